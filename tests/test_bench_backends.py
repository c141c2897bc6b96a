"""bench/backends.py without a GPU: onnxruntime's provider options, provider failures as the artifact's own error,
and the Torch-TensorRT runner's batch profile."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgedistill.bench.backends import OrtRunner, Runner, TorchTrtRunner, onnx_input_shapes, ort_provider
from edgedistill.errors import UserError
from edgedistill.bench import backends


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
    name, int8 = ort_provider("TensorrtExecutionProvider", "int8", shapes, (1, 8, 32), tmp_path / "trt")
    assert name == "TensorrtExecutionProvider"
    assert int8["trt_int8_enable"] is True and int8["trt_fp16_enable"] is True  # QDQ graph, fp16 elsewhere
    assert int8["trt_engine_cache_enable"] is True and int8["trt_engine_cache_path"] == str(tmp_path / "trt")
    assert int8["trt_timing_cache_enable"] is True and int8["trt_timing_cache_path"] == str(tmp_path / "trt")
    assert (int8["trt_profile_min_shapes"], int8["trt_profile_opt_shapes"], int8["trt_profile_max_shapes"]) == (
        "image:1x3x8x8", "image:8x3x8x8", "image:32x3x8x8")
    _, fp16 = ort_provider("TensorrtExecutionProvider", "fp16", shapes, (1, 8, 32), tmp_path)
    assert fp16["trt_fp16_enable"] is True and fp16["trt_int8_enable"] is False
    _, fp32 = ort_provider("TensorrtExecutionProvider", "fp32", shapes, (1, 8, 32), tmp_path)
    assert fp32["trt_fp16_enable"] is False and fp32["trt_int8_enable"] is False
    assert ort_provider("CUDAExecutionProvider", "int8") == ("CUDAExecutionProvider", {"device_id": 0})
    assert ort_provider("CPUExecutionProvider", "int8") == "CPUExecutionProvider"


class FakeSession:
    """An onnxruntime session on the requested provider whose run fails like a TensorRT EP build does."""
    made: list = []

    def __init__(self, path, threads, providers=None, precision="fp32", optimize=True, spin=None):
        FakeSession.made.append({"providers": providers, "optimize": optimize, "spin": spin})
        self.providers = [p if isinstance(p, str) else p[0] for p in providers]

    def get_providers(self):
        return self.providers

    def get_inputs(self):
        return [type("I", (), {"name": "image"})()]

    def run_with_iobinding(self, binding):
        raise RuntimeError("[ONNXRuntimeError] : 11 : EP_FAIL : TensorRT EP could not build engine for fused node\n"
                           "second line of the provider's log")

    def run(self, names, feeds):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Conv")


def test_the_tensorrt_provider_gets_its_options_and_its_failures_are_the_artifacts(monkeypatch, image_graph,
                                                                                    tmp_path):
    monkeypatch.setenv("EDGEDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(backends, "ort_session", FakeSession)
    FakeSession.made.clear()
    runner = OrtRunner(image_graph, "int8", "onnxruntime-tensorrt", None, batch_range=(1, 8, 32))
    providers = FakeSession.made[0]["providers"]
    assert [p[0] for p in providers] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    trt = providers[0][1]
    assert trt["trt_int8_enable"] and trt["trt_profile_max_shapes"] == "image:32x3x8x8"
    assert trt["trt_engine_cache_path"] == str(tmp_path / "cache" / "onnxruntime-tensorrt")
    assert FakeSession.made[0]["optimize"] is False  # TensorRT gets the QDQ graph as exported
    assert (runner.min_batch, runner.max_batch) == (1, 32)
    with pytest.raises(UserError) as e:
        runner.call((object(), None))
    msg = str(e.value)
    assert msg.startswith("onnxruntime's TensorrtExecutionProvider failed to run image_int8.onnx: [ONNXRuntimeError]")
    assert "EP_FAIL" in msg and "\n" not in msg


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
    from edgedistill.export.tensorrt import sidecar_path

    program = tmp_path / "image_fp16.torchtrt.ep"
    program.write_bytes(b"program")
    sidecar_path(program).write_text(json.dumps({"sha256": hashlib.sha256(b"program").hexdigest(),
                                                 "profile": {"min": 1, "opt": 2, "max": 4}}))
    monkeypatch.setattr(backends, "load_torchtrt", lambda path: (lambda x: x))
    runner = TorchTrtRunner(program)
    assert (runner.backend, runner.min_batch, runner.max_batch, runner.timer) == ("torch-tensorrt", 1, 4, "cuda")


def test_tensorrt_engines_run_where_the_module_imports_without_pip_metadata(monkeypatch, tmp_path):
    """JetPack installs TensorRT's Python module by apt (python3-libnvinfer): no pip metadata, still usable."""
    import importlib.machinery
    import importlib.metadata
    import importlib.util

    from edgedistill.bench.backends import candidates
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: importlib.machinery.ModuleSpec(name, None)
                        if name == "tensorrt" else real(name, *a))

    def no_metadata(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "version", no_metadata)
    engine = {"name": "image_int8_trt", "format": "trt", "precision": "int8"}
    (cand,) = candidates(engine, tmp_path / "image_int8.engine", "jetson", None)
    assert cand.reason is None and cand.make is not None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorrt" else real(name, *a))
    (cand,) = candidates(engine, tmp_path / "image_int8.engine", "jetson", None)
    assert "tensorrt is not installed" in cand.reason


def _config(session, key):
    """A session config entry as onnxruntime holds it, or None when it was never set."""
    options = session.get_session_options()
    try:
        return options.get_session_config_entry(key)
    except Exception:  # noqa: BLE001 - onnxruntime raises a plain Fail for a key that is not set
        return None


@pytest.mark.parametrize("spin, expect", [(False, "0"), (True, "1"), (None, None)])
def test_onnxruntime_threads_and_spinning_reach_the_session(image_graph, spin, expect):
    from edgedistill.bench.backends import RunOptions
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
