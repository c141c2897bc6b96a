"""TensorRT engines: build a strongly typed engine from an ONNX graph on the target device, and run it.

Precision lives in the ONNX graph (docs/design.md#precision-in-the-onnx-graph): an fp16 graph gives an fp16
engine, a QDQ graph (fp16 around its Q/DQ pairs) an INT8 engine. TensorRT 11 removed the FP16/INT8 builder
flags and the implicit calibrators, and JetPack 6.1+'s TensorRT 10.3 builds strongly typed networks too, so this
module sets no precision flag at all and uses only APIs that TensorRT 10 and 11 both have (docs/gpu.md lists
each call and its documentation). TensorRT before 10 (JetPack 5, JetPack 6.0) has no strongly typed networks and
is refused. Engines are not portable across GPUs or TensorRT versions: each engine gets a sidecar
``<engine>.json`` naming the TensorRT version, GPU, compute capability, SM count and board it was built on, and a
runner refuses, before deserialising, an engine built elsewhere.

``tensorrt`` and CUDA are imported lazily: this module imports (and its pure parts are tested) on a CPU machine.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import numpy as np

import edgedistill.atomic as atomic
from edgedistill.errors import UserError
from edgedistill.export import artifacts
from edgedistill.hashing import sha256_file
from edgedistill.jetson import detect_jetson
from edgedistill.terminal import make_console, warn

REBUILD_HINT = "rebuild it here with `edgedistill export --format trt`"
ALIGNMENT = 256  # bytes: TensorRT wants every tensor address aligned to this (IExecutionContext.set_tensor_address)
# What an engine is tied to: TensorRT refuses a plan from another version (patch and build included), and kernels
# are tuned per GPU ("Orin" is the name of Orin Nano, NX and AGX alike, so SM count and board tell them apart).
IDENTITY_KEYS = ("tensorrt_version", "gpu_name", "compute_capability", "sm_count", "board_model")


@dataclass(frozen=True)
class BatchProfile:
    """TensorRT optimisation profile of the batch axis: the engine accepts batches in [min, max], tuned for opt."""
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise UserError(f"batch profile needs 1 <= min <= opt <= max "
                            f"(got min={self.min}, opt={self.opt}, max={self.max})")

    def describe(self) -> str:
        return f"{self.min}/{self.opt}/{self.max}"


# ----------------------------------------------------------------------------------------- environment


def require_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or a one-line UserError saying which of the two requirements is missing."""
    try:
        import tensorrt as trt  # deferred: optional (the gpu extra, or JetPack)
    except ImportError as e:
        if e.name == "tensorrt":
            raise UserError("--format trt needs TensorRT, which is not installed (the gpu extra): "
                            "pip install -e '.[gpu]' on a machine with an NVIDIA GPU and CUDA") from None
        raise UserError(f"--format trt needs TensorRT, which is installed but does not load ({e}): "
                        f"reinstall it with pip install -e '.[gpu]' on a machine with CUDA") from None
    except OSError as e:  # a wheel whose CUDA libraries are missing
        raise UserError(f"--format trt needs TensorRT, which is installed but does not load ({e}): "
                        f"reinstall it with pip install -e '.[gpu]' on a machine with CUDA") from None
    require_cuda("--format trt")
    return trt


def require_cuda(what: str) -> None:
    """UserError unless torch sees an NVIDIA GPU."""
    import torch  # deferred: a device that runs engines may have no torch for this module's other uses
    if not torch.cuda.is_available():
        raise UserError(f"{what} needs an NVIDIA GPU and torch sees none (torch.cuda.is_available() is False): "
                        f"run it on the target device with CUDA and pip install -e '.[gpu]', "
                        f"or export with --format onnx for CPU")


def board_model() -> str | None:
    """The Jetson module's device-tree model ("NVIDIA Jetson AGX Orin Developer Kit"), None off a Jetson."""
    info = detect_jetson()
    return info.model if info is not None else None


def device_metadata(trt: ModuleType) -> dict[str, Any]:
    """What an engine depends on (IDENTITY_KEYS): the full TensorRT version, GPU name, compute capability
    ("8.7"), SM count and Jetson board model (None elsewhere); and the CUDA version, for the record."""
    import torch  # deferred: a device that runs engines may have no torch for this module's other uses
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "tensorrt_version": str(trt.__version__),
        "gpu_name": str(props.name),
        "compute_capability": f"{props.major}.{props.minor}",
        "sm_count": int(props.multi_processor_count),
        "board_model": board_model(),
        "cuda": torch.version.cuda,
    }


