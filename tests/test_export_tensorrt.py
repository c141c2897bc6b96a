"""TensorRT and Torch-TensorRT export on CPU: the messages when they cannot run, the pure shape and compatibility
logic, and the engine build's command sequence against a small fake ``tensorrt`` module that records each call.

The fake stands in for TensorRT's Python API (the names used here exist in TensorRT 10 and 11); the real build
and run are in test_export_gpu.py.
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
from edgedistill.export.tensorrt import (BatchProfile, TrtRunner, build_engine, check_compatible, dtype_name,
                                         profile_shapes, sidecar_path)

GPU = SimpleNamespace(name="NVIDIA GeForce RTX 4090", major=8, minor=9)


# ----------------------------------------------------------------------------------------------- the fake


class _Member:
    """An enum member: has a name and an int value, like pybind11 enums."""

    def __init__(self, name: str, value: int) -> None:
        self.name, self.value = name, value

    def __int__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"<{self.name}>"


def _enum(**members: int) -> SimpleNamespace:
    return SimpleNamespace(**{k: _Member(k, v) for k, v in members.items()})


def fake_tensorrt(calls: list, *, version: str = "10.3.0", parse_ok: bool = True, build_ok: bool = True,
                  inputs=(("image", (-1, 3, 64, 64)),), outputs=(("embedding", (-1, 32)),),
                  accept_cache=lambda data: True, engine: Any = None) -> types.ModuleType:
    """A stand-in ``tensorrt`` module recording every builder call in ``calls`` as (name, args...)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.NetworkDefinitionCreationFlag = _enum(EXPLICIT_BATCH=0, STRONGLY_TYPED=1)
    trt.MemoryPoolType = _enum(WORKSPACE=0)
    trt.DataType = _enum(FLOAT=0, HALF=1, INT8=2, INT32=3, BOOL=4, INT64=10)
    trt.TensorIOMode = _enum(NONE=0, INPUT=1, OUTPUT=2)

    class Logger:
        WARNING = "WARNING"

        def __init__(self, level: str) -> None:
            pass

    class IProgressMonitor:
        def __init__(self) -> None:
            calls.append(("IProgressMonitor.__init__",))

    class Network:
        def __init__(self) -> None:
            self.inputs = [SimpleNamespace(name=n, shape=s, dtype=trt.DataType.FLOAT) for n, s in inputs]
            self.outputs = [SimpleNamespace(name=n, shape=s, dtype=trt.DataType.FLOAT) for n, s in outputs]
            self.num_inputs, self.num_outputs = len(self.inputs), len(self.outputs)

        def get_input(self, i: int) -> Any:
            return self.inputs[i]

        def get_output(self, i: int) -> Any:
            return self.outputs[i]

    class ParserError:
        def desc(self) -> str:
            return "No importer registered for op: FancyOp"

        def node_name(self) -> str:
            return "/blocks/fancy"

    class OnnxParser:
        def __init__(self, network: Network, logger: Logger) -> None:
            self.num_errors = 0 if parse_ok else 2

        def parse(self, data: bytes) -> bool:
            calls.append(("parse", data))
            return parse_ok

        def get_error(self, i: int) -> ParserError:
            return ParserError()

    class Profile:
        def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
            calls.append(("set_shape", name, tuple(lo), tuple(opt), tuple(hi)))

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = bytes(data)

        def serialize(self) -> bytes:
            return self.data + b"|timed"

    class Config:
        def __init__(self) -> None:
            self.cache: TimingCache | None = None
            self.progress_monitor = None

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            calls.append(("set_memory_pool_limit", pool.name, size))

        def set_flag(self, flag: Any) -> None:  # must never be called: precision lives in the graph
            calls.append(("set_flag", flag))

        def add_optimization_profile(self, profile: Profile) -> int:
            calls.append(("add_optimization_profile",))
            return 0

        def create_timing_cache(self, data: bytes) -> TimingCache:
            calls.append(("create_timing_cache", bytes(data)))
            return TimingCache(data)

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            calls.append(("set_timing_cache", cache.data, ignore_mismatch))
            if cache.data and not accept_cache(cache.data):
                return False
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache | None:
            return self.cache

    class Builder:
        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, flags: int) -> Network:
            calls.append(("create_network", flags))
            return Network()

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            calls.append(("build_serialized_network",))
            monitor = config.progress_monitor
            if monitor is not None:  # what TensorRT does from its build threads
                monitor.phase_start("Building engine", None, 2)
                assert monitor.step_complete("Building engine", 0) is True
                monitor.phase_finish("Building engine")
                calls.append(("progress_reported",))
            return b"SERIALIZED-ENGINE" if build_ok else None

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> Any:
            calls.append(("deserialize_cuda_engine",))
            if engine == "forbidden":
                raise AssertionError("an incompatible engine must be refused before deserialising")
            return engine

    trt.Logger, trt.IProgressMonitor, trt.OnnxParser = Logger, IProgressMonitor, OnnxParser
    trt.Builder, trt.Runtime = Builder, Runtime
    return trt


@pytest.fixture
def calls() -> list:
    return []


