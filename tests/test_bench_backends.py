"""runtime/backends.py without a GPU: onnxruntime's provider options (no weak-typing precision flags, the engine
cache folder made), provider failures as the artifact's own error, GPU io binding with a preallocated output and
device memory (not host RSS), INT8 graphs offered only to the runtime their flavour is made for, and the
Torch-TensorRT runner's batch profile."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgedistill.bench.torch_runners import TorchTrtRunner
from edgedistill.runtime.backends import OrtRunner, Runner, onnx_input_shapes, ort_provider
from edgedistill.core.errors import UserError
import edgedistill.runtime.backends as backends


@pytest.fixture
def image_graph(tmp_path: Path) -> Path:
    """A real ONNX graph: image (batch, 3, 8, 8) -> embedding (batch, 3) (the mean over the pixels)."""
    node = helper.make_node("ReduceMean", ["image"], ["embedding"], axes=[2, 3], keepdims=0)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                          [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 3])])
    path = tmp_path / "image_int8.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_tensorrt_provider_options(image_graph, tmp_path):
    shapes = onnx_input_shapes(image_graph)
    assert shapes == {"image": [None, 3, 8, 8]}
    name, int8 = ort_provider("TensorrtExecutionProvider", "int8", shapes, (1, 8, 32), tmp_path / "trt", "10.3.0")
    assert name == "TensorrtExecutionProvider"
    assert int8["trt_int8_enable"] is True  # a QDQ graph on TensorRT 10: the provider needs it (onnxruntime#13381)
    assert int8["trt_engine_cache_enable"] is True and int8["trt_engine_cache_path"] == str(tmp_path / "trt")
    assert int8["trt_timing_cache_enable"] is True and int8["trt_timing_cache_path"] == str(tmp_path / "trt")
    assert (int8["trt_profile_min_shapes"], int8["trt_profile_opt_shapes"], int8["trt_profile_max_shapes"]) == (
        "image:1x3x8x8", "image:8x3x8x8", "image:32x3x8x8")
    # precision lives in the graph: never the weak-typing fp16 flag; int8 only for QDQ graphs before TensorRT 11
    for precision, version in (("int8", "10.3.0"), ("int8", None), ("int8", "11.4.0"), ("fp16", "10.3.0"),
                               ("fp32", None)):
        _, options = ort_provider("TensorrtExecutionProvider", precision, shapes, (1, 8, 32), tmp_path, version)
        assert "trt_fp16_enable" not in options, (precision, version)
        assert ("trt_int8_enable" in options) == (precision == "int8" and version != "11.4.0"), (precision, version)
    assert ort_provider("CUDAExecutionProvider", "int8") == ("CUDAExecutionProvider", {"device_id": 0})
    assert ort_provider("CPUExecutionProvider", "int8") == "CPUExecutionProvider"


class FakeSession:
    """An onnxruntime session on the requested provider whose run fails like a TensorRT EP build does."""
    made: list = []

    def __init__(self, path, threads, providers=None, precision="fp32", optimize=True, spin=None):
        trt = [p[1] for p in providers if not isinstance(p, str) and p[0] == "TensorrtExecutionProvider"]
        cache = Path(trt[0]["trt_engine_cache_path"]) if trt else None
        FakeSession.made.append({"providers": providers, "optimize": optimize, "spin": spin,
                                 "cache_dir_exists": cache.is_dir() if cache else None})
        self.providers = [p if isinstance(p, str) else p[0] for p in providers]

    def get_providers(self):
        return self.providers

    def get_inputs(self):
        return [types.SimpleNamespace(name="image", shape=["batch", 3, 8, 8], type="tensor(float)")]

    def get_outputs(self):
        return [types.SimpleNamespace(name="embedding", shape=["batch", 3], type="tensor(float)")]

    def run_with_iobinding(self, binding):
        raise RuntimeError("[ONNXRuntimeError] : 11 : EP_FAIL : TensorRT EP could not build engine for fused node\n"
                           "second line of the provider's log")

    def run(self, names, feeds):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Conv")


def test_the_tensorrt_provider_gets_its_options_and_its_failures_are_the_artifacts(monkeypatch, image_graph,
                                                                                    tmp_path):
    monkeypatch.setenv("EDGEDISTILL_CACHE", str(tmp_path / "fresh" / "cache"))  # a cache root not made yet
    monkeypatch.setattr(backends, "ort_session", FakeSession)
    monkeypatch.setattr(backends, "tensorrt_version", lambda: "10.3.0")
    FakeSession.made.clear()
    runner = OrtRunner(image_graph, "int8", "onnxruntime-tensorrt", None, batch_range=(1, 8, 32))
    providers = FakeSession.made[0]["providers"]
    assert [p[0] for p in providers] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    trt = providers[0][1]
    assert trt["trt_int8_enable"] and trt["trt_profile_max_shapes"] == "image:32x3x8x8"
    assert "trt_fp16_enable" not in trt
    assert trt["trt_engine_cache_path"] == str(tmp_path / "fresh" / "cache" / "onnxruntime-tensorrt")
    assert FakeSession.made[0]["cache_dir_exists"] is True  # made before the session, which would not make it
    assert FakeSession.made[0]["optimize"] is False  # TensorRT gets the QDQ graph as exported
    assert (runner.min_batch, runner.max_batch) == (1, 32)
    with pytest.raises(UserError) as e:
        runner.call((object(), None, None))
    msg = str(e.value)
    assert msg.startswith("onnxruntime's TensorrtExecutionProvider failed to run image_int8.onnx: [ONNXRuntimeError]")
    assert "EP_FAIL" in msg and "\n" not in msg


def test_an_engine_cache_that_cannot_be_made_is_one_line(monkeypatch, image_graph, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("EDGEDISTILL_CACHE", str(tmp_path / "file"))
    monkeypatch.setattr(backends, "ort_session", FakeSession)
    with pytest.raises(UserError, match=r"cannot create onnxruntime's TensorRT engine cache .*onnxruntime-tensorrt "
                                        r"\(.*\): set EDGEDISTILL_CACHE to a writable folder"):
        OrtRunner(image_graph, "fp16", "onnxruntime-tensorrt", None, batch_range=(1, 8, 32))


class FakeBinding:
    def __init__(self, log):
        self.log = log

    def bind_ortvalue_input(self, name, value):
        self.log.append(("bind_ortvalue_input", name, value.shape))

    def bind_ortvalue_output(self, name, value):
        self.log.append(("bind_ortvalue_output", name, value))

    def bind_output(self, name, device_type="cpu", device_id=0, element_type=None, shape=None, buffer_ptr=None):
        self.log.append(("bind_output", name, device_type))

    def copy_outputs_to_cpu(self):
        return [np.full((2, 3), 7.0, np.float32)]


def fake_onnxruntime(log: list) -> types.ModuleType:
    """onnxruntime-gpu's OrtValue on a machine without it: records device allocations."""
    ort = types.ModuleType("onnxruntime")

    class OrtValue:
        def __init__(self, shape, dtype, device):
            self.shape, self.dtype, self.device = tuple(shape), dtype, device

        @staticmethod
        def ortvalue_from_numpy(numpy_obj, device_type="cpu", device_id=0):
            log.append(("ortvalue_from_numpy", numpy_obj.shape, device_type))
            return OrtValue(numpy_obj.shape, numpy_obj.dtype, device_type)

        @staticmethod
        def ortvalue_from_shape_and_type(shape, element_type, device_type="cpu", device_id=0):
            log.append(("ortvalue_from_shape_and_type", tuple(shape), element_type, device_type, device_id))
            return OrtValue(shape, element_type, device_type)

    ort.OrtValue = OrtValue
    return ort


