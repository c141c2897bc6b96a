"""TensorRT and Torch-TensorRT export on CPU: the messages when they cannot run, the pure shape and compatibility
logic, and the engine build's command sequence against strict fakes of ``tensorrt`` 8.6, 10.x and 11.x
(tests/fake_tensorrt.py) that record each call and have only the members each release documents.

The real build and run are in test_export_gpu.py.
"""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from edgedistill.errors import UserError
from edgedistill.export import tensorrt as trt_export
from edgedistill.export import torchtrt
from edgedistill.export.tensorrt import (BatchProfile, TrtRunner, aligned, build_engine, check_compatible,
                                         dtype_name, profile_shapes, sidecar_path)
from tests.fake_tensorrt import FakeEngine, fake_tensorrt

GPU = SimpleNamespace(name="NVIDIA GeForce RTX 4090", major=8, minor=9, multi_processor_count=128)
SUPPORTED = ["10.3.0", "10.13.0.35", "11.4.0"]  # JetPack 6.1+, 10.x on x86, 11.x


@pytest.fixture
def calls() -> list:
    return []


@pytest.fixture
def gpu(monkeypatch):
    """torch sees one CUDA device (GPU above), without touching CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: GPU)
    monkeypatch.setattr(trt_export, "board_model", lambda: None)  # not a Jetson


def install(monkeypatch, module: types.ModuleType, name: str = "tensorrt") -> types.ModuleType:
    monkeypatch.setitem(sys.modules, name, module)
    return module


@pytest.fixture
def onnx_file(tmp_path) -> Path:
    path = tmp_path / "student.onnx"
    path.write_bytes(b"fake onnx graph")
    return path


# -------------------------------------------------------------------------------------------- requirements


def test_require_tensorrt_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails exactly as when it is not installed
    with pytest.raises(UserError) as e:
        trt_export.require_tensorrt()
    msg = str(e.value)
    assert msg.startswith("--format trt needs TensorRT, which is not installed (the gpu extra)")
    assert "pip install -e '.[gpu]'" in msg and "\n" not in msg


def test_require_tensorrt_without_gpu(monkeypatch, calls):
    install(monkeypatch, fake_tensorrt(calls))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError) as e:
        trt_export.require_tensorrt()
    msg = str(e.value)
    assert "needs an NVIDIA GPU" in msg and "torch.cuda.is_available() is False" in msg
    assert "not installed" not in msg and "--format onnx" in msg


def test_require_tensorrt_ok(monkeypatch, calls, gpu):
    fake = install(monkeypatch, fake_tensorrt(calls))
    assert trt_export.require_tensorrt() is fake
    assert trt_export.device_metadata(fake) == {"tensorrt_version": "10.3.0", "gpu_name": GPU.name,
                                                "compute_capability": "8.9", "sm_count": 128, "board_model": None,
                                                "cuda": torch.version.cuda}


def test_board_model_comes_from_the_device_tree(monkeypatch, tmp_path):
    from edgedistill import jetson
    model = "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super"
    monkeypatch.setattr(trt_export, "detect_jetson", lambda root=None: jetson.JetsonInfo(model=model, release=None))
    assert trt_export.board_model() == model
    monkeypatch.setattr(trt_export, "detect_jetson", lambda root=None: None)
    assert trt_export.board_model() is None


def test_require_torch_tensorrt_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)
    with pytest.raises(UserError, match=r"needs torch-tensorrt, which is not installed \(the gpu extra\): "
                                        r"pip install -e '\.\[gpu\]'"):
        torchtrt.require_torch_tensorrt()


def test_require_torch_tensorrt_without_gpu(monkeypatch):
    install(monkeypatch, types.ModuleType("torch_tensorrt"), "torch_tensorrt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="Torch-TensorRT export needs an NVIDIA GPU"):
        torchtrt.require_torch_tensorrt()


def test_torchtrt_offers_no_int8(tmp_path):
    with pytest.raises(UserError, match=r"use --format trt --int8"):
        torchtrt.compile_torchtrt(torch.nn.Identity(), torch.zeros(1, 3, 8, 8), BatchProfile(1, 1, 1), "int8",
                                  tmp_path / "m.ep")
    with pytest.raises(UserError, match="choose fp32 or fp16"):
        torchtrt.compile_torchtrt(torch.nn.Identity(), torch.zeros(1, 3, 8, 8), BatchProfile(1, 1, 1), "bf8",
                                  tmp_path / "m.ep")


def test_torchtrt_precision_options_follow_the_installed_api():
    new_api = {"arg_inputs", "use_explicit_typing", "enable_autocast", "autocast_low_precision_type"}
    assert torchtrt.precision_kwargs(new_api, "fp16", torch) == {
        "use_explicit_typing": True, "enable_autocast": True, "autocast_low_precision_type": torch.float16}
    assert torchtrt.precision_kwargs(new_api, "fp32", torch) == {"use_explicit_typing": True}
    middle_api = {"inputs", "enabled_precisions", "use_explicit_typing"}
    assert torchtrt.precision_kwargs(middle_api, "fp16", torch) == {
        "enabled_precisions": {torch.float16, torch.float32}, "use_explicit_typing": False}
    old_api = {"inputs", "enabled_precisions"}
    assert torchtrt.precision_kwargs(old_api, "fp32", torch) == {"enabled_precisions": {torch.float32}}


# ----------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("batch_dim", [-1, "batch", None])
def test_profile_shapes_dynamic_batch(batch_dim):
    shapes = profile_shapes((batch_dim, 3, 224, 224), BatchProfile(1, 8, 32), "image")
    assert shapes == ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))


def test_profile_shapes_fixed_batch_must_match_the_profile():
    assert profile_shapes((1, 77), BatchProfile(1, 1, 1)) == ((1, 77), (1, 77), (1, 77))
    with pytest.raises(UserError) as e:
        profile_shapes((1, 3, 64, 64), BatchProfile(1, 4, 8), "image")
    assert "fixed batch of 1" in str(e.value) and "1/4/8" in str(e.value) and "dynamic batch axis" in str(e.value)


@pytest.mark.parametrize("shape", [(-1, 3, -1, -1), (-1, 3, "height", 224), (-1, None, 224, 224)])
def test_profile_shapes_rejects_dynamic_non_batch_axes(shape):
    with pytest.raises(UserError, match=r"network input 'image' has shape .* only the batch axis may be dynamic"):
        profile_shapes(shape, BatchProfile(1, 1, 4), "image")


def test_profile_shapes_rejects_scalars():
    with pytest.raises(UserError, match="no batch axis"):
        profile_shapes((), BatchProfile(1, 1, 1), "scale")


@pytest.mark.parametrize("values", [(0, 1, 1), (2, 1, 4), (1, 8, 4)])
def test_batch_profile_is_ordered(values):
    with pytest.raises(UserError, match="min <= opt <= max"):
        BatchProfile(*values)


def test_dtype_names():
    trt = fake_tensorrt([])
    assert [dtype_name(getattr(trt.DataType, n)) for n in ("FLOAT", "HALF", "INT8", "INT32", "INT64", "BOOL")] == [
        "float32", "float16", "int8", "int32", "int64", "bool"]
    assert trt_export.torch_dtype(trt.DataType.HALF) is torch.float16


# -------------------------------------------------------------------------------------------- compatibility


NANO = "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super"
ORIN = {"gpu_name": "Orin", "compute_capability": "8.7", "sm_count": 8, "board_model": NANO,
        "tensorrt_version": "10.3.0.30"}
H100 = {"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "sm_count": 132, "board_model": None,
        "tensorrt_version": "11.4.0"}


def test_check_compatible_same_device_passes():
    check_compatible(ORIN, dict(ORIN))
    check_compatible(ORIN, {**ORIN, "cuda": "12.6"})  # the CUDA version is recorded, not compared


@pytest.mark.parametrize("change", [
    {"tensorrt_version": "10.3.1"},        # another patch release: TensorRT refuses the plan
    {"tensorrt_version": "10.3.0.26"},     # another build of the same release
    {"tensorrt_version": "11.4.0"},
    {"compute_capability": "8.6"},
    {"sm_count": 16},                      # "Orin" on Orin Nano and AGX Orin alike: the SM count differs
    {"board_model": "NVIDIA Jetson Orin NX Engineering Reference Developer Kit"},  # same SMs, another module
    {"gpu_name": "NVIDIA Jetson AGX Orin"},
])
def test_check_compatible_refuses_another_device(change):
    current = {**ORIN, **change}
    with pytest.raises(UserError) as e:
        check_compatible(ORIN, current, what="engine model.engine")
    msg = str(e.value)
    assert msg.startswith(f"engine model.engine was built for Orin (sm 8.7, 8 SMs, {NANO}) with TensorRT "
                          f"10.3.0.30; this machine has")
    assert f"with TensorRT {current['tensorrt_version']}" in msg.split("this machine has")[1]
    assert msg.endswith("rebuild it here with `edgedistill export --format trt`") and "\n" not in msg


def test_check_compatible_refuses_metadata_without_the_device_identity():
    old = {k: v for k, v in ORIN.items() if k not in ("sm_count", "board_model")}  # an older edgedistill's sidecar
    with pytest.raises(UserError, match=r"built for Orin \(sm 8\.7, \? SMs\) with TensorRT 10\.3\.0\.30"):
        check_compatible(old, ORIN)


def test_check_compatible_message_names_both_sides():
    with pytest.raises(UserError) as e:
        check_compatible(ORIN, H100)
    assert f"Orin (sm 8.7, 8 SMs, {NANO}) with TensorRT 10.3.0.30" in str(e.value)
    assert "NVIDIA H100 80GB HBM3 (sm 9.0, 132 SMs) with TensorRT 11.4.0" in str(e.value)


# ------------------------------------------------------------------------------------------------- build


@pytest.mark.parametrize("version", SUPPORTED)
def test_build_engine_command_sequence(monkeypatch, calls, gpu, onnx_file, tmp_path, version):
    fake = install(monkeypatch, fake_tensorrt(calls, version=version,
                                              inputs=[("image", (-1, 3, 64, 64)), ("mask", ("batch", 16))]))
    engine, cache = tmp_path / "out" / "student.engine", tmp_path / "cache" / "timing.cache"
    meta = build_engine(onnx_file, engine, BatchProfile(1, 4, 8), 1024, cache, "fp16")

    assert ("create_network", 1 << int(fake.NetworkDefinitionCreationFlag.STRONGLY_TYPED)) in calls
    assert not [c for c in calls if c[0] in ("set_flag", "deprecated")]  # no precision flags, no EXPLICIT_BATCH
    assert ("parse", b"fake onnx graph") in calls
    assert ("set_memory_pool_limit", "WORKSPACE", 1024 << 20) in calls
    assert [c for c in calls if c[0] == "set_shape"] == [  # every input, batch axis from the profile
        ("set_shape", "image", (1, 3, 64, 64), (4, 3, 64, 64), (8, 3, 64, 64)),
        ("set_shape", "mask", (1, 16), (4, 16), (8, 16))]
    assert calls.index(("add_optimization_profile",)) < calls.index(("build_serialized_network",))
    assert ("create_timing_cache", b"") in calls and ("set_timing_cache", b"", False) in calls
    assert ("progress_reported",) in calls

    assert engine.read_bytes() == b"SERIALIZED-ENGINE"
    assert cache.read_bytes() == b"|timed"
    assert not [p for p in engine.parent.iterdir() if p.name.startswith(".")]  # no temporary files left
    on_disk = json.loads(sidecar_path(engine).read_text())
    assert on_disk == meta
    assert meta["sha256"] == hashlib.sha256(b"SERIALIZED-ENGINE").hexdigest()
    assert meta["onnx"]["sha256"] == hashlib.sha256(b"fake onnx graph").hexdigest()
    assert (meta["gpu_name"], meta["compute_capability"], meta["tensorrt_version"]) == (GPU.name, "8.9", version)
    assert (meta["sm_count"], meta["board_model"]) == (128, None)
    assert meta["precision"] == "fp16" and meta["profile"] == {"min": 1, "opt": 4, "max": 8}
    assert meta["inputs"] == [{"name": "image", "shape": [-1, 3, 64, 64], "dtype": "float32"},
                              {"name": "mask", "shape": [-1, 16], "dtype": "float32"}]
    assert meta["outputs"] == [{"name": "embedding", "shape": [-1, 32], "dtype": "float32"}]

    # a second build reuses (and extends) the timing cache the first one wrote
    calls.clear()
    build_engine(onnx_file, tmp_path / "out" / "second.engine", BatchProfile(1, 1, 8), 1024, cache, "fp16")
    assert ("create_timing_cache", b"|timed") in calls and ("set_timing_cache", b"|timed", False) in calls
    assert cache.read_bytes() == b"|timed|timed"


@pytest.mark.parametrize("version", ["8.5.2", "8.6.1"])  # JetPack 5.x, JetPack 6.0
def test_build_engine_refuses_tensorrt_before_10_in_one_line(monkeypatch, calls, gpu, onnx_file, tmp_path, version):
    install(monkeypatch, fake_tensorrt(calls, version=version))
    with pytest.raises(UserError) as e:
        build_engine(onnx_file, tmp_path / "m.engine", BatchProfile(1, 1, 1), 256, tmp_path / "c", "fp16")
    msg = str(e.value)
    assert msg.startswith(f"TensorRT {version} cannot build strongly typed networks") and "\n" not in msg
    assert "TensorRT 10 or newer" in msg and "--format onnx" in msg
    assert calls == [] and not (tmp_path / "m.engine").exists()  # refused before any work


def test_the_fakes_tell_the_releases_apart():
    """What the strict fakes encode (documented removals), so a call valid in one release only fails elsewhere."""
    old, ten, eleven = (fake_tensorrt([], version=v) for v in ("8.6.1", "10.3.0", "11.4.0"))
    assert not hasattr(old.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") and not hasattr(old, "IProgressMonitor")
    assert int(ten.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 1 and hasattr(ten.BuilderFlag, "FP16")
    assert hasattr(ten, "IInt8EntropyCalibrator2")
    assert int(eleven.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 0
    assert not hasattr(eleven.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    assert not hasattr(eleven.BuilderFlag, "FP16") and not hasattr(eleven.BuilderFlag, "INT8")
    assert not hasattr(eleven, "IInt8EntropyCalibrator2")
    with pytest.raises(ValueError, match="invalid flags"):  # EXPLICIT_BATCH's bit means nothing in 11
        eleven.Builder(None).create_network(1 << 3)
    assert not hasattr(FakeEngine(eleven), "device_memory_size") and hasattr(FakeEngine(ten), "device_memory_size")
    config = ten.Builder(None).create_builder_config()
    config.set_flag(ten.BuilderFlag.FP16)
    assert ten.Builder(None).build_serialized_network(  # precision flags on a strongly typed network fail
        ten.Builder(None).create_network(1 << int(ten.NetworkDefinitionCreationFlag.STRONGLY_TYPED)), config) is None


def test_build_engine_replaces_a_foreign_timing_cache(monkeypatch, calls, gpu, onnx_file, tmp_path):
    install(monkeypatch, fake_tensorrt(calls, accept_cache=lambda data: data != b"from another gpu"))
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"from another gpu")
    build_engine(onnx_file, tmp_path / "m.engine", BatchProfile(1, 1, 1), 256, cache, "int8")
    assert ("set_timing_cache", b"from another gpu", False) in calls and ("set_timing_cache", b"", False) in calls
    assert cache.read_bytes() == b"|timed"


def test_build_engine_parse_error_is_one_line(monkeypatch, calls, gpu, onnx_file, tmp_path):
    install(monkeypatch, fake_tensorrt(calls, parse_ok=False))
    with pytest.raises(UserError) as e:
        build_engine(onnx_file, tmp_path / "m.engine", BatchProfile(1, 1, 1), 256, tmp_path / "c", "fp32")
    msg = str(e.value)
    assert "TensorRT cannot parse" in msg and "No importer registered for op: FancyOp (node /blocks/fancy)" in msg
    assert "(and 1 more)" in msg and "\n" not in msg
    assert not (tmp_path / "m.engine").exists()


def test_build_engine_failure(monkeypatch, calls, gpu, onnx_file, tmp_path):
    install(monkeypatch, fake_tensorrt(calls, build_ok=False))
    with pytest.raises(UserError, match=r"could not build an engine .* larger workspace_mb \(now 256\)"):
        build_engine(onnx_file, tmp_path / "m.engine", BatchProfile(1, 2, 4), 256, tmp_path / "c", "fp16")
    assert not (tmp_path / "m.engine").exists() and not sidecar_path(tmp_path / "m.engine").exists()


def test_build_engine_checks_shapes_before_building(monkeypatch, calls, gpu, onnx_file, tmp_path):
    install(monkeypatch, fake_tensorrt(calls, inputs=[("image", (1, 3, 64, 64))]))
    with pytest.raises(UserError, match="fixed batch of 1"):
        build_engine(onnx_file, tmp_path / "m.engine", BatchProfile(1, 4, 8), 256, tmp_path / "c", "fp16")
    assert ("build_serialized_network",) not in calls


def test_build_engine_missing_onnx(monkeypatch, calls, gpu, tmp_path):
    install(monkeypatch, fake_tensorrt(calls))
    with pytest.raises(UserError, match="ONNX model .* not found"):
        build_engine(tmp_path / "nope.onnx", tmp_path / "m.engine", BatchProfile(1, 1, 1), 256, tmp_path / "c",
                     "fp32")


# ------------------------------------------------------------------------------------------------ runner


def write_engine(tmp_path: Path, device: dict, data: bytes = b"SERIALIZED-ENGINE", **extra) -> Path:
    engine = tmp_path / "student.engine"
    engine.write_bytes(data)
    meta = {"sha256": hashlib.sha256(data).hexdigest(), **device,
            "profile": {"min": 1, "opt": 2, "max": 4}, **extra}
    sidecar_path(engine).write_text(json.dumps(meta))
    return engine


HERE = {"gpu_name": GPU.name, "compute_capability": "8.9", "sm_count": 128, "board_model": None,
        "tensorrt_version": "10.3.0"}


def test_runner_refuses_an_engine_from_another_gpu_before_deserialising(monkeypatch, calls, gpu, tmp_path):
    install(monkeypatch, fake_tensorrt(calls, engine="forbidden"))
    engine = write_engine(tmp_path, {**ORIN, "tensorrt_version": "10.3.0"})
    with pytest.raises(UserError) as e:
        TrtRunner(engine)
    msg = str(e.value)
    assert f"engine {engine} was built for Orin (sm 8.7, 8 SMs, {NANO}) with TensorRT 10.3.0" in msg
    assert f"this machine has {GPU.name} (sm 8.9, 128 SMs) with TensorRT 10.3.0" in msg
    assert ("deserialize_cuda_engine",) not in calls


@pytest.mark.parametrize("version", ["10.3.1", "11.4.0"])
def test_runner_refuses_another_tensorrt_version(monkeypatch, calls, gpu, tmp_path, version):
    install(monkeypatch, fake_tensorrt(calls, version=version, engine="forbidden"))
    with pytest.raises(UserError, match=f"with TensorRT 10.3.0; this machine has .* with TensorRT {version}"):
        TrtRunner(write_engine(tmp_path, HERE))


def test_runner_needs_the_sidecar(monkeypatch, calls, gpu, tmp_path):
    install(monkeypatch, fake_tensorrt(calls, engine="forbidden"))
    engine = tmp_path / "student.engine"
    engine.write_bytes(b"x")
    with pytest.raises(UserError, match="has no metadata file student.engine.json"):
        TrtRunner(engine)
    sidecar_path(engine).write_text("{not json")
    with pytest.raises(UserError, match="metadata .* is unreadable"):
        TrtRunner(engine)
    with pytest.raises(UserError, match="not found"):
        TrtRunner(tmp_path / "missing.engine")


def test_runner_checks_the_sha256(monkeypatch, calls, gpu, tmp_path):
    install(monkeypatch, fake_tensorrt(calls, engine="forbidden"))
    engine = write_engine(tmp_path, HERE)
    engine.write_bytes(b"SERIALIZED-ENGINE but truncated or swapped")
    with pytest.raises(UserError, match="does not match the sha256 in student.engine.json"):
        TrtRunner(engine)
    assert ("deserialize_cuda_engine",) not in calls


def test_runner_deserialise_failure(monkeypatch, calls, gpu, tmp_path):
    install(monkeypatch, fake_tensorrt(calls, engine=None))
    with pytest.raises(UserError, match="TensorRT could not load engine .* rebuild it here"):
        TrtRunner(write_engine(tmp_path, HERE))
    assert ("deserialize_cuda_engine",) in calls


@pytest.mark.parametrize("version", SUPPORTED)
def test_runner_io_and_input_checks(monkeypatch, calls, gpu, tmp_path, version):
    install(monkeypatch, fake_tensorrt(calls, version=version, engine=FakeEngine))
    runner = TrtRunner(write_engine(tmp_path, {**HERE, "tensorrt_version": version}))
    assert runner.input_names == ["image"] and runner.output_names == ["embedding"]
    assert runner.dtypes == {"image": torch.float32, "embedding": torch.float16}
    assert (runner.profile.min, runner.profile.max) == (1, 4)
    # shape checks come before anything touches CUDA
    with pytest.raises(UserError, match=r"batch 5 is outside engine student.engine's profile 1\.\.4"):
        runner.run({"image": torch.zeros(5, 3, 64, 64)})
    with pytest.raises(UserError, match=r"input 'image' has shape \(2, 3, 32, 32\); .* expects \(B, 3, 64, 64\)"):
        runner.run({"image": torch.zeros(2, 3, 32, 32)})
    with pytest.raises(UserError, match="must be a contiguous CUDA tensor of torch.float32"):
        runner.run({"image": torch.zeros(2, 3, 64, 64)})
    with pytest.raises(UserError, match="has no input 'pixels'"):
        runner._feeds((), {"pixels": torch.zeros(1, 3, 64, 64)})
    with pytest.raises(UserError, match="needs input"):
        runner._feeds((), {})
    # engine activation memory: device_memory_size_v2 from 10.1, the only one in 11
    from edgedistill.bench.backends import TensorRtRunner
    wrapper = TensorRtRunner.__new__(TensorRtRunner)
    wrapper.runner = runner
    assert wrapper.peak_memory() == (3.0, "engine activation memory")


def test_aligned_copies_only_misaligned_tensors():
    tokens = torch.arange(10 * 77, dtype=torch.int64).reshape(10, 77)
    base = aligned(tokens)
    assert base.data_ptr() % 256 == 0
    view = base[1:]  # starts 616 bytes into the block: not 256-byte aligned
    assert view.data_ptr() % 256 != 0
    fixed = aligned(view)
    assert fixed.data_ptr() % 256 == 0 and fixed.data_ptr() != view.data_ptr()
    assert torch.equal(fixed, view) and fixed.shape == view.shape and fixed.is_contiguous()
    assert aligned(fixed) is fixed  # aligned tensors are used as they are, no copy
    half = torch.zeros(3, 7, dtype=torch.float16)[1:]
    assert aligned(half).data_ptr() % 256 == 0 and torch.equal(aligned(half), half)


def test_runner_binds_aligned_addresses(monkeypatch, calls, gpu, tmp_path):
    """TensorRT refuses (or misreads) an address that is not 256-byte aligned: a sliced batch is copied first."""
    install(monkeypatch, fake_tensorrt(calls, engine=FakeEngine))
    runner = TrtRunner(write_engine(tmp_path, HERE))
    runner.device = "cpu"  # bind without CUDA; the fake context checks the addresses
    images = aligned(torch.randn(4, 3, 64, 64))
    sliced = images.view(-1)[1:1 + 3 * 3 * 64 * 64].view(3, 3, 64, 64)  # one float past an aligned start
    assert sliced.data_ptr() % 256 != 0
    inputs, outputs = runner._bind({"image": sliced})
    addresses = runner.context.addresses
    assert addresses["image"] % 256 == 0 and addresses["image"] == inputs["image"].data_ptr()
    assert torch.equal(inputs["image"], sliced)
    assert addresses["embedding"] == outputs["embedding"].data_ptr() and outputs["embedding"].shape == (3, 32)
    assert runner.context.shapes == {"image": (3, 3, 64, 64)}
    runner.context.set_tensor_address = lambda name, memory: False
    with pytest.raises(UserError, match="TensorRT refused the address of tensor 'image'"):
        runner._bind({"image": images[:2]})


# ------------------------------------------------------------------------------------------ Torch-TensorRT


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).relu().mean((2, 3)))


def fake_torch_tensorrt(calls: list, new_api: bool) -> types.ModuleType:
    """A stand-in ``torch_tensorrt``: 'compiles' an ExportedProgram to its module, saves with torch.export."""
    ttrt = types.ModuleType("torch_tensorrt")
    ttrt.__version__ = "2.10.0" if new_api else "2.6.0"

    class Input:
        def __init__(self, **kwargs: Any) -> None:
            self.kwargs = kwargs

    if new_api:
        def compile_(program, *, arg_inputs=None, inputs=None, use_explicit_typing=True, enable_autocast=False,
                     autocast_low_precision_type=None, **kwargs):
            calls.append(("compile", arg_inputs[0].kwargs, use_explicit_typing, enable_autocast,
                          autocast_low_precision_type, kwargs))
            return program.module()

        def save(module, file_path, *, arg_inputs=None, inputs=None, retrace=True, dynamic_shapes=None, **kw):
            calls.append(("save", dynamic_shapes, retrace))
            torch.export.save(torch.export.export(module, tuple(arg_inputs), dynamic_shapes=dynamic_shapes),
                              file_path)
    else:
        def compile_(program, inputs=None, *, enabled_precisions=None, **kwargs):
            calls.append(("compile", inputs[0].kwargs, enabled_precisions, kwargs))
            return program.module()

        def save(module, file_path, *, inputs=None, retrace=False, **kw):
            calls.append(("save", retrace))
            torch.export.save(torch.export.export(module, tuple(inputs), dynamic_shapes=({0: torch.export.Dim(
                "b", min=1, max=4)},)), file_path)

    ttrt.Input, ttrt.save = Input, save
    ttrt.compile = lambda module, ir="default", inputs=None, arg_inputs=None, **kwargs: None
    ttrt.dynamo = SimpleNamespace(compile=compile_)
    return ttrt


@pytest.mark.parametrize("new_api", [True, False])
def test_torchtrt_compile_save_load_orchestration(monkeypatch, calls, gpu, tmp_path, new_api):
    install(monkeypatch, fake_tensorrt(calls))
    install(monkeypatch, fake_torch_tensorrt(calls, new_api), "torch_tensorrt")
    monkeypatch.setattr(torchtrt, "DEVICE", "cpu")
    torch.manual_seed(0)
    model = TinyNet()
    out = tmp_path / "programs" / "student.ep"
    meta = torchtrt.compile_torchtrt(model, torch.zeros(1, 3, 16, 16), BatchProfile(1, 1, 4), "fp16", out)

    compile_call = next(c for c in calls if c[0] == "compile")
    shapes = compile_call[1]
    assert (shapes["min_shape"], shapes["opt_shape"], shapes["max_shape"]) == (
        (1, 3, 16, 16), (1, 3, 16, 16), (4, 3, 16, 16))
    if new_api:  # strongly typed release: autocast to fp16, no enabled_precisions
        assert compile_call[2:5] == (True, True, torch.float16) and "enabled_precisions" not in compile_call[5]
        assert next(c for c in calls if c[0] == "save")[1] is not None  # batch range passed to the re-export
        assert meta["precision_api"] == "autocast"
    else:
        assert compile_call[2] == {torch.float16, torch.float32}
        assert ("save", False) in calls  # keep the symbolic batch instead of re-tracing at one size
        assert meta["precision_api"] == "enabled_precisions"

    assert out.is_file() and [p.name for p in out.parent.iterdir()] == ["student.ep", "student.ep.json"]
    assert json.loads(sidecar_path(out).read_text()) == meta
    assert meta["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert (meta["gpu_name"], meta["torch_tensorrt_version"], meta["precision"]) == (
        GPU.name, "2.10.0" if new_api else "2.6.0", "fp16")

    loaded = torchtrt.load_torchtrt(out)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            assert torch.allclose(loaded(x), model(x), atol=1e-5)

    sidecar = json.loads(sidecar_path(out).read_text())
    sidecar_path(out).write_text(json.dumps({**sidecar, "gpu_name": "Orin", "compute_capability": "8.7"}))
    with pytest.raises(UserError, match=r"Torch-TensorRT program .* was built for Orin .* recompile it here"):
        torchtrt.load_torchtrt(out)


class TinyText(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(100, 8)
        self.proj = torch.nn.Linear(8, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        return self.proj(x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)])


def test_torchtrt_keeps_integer_token_inputs(monkeypatch, calls, gpu, tmp_path):
    install(monkeypatch, fake_tensorrt(calls))
    install(monkeypatch, fake_torch_tensorrt(calls, new_api=True), "torch_tensorrt")
    monkeypatch.setattr(torchtrt, "DEVICE", "cpu")
    model = TinyText()
    tokens = torch.randint(0, 100, (1, 16))
    meta = torchtrt.compile_torchtrt(model, tokens, BatchProfile(1, 2, 4), "fp32", tmp_path / "text.ep")
    spec = next(c for c in calls if c[0] == "compile")[1]
    assert spec["dtype"] == torch.int64 and spec["max_shape"] == (4, 16)
    assert meta["input_dtype"] == "int64" and meta["precision_api"] == "explicit_typing"
    x = torch.randint(0, 100, (3, 16))
    with torch.no_grad():
        assert torch.allclose(torchtrt.load_torchtrt(tmp_path / "text.ep")(x), model(x))


def test_torchtrt_program_that_does_not_load_is_one_line(monkeypatch, calls, gpu, tmp_path):
    """A program whose sha256 matches but which torch cannot load (another torch / torch-tensorrt, a truncated
    copy re-hashed by hand): one line naming the versions it needs, no traceback."""
    install(monkeypatch, fake_tensorrt(calls))
    install(monkeypatch, fake_torch_tensorrt(calls, new_api=True), "torch_tensorrt")
    monkeypatch.setattr(torchtrt, "DEVICE", "cpu")
    out = tmp_path / "student.ep"
    torchtrt.compile_torchtrt(TinyNet(), torch.zeros(1, 3, 16, 16), BatchProfile(1, 1, 4), "fp16", out)
    out.write_bytes(b"PK\x03\x04 not a torch.export archive")
    meta = json.loads(sidecar_path(out).read_text())
    sidecar_path(out).write_text(json.dumps({**meta, "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}))
    with pytest.raises(UserError) as e:
        torchtrt.load_torchtrt(out)
    msg = str(e.value)
    assert msg.startswith(f"Torch-TensorRT program {out} does not load here (") and "\n" not in msg
    assert f"torch {torch.__version__} / torch-tensorrt 2.10.0" in msg and msg.endswith("--format torchtrt`")
