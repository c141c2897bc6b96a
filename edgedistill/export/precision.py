"""Float16 conversion and calibrated INT8 QDQ quantisation: the precision lives in the ONNX graph.

Why, and the two INT8 flavours: docs/design.md#precision-in-the-onnx-graph.

FP16: every float32 initializer and op in float16, float32 inputs and outputs (so callers feed the same
arrays). INT8: ``onnxruntime.quantization`` after ``quant_pre_process`` (shape inference and graph
optimisation; without it INT8 on CPU is often slower than FP32), QDQ format, symmetric per-channel int8
weights. Activations: symmetric int8 for TensorRT (explicit quantisation with zero point 0 is what its
strongly typed builder accepts); asymmetric uint8 for onnxruntime on CPU, whose fast x86 kernels are U8S8 —
recorded with benchmarks/export_speed.py (ResNet-18 at 224 px, batch 1, 2 threads; benchmarks/README.md,
"Export"): uint8 activations 2.3x faster than fp32, symmetric int8 activations 0.7x (slower than fp32).

The TensorRT flavour follows NVIDIA's own ONNX quantiser (ModelOpt: ORT ``quantize_static`` with
``QuantizeBias`` off, then the QDQ graph converted to fp16): biases stay float (TensorRT rejects a
DequantizeLinear of int32 into a Conv/Gemm bias), and everything outside the Q/DQ pairs is fp16, because a
strongly typed engine runs each layer in its graph type and would otherwise run those layers in fp32.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
from onnx import version_converter
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import edgedistill.core.atomic as atomic
from edgedistill.core.errors import UserError
from edgedistill.core.hashing import sha256_file, sha256_json

CALIBRATION_METHODS = ("entropy", "minmax", "percentile")


@dataclass(frozen=True)
class Int8Settings:
    """How a graph is quantised (recorded in export.json). ``activations``: "uint8" (asymmetric, calibrated zero
    point: onnxruntime's fast x86 U8S8 kernels) or "int8" (symmetric, zero point 0: TensorRT). ``weights``: "int8"
    symmetric (or "uint8"); ``reduce_range``: weights in 7 bits, so the x86 kernels without VNNI (vpmaddubsw,
    which adds two u8 x s8 products into a saturating int16) cannot overflow; ``per_channel`` weight scales."""
    activations: str
    weights: str = "int8"
    reduce_range: bool = False
    per_channel: bool = True

    def describe(self) -> dict[str, Any]:
        return {"activations": f"{self.activations} {'symmetric' if self.activations == 'int8' else 'asymmetric'}",
                "weights": f"{self.weights} symmetric {'per-channel' if self.per_channel else 'per-tensor'}",
                "reduce_range": self.reduce_range}


# onnxruntime on CPU: uint8 activations, 7-bit int8 weights. Chosen by benchmarks/int8_settings.py (docs/runtime.md
# #int8): full-range weights saturate in onnxruntime's non-VNNI kernels (AVX2-only x86 CPUs); 7-bit weights hold
# the tolerance on CPUs with and without VNNI.
ORT_CPU_INT8 = Int8Settings("uint8", reduce_range=True)
# TensorRT: symmetric int8 activations (explicit quantisation with zero point 0); its kernels do not saturate.
TENSORRT_INT8 = Int8Settings("int8")
CALIBRATION_BATCH = 8  # images per calibration inference
CALIBRATION_STRIDE = 8  # batches per histogram update: bounds memory, since ORT keeps every activation until then
FP16_QDQ_OPSET = 19  # QuantizeLinear/DequantizeLinear take float16 inputs and scales from opset 19 on


# Ops kept in float32 beside the converter's own list: LayerNormalization's mean and variance lose precision in
# float16, and onnxruntime 1.32's default CPU session (ORT_ENABLE_ALL) crashes with a segmentation fault on a
# transformer text graph whose LayerNormalization runs in float16 (measured: blocking it alone prevents the crash).
FP32_OPS = ("LayerNormalization",)


def to_fp16(src: Path, dst: Path) -> None:
    """``dst`` = ``src`` with float16 weights and compute, float32 inputs/outputs (written atomically).

    A QDQ graph is first moved to opset 19 (fp16 Q/DQ), so its Q/DQ pairs become fp16 too.
    """
    # deferred: onnxruntime is an extra (cpu/gpu), needed only when a graph is converted or quantised
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(src))
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        model = _at_least_opset(model, FP16_QDQ_OPSET)
    # keep_io_types: callers keep feeding float32 arrays; casts sit at the graph's edges.
    half = OnnxModel(convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False,
                                              op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP32_OPS]))
    half.topological_sort()  # the converter appends the input casts last; the checker (and TensorRT) want order
    half = half.model
    onnx.checker.check_model(half)
    with atomic.atomic_path(dst) as tmp:
        onnx.save(half, str(tmp))


def _at_least_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    if current >= opset:
        return model
    return version_converter.convert_version(model, opset)


class ImageCalibrationReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over images: batches of (B, 3, H, W) float32.

    ``load(i)`` gives image ``i`` preprocessed; supports ``set_range`` so onnxruntime can calibrate in strides
    (histograms are merged stride by stride instead of holding every activation of every image at once).
    """

    def __init__(self, input_name: str, n_images: int, load: Callable[[int], np.ndarray],
                 progress: Callable[[int], None] | None = None, batch_size: int = CALIBRATION_BATCH) -> None:
        self.input_name = input_name
        self.load = load
        self.progress = progress
        self.batches = [list(range(i, min(i + batch_size, n_images))) for i in range(0, n_images, batch_size)]
        self.start, self.end = 0, len(self.batches)
        self.position = 0

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end = start_index, min(end_index, len(self.batches))
        self.position = self.start

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= self.end:
            return None
        batch = self.batches[self.position]
        self.position += 1
        images = np.stack([self.load(i) for i in batch]).astype(np.float32)
        if self.progress is not None:
            self.progress(len(batch))
        return {self.input_name: images}

    def rewind(self) -> None:
        self.position = self.start


def _stride(n_batches: int) -> int:
    """The largest stride <= CALIBRATION_STRIDE dividing ``n_batches`` (onnxruntime requires a divisor)."""
    return max(s for s in range(1, min(CALIBRATION_STRIDE, n_batches) + 1) if n_batches % s == 0)


def calibration_cache_path(root: Path, model_sha256: str, method: str, data_hash: str,
                           symmetric: bool = True) -> Path:
    """Where the tensor ranges of one (model, method, calibration images, activation flavour) live."""
    key = sha256_json([model_sha256, method, data_hash, symmetric])[:24]
    return root / "calibration" / f"{method}-{key}.json"


def _supports_calibration_cache() -> bool:
    from onnxruntime.quantization import quantize_static  # deferred: onnxruntime is an extra

    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def quantize_int8(src: Path, dst: Path, reader: ImageCalibrationReader, method: str, cache_root: Path,
                  data_hash: str, console: Console | None = None,
                  settings: Int8Settings = ORT_CPU_INT8) -> dict[str, Any]:
    """``dst`` = INT8 QDQ graph of the fp32 ``src``, calibrated with ``method`` on ``reader``'s images.

    ``settings``: ORT_CPU_INT8 (onnxruntime on CPU) or TENSORRT_INT8 (symmetric activations, float biases, fp16
    outside the Q/DQ pairs). Activation ranges are cached by (sha256 of ``src``, method, ``data_hash``,
    activation flavour): a second export with the same model and images skips calibration.
    Returns ``{"method", "images", "activations", "weights", "reduce_range", "cache", "cache_hit", ...}``.
    """
    symmetric_activations = settings.activations == "int8"
    # deferred: onnxruntime is an extra, needed only when a graph is quantised
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise UserError(f"unknown calibration method {method!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
    calib_method = {"entropy": CalibrationMethod.Entropy, "minmax": CalibrationMethod.MinMax,
                    "percentile": CalibrationMethod.Percentile}[method]
    n_images = sum(len(b) for b in reader.batches)
    cache = calibration_cache_path(cache_root, sha256_file(src), method, data_hash, symmetric_activations)
    hit = cache.is_file()
    with tempfile.TemporaryDirectory(prefix="edgedistill-int8-") as work:
        pre = Path(work) / "preprocessed.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
        options: dict[str, Any] = {"ActivationSymmetric": symmetric_activations, "WeightSymmetric": settings.weights == "int8",
                                   "CalibStridedMinMax": _stride(len(reader))}
        if symmetric_activations:  # TensorRT: float biases (no int32 DequantizeLinear into Conv/Gemm)
            options["QuantizeBias"] = False
        if method == "percentile":
            options["CalibPercentile"] = 99.999
        kwargs: dict[str, Any] = {}
        new_cache = Path(work) / "ranges.json"
        if _supports_calibration_cache():
            kwargs["calibration_cache_path"] = str(cache if hit else new_cache)
        else:
            hit = False
        with atomic.atomic_path(dst) as tmp:
            with _calibration_progress(console, 0 if hit else n_images, method) as advance:
                own = reader.progress
                reader.progress = advance if own is None else (lambda n: (advance(n), own(n)) and None)
                quantize_static(str(pre), str(tmp), None if hit else reader, quant_format=QuantFormat.QDQ,
                                per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                                activation_type=QuantType.QInt8 if symmetric_activations else QuantType.QUInt8,
                                weight_type=QuantType.QInt8 if settings.weights == "int8" else QuantType.QUInt8,
                                calibrate_method=calib_method,
                                extra_options=options, **kwargs)
            if symmetric_activations:  # TensorRT: layers outside the Q/DQ pairs in fp16, not fp32
                to_fp16(tmp, tmp)
            onnx.checker.check_model(str(tmp))
        if not hit and new_cache.is_file():
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_bytes(cache, new_cache.read_bytes())
    return {"method": method, "images": n_images, **settings.describe(),
            "high_precision": "fp16" if symmetric_activations else "fp32",
            "cache": str(cache) if cache.is_file() else None, "cache_hit": hit}


class _calibration_progress:
    """A rich progress bar over calibration images (nothing when there is no console or nothing to do)."""

    def __init__(self, console: Console | None, total: int, method: str) -> None:
        self.bar = Progress(TextColumn(f"INT8 calibration ({method})"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, transient=True) \
            if console is not None and total else None
        self.total = total

    def __enter__(self) -> Callable[[int], None]:
        if self.bar is None:
            return lambda n: None
        self.bar.start()
        task = self.bar.add_task("calibrate", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


def calibration_data_hash(paths: Sequence[Path], transform_desc: dict[str, Any]) -> str:
    """Identity of the calibration images: their paths, sizes and modification times, and the preprocessing."""
    h = hashlib.sha256(json.dumps(transform_desc, sort_keys=True, default=str).encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
