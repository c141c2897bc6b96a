"""PyTorch -> ONNX: the student's encoders as graphs with a dynamic batch axis, checked and simplified.

Each encoder is exported on its own (an image encoder for the device, a text encoder where text must be
embedded on the device) and ends in L2 normalisation, so its output is the embedding a search index stores.
"""

from __future__ import annotations

import contextlib
import io
import logging
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import torch

import edgedistill.core.atomic as atomic
from edgedistill.core.errors import UserError

IMAGE_INPUT, IMAGE_OUTPUT = "image", "image_embedding"
# "embedding" alone collides with a value name inside open_clip's text graph under the dynamo exporter.
TEXT_INPUT, TEXT_OUTPUT = "text", "text_embedding"
OPSET = 18  # the dynamo exporter's own; TensorRT 10.x and onnxruntime >= 1.16 read it


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """(B, D) -> rows of unit length. Broadcasting instead of F.normalize's Expand keeps the graph free of
    shape arithmetic that onnxruntime's symbolic shape inference (quant_pre_process) cannot follow."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True).clamp_min(1e-24))


class ImageEncoder(torch.nn.Module):
    """(B, 3, H, W) float32 normalised pixels -> (B, D) L2-normalised embeddings."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.model.encode_image(image))


class TextEncoder(torch.nn.Module):
    """(B, L) int64 token ids (open_clip's tokenizer, padded to the context length) -> (B, D) L2-normalised."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.model.encode_text(text))


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporters print progress lines and warnings a user cannot act on; keep them for --debug."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export(module: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str,
            dynamo: bool) -> None:
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=[input_name],
                                    output_names=[output_name], dynamic_shapes={input_name: {0: batch}},
                                    opset_version=OPSET, verbose=False)
        program.save(str(path))
    else:
        torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=[input_name],
                          output_names=[output_name], opset_version=17,
                          dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})


class _ExportFailed(Exception):
    pass


def export_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str,
                output_name: str) -> dict[str, Any]:
    """Export ``module`` (eval mode, CPU, fp32) to ``path`` with a dynamic batch axis; checked and simplified.

    The dynamo exporter first (torch's default, needs onnxscript); the TorchScript exporter when dynamo cannot
    trace the model. The file appears under ``path`` only when complete and valid.
    Returns ``{"exporter", "opset", "simplified", "nodes"}``.
    """
    module = module.eval().float().cpu()
    if example.shape[0] < 2:  # torch.export specialises a size-1 dimension: trace a batch of 2
        example = torch.cat([example, example])
    errors = []
    for dynamo in (True, False):
        try:
            with atomic.atomic_path(path) as tmp:  # an exception inside removes the temporary file
                try:
                    with _quiet_exporter(), torch.no_grad():
                        _export(module, example, tmp, input_name, output_name, dynamo)
                except Exception as e:  # noqa: BLE001 - any exporter failure falls back / becomes one line
                    raise _ExportFailed(f"{'dynamo' if dynamo else 'torchscript'}: {type(e).__name__}: "
                                        f"{str(e).splitlines()[0][:200] if str(e) else ''}") from e
                model = onnx.load(str(tmp))
                onnx.checker.check_model(model)
                model, simplified = simplify(model)
                fixed = fixed_batch_axes(model)
                if fixed:  # a graph for one batch size fails at any other: refuse it, never name it
                    raise _ExportFailed(f"{'dynamo' if dynamo else 'torchscript'}: the batch axis of "
                                        f"{', '.join(fixed)} came out fixed, not symbolic")
                onnx.save(model, str(tmp))
        except _ExportFailed as e:
            errors.append(str(e))
            continue
        return {"exporter": "dynamo" if dynamo else "torchscript", "opset": opset_of(model),
                "simplified": simplified, "nodes": len(model.graph.node)}
    raise UserError(f"cannot export {type(module.model).__name__} to ONNX ({'; '.join(errors)}); "
                    "run with --debug and report it")


def fixed_batch_axes(model: onnx.ModelProto) -> list[str]:
    """Graph inputs and outputs whose first (batch) axis is a fixed number instead of a symbol, as an exporter
    that specialised on the example's batch (e.g. a batch of 1) leaves it."""
    fixed = []
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value") or not dims[0].dim_param:
            fixed.append(f"{value.name}{[d.dim_value or d.dim_param for d in dims]}")
    return fixed


def opset_of(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def simplify(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """onnxslim's constant folding and fusion, kept only when it removes nodes and the result checks."""
    try:
        import onnxslim  # deferred: optional; the graph is valid without it
    except ImportError:  # optional: the graph is valid without it
        return model, False
    try:
        with _quiet_exporter():
            slim = onnxslim.slim(model)
        onnx.checker.check_model(slim)
    except Exception:  # noqa: BLE001 - a simplifier failure must never lose a valid export
        return model, False
    if slim is None or len(slim.graph.node) >= len(model.graph.node):
        return model, False
    return slim, True


# Run in a child process: a graph that crashes the runtime (a segmentation fault) must fail the gate, not the export.
_DEFAULT_SESSION_PROBE = """
import sys, numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
out = session.run(None, {session.get_inputs()[0].name: np.load(sys.argv[2])})[0]
sys.exit(0 if np.isfinite(out).all() else 3)
"""

# OpenVINO as a user opens a graph: Core().compile_model(path, "CPU"), no properties (bf16 compute where the CPU
# has it). Its errors are stacks of "Exception from src/..." lines: the one line of substance goes to stderr.
_DEFAULT_OPENVINO_PROBE = """
import sys, numpy as np, openvino as ov
try:
    compiled = ov.Core().compile_model(sys.argv[1], "CPU")
    out = compiled.create_infer_request().infer({0: np.load(sys.argv[2])})[compiled.output(0)]
except Exception as e:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    print(([x for x in lines if not x.startswith(("Exception from", "Check '"))] or lines or [type(e).__name__])[-1],
          file=sys.stderr)
    sys.exit(4)
sys.exit(0 if np.isfinite(out).all() else 3)
"""


def check_default_session(path: Path, sample: np.ndarray, timeout_s: float = 300.0) -> None:
    """Open ``path`` the way a user does (``onnxruntime.InferenceSession(path)``, default options) in a child process
    and run ``sample`` through it; UserError when that crashes, fails or gives NaN, so no artifact is named that
    the runtime a user opens it with cannot run."""
    _probe(_DEFAULT_SESSION_PROBE, "onnxruntime", "onnxruntime's default session options", path, sample, timeout_s)


def check_default_openvino(path: Path, sample: np.ndarray, timeout_s: float = 300.0) -> None:
    """The same gate for OpenVINO's CPU runtime (``Core().compile_model(path, "CPU")``, default settings): bench
    and the loader run every ONNX graph there too when openvino is installed."""
    _probe(_DEFAULT_OPENVINO_PROBE, "OpenVINO", "OpenVINO's default CPU settings", path, sample, timeout_s)


def _probe(script: str, runtime: str, settings: str, path: Path, sample: np.ndarray, timeout_s: float) -> None:
    """Run ``script`` (argv: the graph, a .npy batch) in a child process; exit 0 = ran and finite, 3 = NaN/inf."""
    name = Path(path).name
    with tempfile.TemporaryDirectory(prefix="edgedistill-probe-") as tmp:
        np.save(Path(tmp) / "sample.npy", sample)
        try:
            proc = subprocess.run([sys.executable, "-c", script, str(path), str(Path(tmp) / "sample.npy")],
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise UserError(f"{name}: {runtime} with default options did not finish one batch in "
                            f"{timeout_s:.0f} s; nothing was kept") from None
    if proc.returncode == 0:
        return
    if proc.returncode < 0:
        why = f"it crashed {runtime} ({signal.Signals(-proc.returncode).name})"
    elif proc.returncode == 3:
        why = "its output holds NaN or inf"
    else:
        why = f"{runtime} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}"
    raise UserError(f"{name} does not run under {settings} ({why}); nothing was kept. Run with --debug and "
                    f"report it")


def cosine_parity(candidate: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Per-row cosine between two (N, D) embedding sets: mean and worst row."""
    a = candidate / np.maximum(np.linalg.norm(candidate, axis=1, keepdims=True), 1e-12)
    b = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
    cos = (a.astype(np.float64) * b).sum(axis=1)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
