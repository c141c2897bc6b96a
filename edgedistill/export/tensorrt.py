"""TensorRT engines: build a strongly typed engine from an ONNX graph on the target device (the BUILD side).

Running an engine is the device layer's (runtime/tensorrt.py: ``TrtRunner``, numpy in and out, buffers from
cuda-python); this module imports the run-side pieces from there (``BatchProfile``, ``require_tensorrt``,
``device_metadata``, the sidecar helpers) and uses ``TrtRunner`` for the export's parity check.

Precision lives in the ONNX graph (docs/design.md#precision-in-the-onnx-graph): an fp16 graph gives an fp16
engine, a QDQ graph (fp16 around its Q/DQ pairs) an INT8 engine. TensorRT 11 removed the FP16/INT8 builder
flags and the implicit calibrators, and JetPack 6.1+'s TensorRT 10.3 builds strongly typed networks too, so this
module sets no precision flag at all and uses only APIs that TensorRT 10 and 11 both have (docs/gpu.md lists
each call and its documentation). TensorRT before 10 (JetPack 5, JetPack 6.0) has no strongly typed networks and
is refused (``require_tensorrt``, before any work). Each engine gets a sidecar ``<engine>.json`` naming the
TensorRT version, GPU, compute capability, SM count and board it was built on.

``tensorrt`` and CUDA are imported lazily: this module imports (and its pure parts are tested) on a CPU machine.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import numpy as np

import edgedistill.core.atomic as atomic
from edgedistill.core.errors import UserError
import edgedistill.runtime.manifest as artifacts
from edgedistill.runtime.formats import PRECISIONS, artifact_file
from edgedistill.core.terminal import make_console, warn
from edgedistill.runtime.tensorrt import (REBUILD_HINT, BatchProfile, TrtRunner, check_compatible,
                                          describe_device, device_metadata, dtype_name, is_dynamic,
                                          read_sidecar, require_tensorrt, sidecar_path, verify_sha256)

__all__ = ["REBUILD_HINT", "BatchProfile", "TrtRunner", "build_engine", "check_compatible", "device_metadata",
           "export_engines", "network_flags", "profile_shapes", "read_sidecar", "require_tensorrt", "sidecar_path",
           "verify_sha256"]


# ----------------------------------------------------------------------------------------- pure helpers


def profile_shapes(input_shape: Sequence[Any], profile: BatchProfile,
                   name: str = "input") -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) shapes of one network input for the batch ``profile``.

    Axis 0 is the batch axis: dynamic (-1, None or a symbol) takes the profile's sizes; a fixed batch must fit
    the profile exactly. Every other axis must be fixed (the student's image size is known at export).
    """
    shape = tuple(input_shape)
    if not shape:
        raise UserError(f"network input '{name}' is a scalar and has no batch axis; "
                        f"export the ONNX with a leading batch axis")
    rest = shape[1:]
    bad = [i + 1 for i, d in enumerate(rest) if is_dynamic(d)]
    if bad:
        shown = "(" + ", ".join("?" if is_dynamic(d) else str(int(d)) for d in shape) + ")"
        raise UserError(f"network input '{name}' has shape {shown} with dynamic axis {bad[0]}; only the batch "
                        f"axis may be dynamic: export the ONNX with a fixed image size")
    fixed = tuple(int(d) for d in rest)
    batch = shape[0]
    if not is_dynamic(batch) and not profile.min == profile.opt == profile.max == int(batch):
        raise UserError(f"network input '{name}' has a fixed batch of {int(batch)} but the batch profile is "
                        f"{profile.describe()}: export the ONNX with a dynamic batch axis, or use batch "
                        f"{int(batch)}/{int(batch)}/{int(batch)}")
    return (profile.min, *fixed), (profile.opt, *fixed), (profile.max, *fixed)


def _tensor_info(tensor: Any) -> dict[str, Any]:
    shape = [-1 if is_dynamic(d) else int(d) for d in tuple(tensor.shape)]
    return {"name": tensor.name, "shape": shape, "dtype": dtype_name(tensor.dtype)}


# ---------------------------------------------------------------------------------------------- building


def network_flags(trt: ModuleType) -> int:
    """``create_network`` flags: STRONGLY_TYPED, or a one-line UserError naming the version that lacks it.

    Required on TensorRT 10.x, deprecated and ignored on 11.x (always strongly typed): safe to set on both.
    TensorRT 8.x has no such flag: flags 0 there make an implicit-batch network the ONNX parser refuses, and
    its precision flags would need a different graph, so it is refused. EXPLICIT_BATCH is not set: ignored
    since 10.0 (every network is explicit batch) and gone in 11.0.
    """
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    if flag is None:
        raise UserError(f"TensorRT {getattr(trt, '__version__', '?')} cannot build strongly typed networks, which "
                        f"--format trt needs (precision lives in the graph): install TensorRT 10 or newer "
                        f"(JetPack 6.1+ ships 10.3), or export --format onnx and run it with onnxruntime")
    return 1 << int(flag)