def _describe_device(meta: dict[str, Any]) -> str:
    sms = meta.get("sm_count")
    board = f", {meta['board_model']}" if meta.get("board_model") else ""
    return (f"{meta.get('gpu_name', 'an unknown GPU')} (sm {meta.get('compute_capability', '?')}, "
            f"{sms if sms is not None else '?'} SMs{board}) with TensorRT {meta.get('tensorrt_version', '?')}")


def check_compatible(meta: dict[str, Any], current: dict[str, Any], what: str = "the engine",
                     hint: str = REBUILD_HINT) -> None:
    """UserError when an engine built for ``meta`` cannot run on the ``current`` device.

    Every IDENTITY_KEYS value must be equal, the TensorRT version to the build number; a value the engine's
    metadata lacks (an engine from an older edgedistill) counts as different: rebuild, never guess.
    """
    if any(str(meta.get(k)) != str(current.get(k)) for k in IDENTITY_KEYS):
        raise UserError(f"{what} was built for {_describe_device(meta)}; this machine has "
                        f"{_describe_device(current)}: {hint}")


# ----------------------------------------------------------------------------------------- pure helpers


def _is_dynamic(dim: Any) -> bool:
    # ONNX/TensorRT mark a runtime dimension as -1, None, or a symbolic name such as "batch"
    return dim is None or isinstance(dim, str) or (isinstance(dim, (int, np.integer)) and dim < 0)


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
    bad = [i + 1 for i, d in enumerate(rest) if _is_dynamic(d)]
    if bad:
        shown = "(" + ", ".join("?" if _is_dynamic(d) else str(int(d)) for d in shape) + ")"
        raise UserError(f"network input '{name}' has shape {shown} with dynamic axis {bad[0]}; only the batch "
                        f"axis may be dynamic: export the ONNX with a fixed image size")
    fixed = tuple(int(d) for d in rest)
    batch = shape[0]
    if not _is_dynamic(batch) and not profile.min == profile.opt == profile.max == int(batch):
        raise UserError(f"network input '{name}' has a fixed batch of {int(batch)} but the batch profile is "
                        f"{profile.describe()}: export the ONNX with a dynamic batch axis, or use batch "
                        f"{int(batch)}/{int(batch)}/{int(batch)}")
    return (profile.min, *fixed), (profile.opt, *fixed), (profile.max, *fixed)


_DTYPES = {  # TensorRT DataType member name -> numpy/torch dtype name
    "FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
    "INT32": "int32", "INT64": "int64", "BOOL": "bool", "FP8": "float8_e4m3fn",
}


def dtype_name(trt_dtype: Any) -> str:
    """A TensorRT DataType as a numpy/torch dtype name ('float32', 'float16', ...)."""
    name = getattr(trt_dtype, "name", None) or str(trt_dtype).rsplit(".", 1)[-1]
    return _DTYPES.get(name, name.lower())


def torch_dtype(trt_dtype: Any) -> Any:
    """The torch dtype of a TensorRT DataType (float32, float16, bfloat16, int8, uint8, int32, int64, bool)."""
    import torch  # deferred: a device that runs engines may have no torch for this module's other uses
    name = dtype_name(trt_dtype)
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise UserError(f"the engine has a tensor of TensorRT type {name}, which this runner does not handle")
    return dtype


def aligned(tensor: Any) -> Any:
    """``tensor`` when its address is ALIGNMENT-aligned, else a contiguous copy at an aligned address.

    torch's CUDA allocator hands out aligned blocks, but a slice (``x[1:]``) starts inside one.
    """
    if tensor.data_ptr() % ALIGNMENT == 0:
        return tensor
    import torch  # deferred: a device that runs engines may have no torch for this module's other uses
    size = tensor.element_size()  # 1, 2, 4 or 8: divides ALIGNMENT
    buffer = torch.empty(tensor.numel() + ALIGNMENT // size, dtype=tensor.dtype, device=tensor.device)
    start = (-buffer.data_ptr() % ALIGNMENT) // size
    out = buffer[start:start + tensor.numel()].view(tensor.shape)
    out.copy_(tensor)
    return out


def sidecar_path(artifact: Path) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + ".json")


def read_sidecar(artifact: Path, kind: str = "engine", hint: str = REBUILD_HINT) -> dict[str, Any]:
    """The metadata written next to an engine, or a UserError saying to rebuild."""
    path = sidecar_path(artifact)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{kind} {artifact} has no metadata file {path.name} (which GPU and TensorRT built "
                        f"it is unknown): {hint}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{kind} metadata {path} is unreadable ({e}): {hint}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{kind} metadata {path} is not a JSON object: {hint}")
    return meta


