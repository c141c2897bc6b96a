"""TensorRT and Torch-TensorRT export on CPU: the messages when they cannot run, the pure shape and compatibility
logic, the engine build's command sequence against strict fakes of ``tensorrt`` 8.6, 10.x and 11.x
(tests/fake_tensorrt.py) that record each call and have only the members each release documents, and the
runtime's torch-free engine runner against a strict fake of cuda-python's runtime bindings (tests/fake_cudart.py)
whose device memory the fake engine really computes through.

The real build and run are in test_export_gpu.py.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from edgedistill.core.errors import UserError
from edgedistill.export import tensorrt as trt_export
from edgedistill.export import torchtrt
from edgedistill.export.tensorrt import (BatchProfile, build_engine, check_compatible, network_flags,
                                         profile_shapes, sidecar_path)
from edgedistill.runtime import cuda as rt_cuda
from edgedistill.runtime import tensorrt as rt_trt
from edgedistill.runtime.backends import TensorRtRunner
from edgedistill.runtime.tensorrt import TrtRunner, dtype_name, numpy_dtype
from tests.fake_cudart import FUNCTIONS, FakeCuda, block_cuda_python
from tests.fake_tensorrt import FakeEngine, fake_tensorrt

GPU = SimpleNamespace(name="NVIDIA GeForce RTX 4090", major=8, minor=9, multi_processor_count=128)
SUPPORTED = ["10.3.0", "10.13.0.35", "11.4.0"]  # JetPack 6.1+, 10.x on x86, 11.x


@pytest.fixture
def calls() -> list:
    return []


@pytest.fixture
def cuda(monkeypatch) -> FakeCuda:
    """cuda-python sees one GPU (GPU above, CUDA 12.6) whose memory is numpy buffers; not a Jetson."""
    fake = FakeCuda(name=GPU.name, capability=(GPU.major, GPU.minor), sm_count=GPU.multi_processor_count)
    fake.install(monkeypatch)
    monkeypatch.setattr(rt_trt, "board_model", lambda: None)
    return fake


@pytest.fixture
def gpu(monkeypatch, cuda):
    """The same GPU seen by cuda-python (the engine side) and by torch (Torch-TensorRT), without touching CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: GPU)
    return cuda


def install(monkeypatch, module: types.ModuleType, name: str = "tensorrt") -> types.ModuleType:
    monkeypatch.setitem(sys.modules, name, module)
    return module