class GpuSession(FakeSession):
    """A CUDA provider session that takes GPU memory when it opens (from the fake cuda-python's free memory)."""
    cuda = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cuda_value = GpuSession.cuda.runtime.cudaMalloc(48 << 20)[1]  # weights, arena: 48 MiB
        self.log: list = []
        self.runs = 0

    def io_binding(self):
        return FakeBinding(self.log)

    def run_with_iobinding(self, binding):
        self.runs += 1


def test_gpu_onnxruntime_binds_a_preallocated_output_and_reports_device_memory(monkeypatch, image_graph):
    from tests.fake_cudart import FakeCuda, block_cuda_python

    log: list = []
    monkeypatch.setitem(sys.modules, "onnxruntime", fake_onnxruntime(log))
    cuda = FakeCuda()
    cuda.install(monkeypatch)
    GpuSession.cuda = cuda
    monkeypatch.setattr(backends, "ort_session", GpuSession)
    runner = OrtRunner(image_graph, "fp32", "onnxruntime-cuda", None)
    staged = runner.stage(np.ones((2, 3, 8, 8), np.float32))
    value = staged[2]
    assert (value.shape, value.dtype, value.device) == ((2, 3), np.float32, "cuda")
    assert runner.session.log == [("bind_ortvalue_input", "image", (2, 3, 8, 8)),
                                  ("bind_ortvalue_output", "embedding", value)]
    before = (list(log), list(runner.session.log))
    for _ in range(3):
        assert runner.call(staged) is staged[0]  # what bench times: the run alone
    assert (log, runner.session.log) == before and runner.session.runs == 3  # no allocation, no binding
    assert runner.stage(np.ones((2, 3, 8, 8), np.float32))[2] is value  # one output value per batch size
    assert [e[0] for e in log].count("ortvalue_from_shape_and_type") == 1
    assert runner.to_numpy(runner.call(staged)).shape == (2, 3)
    # device memory, not the host's RSS: what the session took since it opened
    assert runner.peak_memory() == (48.0, "gpu memory in use since load (cudaMemGetInfo)")

    block_cuda_python(monkeypatch)  # without cuda-python there is no device figure, and no RSS in its place
    without = OrtRunner(image_graph, "fp32", "onnxruntime-cuda", None)
    mib, kind = without.peak_memory()
    assert mib is None and "not measured" in kind and "rss" not in kind


