"""A strict stand-in for TensorRT's Python API, one per release line, for testing on machines without a GPU.

Each fake has only the members its release documents, with the documented parameter names and no ``**kwargs``,
so a call that exists in one release only fails in the test of the other (docs/gpu.md lists the sources):

- 8.6 (JetPack 6.0; 8.5 on JetPack 5): no ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; without
  ``EXPLICIT_BATCH`` the network is implicit-batch and the ONNX parser refuses it; no ``IProgressMonitor``.
- 10.x (JetPack 6.1+ ships 10.3): ``EXPLICIT_BATCH`` deprecated and ignored, ``STRONGLY_TYPED`` = 1; the
  weak-typing ``BuilderFlag.FP16``/``INT8`` and the INT8 calibrators still exist, but precision flags on a
  strongly typed network fail the build; ``ICudaEngine.device_memory_size_v2`` from 10.1.
- 11.x: ``EXPLICIT_BATCH`` gone, ``STRONGLY_TYPED`` = 0 (deprecated, ignored); ``BuilderFlag.FP16``/``INT8``,
  ``IBuilderConfig.int8_calibrator``, the ``IInt8*Calibrator`` classes and ``ICudaEngine.device_memory_size``
  removed.

As strict as the real API where a runner can go wrong: ``OnnxParser.parse`` fails, with a parser error, on bytes
that are not an ONNX ModelProto; ``IExecutionContext.set_input_shape`` returns False for a shape outside the
engine's optimisation profile (or of the wrong rank or item shape); ``execute_async_v3`` returns False when an
input shape or a tensor address is missing, or when the engine is made to fail (``FakeEngine(execute_ok=False)``).
A ``FakeEngine`` given the fake GPU memory (tests/fake_cudart.py) really computes: it reads its input from the
bound device buffer and writes ``image.reshape(B, -1) @ WEIGHTS`` (float16) to the output buffer.

Every call is recorded in ``calls`` as a tuple (name, args...).
"""

from __future__ import annotations

import types
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

ALIGNMENT = 256  # IExecutionContext.set_tensor_address: "The pointer must have at least 256-byte alignment."


class Member:
    """An enum member with a name and an int value, like pybind11 enums."""

    def __init__(self, name: str, value: int) -> None:
        self.name, self.value = name, value

    def __int__(self) -> int:
        return self.value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Member) and (self.name, self.value) == (other.name, other.value)

    def __hash__(self) -> int:
        return hash((self.name, self.value))

    def __repr__(self) -> str:
        return f"<{self.name}>"


def enum(**members: int) -> SimpleNamespace:
    return SimpleNamespace(**{k: Member(k, v) for k, v in members.items()})


def release(version: str) -> tuple[int, int]:
    major, minor = (int(x) for x in version.split(".")[:2])
    return major, minor


def creation_flags(major: int) -> SimpleNamespace:
    if major < 10:
        return enum(EXPLICIT_BATCH=0, EXPLICIT_PRECISION=1)
    if major == 10:
        return enum(EXPLICIT_BATCH=0, STRONGLY_TYPED=1, PREFER_AOT_PYTHON_PLUGINS=2, PREFER_JIT_PYTHON_PLUGINS=3)
    return enum(STRONGLY_TYPED=0, PREFER_AOT_PYTHON_PLUGINS=1, PREFER_JIT_PYTHON_PLUGINS=2)


def builder_flags(major: int) -> SimpleNamespace:
    if major >= 11:
        return enum(DEBUG=1, GPU_FALLBACK=2, REFIT=3, DISABLE_TIMING_CACHE=4)
    return enum(FP16=0, INT8=1, DEBUG=2, GPU_FALLBACK=3, REFIT=5, DISABLE_TIMING_CACHE=6, TF32=7,
                OBEY_PRECISION_CONSTRAINTS=10, PREFER_PRECISION_CONSTRAINTS=11, BF16=17)