def onnx_bytes() -> bytes:
    """A real (tiny) ONNX ModelProto: what TensorRT's parser accepts (the fake refuses anything else)."""
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["image"], ["embedding"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


MODEL = onnx_bytes()


@pytest.fixture
def onnx_file(tmp_path) -> Path:
    path = tmp_path / "student.onnx"
    path.write_bytes(MODEL)
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
    FakeCuda(devices=0).install(monkeypatch)
    with pytest.raises(UserError) as e:
        trt_export.require_tensorrt()
    msg = str(e.value)
    assert msg.startswith("--format trt needs an NVIDIA GPU and CUDA sees none (cudaGetDeviceCount: "
                          "cudaErrorNoDevice: no CUDA-capable device is detected)")
    assert "not installed" not in msg and "--format onnx" in msg and "\n" not in msg


def test_require_tensorrt_without_cuda_python(monkeypatch, calls):
    install(monkeypatch, fake_tensorrt(calls))
    block_cuda_python(monkeypatch)
    with pytest.raises(UserError) as e:
        trt_export.require_tensorrt()
    assert str(e.value).startswith("--format trt needs NVIDIA's cuda-python, which is not installed: "
                                   "pip install -e '.[gpu]' (cuda-python)")
    assert rt_cuda.cuda_python_missing().startswith("cuda-python is not installed")


def test_require_tensorrt_ok(monkeypatch, calls, cuda):
    fake = install(monkeypatch, fake_tensorrt(calls))
    assert trt_export.require_tensorrt() is fake
    assert trt_export.device_metadata(fake) == {"tensorrt_version": "10.3.0", "gpu_name": GPU.name,
                                                "compute_capability": "8.9", "sm_count": 128, "board_model": None,
                                                "cuda": "12.6"}
    # the identity comes from cuda-python, not torch: the device layer has no torch
    assert ("cudaGetDeviceProperties", 0) in cuda.calls and ("cudaRuntimeGetVersion",) in cuda.calls


@pytest.mark.parametrize("version", ["8.5.2", "8.6.1"])  # JetPack 5.x, JetPack 6.0
def test_require_tensorrt_refuses_releases_before_10_before_touching_cuda(monkeypatch, calls, cuda, version):
    install(monkeypatch, fake_tensorrt(calls, version=version))
    with pytest.raises(UserError) as e:
        trt_export.require_tensorrt()
    msg = str(e.value)
    assert msg.startswith(f"--format trt needs TensorRT 10 or newer (strongly typed networks: precision lives in "
                          f"the graph) and TensorRT {version} is installed")
    assert "JetPack 6.1+ ships 10.3" in msg and "--format onnx" in msg and "\n" not in msg
    assert cuda.calls == [] and calls == []  # refused before CUDA or TensorRT did anything


def test_export_trt_refuses_tensorrt_8_before_the_onnx_export_and_calibration(monkeypatch, calls, gpu, tmp_path):
    """`edgedistill export --format trt --int8` on TensorRT 8.6 stops in _check_backend (the format's
    ``requires``), before any graph is exported or calibrated; the refusal used to come from build_engine, after
    both had run."""
    from edgedistill.export import exporter

    install(monkeypatch, fake_tensorrt(calls, version="8.6.1"))
    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    (run / "recipe.yaml").write_text("name: r\n")
    started = []
    monkeypatch.setattr(exporter, "_export_run", lambda *a, **k: started.append(a))
    with pytest.raises(UserError, match=r"--format trt needs TensorRT 10 or newer .* TensorRT 8\.6\.1 is installed"):
        exporter.run_export(exporter.ExportOptions(run_dir=run, format="trt", int8=True, out=tmp_path / "out"))
    assert started == [] and gpu.calls == [] and not (tmp_path / "out").exists()


def test_board_model_comes_from_the_device_tree(monkeypatch, tmp_path):
    import edgedistill.runtime.jetson as jetson
    model = "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super"
    monkeypatch.setattr(rt_trt, "detect_jetson", lambda root=None: jetson.JetsonInfo(model=model, release=None))
    assert rt_trt.board_model() == model
    monkeypatch.setattr(rt_trt, "detect_jetson", lambda root=None: None)
    assert rt_trt.board_model() is None


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
    # fp32 never asks for weak typing: strong typing where the switch exists, else the release's default
    assert torchtrt.precision_kwargs(middle_api, "fp32", torch) == {"use_explicit_typing": True}
    old_api = {"inputs", "enabled_precisions"}
    assert torchtrt.precision_kwargs(old_api, "fp32", torch) == {}
    assert torchtrt.precision_kwargs(old_api, "fp16", torch) == {
        "enabled_precisions": {torch.float16, torch.float32}}


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
    assert numpy_dtype(trt.DataType.HALF) == np.float16 and numpy_dtype(trt.DataType.INT64) == np.int64
    with pytest.raises(UserError, match="TensorRT type bfloat16, which numpy and this runner do not handle"):
        numpy_dtype(trt.DataType.BF16)


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
def test_build_engine_command_sequence(monkeypatch, calls, cuda, onnx_file, tmp_path, version):
    fake = install(monkeypatch, fake_tensorrt(calls, version=version,
                                              inputs=[("image", (-1, 3, 64, 64)), ("mask", ("batch", 16))]))
    engine, cache = tmp_path / "out" / "student.engine", tmp_path / "cache" / "timing.cache"
    meta = build_engine(onnx_file, engine, BatchProfile(1, 4, 8), 1024, cache, "fp16")

    assert ("create_network", 1 << int(fake.NetworkDefinitionCreationFlag.STRONGLY_TYPED)) in calls
    assert not [c for c in calls if c[0] in ("set_flag", "deprecated")]  # no precision flags, no EXPLICIT_BATCH
    assert ("parse", MODEL) in calls
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
    assert meta["onnx"]["sha256"] == hashlib.sha256(MODEL).hexdigest()
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
def test_build_engine_refuses_tensorrt_before_10_in_one_line(monkeypatch, calls, cuda, onnx_file, tmp_path, version):
    fake = install(monkeypatch, fake_tensorrt(calls, version=version))
    with pytest.raises(UserError) as e:
        build_engine(onnx_file, tmp_path / "m.engine", BatchProfile(1, 1, 1), 256, tmp_path / "c", "fp16")
    msg = str(e.value)
    assert "needs TensorRT 10 or newer" in msg and f"TensorRT {version} is installed" in msg and "\n" not in msg
    assert calls == [] and cuda.calls == [] and not (tmp_path / "m.engine").exists()  # refused before any work
    # and the builder's own guard, should a release without strong typing get that far
    with pytest.raises(UserError, match=f"TensorRT {version} cannot build strongly typed networks"):
        network_flags(fake)


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
    # as strict as the real API where a runner can go wrong: the profile, a failing enqueue, bytes that are not ONNX
    context = FakeEngine(ten, profile=(1, 4)).create_execution_context()
    assert context.set_input_shape("image", (4, 3, 64, 64)) is True
    assert context.set_input_shape("image", (5, 3, 64, 64)) is False       # beyond the profile's max
    assert context.set_input_shape("image", (2, 3, 32, 32)) is False       # another item shape
    assert context.set_input_shape("embedding", (2, 32)) is False          # not an input
    assert context.execute_async_v3(0) is False                            # no tensor address bound
    failing = FakeEngine(ten, execute_ok=False).create_execution_context()
    failing.set_input_shape("image", (1, 3, 64, 64))
    failing.addresses = {"image": 256, "embedding": 512}
    assert failing.execute_async_v3(0) is False
    parser = ten.OnnxParser(ten.Builder(None).create_network(1 << 1), None)
    assert parser.parse(b"fake onnx graph") is False and "not a ModelProto" in parser.get_error(0).desc()
    assert ten.OnnxParser(ten.Builder(None).create_network(1 << 1), None).parse(MODEL) is True
    config = ten.Builder(None).create_builder_config()
    config.set_flag(ten.BuilderFlag.FP16)
    assert ten.Builder(None).build_serialized_network(  # precision flags on a strongly typed network fail
        ten.Builder(None).create_network(1 << int(ten.NetworkDefinitionCreationFlag.STRONGLY_TYPED)), config) is None


def test_build_engine_replaces_a_foreign_timing_cache(monkeypatch, calls, cuda, onnx_file, tmp_path):
    install(monkeypatch, fake_tensorrt(calls, accept_cache=lambda data: data != b"from another gpu"))
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"from another gpu")
    build_engine(onnx_file, tmp_path / "m.engine", BatchProfile(1, 1, 1), 256, cache, "int8")
    assert ("set_timing_cache", b"from another gpu", False) in calls and ("set_timing_cache", b"", False) in calls
    assert cache.read_bytes() == b"|timed"