def test_a_provider_that_cannot_load_the_graph_is_a_user_error(monkeypatch, image_graph):
    def broken(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Exception during initialization")
    monkeypatch.setattr(backends, "ort_session", broken)
    with pytest.raises(UserError, match=r"^onnxruntime's CUDAExecutionProvider could not load image_int8\.onnx: "
                                        r"\[ONNXRuntimeError\] : 6 : RUNTIME_EXCEPTION"):
        OrtRunner(image_graph, "int8", "onnxruntime-cuda", None)


def test_cpu_provider_failure_is_a_user_error_too(monkeypatch, image_graph):
    runner = OrtRunner(image_graph, "fp32", "onnxruntime-cpu", 1)
    x = np.ones((2, 3, 8, 8), np.float32)
    assert np.allclose(runner.embed(x), 1.0)  # the real CPU provider
    monkeypatch.setattr(runner, "session", FakeSession(image_graph, 1, ["CPUExecutionProvider"]))
    with pytest.raises(UserError, match="CPUExecutionProvider failed to run image_int8.onnx: .*Conv"):
        runner.call(runner.stage(x))


class Recorder(Runner):
    """Records the batch of every call; refuses batches outside [2, 4] like a compiled program's shape guard."""
    min_batch, max_batch = 2, 4

    def __init__(self) -> None:
        self.batches: list[int] = []

    def call(self, staged):
        if not self.min_batch <= len(staged) <= self.max_batch:
            raise AssertionError(f"batch {len(staged)} outside the profile")
        self.batches.append(len(staged))
        return staged.reshape(len(staged), -1) * 2


def test_embed_keeps_every_call_inside_the_profile():
    runner = Recorder()
    x = np.arange(9 * 3, dtype=np.float32).reshape(9, 3)
    out = runner.embed(x, batch=32)
    assert runner.batches == [4, 4, 2]  # the last row alone is padded up to the minimum batch
    np.testing.assert_array_equal(out, x * 2)


def test_torchtrt_runner_reads_the_batch_profile(monkeypatch, tmp_path):
    """Batches outside the compiled profile are the bench's skipped rows (min_batch/max_batch), not crashes."""
    from edgedistill.runtime.tensorrt import sidecar_path

    program = tmp_path / "image_fp16.torchtrt.ep"
    program.write_bytes(b"program")
    sidecar_path(program).write_text(json.dumps({"sha256": hashlib.sha256(b"program").hexdigest(),
                                                 "profile": {"min": 1, "opt": 2, "max": 4}}))
    import edgedistill.bench.torch_runners as torch_runners
    monkeypatch.setattr(torch_runners, "load_torchtrt", lambda path: (lambda x: x))
    runner = TorchTrtRunner(program)
    assert (runner.backend, runner.min_batch, runner.max_batch, runner.timer) == ("torch-tensorrt", 1, 4, "cuda")


def test_tensorrt_engines_run_where_the_module_imports_without_pip_metadata(monkeypatch, tmp_path):
    """JetPack installs TensorRT's Python module by apt (python3-libnvinfer): no pip metadata, still usable. The
    runner needs cuda-python too (its buffers and stream), and says so when it is missing."""
    import importlib.machinery
    import importlib.metadata
    import importlib.util

    from edgedistill.runtime.backends import TensorRtRunner, candidates
    real = importlib.util.find_spec
    present = {"tensorrt", "cuda.bindings.runtime"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: importlib.machinery.ModuleSpec(name, None)
                        if name in present else None if name.startswith(("tensorrt", "cuda")) else real(name, *a))

    def no_metadata(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "version", no_metadata)
    engine = {"name": "image_int8_trt", "format": "trt", "precision": "int8"}
    (cand,) = candidates(engine, tmp_path / "image_int8.engine", "jetson", None)
    assert cand.reason is None and cand.make is not None
    assert backends.resolve(backends.BACKENDS["tensorrt"].runner) is TensorRtRunner  # the runtime's, no torch
    present.discard("cuda.bindings.runtime")
    (cand,) = candidates(engine, tmp_path / "image_int8.engine", "jetson", None)
    assert cand.make is None and cand.reason.startswith("cuda-python is not installed (pip install -e '.[gpu]'")
    present.discard("tensorrt")
    (cand,) = candidates(engine, tmp_path / "image_int8.engine", "jetson", None)
    assert "tensorrt is not installed" in cand.reason


INT8 = {"name": "image_int8_onnx", "encoder": "image", "format": "onnx", "precision": "int8"}
TRT_FLAVOUR = {**INT8, "flavour": "tensorrt", "calibration": {"activations": "int8 symmetric"}}
CPU_FLAVOUR = {**INT8, "flavour": "onnxruntime-cpu", "calibration": {"activations": "uint8 asymmetric"}}


@pytest.mark.parametrize("artifact, flavour", [
    (TRT_FLAVOUR, "tensorrt"), (CPU_FLAVOUR, "onnxruntime-cpu"),
    ({**INT8, "calibration": {"activations": "int8 symmetric"}}, "tensorrt"),       # older exports: no "flavour"
    ({**INT8, "calibration": {"activations": "uint8 asymmetric"}}, "onnxruntime-cpu"),
    (INT8, None), ({**TRT_FLAVOUR, "precision": "fp16"}, None)])
def test_the_int8_flavour_comes_from_export_json(artifact, flavour):
    assert backends.int8_flavour(artifact) == flavour


def test_int8_graphs_are_offered_only_to_the_runtime_they_were_quantised_for(image_graph, monkeypatch):
    def reasons(artifact, device):
        return {c.backend: c.reason for c in backends.candidates(artifact, image_graph, device, 1)}

    # CPU: the TensorRT flavour is refused by both CPU backends (it used to be timed and scored there)
    cpu = reasons(TRT_FLAVOUR, "cpu")
    assert all(r and r.startswith("INT8 graph quantised for TensorRT") for r in cpu.values()), cpu
    assert reasons(CPU_FLAVOUR, "cpu")["onnxruntime-cpu"] is None
    # GPU: the CPU flavour never reaches onnxruntime's TensorRT provider; the TensorRT flavour reaches only it
    for name in ("onnxruntime-tensorrt", "onnxruntime-cuda"):  # as if onnxruntime-gpu were installed
        monkeypatch.setitem(backends.BACKENDS, name, dataclasses.replace(backends.BACKENDS[name], missing=lambda: None))
    gpu_cpu_flavour = reasons(CPU_FLAVOUR, "cuda")
    assert gpu_cpu_flavour["onnxruntime-tensorrt"].startswith("INT8 graph quantised for onnxruntime on CPU")
    assert "--format trt" in gpu_cpu_flavour["onnxruntime-tensorrt"] and gpu_cpu_flavour["onnxruntime-cuda"] is None
    gpu_trt_flavour = reasons(TRT_FLAVOUR, "jetson")
    assert gpu_trt_flavour["onnxruntime-tensorrt"] is None
    assert gpu_trt_flavour["onnxruntime-cuda"].startswith("INT8 graph quantised for TensorRT")
    # an fp32 or fp16 graph, or an INT8 graph of unknown flavour, goes everywhere as before
    assert set(reasons({**INT8, "precision": "fp16"}, "cuda").values()) == {None}
    assert set(reasons(INT8, "cuda").values()) == {None}


def _config(session, key):
    """A session config entry as onnxruntime holds it, or None when it was never set."""
    options = session.get_session_options()
    try:
        return options.get_session_config_entry(key)
    except Exception:  # noqa: BLE001 - onnxruntime raises a plain Fail for a key that is not set
        return None


@pytest.mark.parametrize("spin, expect", [(False, "0"), (True, "1"), (None, None)])
def test_onnxruntime_threads_and_spinning_reach_the_session(image_graph, spin, expect):
    from edgedistill.runtime.backends import RunOptions
    from edgedistill.runtime.ort import SPIN_KEYS

    artifact = {"name": "image_int8_onnx", "format": "onnx", "precision": "fp32"}
    runner = OrtRunner.open("onnxruntime-cpu", image_graph, artifact, RunOptions("cpu", threads=2, spin=spin))
    options = runner.session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)
    assert [_config(runner.session, key) for key in SPIN_KEYS] == [expect, expect]  # None: onnxruntime's default
    assert np.allclose(runner.embed(np.ones((3, 3, 8, 8), np.float32)), 1.0)