@pytest.fixture
def gpu(monkeypatch):
    """torch sees one CUDA device (GPU above), without touching CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: GPU)


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
                                                "compute_capability": "8.9", "cuda": torch.version.cuda}


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


ORIN = {"gpu_name": "Orin", "compute_capability": "8.7", "tensorrt_version": "10.3.0"}
H100 = {"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt_version": "11.4.0"}


def test_check_compatible_same_device_passes():
    check_compatible(ORIN, dict(ORIN))
    check_compatible(ORIN, {**ORIN, "tensorrt_version": "10.3.1", "cuda": "12.6"})  # patch releases agree


@pytest.mark.parametrize("change", [{"gpu_name": "NVIDIA Jetson AGX Orin"}, {"compute_capability": "8.6"},
                                    {"tensorrt_version": "10.7.0"}, {"tensorrt_version": "11.3.0"}])
def test_check_compatible_refuses_another_device(change):
    current = {**ORIN, **change}
    with pytest.raises(UserError) as e:
        check_compatible(ORIN, current, what="engine model.engine")
    msg = str(e.value)
    assert msg.startswith("engine model.engine was built for Orin (sm 8.7) with TensorRT 10.3.0; this machine has")
    assert f"{current['gpu_name']} (sm {current['compute_capability']}) with TensorRT {current['tensorrt_version']}" \
        in msg
    assert msg.endswith("rebuild it here with `edgedistill export --format trt`") and "\n" not in msg


def test_check_compatible_message_names_both_sides():
    with pytest.raises(UserError) as e:
        check_compatible(ORIN, H100)
    assert "Orin (sm 8.7) with TensorRT 10.3.0" in str(e.value)
    assert "NVIDIA H100 80GB HBM3 (sm 9.0) with TensorRT 11.4.0" in str(e.value)


# ------------------------------------------------------------------------------------------------- build


def test_build_engine_command_sequence(monkeypatch, calls, gpu, onnx_file, tmp_path):
    fake = install(monkeypatch, fake_tensorrt(calls, inputs=[("image", (-1, 3, 64, 64)), ("mask", ("batch", 16))]))
    engine, cache = tmp_path / "out" / "student.engine", tmp_path / "cache" / "timing.cache"
    meta = build_engine(onnx_file, engine, BatchProfile(1, 4, 8), 1024, cache, "fp16")

    assert ("create_network", 1 << int(fake.NetworkDefinitionCreationFlag.STRONGLY_TYPED)) in calls
    assert not [c for c in calls if c[0] == "set_flag"]  # no FP16/INT8 builder flags, ever
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
    assert (meta["gpu_name"], meta["compute_capability"], meta["tensorrt_version"]) == (GPU.name, "8.9", "10.3.0")
    assert meta["precision"] == "fp16" and meta["profile"] == {"min": 1, "opt": 4, "max": 8}
    assert meta["inputs"] == [{"name": "image", "shape": [-1, 3, 64, 64], "dtype": "float32"},
                              {"name": "mask", "shape": [-1, 16], "dtype": "float32"}]
    assert meta["outputs"] == [{"name": "embedding", "shape": [-1, 32], "dtype": "float32"}]

    # a second build reuses (and extends) the timing cache the first one wrote
    calls.clear()
    build_engine(onnx_file, tmp_path / "out" / "second.engine", BatchProfile(1, 1, 8), 1024, cache, "fp16")
    assert ("create_timing_cache", b"|timed") in calls and ("set_timing_cache", b"|timed", False) in calls
    assert cache.read_bytes() == b"|timed|timed"


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


HERE = {"gpu_name": GPU.name, "compute_capability": "8.9", "tensorrt_version": "10.3.0"}


def test_runner_refuses_an_engine_from_another_gpu_before_deserialising(monkeypatch, calls, gpu, tmp_path):
    install(monkeypatch, fake_tensorrt(calls, engine="forbidden"))
    engine = write_engine(tmp_path, {"gpu_name": "Orin", "compute_capability": "8.7", "tensorrt_version": "10.3.0"})
    with pytest.raises(UserError) as e:
        TrtRunner(engine)
    msg = str(e.value)
    assert f"engine {engine} was built for Orin (sm 8.7) with TensorRT 10.3.0" in msg
    assert f"this machine has {GPU.name} (sm 8.9) with TensorRT 10.3.0" in msg
    assert ("deserialize_cuda_engine",) not in calls


def test_runner_refuses_another_tensorrt_version(monkeypatch, calls, gpu, tmp_path):
    install(monkeypatch, fake_tensorrt(calls, version="11.4.0", engine="forbidden"))
    with pytest.raises(UserError, match="with TensorRT 10.3.0; this machine has .* with TensorRT 11.4.0"):
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


class FakeEngine:
    """A deserialised engine: image (B, 3, 64, 64) float32 -> embedding (B, 32) float16."""

    def __init__(self, trt: types.ModuleType) -> None:
        self.trt = trt
        self.num_io_tensors = 2
        self.tensors = {"image": (trt.TensorIOMode.INPUT, trt.DataType.FLOAT, (-1, 3, 64, 64)),
                        "embedding": (trt.TensorIOMode.OUTPUT, trt.DataType.HALF, (-1, 32))}

    def get_tensor_name(self, i: int) -> str:
        return list(self.tensors)[i]

    def get_tensor_mode(self, name: str) -> Any:
        return self.tensors[name][0]

    def get_tensor_dtype(self, name: str) -> Any:
        return self.tensors[name][1]

    def get_tensor_shape(self, name: str) -> tuple:
        return self.tensors[name][2]

    def create_execution_context(self) -> Any:
        return SimpleNamespace()


def test_runner_io_and_input_checks(monkeypatch, calls, gpu, tmp_path):
    trt = fake_tensorrt(calls)
    install(monkeypatch, trt)
    monkeypatch.setattr(trt.Runtime, "deserialize_cuda_engine", lambda self, data: FakeEngine(trt))
    runner = TrtRunner(write_engine(tmp_path, HERE))
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
