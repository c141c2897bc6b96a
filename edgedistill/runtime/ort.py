"""onnxruntime sessions as edgedistill opens them: full graph optimisation (the level a user's default session runs
at; every exported graph is checked to run there), quiet logs, an optional thread count and providers. No torch:
the device runtime uses this too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgedistill.core.errors import UserError


# onnxruntime's session config keys (onnxruntime_session_options_config_keys.h): "1" lets idle pool threads spin
SPIN_KEYS = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")


def ort_session(path: Path, threads: int | None = None, providers: list[Any] | None = None,
                optimize: bool = True, spin: bool | None = None) -> Any:
    """An onnxruntime session with full graph optimisation (CPU unless ``providers`` say otherwise), the level a
    user's default session runs at (every exported graph is checked to run there: ``check_default_session``).

    ``providers``: names or (name, options) pairs. ``optimize=False`` hands the graph over untouched (TensorRT's
    provider optimises it itself). ``threads``: intra-op threads (inter-op 1); None: onnxruntime's default (one
    per core). ``spin``: whether idle pool threads busy-wait for the next op; None keeps onnxruntime's default
    (on). Spinning lowers latency on idle cores and costs it when other processes want them
    (docs/design.md#formats-and-backends).
    """
    import onnxruntime as ort  # deferred: an extra (cpu, gpu, device), not a core dependency

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize \
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if spin is not None:
        for key in SPIN_KEYS:
            options.add_session_config_entry(key, "1" if spin else "0")
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def run_session(session: Any, inputs: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """(N, ...) -> (N, D) float32, in batches of ``batch_size``."""
    if not session.get_inputs():
        raise UserError("the ONNX graph has no inputs; an encoder takes one (export again)")
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: inputs[i:i + batch_size]})[0] for i in range(0, len(inputs), batch_size)]
    return np.concatenate(outs).astype(np.float32) if outs else np.zeros((0, 0), np.float32)
