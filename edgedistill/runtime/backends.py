"""Runners: one artifact on one backend, with inputs staged where the backend reads them.

Backends by device (an artifact runs on every backend of the device that can run it; the rest are listed as
skipped with the reason):

    device   onnx graphs                                   TensorRT engine   Torch-TensorRT   PyTorch student
    cpu      openvino-cpu, onnxruntime-cpu                 -                 -                pytorch-cpu
    cuda     onnxruntime-cuda, onnxruntime-tensorrt         tensorrt          torch-tensorrt   pytorch-cuda
    jetson   (as cuda)

A runner's ``stage(x)`` puts a numpy batch where the backend wants it (a CUDA tensor, an onnxruntime value on
the GPU, a TensorRT engine's device buffer, or the array itself), ``call(staged)`` runs one inference on it, and
``embed(x)`` returns float32 embeddings for the accuracy pass. A runner with ``timer = "cuda"`` (the torch ones,
bench/torch_runners.py) enqueues on torch's current stream, so CUDA events time it; the runtime's own GPU runners
(onnxruntime's providers, TensorRT) return when the GPU is done, so wall-clock time is right for them.

An INT8 graph is made for one runtime (export.json's ``flavour``): the onnxruntime-CPU flavour (uint8 asymmetric
activations, int32 biases) or the TensorRT one (symmetric int8 activations, float biases, fp16 between the Q/DQ
pairs). ``candidates`` gives a backend of the other flavour a skip reason instead of a runner.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgedistill.runtime.peak_memory import peak_rss_mb, reset_peak_rss
from edgedistill.core.errors import UserError
from edgedistill.runtime.formats import BACKENDS, backends_for, resolve, why_not
from edgedistill.runtime.manifest import DamagedBundle
from edgedistill.core.locations import default_cache_root
from edgedistill.runtime.cuda import free_memory
from edgedistill.runtime.ort import ort_session
from edgedistill.runtime.tensorrt import TrtRunner, release, tensorrt_version


def package_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


class Runner:
    """One model on one backend. Subclasses set ``backend``, ``version``, ``timer`` ('cpu' or 'cuda')."""
    backend = ""
    version: str | None = None
    timer = "cpu"
    max_batch: int | None = None
    min_batch = 1

    def stage(self, x: np.ndarray) -> Any:
        return x

    def call(self, staged: Any) -> Any:
        raise NotImplementedError

    def to_numpy(self, out: Any) -> np.ndarray:
        return np.asarray(out, dtype=np.float32)

    def embed(self, x: np.ndarray, batch: int = 32) -> np.ndarray:
        """(N, ...) -> (N, D) float32, in batches the backend accepts (a short last one padded to min_batch)."""
        step = max(min(batch, self.max_batch or batch), self.min_batch)
        outs = []
        for i in range(0, len(x), step):
            chunk = x[i:i + step]
            padded = np.concatenate([chunk] * -(-self.min_batch // len(chunk)))[:self.min_batch] \
                if len(chunk) < self.min_batch else chunk
            out = self.to_numpy(self.call(self.stage(padded)))
            if out.ndim != 2 or len(out) < len(chunk):  # a graph that lies about its output shape
                raise DamagedBundle(f"{getattr(self, 'name', self.backend)} returned an output of shape "
                                    f"{out.shape} for a batch of {len(padded)}; an encoder gives (N, D): export again")
            outs.append(out[:len(chunk)])
        return np.concatenate(outs).astype(np.float32)

    def peak_memory_reset(self) -> None:
        reset_peak_rss()

    def peak_memory(self) -> tuple[float | None, str | None]:
        """(MiB, what was measured): the process's peak RSS here; GPU runners report their device memory."""
        peak = peak_rss_mb()
        return peak, ("process peak rss" if peak is not None else None)


# ---------------------------------------------------------------------------------------------- onnxruntime
ORT_PROVIDERS = {"onnxruntime-cpu": "CPUExecutionProvider", "onnxruntime-cuda": "CUDAExecutionProvider",
                 "onnxruntime-tensorrt": "TensorrtExecutionProvider"}


def _first_line(error: BaseException) -> str:
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= 300 else text[:300] + "..."


