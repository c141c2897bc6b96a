"""Running a TensorRT engine without torch: numpy in, numpy out, device memory from cuda-python.

Everything needed to RUN an engine lives here (the device layer); building one is export/tensorrt.py. An engine
is not portable across GPUs or TensorRT versions: its sidecar ``<engine>.json`` names the TensorRT version, GPU,
compute capability, SM count and Jetson board it was built on, and ``TrtRunner`` refuses, before deserialising,
an engine built elsewhere or whose sha256 changed. TensorRT before 10 (JetPack 5, JetPack 6.0) has no strongly
typed networks and is refused by ``require_tensorrt`` before any work.

``TrtRunner`` preallocates one device buffer per I/O tensor for the profile's largest batch (``cudaMalloc``,
256-byte aligned as ``set_tensor_address`` requires), binds them once, and then only copies and enqueues:
``stage`` copies host to device on its own stream, ``execute`` enqueues ``execute_async_v3`` and waits for the
stream, ``fetch`` copies the outputs back. Shapes are checked against the engine and the batch against its
optimisation profile before TensorRT sees them. docs/gpu.md lists each TensorRT and cuda-python call.

``tensorrt`` and ``cuda-python`` are imported lazily: this module imports (and is tested) on a CPU machine.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edgedistill.core.errors import UserError
from edgedistill.core.hashing import sha256_file
from edgedistill.runtime.cuda import check, cudart, gpu_properties, require_cuda
from edgedistill.runtime.jetson import detect_jetson

REBUILD_HINT = "rebuild it here with `edgedistill export --format trt`"
ALIGNMENT = 256  # bytes: TensorRT wants every tensor address aligned to this (IExecutionContext.set_tensor_address)
MIN_TENSORRT = 10  # strongly typed networks (precision in the graph) start with TensorRT 10
# What an engine is tied to: TensorRT refuses a plan from another version (patch and build included), and kernels
# are tuned per GPU ("Orin" is the name of Orin Nano, NX and AGX alike, so SM count and board tell them apart).
IDENTITY_KEYS = ("tensorrt_version", "gpu_name", "compute_capability", "sm_count", "board_model")
# pip distributions that carry TensorRT's libraries (JetPack's apt package has no pip metadata: then the import)
TENSORRT_DISTRIBUTIONS = ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu13-libs", "tensorrt-cu12-libs",
                          "tensorrt-libs")


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


def release(version: str) -> tuple[int, int] | None:
    """"10.3.0.30" -> (10, 3); None when the string is not a version."""
    parts = str(version).split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return None


def tensorrt_version() -> str | None:
    """The installed TensorRT's version: pip metadata when there is some, else the module's ``__version__``
    (JetPack's apt package); None when TensorRT is not installed or does not load."""
    for name in TENSORRT_DISTRIBUTIONS:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        import tensorrt  # deferred: optional (the gpu extra, or JetPack); only its version is read here
    except (ImportError, OSError):
        return None
    return str(getattr(tensorrt, "__version__", "")) or None


def require_tensorrt(what: str = "--format trt") -> ModuleType:
    """The ``tensorrt`` module of release 10 or newer on a machine whose GPU CUDA sees; else a one-line
    UserError saying which requirement is missing. The release is checked first, before CUDA is touched."""
    try:
        import tensorrt as trt  # deferred: optional (the gpu extra, or JetPack)
    except ImportError as e:
        if e.name == "tensorrt":
            raise UserError(f"{what} needs TensorRT, which is not installed (the gpu extra): "
                            f"pip install -e '.[gpu]' on a machine with an NVIDIA GPU and CUDA") from None
        raise UserError(f"{what} needs TensorRT, which is installed but does not load ({e}): "
                        f"reinstall it with pip install -e '.[gpu]' on a machine with CUDA") from None
    except OSError as e:  # a wheel whose CUDA libraries are missing
        raise UserError(f"{what} needs TensorRT, which is installed but does not load ({e}): "
                        f"reinstall it with pip install -e '.[gpu]' on a machine with CUDA") from None
    version = str(getattr(trt, "__version__", "?"))
    parsed = release(version)
    if parsed is None or parsed[0] < MIN_TENSORRT:
        raise UserError(f"{what} needs TensorRT {MIN_TENSORRT} or newer (strongly typed networks: precision lives "
                        f"in the graph) and TensorRT {version} is installed: install TensorRT 10 or newer "
                        f"(JetPack 6.1+ ships 10.3), or export --format onnx and run it with onnxruntime")
    require_cuda(what)
    return trt


def board_model() -> str | None:
    """The Jetson module's device-tree model ("NVIDIA Jetson AGX Orin Developer Kit"), None off a Jetson."""
    info = detect_jetson()
    return info.model if info is not None else None


def device_metadata(trt: ModuleType, gpu: dict[str, Any] | None = None) -> dict[str, Any]:
    """What an engine depends on (IDENTITY_KEYS): the full TensorRT version, GPU name, compute capability
    ("8.7"), SM count and Jetson board model (None elsewhere); and the CUDA version, for the record.

    ``gpu``: the GPU's properties as ``runtime.cuda.gpu_properties`` gives them (default: asked from cuda-python
    now); the Torch-TensorRT side passes torch's view of the same GPU."""
    gpu = gpu if gpu is not None else gpu_properties()
    return {
        "tensorrt_version": str(trt.__version__),
        "gpu_name": str(gpu["gpu_name"]),
        "compute_capability": str(gpu["compute_capability"]),
        "sm_count": int(gpu["sm_count"]),
        "board_model": board_model(),
        "cuda": gpu.get("cuda"),
    }


def describe_device(meta: dict[str, Any]) -> str:
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
        raise UserError(f"{what} was built for {describe_device(meta)}; this machine has "
                        f"{describe_device(current)}: {hint}")


# ----------------------------------------------------------------------------------------- pure helpers


def is_dynamic(dim: Any) -> bool:
    """ONNX/TensorRT mark a runtime dimension as -1, None, or a symbolic name such as "batch"."""
    return dim is None or isinstance(dim, str) or (isinstance(dim, (int, np.integer)) and dim < 0)


_DTYPES = {  # TensorRT DataType member name -> dtype name (numpy's where numpy has it)
    "FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
    "INT32": "int32", "INT64": "int64", "BOOL": "bool", "FP8": "float8_e4m3fn",
}
_NUMPY = ("float32", "float16", "int8", "uint8", "int32", "int64", "bool")


def dtype_name(trt_dtype: Any) -> str:
    """A TensorRT DataType as a dtype name ('float32', 'float16', ...)."""
    name = getattr(trt_dtype, "name", None) or str(trt_dtype).rsplit(".", 1)[-1]
    return _DTYPES.get(name, name.lower())


def numpy_dtype(trt_dtype: Any) -> np.dtype:
    """The numpy dtype of a TensorRT DataType; a UserError for the ones numpy has not (bfloat16, fp8, int4)."""
    name = dtype_name(trt_dtype)
    if name not in _NUMPY:
        raise UserError(f"the engine has a tensor of TensorRT type {name}, which numpy and this runner do not "
                        f"handle: export the graph with float32 or float16 inputs and outputs")
    return np.dtype(name)


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


# ---------------------------------------------------------------------------------------------- running


@dataclass
class Staged:
    """A batch whose inputs were copied into the runner's device buffers (the host arrays are kept alive)."""
    feeds: dict[str, np.ndarray]
    batch: int


class TrtRunner:
    """Run a TensorRT engine: numpy arrays in, numpy arrays out; buffers, stream and copies from cuda-python.

    ``runner(x)`` (one positional per input, or by name) returns the first output; ``run(feeds)`` every output
    by name. For timing, ``stage(feeds)`` copies a batch to the GPU once and ``execute(staged)`` runs it and
    waits: nothing is allocated after the constructor. ``close()`` (or ``with TrtRunner(...)``) frees the GPU
    memory; the garbage collector does it too.
    """

    def __init__(self, engine_path: Path) -> None:
        self.path = Path(engine_path)
        self._buffers: dict[str, int] = {}
        self._stream: Any = None
        self._staged: Staged | None = None
        self.context: Any = None
        self.engine: Any = None
        if not self.path.is_file():
            raise UserError(f"TensorRT engine {self.path} not found; build it with `edgedistill export --format trt`")
        self.meta = read_sidecar(self.path)
        trt = require_tensorrt(f"running TensorRT engine {self.path.name}")
        # before deserialising: a foreign engine fails inside TensorRT with an unhelpful message, or worse
        check_compatible(self.meta, device_metadata(trt), what=f"engine {self.path}")
        verify_sha256(self.path, self.meta)
        self._trt = trt
        self.tensorrt_version = str(trt.__version__)
        self._rt = cudart()
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
        self.dtypes: dict[str, np.dtype] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            self.dtypes[name] = numpy_dtype(self.engine.get_tensor_dtype(name))
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.input_names.append(name)
            else:
                self.output_names.append(name)
        profile = self.meta.get("profile") or {}
        self.profile = BatchProfile(int(profile.get("min", 1)), int(profile.get("opt", 1)),
                                    int(profile.get("max", 1)))
        self.max_shapes: dict[str, tuple[int, ...]] = {}
        try:
            self._allocate()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------ memory
    def _allocate(self) -> None:
        """One stream, and one aligned device buffer per I/O tensor for the profile's max batch, bound once."""
        rt = self._rt
        self._stream = check(rt, rt.cudaStreamCreate(), "cudaStreamCreate")
        for name in self.input_names:
            shape = self._max_input_shape(name)
            if not self.context.set_input_shape(name, shape):
                raise UserError(f"engine {self.path.name} rejects input '{name}' of shape {shape}, the batch max of "
                                f"its sidecar's profile {self.profile.describe()}: {REBUILD_HINT}")
            self.max_shapes[name] = shape
        for name in self.output_names:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise UserError(f"output '{name}' of engine {self.path.name} has a data-dependent shape {shape}, "
                                f"which this runner does not handle")
            self.max_shapes[name] = shape
        for name in (*self.input_names, *self.output_names):
            size = max(1, math.prod(self.max_shapes[name]) * self.dtypes[name].itemsize)
            pointer = int(check(rt, rt.cudaMalloc(size), f"cudaMalloc of {size} bytes for tensor '{name}'"))
            self._buffers[name] = pointer
            if pointer % ALIGNMENT:  # cudaMalloc's blocks are 256-byte aligned; TensorRT needs that
                raise UserError(f"cudaMalloc returned address {pointer:#x} for tensor '{name}', not {ALIGNMENT}-byte "
                                f"aligned as TensorRT requires: check the CUDA installation")
            if not self.context.set_tensor_address(name, pointer):
                raise UserError(f"TensorRT refused the address of tensor '{name}' of engine {self.path.name}: "
                                f"{REBUILD_HINT}")

    def _max_input_shape(self, name: str) -> tuple[int, ...]:
        expected = tuple(self.engine.get_tensor_shape(name))
        if not expected:
            raise UserError(f"input '{name}' of engine {self.path.name} is a scalar; export with a batch axis")
        if any(is_dynamic(d) for d in expected[1:]):
            raise UserError(f"input '{name}' of engine {self.path.name} has shape {expected} with a dynamic axis "
                            f"besides the batch: export the ONNX with a fixed image size")
        return (self.profile.max, *(int(d) for d in expected[1:]))

    @property
    def buffer_bytes(self) -> int:
        """Device memory of the preallocated I/O buffers."""
        return sum(math.prod(s) * self.dtypes[n].itemsize for n, s in self.max_shapes.items())

    def device_memory(self) -> int | None:
        """The engine's activation (scratch) memory in bytes: ``device_memory_size_v2`` (TensorRT 10.1+), else
        ``device_memory_size`` (removed in 11)."""
        size = getattr(self.engine, "device_memory_size_v2", None) or getattr(self.engine, "device_memory_size", None)
        return int(size) if size else None

    def close(self) -> None:
        """Free the device buffers and the stream (idempotent). The context goes first: it refers to them."""
        rt = getattr(self, "_rt", None)
        self.context = None
        buffers, self._buffers = getattr(self, "_buffers", {}), {}
        stream, self._stream = getattr(self, "_stream", None), None
        if rt is None:
            return
        results = [("cudaFree", rt.cudaFree(pointer)) for pointer in buffers.values()]
        if stream is not None:
            results.append(("cudaStreamDestroy", rt.cudaStreamDestroy(stream)))
        for call, result in results:  # everything is released first; then the first failure is reported
            check(rt, result, call)

    def __enter__(self) -> "TrtRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit CUDA may already be gone
            pass

    # ------------------------------------------------------------------------------------------ inputs
    def feeds(self, args: tuple[Any, ...], named: dict[str, Any]) -> dict[str, np.ndarray]:
        """The inputs by name, as C-contiguous arrays of the engine's dtypes (positional ones in engine order)."""
        if len(args) > len(self.input_names):
            raise UserError(f"engine {self.path.name} takes {len(self.input_names)} input(s) "
                            f"({', '.join(self.input_names)}), got {len(args)}")
        given = dict(zip(self.input_names, args))
        for name, value in named.items():
            if name not in self.input_names or name in given:
                raise UserError(f"engine {self.path.name} has no input '{name}' or got it twice; "
                                f"inputs: {', '.join(self.input_names)}")
            given[name] = value
        missing = [n for n in self.input_names if n not in given]
        if missing:
            raise UserError(f"engine {self.path.name} needs input(s) {', '.join(missing)}")
        out = {}
        for name, value in given.items():
            array = np.asarray(value)
            want = self.dtypes[name]
            if array.dtype != want and (array.dtype.kind in "fc") != (want.kind in "fc"):
                raise UserError(f"input '{name}' of engine {self.path.name} is {want}; got {array.dtype} "
                                f"(floats and integers are not converted into each other)")
            out[name] = np.ascontiguousarray(array, dtype=want)
        return out

    def check_shape(self, name: str, array: np.ndarray) -> None:
        """UserError unless ``array`` fits the engine's input ``name`` and its batch fits the profile."""
        expected = tuple(self.engine.get_tensor_shape(name))
        shape = tuple(array.shape)
        if len(shape) != len(expected) or any(e >= 0 and e != s for e, s in zip(expected[1:], shape[1:])):
            want = "(" + ", ".join("B" if i == 0 else str(d) for i, d in enumerate(expected)) + ")"
            raise UserError(f"input '{name}' has shape {shape}; engine {self.path.name} expects {want}")
        batch = shape[0]
        if not self.profile.min <= batch <= self.profile.max:
            raise UserError(f"batch {batch} is outside engine {self.path.name}'s profile "
                            f"{self.profile.min}..{self.profile.max}: split the batch, or rebuild with a "
                            f"larger batch max in the target")

    # ------------------------------------------------------------------------------------------ running
    def stage(self, feeds: dict[str, np.ndarray]) -> Staged:
        """Check the batch, set the input shapes and copy the inputs into the device buffers (host to device)."""
        if self._stream is None:
            raise UserError(f"the runner of engine {self.path.name} was closed; open a new one")
        batches = set()
        for name in self.input_names:
            self.check_shape(name, feeds[name])
            batches.add(int(feeds[name].shape[0]))
        if len(batches) != 1:
            raise UserError(f"the inputs of engine {self.path.name} have different batch sizes {sorted(batches)}")
        rt = self._rt
        for name in self.input_names:
            array = feeds[name]
            if not self.context.set_input_shape(name, tuple(array.shape)):
                raise UserError(f"engine {self.path.name} rejects input '{name}' of shape {tuple(array.shape)} "
                                f"(outside its optimisation profile?): {REBUILD_HINT}")
            if array.nbytes:
                check(rt, rt.cudaMemcpyAsync(self._buffers[name], array.ctypes.data, array.nbytes,
                                             rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream),
                      f"cudaMemcpyAsync (host to device) of input '{name}'")
        self._staged = Staged(feeds, batches.pop())
        return self._staged

    def execute(self, staged: Staged) -> None:
        """Run the engine on a staged batch and wait for it (``execute_async_v3``, then the stream's sync)."""
        if staged is not self._staged:  # another batch was staged since: its data is in the buffers now
            self.stage(staged.feeds)
        rt = self._rt
        if not self.context.execute_async_v3(int(self._stream)):
            raise UserError(f"TensorRT failed to run engine {self.path.name} (its log above says why): "
                            f"{REBUILD_HINT}")
        check(rt, rt.cudaStreamSynchronize(self._stream), f"cudaStreamSynchronize after engine {self.path.name}")

    def fetch(self) -> dict[str, np.ndarray]:
        """Every output of the last run, copied device to host into new arrays, by name."""
        rt = self._rt
        outputs = {}
        for name in self.output_names:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise UserError(f"output '{name}' of engine {self.path.name} has a data-dependent shape {shape}, "
                                f"which this runner does not handle")
            host = np.empty(shape, dtype=self.dtypes[name])
            if host.nbytes:
                check(rt, rt.cudaMemcpyAsync(host.ctypes.data, self._buffers[name], host.nbytes,
                                             rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream),
                      f"cudaMemcpyAsync (device to host) of output '{name}'")
            outputs[name] = host
        check(rt, rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize after the output copies")
        return outputs

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output, by name, for inputs given by name (as ``feeds`` returns them)."""
        staged = self.stage(feeds)
        self.execute(staged)
        return self.fetch()

    def __call__(self, *inputs: Any, **named: Any) -> np.ndarray:
        """The first output for numpy inputs (positional in the engine's input order, or by name)."""
        return self.run(self.feeds(inputs, named))[self.output_names[0]]