def test_candidates_pass_the_spin_option_to_the_onnxruntime_runner(image_graph):
    from edgedistill.runtime.ort import SPIN_KEYS

    artifact = {"name": "image_int8_onnx", "format": "onnx", "precision": "fp32"}
    cand = next(c for c in backends.candidates(artifact, image_graph, "cpu", 1, spin=False)
                if c.backend == "onnxruntime-cpu")
    assert _config(cand.make().session, SPIN_KEYS[0]) == "0"


def test_onnxruntime_comes_before_openvino_on_the_cpu_and_openvino_is_skipped_with_the_fix_when_missing(
        image_graph, monkeypatch):
    import importlib.util

    artifact = {"name": "image_int8_onnx", "format": "onnx", "precision": "int8"}
    assert [c.backend for c in backends.candidates(artifact, image_graph, "cpu", 1)] == \
        ["onnxruntime-cpu", "openvino-cpu"]  # the table's order of preference
    assert "openvino-cpu" not in [c.backend for c in backends.candidates(artifact, image_graph, "jetson", 1)]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    ort, skipped = backends.candidates(artifact, image_graph, "cpu", 1)
    assert skipped.make is None and skipped.reason == "openvino is not installed (pip install 'edgedistill[openvino]')"
    assert ort.reason is None