def onnx_input_shapes(path: Path) -> dict[str, list[int | None]]:
    """Each graph input's shape, None for a symbolic (dynamic) axis."""
    import onnx  # deferred: not part of the device install

    graph = onnx.load(str(path), load_external_data=False).graph
    init = {i.name for i in graph.initializer}
    return {i.name: [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
            for i in graph.input if i.name not in init}


def ort_provider(provider: str, precision: str, shapes: dict[str, list[int | None]] | None = None,
                 batch_range: tuple[int, int, int] | None = None, cache_dir: Path | None = None,
                 tensorrt: str | None = None) -> Any:
    """The (provider, options) pair for one graph (onnxruntime's TensorRT / CUDA provider options).

    TensorRT: precision is the graph's (fp16 graphs are fp16, INT8 graphs QDQ with fp16 around the pairs), so no
    precision flag is asked for, with one exception: a QDQ graph (``precision`` "int8") gets ``trt_int8_enable``
    where the TensorRT behind the provider is older than 11 (``tensorrt``: its version; None when unknown, taken
    as 10), because the provider needs it to honour the Q/DQ nodes of a weakly typed network (onnxruntime#13381).
    ``trt_fp16_enable`` is never set (weak typing: deprecated in TensorRT 10.12, removed in 11). docs/gpu.md,
    "Precision requests", gives the reasoning. Engines and timing caches are kept under ``cache_dir`` (which the
    caller creates) so a second session does not rebuild; the batch axis gets an explicit profile (min/opt/max).
    """
    if provider == "CPUExecutionProvider":
        return provider
    options: dict[str, Any] = {"device_id": 0}
    if provider != "TensorrtExecutionProvider":
        return provider, options
    major = (release(tensorrt) or (10, 0))[0] if tensorrt else 10
    if precision == "int8" and major < 11:
        options["trt_int8_enable"] = True
    if cache_dir is not None:
        options.update({"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
                        "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache_dir)})
    if shapes and batch_range is not None:
        for key, batch in zip(("min", "opt", "max"), batch_range):
            options[f"trt_profile_{key}_shapes"] = ",".join(
                f"{name}:" + "x".join(str(batch if i == 0 else d) for i, d in enumerate(dims))
                for name, dims in shapes.items())
    return provider, options


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_FLOAT_INPUTS = ("tensor(float)", "tensor(float16)")
_NUMPY_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)",
                "int32": "tensor(int32)"}
_INT_INPUTS = ("tensor(int64)", "tensor(int32)")


@dataclass(frozen=True)
class GraphSpec:
    """What an export's encoders take and give: images (N, 3, H, W) at ``size`` (H, W), embeddings (N, D)."""
    size: tuple[int, int]
    embed_dim: int


def _fixed(d: Any) -> bool:
    """A dimension with a size (not symbolic)."""
    return isinstance(d, int) and not isinstance(d, bool) and d > 0


def _shown(dims: list[Any]) -> str:
    return "x".join(str(d) if _fixed(d) else "?" for d in dims)


def check_graph_io(name: str, encoder: str, inputs: list[tuple[str, list[Any]]], outputs: list[list[Any]],
                   expect: GraphSpec | None) -> None:
    """DamagedBundle naming the artifact unless its graph is an encoder: the image one takes one 4-D float input
    (N, 3, H, W), the text one one 2-D int input (N, L), and the first output is (N, D). ``inputs``: (type, dims);
    a dim that is not a positive int is symbolic and matches anything. ``expect``: H, W and D to match."""
    image = encoder == "image"
    want = "one 4-D float input (N, 3, H, W)" if image else "one 2-D integer input (N, L)"
    if len(inputs) != 1:
        raise DamagedBundle(f"{name}: the {encoder} graph has {len(inputs)} inputs; an encoder takes {want}: "
                            f"export again")
    kind, dims = inputs[0]
    ok = kind in (_FLOAT_INPUTS if image else _INT_INPUTS) and len(dims) == (4 if image else 2)
    sizes = (3, *(expect.size if expect else (None, None))) if image else ()
    if not ok or any(_fixed(d) and s is not None and d != s for d, s in zip(dims[1:], sizes)):
        size = f" with H, W = {expect.size[0]}, {expect.size[1]}" if image and expect else ""
        raise DamagedBundle(f"{name}: the {encoder} graph takes {kind} of shape ({_shown(dims)}), not {want}{size}; "
                            f"export again")
    out = outputs[0] if outputs else None
    if out is None or len(out) != 2 or (expect is not None and _fixed(out[1]) and out[1] != expect.embed_dim):
        dim = f" with D = embed_dim {expect.embed_dim}" if expect else ""
        got = f"an output of shape ({_shown(out)})" if out is not None else "no output"
        raise DamagedBundle(f"{name}: the {encoder} graph gives {got}, not (N, D){dim}; export again")


class OrtRunner(Runner):
    """An ONNX graph in onnxruntime. On GPU providers the input is bound on the device and the output into a
    value preallocated for the batch (io binding), both in ``stage``: the timed ``call`` copies and allocates
    nothing. Their memory is the GPU's, measured as device memory (``peak_memory``), never the host's RSS. A
    provider that fails to build or run the graph is this artifact's failure (a UserError, hence a failed row),
    never the whole bench's."""

    @classmethod
    def open(cls, backend: str, path: Path, artifact: dict[str, Any], options: "RunOptions") -> "OrtRunner":
        runner = cls(path, str(artifact.get("precision", "fp32")), backend, options.threads, options.batch_range,
                     spin=options.spin)
        check_graph_io(runner.name, str(artifact.get("encoder", "image")),
                       [(str(i.type), list(i.shape or [])) for i in runner.session.get_inputs()],
                       [list(o.shape or []) for o in runner.session.get_outputs()], options.expect)
        return runner

    def __init__(self, path: Path, precision: str, backend: str, threads: int | None,
                 batch_range: tuple[int, int, int] | None = None, spin: bool | None = None) -> None:
        self.backend, self.name = backend, Path(path).name
        self.version = package_version("onnxruntime-gpu", "onnxruntime")
        self.provider = provider = ORT_PROVIDERS[backend]
        self.on_gpu = provider != "CPUExecutionProvider"
        providers: list[Any] = [ort_provider(provider, precision)]
        if provider == "TensorrtExecutionProvider":
            cache_dir = default_cache_root() / "onnxruntime-tensorrt"
            try:  # the provider writes its engines and timing caches there, but does not make the folder
                cache_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create onnxruntime's TensorRT engine cache {cache_dir} ({e.strerror or e}): "
                                f"set EDGEDISTILL_CACHE to a writable folder") from None
            providers = [ort_provider(provider, precision, onnx_input_shapes(path), batch_range, cache_dir,
                                      tensorrt_version()),
                         ort_provider("CUDAExecutionProvider", precision)]
            if batch_range is not None:
                self.min_batch, self.max_batch = batch_range[0], batch_range[2]
        elif provider == "CUDAExecutionProvider":
            providers.append("CPUExecutionProvider")
        self._free_before = free_memory() if self.on_gpu else None  # before the session: its memory is the rest
        try:
            self.session = ort_session(path, threads, providers=providers,
                                       optimize=provider != "TensorrtExecutionProvider", spin=spin)
        except Exception as e:  # noqa: BLE001 - onnxruntime's EPFail, Fail, RuntimeException...
            raise UserError(f"onnxruntime's {provider} could not load {self.name}: {_first_line(e)}") from e
        used = self.session.get_providers()
        if used[0] != provider:
            raise UserError(f"onnxruntime fell back to {used[0]} for {self.name} instead of {provider}; "
                            f"check the onnxruntime-gpu, CUDA and cuDNN installation")
        if not self.session.get_inputs() or not self.session.get_outputs():
            raise DamagedBundle(f"{self.name}: the graph has no inputs or no outputs; an encoder takes one and gives "
                                f"one: export again")
        self.input_name = self.session.get_inputs()[0].name
        output = self.session.get_outputs()[0]
        self.output_name = output.name
        dims = list(getattr(output, "shape", None) or [])
        # (batch, D) with D fixed: the output can be preallocated per batch; else onnxruntime allocates it
        self.output_dim = dims[1] if len(dims) == 2 and isinstance(dims[1], int) and dims[1] > 0 else None
        self.output_dtype = _ORT_TYPES.get(str(getattr(output, "type", "")), np.float32)
        self._outputs: dict[int, Any] = {}

    def _failed(self, error: Exception) -> UserError:
        return UserError(f"onnxruntime's {self.provider} failed to run {self.name}: {_first_line(error)}")

    def _output_value(self, ort: Any, batch: int) -> Any:
        """The device value the output of a ``batch`` is written into, allocated once per batch size."""
        if self.output_dim is None:
            return None
        if batch not in self._outputs:
            self._outputs[batch] = ort.OrtValue.ortvalue_from_shape_and_type(
                [batch, self.output_dim], self.output_dtype, "cuda", 0)
        return self._outputs[batch]

    def stage(self, x: np.ndarray) -> Any:
        if not self.on_gpu:
            return {self.input_name: np.ascontiguousarray(x)}
        import onnxruntime as ort  # deferred: an extra

        try:
            binding = self.session.io_binding()
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), "cuda", 0)
            binding.bind_ortvalue_input(self.input_name, value)
            out = self._output_value(ort, len(x))
            if out is not None:
                binding.bind_ortvalue_output(self.output_name, out)
            else:  # an output shape the graph does not fix: onnxruntime allocates it on each run
                binding.bind_output(self.output_name, "cuda", 0)
        except Exception as e:  # noqa: BLE001
            raise self._failed(e) from e
        return binding, value, out  # keep the device values alive with the binding

    def call(self, staged: Any) -> Any:
        try:
            if not self.on_gpu:
                return self.session.run(None, staged)[0]
            binding = staged[0]
            self.session.run_with_iobinding(binding)  # synchronous: returns when the GPU is done
        except Exception as e:  # noqa: BLE001 - the provider's own error types
            raise self._failed(e) from e
        return binding

    def to_numpy(self, out: Any) -> np.ndarray:
        if self.on_gpu:
            return np.asarray(out.copy_outputs_to_cpu()[0], dtype=np.float32)
        return np.asarray(out, dtype=np.float32)

    def peak_memory_reset(self) -> None:
        if not self.on_gpu:
            super().peak_memory_reset()

    def peak_memory(self) -> tuple[float | None, str | None]:
        """CPU: the process's peak RSS. GPU: the device memory used since the session opened (the drop in
        ``cudaMemGetInfo``'s free memory: device-wide, current rather than peak); None where cuda-python is not
        there to ask. Never the host's RSS labelled as GPU memory."""
        if not self.on_gpu:
            return super().peak_memory()
        now = free_memory() if self._free_before is not None else None
        if self._free_before is None or now is None:
            return None, "gpu memory not measured (needs cuda-python: pip install -e '.[gpu]')"
        return round(max(0, self._free_before - now) / 2**20, 1), "gpu memory in use since load (cudaMemGetInfo)"