def _parse_errors(parser: Any) -> str:
    errors = []
    for i in range(int(getattr(parser, "num_errors", 0))):
        err = parser.get_error(i)
        desc = err.desc() if hasattr(err, "desc") else str(err)
        node = err.node_name() if hasattr(err, "node_name") else None
        errors.append(f"{desc} (node {node})" if node else str(desc))
    if not errors:
        return "no error reported"
    return errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")


def _progress_monitor(trt: ModuleType, status: Any) -> Any:
    """A TensorRT progress monitor that shows the current build phase in a rich status line (TensorRT 10+)."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None or status is None:
        return None

    class _Monitor(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            self.phases: dict[str, tuple[int, int]] = {}

        def _show(self) -> None:
            parts = [f"{name} {done}/{total}" for name, (done, total) in list(self.phases.items())]
            status.update(f"building TensorRT engine: {' > '.join(parts) or '...'}")

        # TensorRT calls these from its own threads: never let an exception escape into it
        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            try:
                self.phases[phase_name] = (0, num_steps)
                self._show()
            except Exception:
                pass

        def step_complete(self, phase_name: str, step: int) -> bool:
            try:
                total = self.phases.get(phase_name, (0, 0))[1]
                self.phases[phase_name] = (step + 1, total)
                self._show()
            except Exception:
                pass
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            try:
                self.phases.pop(phase_name, None)
                self._show()
            except Exception:
                pass

    return _Monitor()


def _load_timing_cache(config: Any, path: Path, console: Any) -> Any:
    """Attach the timing cache at ``path`` (or a fresh one) to ``config``; a stale cache is replaced, not fatal."""
    if path.is_file():
        cache = config.create_timing_cache(path.read_bytes())
        if cache is not None and config.set_timing_cache(cache, False):
            return cache
        # made by another GPU or TensorRT version: timing only speeds the build up, so start afresh
        warn(console, f"timing cache {path} was made by another GPU or TensorRT version; starting a new one")
    cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, False)
    return cache


def build_engine(onnx_path: Path, engine_path: Path, profile: BatchProfile, workspace_mb: int,
                 timing_cache: Path, precision: str, console: Any = None) -> dict[str, Any]:
    """Build a strongly typed TensorRT engine from ``onnx_path`` on this GPU; returns the sidecar metadata.

    The precision is the graph's (``precision`` is recorded, not applied). Every network input gets the batch
    ``profile`` on axis 0. The timing cache at ``timing_cache`` is read when present and written back after
    the build, so later builds of similar graphs skip kernel timing. The engine and ``<engine>.json`` are
    written atomically.
    """
    trt = require_tensorrt()
    console = console or make_console(stderr=True)
    onnx_path, engine_path, timing_cache = Path(onnx_path), Path(engine_path), Path(timing_cache)
    if not onnx_path.is_file():
        raise UserError(f"ONNX model {onnx_path} not found; export one first with `edgedistill export`")
    if workspace_mb < 1:
        raise UserError(f"workspace_mb must be at least 1 (got {workspace_mb})")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}'; choose fp32, fp16 or int8")
    model_bytes = onnx_path.read_bytes()

    flags = network_flags(trt)  # refuses TensorRT < 10 before any work
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model_bytes):
        raise UserError(f"TensorRT cannot parse {onnx_path}: {_parse_errors(parser)}; "
                        f"re-export the ONNX (opset 17) or simplify the unsupported operator")
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    config = _builder_config(trt, builder, inputs, profile, workspace_mb)
    cache = _load_timing_cache(config, timing_cache, console)
    label = f"building TensorRT engine ({precision}, batch {profile.describe()}) from {onnx_path.name}"
    serialized = _build_with_progress(trt, builder, network, config, console, label)
    if serialized is None:
        raise UserError(f"TensorRT could not build an engine from {onnx_path} (its log above says why): "
                        f"try a larger workspace_mb (now {workspace_mb}) or a smaller batch max "
                        f"(now {profile.max})")

    engine_bytes = bytes(serialized)
    atomic.write_bytes(engine_path, engine_bytes)
    cache_out = config.get_timing_cache() or cache
    atomic.write_bytes(timing_cache, bytes(cache_out.serialize()))

    meta: dict[str, Any] = {
        "format": "tensorrt",
        "engine": engine_path.name,
        "sha256": hashlib.sha256(engine_bytes).hexdigest(),
        **device_metadata(trt),
        "precision": precision,
        "profile": asdict(profile),
        "workspace_mb": int(workspace_mb),
        "onnx": {"path": str(onnx_path), "sha256": hashlib.sha256(model_bytes).hexdigest()},
        "inputs": [_tensor_info(t) for t in inputs],
        "outputs": [_tensor_info(t) for t in outputs],
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic.write_json(sidecar_path(engine_path), meta)
    console.print(f"TensorRT engine {engine_path} ({len(engine_bytes) / 2**20:.1f} MiB, {precision}, "
                  f"batch {profile.describe()}) for {describe_device(meta)}")
    return meta


def _builder_config(trt: Any, builder: Any, inputs: list[Any], profile: BatchProfile, workspace_mb: int) -> Any:
    """The builder config: the workspace limit and one optimization profile, ``profile`` on every input's axis 0."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    opt_profile = builder.create_optimization_profile()
    for tensor in inputs:
        opt_profile.set_shape(tensor.name, *profile_shapes(tuple(tensor.shape), profile, tensor.name))
    config.add_optimization_profile(opt_profile)
    return config