def fake_tensorrt(calls: list, *, version: str = "10.3.0", parse_ok: bool = True, build_ok: bool = True,
                  inputs: Any = (("image", (-1, 3, 64, 64)),), outputs: Any = (("embedding", (-1, 32)),),
                  accept_cache: Callable[[bytes], bool] = lambda data: True, engine: Any = None) -> types.ModuleType:
    """A ``tensorrt`` module of release ``version`` recording every builder call in ``calls``."""
    major, minor = release(version)
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.NetworkDefinitionCreationFlag = creation_flags(major)
    trt.BuilderFlag = builder_flags(major)
    trt.MemoryPoolType = enum(WORKSPACE=0)
    trt.DataType = enum(FLOAT=0, HALF=1, INT8=2, INT32=3, BOOL=4, UINT8=5, FP8=6, BF16=7, INT64=8)
    trt.TensorIOMode = enum(NONE=0, INPUT=1, OUTPUT=2)
    flag_values = {int(m) for m in vars(trt.NetworkDefinitionCreationFlag).values()}

    class Logger:
        WARNING = "WARNING"

        def __init__(self, min_severity: str) -> None:
            pass

    class Network:
        def __init__(self, flags: int) -> None:
            named = {m.name for m in vars(trt.NetworkDefinitionCreationFlag).values() if flags >> int(m) & 1}
            self.strongly_typed = "STRONGLY_TYPED" in named or major >= 11
            self.explicit_batch = major >= 10 or "EXPLICIT_BATCH" in named
            self.inputs = [SimpleNamespace(name=n, shape=s, dtype=trt.DataType.FLOAT) for n, s in inputs]
            self.outputs = [SimpleNamespace(name=n, shape=s, dtype=trt.DataType.FLOAT) for n, s in outputs]
            self.num_inputs, self.num_outputs = len(self.inputs), len(self.outputs)

        def get_input(self, index: int) -> Any:
            return self.inputs[index]

        def get_output(self, index: int) -> Any:
            return self.outputs[index]

    class ParserError:
        def __init__(self, text: str) -> None:
            self.text = text

        def desc(self) -> str:
            return self.text

        def node_name(self) -> str:  # 10.0+
            return "/blocks/fancy"

    class OnnxParser:
        def __init__(self, network: Network, logger: Logger) -> None:
            self.network, self.errors = network, []

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def parse(self, model: bytes, path: str | None = None) -> bool:
            calls.append(("parse", bytes(model)))
            problem = onnx_problem(bytes(model))
            if problem is not None:
                self.errors = [ParserError(problem)]
            elif not self.network.explicit_batch:  # what TensorRT 8.x does with flags 0
                self.errors = [ParserError("The ONNX parser only supports networks with an explicit batch "
                                           "dimension")]
            elif not parse_ok:
                self.errors = [ParserError("No importer registered for op: FancyOp")] * 2
            return not self.errors

        def get_error(self, index: int) -> ParserError:
            return self.errors[index]

    class Profile:
        def set_shape(self, input: str, min: tuple, opt: tuple, max: tuple) -> None:  # noqa: A002
            lo, mid, hi = tuple(min), tuple(opt), tuple(max)
            if not all(a <= b <= c for a, b, c in zip(lo, mid, hi)) or not len(lo) == len(mid) == len(hi):
                raise ValueError(f"set_shape: need min <= opt <= max, got {lo} {mid} {hi}")
            calls.append(("set_shape", input, lo, mid, hi))

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = bytes(data)

        def serialize(self) -> bytes:
            return self.data + b"|timed"

    config_slots = ["cache", "flags", "_monitor"] + (["int8_calibrator"] if major < 11 else [])

    class Config:
        __slots__ = config_slots

        def __init__(self) -> None:
            self.cache: TimingCache | None = None
            self.flags: list[Member] = []
            self._monitor = None

        def set_memory_pool_limit(self, pool: Member, pool_size: int) -> None:
            calls.append(("set_memory_pool_limit", pool.name, int(pool_size)))

        def set_flag(self, flag: Member) -> None:
            if flag not in vars(trt.BuilderFlag).values():
                raise TypeError(f"set_flag: {flag!r} is not a BuilderFlag of TensorRT {version}")
            calls.append(("set_flag", flag.name))
            self.flags.append(flag)

        def add_optimization_profile(self, profile: Profile) -> int:
            calls.append(("add_optimization_profile",))
            return 0

        def create_timing_cache(self, serialized_timing_cache: bytes) -> TimingCache:
            calls.append(("create_timing_cache", bytes(serialized_timing_cache)))
            return TimingCache(serialized_timing_cache)

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            if not isinstance(ignore_mismatch, bool):
                raise TypeError("set_timing_cache(cache, ignore_mismatch: bool)")
            calls.append(("set_timing_cache", cache.data, ignore_mismatch))
            if cache.data and not accept_cache(cache.data):
                return False
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache | None:
            return self.cache

    if major >= 10:  # IBuilderConfig.progress_monitor and IProgressMonitor: TensorRT 10.0+
        def _get_monitor(self: Config) -> Any:
            return self._monitor

        def _set_monitor(self: Config, monitor: Any) -> None:
            if monitor is not None and not isinstance(monitor, IProgressMonitor):
                raise TypeError("progress_monitor must be an IProgressMonitor")
            self._monitor = monitor

        Config.progress_monitor = property(_get_monitor, _set_monitor)

        class IProgressMonitor:
            def __init__(self) -> None:
                calls.append(("IProgressMonitor.__init__",))

        trt.IProgressMonitor = IProgressMonitor

    if major < 11:  # the implicit-quantisation calibrators: deprecated in 10.1, removed in 11.0
        class IInt8EntropyCalibrator2:
            pass

        trt.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2

    class Builder:
        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, flags: int = 0) -> Network:
            if not isinstance(flags, int) or any(flags >> b & 1 for b in range(32) if b not in flag_values):
                raise ValueError(f"create_network: invalid flags {flags!r} for TensorRT {version}")
            if major == 10 and flags >> int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) & 1:
                calls.append(("deprecated", "EXPLICIT_BATCH"))
            calls.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            calls.append(("build_serialized_network",))
            if network.strongly_typed and config.flags:  # "precision flags on a strongly typed network"
                calls.append(("build_error", "precision flags set on a strongly typed network"))
                return None
            monitor = getattr(config, "progress_monitor", None)
            if monitor is not None:  # what TensorRT does from its build threads
                monitor.phase_start("Building engine", None, 2)
                assert monitor.step_complete("Building engine", 0) is True
                monitor.phase_finish("Building engine")
                calls.append(("progress_reported",))
            return b"SERIALIZED-ENGINE" if build_ok else None

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            pass

        def deserialize_cuda_engine(self, serialized_engine: bytes) -> Any:
            calls.append(("deserialize_cuda_engine",))
            if engine == "forbidden":
                raise AssertionError("an incompatible engine must be refused before deserialising")
            return engine(trt) if callable(engine) else engine

    trt.Logger, trt.OnnxParser, trt.Builder, trt.Runtime = Logger, OnnxParser, Builder, Runtime
    return trt