# ---------------------------------------------------------------------------------------------- tensorrt
class TensorRtRunner(Runner):
    """A serialized TensorRT engine through runtime.tensorrt.TrtRunner (which checks GPU, TensorRT version and
    sha256, and preallocates its device buffers): ``stage`` copies the batch host to device, ``call`` enqueues
    ``execute_async_v3`` and waits for the stream, so wall-clock timing (``timer = "cpu"``) is the GPU time plus
    the enqueue; ``to_numpy`` copies the last run's output back. No torch."""
    backend = "tensorrt"
    timer = "cpu"  # call() returns when the GPU is done

    @classmethod
    def open(cls, backend: str, path: Path, artifact: dict[str, Any],
             options: "RunOptions | None") -> "TensorRtRunner":
        return cls(path, str(artifact.get("encoder", "image")), options.expect if options is not None else None)

    def __init__(self, path: Path, encoder: str | None = None, expect: GraphSpec | None = None) -> None:
        self.runner = TrtRunner(path)
        self.version = self.runner.tensorrt_version  # JetPack's apt package has no pip metadata
        self.name = Path(path).name
        r = self.runner
        if encoder is not None or not r.output_names:  # the engine's I/O at its profile's max batch
            check_graph_io(self.name, encoder or "image",
                           [(_NUMPY_TYPES.get(np.dtype(r.dtypes[n]).name, "other"), list(r.max_shapes[n]))
                            for n in r.input_names],
                           [list(r.max_shapes[n]) for n in r.output_names], expect)
        self.output_name = self.runner.output_names[0]
        self.min_batch, self.max_batch = self.runner.profile.min, self.runner.profile.max

    def stage(self, x: np.ndarray) -> Any:
        return self.runner.stage(self.runner.feeds((x,), {}))

    def call(self, staged: Any) -> Any:
        self.runner.execute(staged)
        return staged

    def to_numpy(self, out: Any) -> np.ndarray:
        """The output of the last ``call`` (``out`` is its staged batch)."""
        return self.runner.fetch()[self.output_name].astype(np.float32)

    def peak_memory_reset(self) -> None:
        pass  # the engine's memory is fixed when it is loaded

    def peak_memory(self) -> tuple[float | None, str | None]:
        """The engine's activation memory (``device_memory_size_v2``, else ``device_memory_size``)."""
        size = self.runner.device_memory()
        return (round(size / 2**20, 1), "engine activation memory") if size else (None, None)