def _build_with_progress(trt: Any, builder: Any, network: Any, config: Any, console: Any, label: str) -> Any:
    """``build_serialized_network`` under a status line that TensorRT's progress monitor updates (when it has one)."""
    with console.status(label) as status:
        # TensorRT holds the monitor without owning it: this frame keeps it alive until it is detached below
        monitor = _progress_monitor(trt, status)
        if monitor is not None:
            try:
                config.progress_monitor = monitor
            except (AttributeError, TypeError):
                monitor = None
        try:
            return builder.build_serialized_network(network, config)
        finally:
            if monitor is not None:
                try:
                    config.progress_monitor = None
                except (AttributeError, TypeError):
                    pass


# ------------------------------------------------------------------------------------------------ the export
def _embed(runner: TrtRunner, x: np.ndarray) -> np.ndarray:
    """(N, ...) -> first output (N, D) float32, in batches the engine's profile accepts (a short last batch is
    padded up to the profile's min, and the padding dropped)."""
    low, high = runner.profile.min, runner.profile.max
    outs = []
    for i in range(0, len(x), high):
        chunk = x[i:i + high]
        padded = np.concatenate([chunk] * -(-low // len(chunk)))[:low] if len(chunk) < low else chunk
        outs.append(np.asarray(runner(padded))[:len(chunk)])
    return np.concatenate(outs).astype(np.float32)


def export_engines(job: Any, graphs: dict[tuple[str, str], Path]) -> list[dict[str, Any]]:
    """``--format trt`` (formats.FORMATS['trt'].build): a strongly typed engine per exported graph of the plan's
    precisions (its precision is the graph's), checked against PyTorch like the graphs through the runtime's
    ``TrtRunner`` (numpy in and out, what a device runs); ``job`` is the exporter's ExportJob."""
    trt = require_tensorrt()
    meta = device_metadata(trt)
    gpu = "".join(c if c.isalnum() else "-" for c in str(meta.get("gpu_name", "gpu")))
    timing_cache = job.recipe.cache.root / "tensorrt" / \
        f"timing-{gpu}-sm{meta.get('compute_capability')}-trt{meta.get('tensorrt_version')}.cache"
    profile = BatchProfile(*job.plan.profile)
    entries = []
    for (encoder, precision), path in graphs.items():
        if precision == "fp32" and job.plan.precisions:
            continue
        engine = path.with_name(artifact_file(encoder, precision, "trt"))
        info = build_engine(path, engine, profile, job.plan.workspace_mb, timing_cache, precision, console=job.console)
        with TrtRunner(engine) as runner:  # frees its GPU buffers before the next engine is built
            inputs = job.parity_images if encoder == "image" else job.tokens
            parity = job.parity(encoder, precision, _embed(runner, inputs),
                                f"TensorRT {precision} engine of the {encoder} encoder", discard=engine)
            val = job.val_metrics(_embed(runner, job.images), engine.name) if encoder == "image" else None
        entry = artifacts.artifact_entry(job.out, engine, name=f"{encoder}_{precision}_trt", encoder=encoder,
                                         fmt="trt", precision=precision, parity=parity, engine=info)
        if val is not None:
            entry["val"] = val
        entries.append(entry)
        job.say(entry)
    return entries
