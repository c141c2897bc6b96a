"""The OpenVINO CPU backend (runtime/backends.OpenVinoRunner) on real exported graphs: parity with onnxruntime,
dynamic batch, the options it was given read back from the compiled model, failures as one-line user errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from edgedistill.runtime.backends import OpenVinoRunner, OrtRunner, RunOptions
from edgedistill.core.errors import UserError
from edgedistill.export.graph import ImageEncoder, TextEncoder, cosine_parity, export_onnx
from edgedistill.export.precision import ImageCalibrationReader, quantize_int8, to_fp16

pytest.importorskip("openvino")

CONTEXT = 8


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[str, Path]:
    """A ResNet-18 student at 32 px (random weights) exported as the exporter does: image fp32, fp16 and INT8 QDQ
    (onnxruntime's CPU flavour, uint8 activations), and its text tower fp32."""
    from edgedistill.distill.teachers import register_open_clip_config

    torch.manual_seed(0)
    register_open_clip_config("openvino-test-resnet", {
        "embed_dim": 16, "vision_cfg": {"timm_model_name": "resnet18", "timm_model_pretrained": False,
                                        "timm_pool": "avg", "timm_proj": "", "image_size": 32},
        "text_cfg": {"context_length": CONTEXT, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}})
    model = open_clip.create_model("openvino-test-resnet").eval()
    folder = tmp_path_factory.mktemp("openvino")
    images = _images(24)
    paths = {"fp32": folder / "image_fp32.onnx", "fp16": folder / "image_fp16.onnx",
             "int8": folder / "image_int8.onnx", "text": folder / "text_fp32.onnx"}
    export_onnx(ImageEncoder(model), torch.from_numpy(images[:2]), paths["fp32"], "image", "image_embedding")
    to_fp16(paths["fp32"], paths["fp16"])
    quantize_int8(paths["fp32"], paths["int8"], ImageCalibrationReader("image", len(images), lambda i: images[i]),
                  "minmax", folder / "cache", "openvino-test")
    export_onnx(TextEncoder(model), torch.from_numpy(_tokens(2)), paths["text"], "text", "text_embedding")
    return paths


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 32, 32)).astype(np.float32)


def _tokens(n: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    tokens = np.zeros((n, CONTEXT), np.int64)
    tokens[:, 0], tokens[:, -1] = 49406, 49407
    tokens[:, 1:-1] = rng.integers(1, 49000, size=(n, CONTEXT - 2))
    return tokens


def _both(path: Path, precision: str, x: np.ndarray, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    ov = OpenVinoRunner(path, threads)
    ort = OrtRunner(path, precision, "onnxruntime-cpu", threads)
    return ov.embed(x, batch=8), ort.embed(x, batch=8)


@pytest.mark.parametrize("precision, floor", [("fp32", 0.9999), ("fp16", 0.999)])
def test_openvino_agrees_with_onnxruntime_on_the_image_graph(graphs, precision, floor):
    got, ref = _both(graphs[precision], precision, _images(20, seed=3))
    assert got.shape == ref.shape == (20, 16) and got.dtype == np.float32
    parity = cosine_parity(got, ref)
    assert parity["cosine_mean"] >= floor and parity["cosine_min"] >= floor, parity


def test_openvino_runs_the_int8_qdq_graph(graphs):
    """The same QDQ graph in two int8 engines: close, not bit-equal (each rounds its own way)."""
    x = _images(20, seed=3)
    got, ref = _both(graphs["int8"], "int8", x)
    fp32 = OpenVinoRunner(graphs["fp32"], 1).embed(x)
    assert cosine_parity(got, ref)["cosine_mean"] >= 0.999
    assert not np.allclose(got, fp32, atol=1e-4)  # int8 kernels ran: not the fp32 graph's numbers


def test_openvino_runs_the_text_graph(graphs):
    got, ref = _both(graphs["text"], "fp32", _tokens(10))
    assert cosine_parity(got, ref)["cosine_min"] >= 0.9999


def test_the_batch_axis_stays_dynamic(graphs):
    runner = OpenVinoRunner(graphs["fp32"], 1)
    x = _images(33)
    one = runner.to_numpy(runner.call(runner.stage(x[:1])))
    many = runner.to_numpy(runner.call(runner.stage(x)))
    assert one.shape == (1, 16) and many.shape == (33, 16)
    assert cosine_parity(one, many[:1])["cosine_min"] >= 0.9999


@pytest.mark.parametrize("threads, hint", [(1, "latency"), (2, "throughput")])
def test_the_options_are_what_the_compiled_model_runs_with(graphs, threads, hint):
    artifact = {"name": "image_fp32_onnx", "format": "onnx", "precision": "fp32"}
    runner = OpenVinoRunner.open("openvino-cpu", graphs["fp32"], artifact, RunOptions("cpu", threads, hint=hint))
    compiled = runner.compiled
    assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == threads
    assert str(compiled.get_property("PERFORMANCE_HINT")).upper().endswith(hint.upper())
    assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) in ("<Type: 'float32'>", "f32")  # never bf16
    assert runner.version and runner.backend == "openvino-cpu" and runner.timer == "cpu"


def test_a_graph_openvino_cannot_read_is_a_one_line_user_error(tmp_path):
    bad = tmp_path / "image_fp32.onnx"
    bad.write_bytes(b"\x08\x07not a protobuf")
    with pytest.raises(UserError) as e:
        OpenVinoRunner(bad, 1)
    msg = str(e.value)
    assert msg.startswith("OpenVINO could not load image_fp32.onnx on the CPU: ") and "\n" not in msg
    assert "Exception from" not in msg  # OpenVINO's stack of source locations is not the message


def test_a_run_that_fails_is_a_one_line_user_error(graphs):
    runner = OpenVinoRunner(graphs["fp32"], 1)
    with pytest.raises(UserError) as e:
        runner.call(runner.stage(np.zeros((2, 3, 40, 32), np.float32)))  # not the graph's image size
    msg = str(e.value)
    assert msg.startswith("OpenVINO failed to run image_fp32.onnx on the CPU: ") and "\n" not in msg
    assert len(msg) > len("OpenVINO failed to run image_fp32.onnx on the CPU: ") + 5


def test_an_unknown_hint_is_refused(graphs):
    with pytest.raises(UserError, match="latency or throughput"):
        OpenVinoRunner(graphs["fp32"], 1, hint="fastest")


def test_peak_memory_is_the_process_rss_like_the_other_cpu_runners(graphs):
    runner = OpenVinoRunner(graphs["fp32"], 1)
    runner.peak_memory_reset()
    runner.embed(_images(4))
    mib, kind = runner.peak_memory()
    assert kind == "process peak rss" and mib is not None and mib > 0