def test_build_engine_parse_error_is_one_line(monkeypatch, calls, cuda, onnx_file, tmp_path):
    install(monkeypatch, fake_tensorrt(calls, parse_ok=False))
    with pytest.raises(UserError) as e:
        build_engine(onnx_file, tmp_path / "m.engine", BatchProfile(1, 1, 1), 256, tmp_path / "c", "fp32")
    msg = str(e.value)
    assert "TensorRT cannot parse" in msg and "No importer registered for op: FancyOp (node /blocks/fancy)" in msg
    assert "(and 1 more)" in msg and "\n" not in msg
    assert not (tmp_path / "m.engine").exists()


def test_build_engine_refuses_bytes_that_are_not_onnx(monkeypatch, calls, cuda, tmp_path):
    """TensorRT's parser refuses a file that is not an ONNX ModelProto (a truncated copy, the wrong file): one line,
    no engine (the fake used to accept any bytes and build)."""
    install(monkeypatch, fake_tensorrt(calls))
    bad = tmp_path / "student.onnx"
    bad.write_bytes(MODEL[: len(MODEL) // 2])  # a half-copied graph
    with pytest.raises(UserError) as e:
        build_engine(bad, tmp_path / "m.engine", BatchProfile(1, 1, 1), 256, tmp_path / "c", "fp16")
    msg = str(e.value)
    assert msg.startswith(f"TensorRT cannot parse {bad}: Failed to parse ONNX model") and "\n" not in msg
    assert ("build_serialized_network",) not in calls and not (tmp_path / "m.engine").exists()


def test_build_engine_failure(monkeypatch, calls, cuda, onnx_file, tmp_path):
    install(monkeypatch, fake_tensorrt(calls, build_ok=False))
    with pytest.raises(UserError, match=r"could not build an engine .* larger workspace_mb \(now 256\)"):
        build_engine(onnx_file, tmp_path / "m.engine", BatchProfile(1, 2, 4), 256, tmp_path / "c", "fp16")
    assert not (tmp_path / "m.engine").exists() and not sidecar_path(tmp_path / "m.engine").exists()


def test_build_engine_checks_shapes_before_building(monkeypatch, calls, cuda, onnx_file, tmp_path):
    install(monkeypatch, fake_tensorrt(calls, inputs=[("image", (1, 3, 64, 64))]))
    with pytest.raises(UserError, match="fixed batch of 1"):
        build_engine(onnx_file, tmp_path / "m.engine", BatchProfile(1, 4, 8), 256, tmp_path / "c", "fp16")
    assert ("build_serialized_network",) not in calls


def test_build_engine_missing_onnx(monkeypatch, calls, cuda, tmp_path):
    install(monkeypatch, fake_tensorrt(calls))
    with pytest.raises(UserError, match="ONNX model .* not found"):
        build_engine(tmp_path / "nope.onnx", tmp_path / "m.engine", BatchProfile(1, 1, 1), 256, tmp_path / "c",
                     "fp32")


# ------------------------------------------------------------------------------------------------ runner


def write_engine(tmp_path: Path, device: dict, data: bytes = b"SERIALIZED-ENGINE", profile: tuple = (1, 2, 4),
                 **extra) -> Path:
    engine = tmp_path / "student.engine"
    engine.write_bytes(data)
    meta = {"sha256": hashlib.sha256(data).hexdigest(), **device,
            "profile": dict(zip(("min", "opt", "max"), profile)), **extra}
    sidecar_path(engine).write_text(json.dumps(meta))
    return engine


HERE = {"gpu_name": GPU.name, "compute_capability": "8.9", "sm_count": 128, "board_model": None,
        "tensorrt_version": "10.3.0"}


def computing(cuda: FakeCuda, **options: Any) -> Any:
    """A FakeEngine factory whose context computes through ``cuda``'s device memory."""
    return functools.partial(FakeEngine, memory=cuda, **options)


def images(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 64, 64)).astype(np.float32)


def assert_embeds(got: np.ndarray, x: np.ndarray) -> None:
    """``got`` is what the fake engine computes for ``x`` (to float16 rounding: BLAS sums in batch-dependent order)."""
    assert got.shape == (len(x), 32)
    np.testing.assert_allclose(np.asarray(got, np.float32), FakeEngine.expected(x).astype(np.float32), rtol=2e-3,
                               atol=2e-3)


def test_runner_refuses_an_engine_from_another_gpu_before_deserialising(monkeypatch, calls, cuda, tmp_path):
    install(monkeypatch, fake_tensorrt(calls, engine="forbidden"))
    engine = write_engine(tmp_path, {**ORIN, "tensorrt_version": "10.3.0"})
    with pytest.raises(UserError) as e:
        TrtRunner(engine)
    msg = str(e.value)
    assert f"engine {engine} was built for Orin (sm 8.7, 8 SMs, {NANO}) with TensorRT 10.3.0" in msg
    assert f"this machine has {GPU.name} (sm 8.9, 128 SMs) with TensorRT 10.3.0" in msg
    assert ("deserialize_cuda_engine",) not in calls and not cuda.memory


@pytest.mark.parametrize("version", ["10.3.1", "11.4.0"])
def test_runner_refuses_another_tensorrt_version(monkeypatch, calls, cuda, tmp_path, version):
    install(monkeypatch, fake_tensorrt(calls, version=version, engine="forbidden"))
    with pytest.raises(UserError, match=f"with TensorRT 10.3.0; this machine has .* with TensorRT {version}"):
        TrtRunner(write_engine(tmp_path, HERE))


def test_runner_needs_the_sidecar(monkeypatch, calls, cuda, tmp_path):
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


def test_runner_checks_the_sha256(monkeypatch, calls, cuda, tmp_path):
    install(monkeypatch, fake_tensorrt(calls, engine="forbidden"))
    engine = write_engine(tmp_path, HERE)
    engine.write_bytes(b"SERIALIZED-ENGINE but truncated or swapped")
    with pytest.raises(UserError, match="does not match the sha256 in student.engine.json"):
        TrtRunner(engine)
    assert ("deserialize_cuda_engine",) not in calls


def test_runner_deserialise_failure(monkeypatch, calls, cuda, tmp_path):
    install(monkeypatch, fake_tensorrt(calls, engine=None))
    with pytest.raises(UserError, match="TensorRT could not load engine .* rebuild it here"):
        TrtRunner(write_engine(tmp_path, HERE))
    assert ("deserialize_cuda_engine",) in calls


@pytest.mark.parametrize("version", SUPPORTED)
def test_runner_runs_numpy_through_preallocated_device_buffers(monkeypatch, calls, cuda, tmp_path, version):
    """Real numbers flow: host -> cudaMalloc'd buffer -> the engine -> output buffer -> host, with the buffers
    allocated once for the profile's max batch (256-byte aligned, bound once) and reused by every call."""
    install(monkeypatch, fake_tensorrt(calls, version=version, engine=computing(cuda)))
    runner = TrtRunner(write_engine(tmp_path, {**HERE, "tensorrt_version": version}))
    assert runner.input_names == ["image"] and runner.output_names == ["embedding"]
    assert runner.dtypes == {"image": np.float32, "embedding": np.float16}
    assert runner.max_shapes == {"image": (4, 3, 64, 64), "embedding": (4, 32)}
    context = runner.engine.contexts[0]
    allocations = [c for c in cuda.calls if c[0] == "cudaMalloc"]
    assert [c[1] for c in allocations] == [4 * 3 * 64 * 64 * 4, 4 * 32 * 2]  # max batch, engine dtypes
    assert all(address % 256 == 0 for address in cuda.memory) and len(cuda.streams) == 1
    assert context.addresses == {"image": runner._buffers["image"], "embedding": runner._buffers["embedding"]}

    for batch in (3, 1, 4):
        x = images(batch, seed=batch)
        got = runner(x)
        assert got.dtype == np.float16 and got.shape == (batch, 32)
        assert_embeds(got, x)
        assert context.shapes["image"] == (batch, 3, 64, 64)
    assert len([c for c in cuda.calls if c[0] == "cudaMalloc"]) == 2  # nothing allocated after the constructor
    assert len([c for c in context.calls if c[0] == "set_tensor_address"]) == 2  # bound once
    copies = [c[1] for c in cuda.calls if c[0] == "cudaMemcpyAsync"]
    assert copies == ["cudaMemcpyHostToDevice", "cudaMemcpyDeviceToHost"] * 3
    handle = next(iter(cuda.streams))
    assert [c for c in context.calls if c[0] == "execute_async_v3"] == [("execute_async_v3", handle)] * 3
    # by name too; every output of run() by name
    assert_embeds(runner(image=images(2)), images(2))
    assert set(runner.run(runner.feeds((images(1),), {}))) == {"embedding"}

    runner.close()
    assert cuda.memory == {} and cuda.streams == set()  # every buffer freed, the stream destroyed
    runner.close()  # idempotent
    with pytest.raises(UserError, match="was closed"):
        runner(images(1))


def test_runner_checks_inputs_and_the_profile_before_tensorrt(monkeypatch, calls, cuda, tmp_path):
    install(monkeypatch, fake_tensorrt(calls, engine=computing(cuda)))
    runner = TrtRunner(write_engine(tmp_path, HERE))
    context = runner.engine.contexts[0]
    before = (list(cuda.calls), list(context.calls))
    with pytest.raises(UserError, match=r"batch 5 is outside engine student.engine's profile 1\.\.4"):
        runner(images(5))
    with pytest.raises(UserError, match=r"input 'image' has shape \(2, 3, 32, 32\); .* expects \(B, 3, 64, 64\)"):
        runner(np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(UserError, match=r"input 'image' of engine student.engine is float32; got int64"):
        runner(np.zeros((2, 3, 64, 64), np.int64))
    with pytest.raises(UserError, match="has no input 'pixels'"):
        runner(pixels=images(1))
    with pytest.raises(UserError, match="needs input"):
        runner()
    assert (cuda.calls, context.calls) == before  # all of it refused before TensorRT or CUDA was asked
    assert runner(images(2).astype(np.float64)).shape == (2, 32)  # floats of another width are converted


def test_tensorrt_refusing_a_shape_is_a_user_error(monkeypatch, calls, cuda, tmp_path):
    """An engine whose own profile is narrower than its sidecar says: TensorRT's False becomes one line."""
    install(monkeypatch, fake_tensorrt(calls, engine=computing(cuda, profile=(1, 2))))
    with pytest.raises(UserError) as e:
        TrtRunner(write_engine(tmp_path, HERE))
    assert "rejects input 'image' of shape (4, 3, 64, 64), the batch max of its sidecar's profile 1/2/4" in \
        str(e.value)
    assert cuda.memory == {} and cuda.streams == set()  # what was made before the refusal is released


def test_a_failing_enqueue_is_a_user_error(monkeypatch, calls, cuda, tmp_path):
    install(monkeypatch, fake_tensorrt(calls, engine=computing(cuda, execute_ok=False)))
    runner = TrtRunner(write_engine(tmp_path, HERE))
    with pytest.raises(UserError) as e:
        runner(images(2))
    assert str(e.value) == ("TensorRT failed to run engine student.engine (its log above says why): rebuild it "
                            "here with `edgedistill export --format trt`")


def test_cuda_errors_are_one_line_and_release_what_was_allocated(monkeypatch, calls, tmp_path):
    cuda = FakeCuda(name=GPU.name, capability=(8, 9), sm_count=128,
                    fail={"cudaMalloc": ("cudaErrorMemoryAllocation", 1)})  # the second buffer does not fit
    cuda.install(monkeypatch)
    monkeypatch.setattr(rt_trt, "board_model", lambda: None)
    install(monkeypatch, fake_tensorrt(calls, engine=computing(cuda)))
    with pytest.raises(UserError) as e:
        TrtRunner(write_engine(tmp_path, HERE))
    msg = str(e.value)
    assert msg.startswith("CUDA cudaMalloc of 256 bytes for tensor 'embedding' failed (cudaErrorMemoryAllocation: "
                          "out of memory): the GPU is out of memory") and "\n" not in msg
    assert cuda.memory == {} and cuda.streams == set()  # the first buffer and the stream were released


def test_cuda_malloc_alignment_is_checked(monkeypatch, calls, tmp_path):
    cuda = FakeCuda(name=GPU.name, capability=(8, 9), sm_count=128, misalign=True)
    cuda.install(monkeypatch)
    monkeypatch.setattr(rt_trt, "board_model", lambda: None)
    install(monkeypatch, fake_tensorrt(calls, engine=computing(cuda)))
    with pytest.raises(UserError, match=r"cudaMalloc returned address 0x[0-9a-f]+ for tensor 'image', not 256-byte "
                                        r"aligned as TensorRT requires"):
        TrtRunner(write_engine(tmp_path, HERE))
    assert cuda.memory == {}


def test_cuda_python_before_12_8_is_imported_from_cuda_cudart(monkeypatch, calls, tmp_path):
    cuda = FakeCuda(name=GPU.name, capability=(8, 9), sm_count=128)
    cuda.install(monkeypatch, path="cuda.cudart")
    monkeypatch.setattr(rt_trt, "board_model", lambda: None)
    install(monkeypatch, fake_tensorrt(calls, engine=computing(cuda)))
    assert rt_cuda.cuda_python_missing() is None
    with TrtRunner(write_engine(tmp_path, HERE)) as runner:
        assert_embeds(runner(images(1)), images(1))
    assert cuda.memory == {}


@pytest.mark.parametrize("version, memory", [("10.0.1", 2.0), ("10.3.0", 3.0), ("11.4.0", 3.0)])
def test_the_bench_runner_stages_calls_and_reads_back(monkeypatch, calls, cuda, tmp_path, version, memory):
    """runtime.backends.TensorRtRunner: stage copies in, call runs and waits (so the bench's wall-clock timer is
    right: timer "cpu"), to_numpy copies out; nothing is allocated in a timed call; the engine's memory is
    device_memory_size_v2 from 10.1 (the only one in 11), device_memory_size before."""
    install(monkeypatch, fake_tensorrt(calls, version=version, engine=computing(cuda)))
    runner = TensorRtRunner.open("tensorrt", write_engine(tmp_path, {**HERE, "tensorrt_version": version}),
                                 {"format": "trt"}, None)
    assert (runner.backend, runner.timer, runner.version) == ("tensorrt", "cpu", version)
    assert (runner.min_batch, runner.max_batch) == (1, 4)
    x = images(3)
    staged = runner.stage(x)
    before = list(cuda.calls)
    for _ in range(3):
        runner.call(staged)  # what bench times
    timed = cuda.calls[len(before):]
    assert [c[0] for c in timed] == ["cudaStreamSynchronize"] * 3  # no copy, no allocation: run and wait
    out = runner.to_numpy(staged)
    assert out.dtype == np.float32 and out.shape == (3, 32)
    assert_embeds(out, x)
    assert_embeds(runner.embed(images(6), batch=32), images(6))
    assert runner.peak_memory() == (memory, "engine activation memory")


def test_export_engines_checks_parity_through_the_runtime_runner(monkeypatch, calls, gpu, onnx_file, tmp_path):
    """--format trt's parity check runs each engine with the runtime's numpy runner (what a device runs), in
    batches inside the engine's profile (a short last batch padded up to its min), and frees its buffers."""
    from rich.console import Console

    install(monkeypatch, fake_tensorrt(calls, engine=computing(gpu, profile=(2, 4))))
    seen: dict[str, np.ndarray] = {}

    class Job:  # the parts of the exporter's ExportJob that export_engines uses
        plan = SimpleNamespace(profile=(2, 2, 4), workspace_mb=256, precisions=["fp16"])
        recipe = SimpleNamespace(cache=SimpleNamespace(root=tmp_path / "cache"))
        out, console, tokens = tmp_path, Console(quiet=True), None
        parity_images, images = images(5), images(7, seed=1)

        def parity(self, encoder, precision, got, what, discard):
            seen["parity"] = got
            return {"cosine_mean": 1.0}

        def val_metrics(self, got, name):
            seen["val"] = got
            return {"recall@1": 1.0}

        def say(self, entry):
            pass

    (entry,) = trt_export.export_engines(Job(), {("image", "fp32"): onnx_file, ("image", "fp16"): onnx_file})
    assert entry["name"] == "image_fp16_trt" and entry["val"] == {"recall@1": 1.0}
    assert seen["parity"].dtype == np.float32 and seen["val"].dtype == np.float32
    assert_embeds(seen["parity"], images(5))
    assert_embeds(seen["val"], images(7, seed=1))
    assert gpu.memory == {} and gpu.streams == set()


# ------------------------------------------------------------------------------- cuda-python, the real one

REAL = importlib.util.find_spec("cuda") is not None and importlib.util.find_spec("cuda.bindings") is not None


@pytest.mark.skipif(not REAL, reason="cuda-python (cuda.bindings) is not installed")
def test_the_fake_has_the_installed_cuda_pythons_names_parameters_and_values():
    from cuda.bindings import runtime as real

    fake = FakeCuda().runtime
    for name in FUNCTIONS:
        assert list(inspect.signature(getattr(fake, name)).parameters) == \
            list(inspect.signature(getattr(real, name)).parameters), name
    for enum_name in ("cudaError_t", "cudaMemcpyKind"):
        for member in getattr(fake, enum_name):
            assert int(getattr(getattr(real, enum_name), member.name)) == int(member), member
    props = real.cudaDeviceProp()
    assert all(hasattr(props, field) for field in ("name", "major", "minor", "multiProcessorCount",
                                                   "totalGlobalMem"))
    assert int(real.cudaStream_t(7)) == 7


@pytest.mark.skipif(not REAL, reason="cuda-python (cuda.bindings) is not installed")
def test_the_real_cuda_python_without_a_gpu_gives_one_line(monkeypatch):
    """On this machine's real cuda-python: no GPU (or no driver) is a one-line UserError from the first call."""
    from cuda.bindings import runtime as real

    err, count = real.cudaGetDeviceCount()[:2]
    if err == real.cudaError_t.cudaSuccess and count:
        pytest.skip("a GPU is visible here")
    with pytest.raises(UserError) as e:
        rt_cuda.require_cuda("the TensorRT runner")
    msg = str(e.value)
    assert msg.startswith("the TensorRT runner needs an NVIDIA GPU and CUDA sees none (cudaGetDeviceCount: cudaError")
    assert "\n" not in msg
    assert rt_cuda.free_memory() is None and rt_cuda.cuda_python_missing() is None


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