def onnx_problem(model: bytes) -> str | None:
    """Why TensorRT's ONNX parser would refuse ``model`` before looking at its operators, or None."""
    import onnx  # deferred: the fake is imported by tests that never parse
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load_from_string(model)
    except (DecodeError, ValueError, RuntimeError) as e:
        return f"Failed to parse ONNX model from buffer: not a ModelProto ({type(e).__name__})"
    if not proto.ir_version or not proto.graph.node:
        return "Failed to parse ONNX model from buffer: the ModelProto has no IR version or no graph"
    return None


WEIGHTS = np.random.default_rng(0).standard_normal((3 * 64 * 64, 32)).astype(np.float32) / 64


class FakeContext:
    """IExecutionContext: input shapes (refused outside the profile), tensor addresses (refused when not 256-byte
    aligned), enqueue (which computes through the fake GPU memory when the engine has some)."""

    def __init__(self, engine: "FakeEngine") -> None:
        self.engine, self.shapes, self.addresses = engine, {}, {}
        self.calls: list[tuple] = []

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        shape = tuple(shape)
        self.calls.append(("set_input_shape", name, shape))
        engine = self.engine
        if name not in engine.tensors or engine.get_tensor_mode(name) != engine.trt.TensorIOMode.INPUT:
            return False
        expected = engine.get_tensor_shape(name)
        low, high = engine.profile
        if len(shape) != len(expected) or any(e >= 0 and e != s for e, s in zip(expected[1:], shape[1:])) \
                or not low <= shape[0] <= high:
            return False  # "false if ... the dimensions are not within the optimization profile"
        self.shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        shape = self.engine.get_tensor_shape(name)
        if name in self.shapes:
            return self.shapes[name]
        batch = next(iter(self.shapes.values()))[0] if self.shapes else -1  # unknown until the inputs are set
        return (batch, *shape[1:])

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if not isinstance(memory, int):
            raise TypeError("set_tensor_address(name: str, memory: int)")
        self.calls.append(("set_tensor_address", name, memory))
        if memory % ALIGNMENT:
            return False
        self.addresses[name] = memory
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        if not isinstance(stream_handle, int):
            raise TypeError("execute_async_v3(stream_handle: int)")
        self.calls.append(("execute_async_v3", stream_handle))
        engine = self.engine
        inputs = [n for n in engine.tensors if engine.get_tensor_mode(n) == engine.trt.TensorIOMode.INPUT]
        if not engine.execute_ok or any(n not in self.shapes for n in inputs) \
                or any(n not in self.addresses for n in engine.tensors):
            return False
        if engine.memory is not None:
            image = self.shapes["image"]
            nbytes = int(np.prod(image)) * 4
            x = engine.memory.view(self.addresses["image"], nbytes).view(np.float32).reshape(image)
            out = (x.reshape(image[0], -1) @ WEIGHTS).astype(np.float16)
            engine.memory.view(self.addresses["embedding"], out.nbytes)[:] = out.view(np.uint8).reshape(-1)
        return True