# ---------------------------------------------------------------------------------------------- openvino
OPENVINO_HINTS = ("latency", "throughput")
_OV_TYPES = {"f32": "tensor(float)", "f16": "tensor(float16)", "i64": "tensor(int64)", "i32": "tensor(int32)"}


def _ov_dims(port: Any) -> list[int | None]:
    """An OpenVINO port's shape, None for a dynamic dimension."""
    return [d.get_length() if d.is_static else None for d in port.get_partial_shape()]


def openvino_message(error: BaseException) -> str:
    """OpenVINO's errors are stacks of "Exception from src/...:" lines around one line of substance: that one."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Exception from", "Check '"))]
    text = (useful or lines or [type(error).__name__])[-1]
    return text if len(text) <= 300 else text[:300] + "..."


class OpenVinoRunner(Runner):
    """An ONNX graph (fp32, fp16, INT8 QDQ) in OpenVINO's CPU runtime, batch axis left dynamic as exported.

    Compute is pinned to fp32 (``INFERENCE_PRECISION_HINT``): OpenVINO's CPU default is bf16 wherever the CPU has
    bf16 instructions (AVX512_BF16, AMX), which would make an fp32 row a bf16 one. INT8 QDQ graphs still run
    their int8 kernels. ``threads`` sets ``INFERENCE_NUM_THREADS`` (None: OpenVINO's default, every core);
    ``hint`` the performance hint: "latency" (one stream, all threads on each call) or "throughput" (several
    streams, fewer threads each; meant for many requests in flight).
    """
    backend = "openvino-cpu"

    @classmethod
    def open(cls, backend: str, path: Path, artifact: dict[str, Any], options: "RunOptions") -> "OpenVinoRunner":
        runner = cls(path, options.threads, options.hint)
        check_graph_io(runner.name, str(artifact.get("encoder", "image")),
                       [(_OV_TYPES.get(i.get_element_type().get_type_name(), "other"), _ov_dims(i))
                        for i in runner.compiled.inputs],
                       [_ov_dims(o) for o in runner.compiled.outputs], options.expect)
        return runner

    def __init__(self, path: Path, threads: int | None = None, hint: str | None = None) -> None:
        import openvino as ov  # deferred: an optional extra (edgedistill[openvino])

        self.name = Path(path).name
        self.version = package_version("openvino")
        self.hint = (hint or "latency").lower()
        if self.hint not in OPENVINO_HINTS:
            raise UserError(f"OpenVINO performance hint {hint!r}: choose {' or '.join(OPENVINO_HINTS)}")
        config: dict[str, Any] = {"PERFORMANCE_HINT": self.hint.upper(), "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            core = ov.Core()
            self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
            self.request = self.compiled.create_infer_request()
            self.output = self.compiled.output(0)
        except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError for everything
            raise UserError(f"OpenVINO could not load {self.name} on the CPU: {openvino_message(e)}") from e

    def stage(self, x: np.ndarray) -> Any:
        return np.require(x, requirements=("C", "W"))  # what OpenVINO can share without a copy

    def call(self, staged: Any) -> Any:
        try:
            return self.request.infer({0: staged}, share_inputs=True)[self.output]
        except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError for everything
            raise UserError(f"OpenVINO failed to run {self.name} on the CPU: {openvino_message(e)}") from e


# ---------------------------------------------------------------------------------------------- planning
@dataclass
class RunOptions:
    """How a runner is opened: the bench device, CPU threads, the batch profile TensorRT builds for, whether
    onnxruntime's idle threads spin (None: its default, on), and OpenVINO's performance hint."""
    device: str = "cpu"
    threads: int | None = None
    batch_range: tuple[int, int, int] | None = None
    spin: bool | None = None
    hint: str | None = None          # "latency" (default) or "throughput"
    expect: GraphSpec | None = None  # the encoder's input size and embedding width, checked when a graph opens


@dataclass
class Candidate:
    """One (artifact, backend) the device could run, or the reason it cannot."""
    artifact: dict[str, Any]
    backend: str
    reason: str | None = None                 # why it is skipped (None: runnable)
    make: Callable[[], Runner] | None = field(default=None, repr=False)


# The backends each INT8 graph flavour is made for (export.json's "flavour"); the other backends skip it.
INT8_FLAVOUR_BACKENDS = {"tensorrt": ("onnxruntime-tensorrt",),
                         "onnxruntime-cpu": ("onnxruntime-cpu", "openvino-cpu", "onnxruntime-cuda")}


def int8_flavour(artifact: dict[str, Any]) -> str | None:
    """Which runtime an INT8 ONNX graph was quantised for: "tensorrt" or "onnxruntime-cpu" (export.json's
    ``flavour``; older exports: from ``calibration.activations``, "int8 symmetric" being TensorRT's). None for
    any other artifact, or when the export does not say."""
    if artifact.get("format") != "onnx" or artifact.get("precision") != "int8":
        return None
    flavour = artifact.get("flavour")
    if flavour in INT8_FLAVOUR_BACKENDS:
        return str(flavour)
    activations = str((artifact.get("calibration") or {}).get("activations") or "")
    if activations.startswith("int8 symmetric"):
        return "tensorrt"
    if activations.startswith("uint8 asymmetric"):
        return "onnxruntime-cpu"
    return None


def flavour_mismatch(artifact: dict[str, Any], backend: str) -> str | None:
    """Why ``backend`` must not run this INT8 graph (made for the other flavour's runtime), or None."""
    flavour = int8_flavour(artifact)
    if flavour is None or backend in INT8_FLAVOUR_BACKENDS[flavour]:
        return None
    if flavour == "tensorrt":
        return (f"INT8 graph quantised for TensorRT (symmetric int8 activations, fp16 between the Q/DQ pairs), not "
                f"for {backend}: run it with onnxruntime-tensorrt or as a TensorRT engine; for {backend}, export "
                f"--int8 without --format trt or a TensorRT target")
    return (f"INT8 graph quantised for onnxruntime on CPU (uint8 asymmetric activations, int32 biases), which "
            f"TensorRT's explicit quantisation does not take (zero point 0, float biases): for {backend}, export "
            f"--int8 with --format trt or a TensorRT target")


def candidates(artifact: dict[str, Any], path: Path, device: str, threads: int | None,
               batch_range: tuple[int, int, int] | None = None, *, spin: bool | None = None,
               hint: str | None = None, expect: GraphSpec | None = None) -> list[Candidate]:
    """Every backend of ``device`` for one artifact (formats.BACKENDS): runnable ones with a factory, the others
    with the reason (not installed here, or an INT8 graph of the other flavour: ``flavour_mismatch``).
    ``batch_range`` (min, opt, max): the batch profile onnxruntime's TensorRT provider builds for; ``spin``:
    onnxruntime's idle-thread spinning; ``hint``: OpenVINO's performance hint; ``expect``: the shapes a graph
    must take and give (RunOptions).
    """
    fmt = str(artifact.get("format"))
    options = RunOptions(device, threads, batch_range, spin=spin, hint=hint, expect=expect)
    backends = backends_for(fmt, device)
    if not backends:  # named after the backend the format would have elsewhere, so the row says what it is
        name = next((b.name for b in BACKENDS.values() if fmt in b.formats), "-")
        return [Candidate(artifact, name, reason=why_not(fmt, device))]
    out = []
    for b in backends:
        reason = flavour_mismatch(artifact, b.name) or b.missing()
        out.append(Candidate(artifact, b.name, reason=reason) if reason else Candidate(
            artifact, b.name, make=lambda b=b: resolve(b.runner).open(b.name, path, artifact, options)))
    return out