def verify_sha256(artifact: Path, meta: dict[str, Any], kind: str = "engine", hint: str = REBUILD_HINT) -> None:
    """UserError unless the file's sha256 is the one its metadata recorded (nothing unchecked runs)."""
    expected = meta.get("sha256")
    actual = sha256_file(artifact)
    if expected != actual:
        raise UserError(f"{kind} {artifact} does not match the sha256 in {sidecar_path(artifact).name} "
                        f"(changed or half-copied): copy it again, or {hint}")


def _tensor_info(tensor: Any) -> dict[str, Any]:
    shape = [-1 if _is_dynamic(d) else int(d) for d in tuple(tensor.shape)]
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
    if precision not in ("fp32", "fp16", "int8"):
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
                  f"batch {profile.describe()}) for {_describe_device(meta)}")
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


# ---------------------------------------------------------------------------------------------- running


class TrtRunner:
    """Run a TensorRT engine with torch CUDA tensors as its buffers (no pycuda / cuda-python needed).

    ``runner(x)`` takes numpy arrays or torch tensors (one positional per input, or by name) and returns the
    first output as a numpy array; ``runner.infer_torch(x_cuda)`` returns it as a CUDA tensor without copies.
    """

    def __init__(self, engine_path: Path) -> None:
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise UserError(f"TensorRT engine {self.path} not found; build it with `edgedistill export --format trt`")
        self.meta = read_sidecar(self.path)
        trt = require_tensorrt()
        # before deserialising: a foreign engine fails inside TensorRT with an unhelpful message, or worse
        check_compatible(self.meta, device_metadata(trt), what=f"engine {self.path}")
        verify_sha256(self.path, self.meta)
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)  # must outlive the engine
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise UserError(f"TensorRT could not load engine {self.path} (its log above says why): {REBUILD_HINT}")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise UserError(f"TensorRT could not create an execution context for {self.path} "
                            f"(out of GPU memory?): free GPU memory, or rebuild with a smaller batch max")
        self.input_names: list[str] = []
        self.output_names: list[str] = []
        self.dtypes: dict[str, Any] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            self.dtypes[name] = torch_dtype(self.engine.get_tensor_dtype(name))
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.input_names.append(name)
            else:
                self.output_names.append(name)
        self._stream: Any = None  # a CUDA stream, made on first use
        self.device = "cuda"      # where outputs are allocated (the CPU tests bind on "cpu")
        profile = self.meta.get("profile") or {}
        self.profile = BatchProfile(int(profile.get("min", 1)), int(profile.get("opt", 1)),
                                    int(profile.get("max", 1)))

    def _feeds(self, args: tuple[Any, ...], named: dict[str, Any]) -> dict[str, Any]:
        import torch  # deferred: a device that runs engines may have no torch for this module's other uses
        if len(args) > len(self.input_names):
            raise UserError(f"engine {self.path.name} takes {len(self.input_names)} input(s) "
                            f"({', '.join(self.input_names)}), got {len(args)}")
        feeds = dict(zip(self.input_names, args))
        for name, value in named.items():
            if name not in self.input_names or name in feeds:
                raise UserError(f"engine {self.path.name} has no input '{name}' or got it twice; "
                                f"inputs: {', '.join(self.input_names)}")
            feeds[name] = value
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise UserError(f"engine {self.path.name} needs input(s) {', '.join(missing)}")
        out = {}
        for name, value in feeds.items():
            tensor = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
            if not isinstance(tensor, torch.Tensor):
                raise UserError(f"input '{name}' must be a numpy array or a torch tensor, "
                                f"not {type(value).__name__}")
            out[name] = tensor.to(device="cuda", dtype=self.dtypes[name]).contiguous()
        return out

    def _check_shape(self, name: str, tensor: Any) -> None:
        expected = tuple(self.engine.get_tensor_shape(name))
        shape = tuple(tensor.shape)
        if len(shape) != len(expected) or any(e >= 0 and e != s for e, s in zip(expected[1:], shape[1:])):
            want = "(" + ", ".join("B" if i == 0 else str(d) for i, d in enumerate(expected)) + ")"
            raise UserError(f"input '{name}' has shape {shape}; engine {self.path.name} expects {want}")
        batch = shape[0]
        if not self.profile.min <= batch <= self.profile.max:
            raise UserError(f"batch {batch} is outside engine {self.path.name}'s profile "
                            f"{self.profile.min}..{self.profile.max}: split the batch, or rebuild with a "
                            f"larger batch max in the target")

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """Run on contiguous CUDA tensors of the engine's dtypes -> every output as a CUDA tensor, by name.

        Asynchronous like any torch op: the work is ordered after torch's current stream and before whatever
        the caller does next on it, so reading an output (``.cpu()``) or a CUDA event waits for it.
        """
        import torch  # deferred: a device that runs engines may have no torch for this module's other uses
        for name in self.input_names:
            tensor = feeds[name]
            self._check_shape(name, tensor)
            if not tensor.is_cuda or tensor.dtype != self.dtypes[name] or not tensor.is_contiguous():
                raise UserError(f"input '{name}' must be a contiguous CUDA tensor of {self.dtypes[name]} "
                                f"(got {tensor.dtype} on {tensor.device}); or call the runner, which converts")
        current = torch.cuda.current_stream()
        if self._stream is None:
            # TensorRT syncs extra on the legacy default stream (and warns): enqueue on a stream of our own
            self._stream = torch.cuda.Stream()
        stream = self._stream
        inputs, outputs = self._bind(feeds)
        stream.wait_stream(current)  # inputs (and output allocations) made on the current stream come first
        for tensor in (*inputs.values(), *outputs.values()):
            tensor.record_stream(stream)  # the allocator must not reuse them before TensorRT is done
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise UserError(f"TensorRT failed to run engine {self.path.name} (its log above says why): "
                            f"{REBUILD_HINT}")
        current.wait_stream(stream)
        return outputs

    def _bind(self, feeds: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Input shapes and every tensor address -> (inputs, outputs) as bound: misaligned ones are copies."""
        import torch  # deferred: a device that runs engines may have no torch for this module's other uses
        inputs = {}
        for name in self.input_names:
            tensor = aligned(feeds[name])
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise UserError(f"engine {self.path.name} rejects input '{name}' of shape {tuple(tensor.shape)}")
            self._set_address(name, tensor)
            inputs[name] = tensor
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise UserError(f"output '{name}' of engine {self.path.name} has a data-dependent shape {shape}, "
                                f"which this runner does not handle")
            outputs[name] = aligned(torch.empty(shape, dtype=self.dtypes[name], device=self.device))
            self._set_address(name, outputs[name])
        return inputs, outputs

    def _set_address(self, name: str, tensor: Any) -> None:
        if not self.context.set_tensor_address(name, tensor.data_ptr()):
            raise UserError(f"TensorRT refused the address of tensor '{name}' of engine {self.path.name}: "
                            f"{REBUILD_HINT}")

    def infer_torch(self, *tensors: Any, **named: Any) -> Any:
        """First output as a CUDA tensor; inputs already on CUDA in the engine's dtype are used without copies."""
        outputs = self.run(self._feeds(tensors, named))
        return outputs[self.output_names[0]]

    def __call__(self, *inputs: Any, **named: Any) -> np.ndarray:
        """First output as a numpy array, from numpy arrays or torch tensors (positional or by input name)."""
        return self.infer_torch(*inputs, **named).cpu().numpy()


# ------------------------------------------------------------------------------------------------ the export
def export_engines(job: Any, graphs: dict[tuple[str, str], Path]) -> list[dict[str, Any]]:
    """``--format trt`` (formats.FORMATS['trt'].build): a strongly typed engine per exported graph of the plan's
    precisions (its precision is the graph's), checked against PyTorch like the graphs; ``job`` is the
    exporter's ExportJob."""
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
        engine = path.with_suffix(".engine")
        info = build_engine(path, engine, profile, job.plan.workspace_mb, timing_cache, precision, console=job.console)
        runner = TrtRunner(engine)
        embed = (lambda x: np.concatenate([np.asarray(runner(x[i:i + profile.max]))
                                           for i in range(0, len(x), profile.max)]).astype(np.float32))
        inputs = job.parity_images if encoder == "image" else job.tokens
        parity = job.parity(encoder, precision, embed(inputs), f"TensorRT {precision} engine of the {encoder} "
                                                                f"encoder", discard=engine)
        entry = artifacts.artifact_entry(job.out, engine, name=f"{encoder}_{precision}_trt", encoder=encoder,
                                         fmt="trt", precision=precision, parity=parity, engine=info)
        if encoder == "image":
            entry["val"] = job.val_metrics(embed(job.images), engine.name)
        entries.append(entry)
        job.say(entry)
    return entries