class FakeEngine:
    """An ICudaEngine: image (B, 3, 64, 64) float32 -> embedding (B, 32) float16, one optimisation profile of
    batches ``profile`` (min, max). With ``memory`` (a tests.fake_cudart.FakeCuda) the context computes
    ``FakeEngine.expected`` through the device buffers; ``execute_ok=False`` makes every enqueue fail."""

    def __init__(self, trt: types.ModuleType, *, memory: Any = None, profile: tuple[int, int] = (1, 4),
                 execute_ok: bool = True) -> None:
        self.trt, self.memory, self.profile, self.execute_ok = trt, memory, profile, execute_ok
        self.num_io_tensors = 2
        self.tensors = {"image": (trt.TensorIOMode.INPUT, trt.DataType.FLOAT, (-1, 3, 64, 64)),
                        "embedding": (trt.TensorIOMode.OUTPUT, trt.DataType.HALF, (-1, 32))}
        self.contexts: list[FakeContext] = []
        major, minor = release(trt.__version__)
        if major < 11:
            self.device_memory_size = 2 << 20          # removed in 11.0
        if (major, minor) >= (10, 1):
            self.device_memory_size_v2 = 3 << 20       # added in 10.1

    def get_tensor_name(self, index: int) -> str:
        return list(self.tensors)[index]

    def get_tensor_mode(self, name: str) -> Any:
        return self.tensors[name][0]

    def get_tensor_dtype(self, name: str) -> Any:
        return self.tensors[name][1]

    def get_tensor_shape(self, name: str) -> tuple:
        return self.tensors[name][2]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list:
        if self.get_tensor_mode(name) != self.trt.TensorIOMode.INPUT or profile_index != 0:
            raise ValueError("get_tensor_profile_shape: an input of profile 0")
        low, high = self.profile
        rest = self.get_tensor_shape(name)[1:]
        return [(low, *rest), (low, *rest), (high, *rest)]

    def create_execution_context(self) -> FakeContext:
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]

    @staticmethod
    def expected(images: np.ndarray) -> np.ndarray:
        """What the engine computes for ``images`` (B, 3, 64, 64)."""
        return (np.asarray(images, np.float32).reshape(len(images), -1) @ WEIGHTS).astype(np.float16)
