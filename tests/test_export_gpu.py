"""TensorRT and Torch-TensorRT on a real NVIDIA GPU: build, run, and match onnxruntime / torch on the CPU.

Engines run through the runtime's torch-free runner (numpy in and out, buffers from cuda-python). Skipped without
CUDA, TensorRT or cuda-python; run on a GPU machine with ``pip install -e '.[gpu]'`` and ``pytest -m gpu``.
"""

from __future__ import annotations

import copy
import importlib.util
import json

import numpy as np
import pytest
import torch

from edgedistill.core.errors import UserError
from edgedistill.export.tensorrt import BatchProfile, build_engine, sidecar_path
from edgedistill.runtime.backends import TensorRtRunner
from edgedistill.runtime.cuda import cuda_python_missing
from edgedistill.runtime.tensorrt import TrtRunner

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA)"),
    pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs TensorRT (pip install -e '.[gpu]')"),
    pytest.mark.skipif(cuda_python_missing() is not None, reason="needs cuda-python (pip install -e '.[gpu]')"),
]

IMAGE = (3, 64, 64)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def student() -> torch.nn.Module:
    import timm
    torch.manual_seed(0)
    return timm.create_model("mobilenetv3_small_100", num_classes=32, pretrained=False).eval()


@pytest.fixture(scope="module")
def onnx_models(student, tmp_path_factory) -> dict:
    """fp32 ONNX with a dynamic batch axis, and its fp16 graph with float32 inputs/outputs."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    folder = tmp_path_factory.mktemp("onnx")
    fp32, fp16 = folder / "student.onnx", folder / "student_fp16.onnx"
    torch.onnx.export(student, torch.randn(1, *IMAGE), str(fp32), dynamo=False, input_names=["image"],
                      output_names=["embedding"], opset_version=17,
                      dynamic_axes={"image": {0: "batch"}, "embedding": {0: "batch"}})
    onnx.save(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True), str(fp16))
    return {"fp32": fp32, "fp16": fp16}


def reference(onnx_path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": images})[0]


def test_engine_matches_onnxruntime_and_reuses_the_timing_cache(onnx_models, tmp_path):
    profile = BatchProfile(1, 4, 8)
    cache = tmp_path / "timing.cache"
    engine = tmp_path / "student_fp16.engine"
    meta = build_engine(onnx_models["fp16"], engine, profile, 1024, cache, "fp16")
    assert engine.is_file() and cache.stat().st_size > 0
    assert json.loads(sidecar_path(engine).read_text()) == meta
    assert meta["inputs"][0]["name"] == "image" and meta["inputs"][0]["shape"] == [-1, *IMAGE]
    assert meta["outputs"][0]["dtype"] == "float32"  # keep_io_types: fp16 inside, fp32 at the edges

    runner = TrtRunner(engine)
    rng = np.random.default_rng(0)
    for batch in (1, 4):
        images = rng.standard_normal((batch, *IMAGE)).astype(np.float32)
        got = runner(images)
        assert got.shape == (batch, 32)
        assert cosine_rows(got, reference(onnx_models["fp32"], images)).min() >= 0.999
    with pytest.raises(UserError, match="outside engine"):
        runner(np.zeros((9, *IMAGE), np.float32))
    runner.close()

    # the bench's runner: staged once, run (and waited for) by call, read back by to_numpy; timed on the wall clock
    bench = TensorRtRunner(engine)
    assert bench.timer == "cpu"
    images = rng.standard_normal((4, *IMAGE)).astype(np.float32)
    staged = bench.stage(images)
    for _ in range(3):
        bench.call(staged)
    assert cosine_rows(bench.to_numpy(staged), reference(onnx_models["fp32"], images)).min() >= 0.999
    mib, kind = bench.peak_memory()
    assert mib is not None and mib >= 0 and kind == "engine activation memory"

    # the second build starts from the first one's timing cache and writes it back
    size_before = cache.stat().st_size
    rebuilt = build_engine(onnx_models["fp16"], tmp_path / "again.engine", profile, 1024, cache, "fp16")
    assert rebuilt["onnx"]["sha256"] == meta["onnx"]["sha256"]
    assert cache.stat().st_size >= size_before
    again = TrtRunner(tmp_path / "again.engine")
    images = rng.standard_normal((2, *IMAGE)).astype(np.float32)
    assert cosine_rows(again(images), reference(onnx_models["fp32"], images)).min() >= 0.999


def test_fp32_engine(onnx_models, tmp_path):
    engine = tmp_path / "student.engine"
    build_engine(onnx_models["fp32"], engine, BatchProfile(1, 2, 4), 512, tmp_path / "timing.cache", "fp32")
    images = np.random.default_rng(1).standard_normal((3, *IMAGE)).astype(np.float32)
    assert cosine_rows(TrtRunner(engine)(images), reference(onnx_models["fp32"], images)).min() >= 0.9999


@pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is None, reason="needs torch-tensorrt")
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_torchtrt_compile_save_load(student, tmp_path, precision):
    from edgedistill.export.torchtrt import compile_torchtrt, load_torchtrt

    model = copy.deepcopy(student).cuda()  # the module-scoped student stays on the CPU for the ONNX export
    path = tmp_path / f"student_{precision}.ep"
    meta = compile_torchtrt(model, torch.randn(1, *IMAGE), BatchProfile(1, 2, 4), precision, path)
    assert path.is_file() and meta["precision"] == precision
    assert json.loads(sidecar_path(path).read_text()) == meta
    loaded = load_torchtrt(path)
    for batch in (1, 3):
        x = torch.randn(batch, *IMAGE, device="cuda")
        with torch.no_grad():
            want = model(x).float().cpu().numpy()
            got = loaded(x)
        got = (got[0] if isinstance(got, (tuple, list)) else got).float().cpu().numpy()
        assert got.shape == want.shape
        assert cosine_rows(got, want).min() >= 0.999


def test_int8_engine_from_the_tensorrt_flavour(onnx_models, tmp_path):
    """The TensorRT INT8 graph (float biases, fp16 outside the Q/DQ pairs) parses and builds strongly typed."""
    from edgedistill.export.precision import TENSORRT_INT8, ImageCalibrationReader, quantize_int8

    rng = np.random.default_rng(2)
    calib = rng.standard_normal((32, *IMAGE)).astype(np.float32)
    qdq = tmp_path / "student_int8.onnx"
    quantize_int8(onnx_models["fp32"], qdq, ImageCalibrationReader("image", 32, lambda i: calib[i]), "minmax",
                  tmp_path / "cache", "gpu-test", settings=TENSORRT_INT8)
    engine = tmp_path / "student_int8.engine"
    meta = build_engine(qdq, engine, BatchProfile(1, 4, 8), 1024, tmp_path / "timing.cache", "int8")
    assert meta["precision"] == "int8" and engine.stat().st_size > 0
    images = rng.standard_normal((4, *IMAGE)).astype(np.float32)
    assert cosine_rows(TrtRunner(engine)(images), reference(onnx_models["fp32"], images)).mean() >= 0.95
