"""Runners: one artifact on one backend, with inputs staged where the backend reads them.

Backends by device (an artifact runs on every backend of the device that can run it; the rest are listed as
skipped with the reason):

    device   onnx graphs                                   TensorRT engine   Torch-TensorRT   PyTorch student
    cpu      openvino-cpu, onnxruntime-cpu                 -                 -                pytorch-cpu
    cuda     onnxruntime-cuda, onnxruntime-tensorrt         tensorrt          torch-tensorrt   pytorch-cuda
    jetson   (as cuda)

A runner's ``stage(x)`` puts a numpy batch where the backend wants it (a CUDA tensor, an onnxruntime value on
the GPU, or the array itself), ``call(staged)`` runs one inference on it, and ``embed(x)`` returns float32
embeddings for the accuracy pass. GPU runners enqueue on torch's current stream, so CUDA events time them.
"""

from __future__ import annotations

import functools
import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgedistill.bench.timing import peak_rss_mb, reset_peak_rss
from edgedistill.errors import UserError
from edgedistill.export.tensorrt import TrtRunner, read_sidecar
from edgedistill.export.torchtrt import REBUILD_HINT, load_torchtrt
from edgedistill.formats import BACKENDS, backends_for, resolve, why_not
from edgedistill.locations import default_cache_root
from edgedistill.runtime.ort import ort_session


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
            outs.append(self.to_numpy(self.call(self.stage(padded)))[:len(chunk)])
        return np.concatenate(outs).astype(np.float32)

    def peak_memory_reset(self) -> None:
        if self.timer == "cuda":
            import torch  # deferred: the device install has no torch
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()

    def peak_memory(self) -> tuple[float | None, str | None]:
        """(MiB, what was measured): torch's CUDA allocator peak on GPU, the process's peak RSS on CPU."""
        if self.timer == "cuda":
            import torch  # deferred: the device install has no torch
            return round(torch.cuda.max_memory_allocated() / 2**20, 1), "cuda allocated (torch)"
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
                 batch_range: tuple[int, int, int] | None = None, cache_dir: Path | None = None) -> Any:
    """The (provider, options) pair for one graph (onnxruntime's TensorRT / CUDA provider options).

    TensorRT: INT8 QDQ graphs need ``trt_int8_enable`` (onnxruntime#13381) and fp16 for the layers outside the
    Q/DQ pairs; fp16 graphs ``trt_fp16_enable``; engines and timing caches are kept under ``cache_dir`` so a
    second session does not rebuild; the batch axis gets an explicit profile (min/opt/max).
    """
    if provider == "CPUExecutionProvider":
        return provider
    options: dict[str, Any] = {"device_id": 0}
    if provider != "TensorrtExecutionProvider":
        return provider, options
    options.update({"trt_fp16_enable": precision in ("fp16", "int8"), "trt_int8_enable": precision == "int8"})
    if cache_dir is not None:
        options.update({"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
                        "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache_dir)})
    if shapes and batch_range is not None:
        for key, batch in zip(("min", "opt", "max"), batch_range):
            options[f"trt_profile_{key}_shapes"] = ",".join(
                f"{name}:" + "x".join(str(batch if i == 0 else d) for i, d in enumerate(dims))
                for name, dims in shapes.items())
    return provider, options


class OrtRunner(Runner):
    """An ONNX graph in onnxruntime. On GPU providers the input is bound on the device (io binding), so the
    host-to-device copy is staged, not timed. A provider that fails to build or run the graph is this
    artifact's failure (a UserError, hence a failed row), never the whole bench's."""

    @classmethod
    def open(cls, backend: str, path: Path, artifact: dict[str, Any], options: "RunOptions") -> "OrtRunner":
        return cls(path, str(artifact.get("precision", "fp32")), backend, options.threads, options.batch_range,
                   spin=options.spin)

    def __init__(self, path: Path, precision: str, backend: str, threads: int | None,
                 batch_range: tuple[int, int, int] | None = None, spin: bool | None = None) -> None:
        self.backend, self.name = backend, Path(path).name
        self.version = package_version("onnxruntime-gpu", "onnxruntime")
        self.provider = provider = ORT_PROVIDERS[backend]
        providers: list[Any] = [ort_provider(provider, precision)]
        if provider == "TensorrtExecutionProvider":
            providers = [ort_provider(provider, precision, onnx_input_shapes(path), batch_range,
                                      default_cache_root() / "onnxruntime-tensorrt"),
                         ort_provider("CUDAExecutionProvider", precision)]
            if batch_range is not None:
                self.min_batch, self.max_batch = batch_range[0], batch_range[2]
        elif provider == "CUDAExecutionProvider":
            providers.append("CPUExecutionProvider")
        try:
            self.session = ort_session(path, threads, providers=providers,
                                       optimize=provider != "TensorrtExecutionProvider", spin=spin)
        except Exception as e:  # noqa: BLE001 - onnxruntime's EPFail, Fail, RuntimeException...
            raise UserError(f"onnxruntime's {provider} could not load {self.name}: {_first_line(e)}") from e
        used = self.session.get_providers()
        if used[0] != provider:
            raise UserError(f"onnxruntime fell back to {used[0]} for {self.name} instead of {provider}; "
                            f"check the onnxruntime-gpu, CUDA and cuDNN installation")
        self.input_name = self.session.get_inputs()[0].name
        self.on_gpu = provider != "CPUExecutionProvider"

    def _failed(self, error: Exception) -> UserError:
        return UserError(f"onnxruntime's {self.provider} failed to run {self.name}: {_first_line(error)}")

    def stage(self, x: np.ndarray) -> Any:
        if not self.on_gpu:
            return {self.input_name: np.ascontiguousarray(x)}
        import onnxruntime as ort  # deferred: an extra

        try:
            binding = self.session.io_binding()
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), "cuda", 0)
            binding.bind_ortvalue_input(self.input_name, value)
            binding.bind_output(self.session.get_outputs()[0].name, "cuda", 0)
        except Exception as e:  # noqa: BLE001
            raise self._failed(e) from e
        return binding, value  # keep the device value alive with the binding

    def call(self, staged: Any) -> Any:
        try:
            if not self.on_gpu:
                return self.session.run(None, staged)[0]
            binding, _ = staged
            self.session.run_with_iobinding(binding)  # synchronous: returns when the GPU is done
        except Exception as e:  # noqa: BLE001 - the provider's own error types
            raise self._failed(e) from e
        return binding

    def to_numpy(self, out: Any) -> np.ndarray:
        if self.on_gpu:
            return np.asarray(out.copy_outputs_to_cpu()[0], dtype=np.float32)
        return np.asarray(out, dtype=np.float32)


# ---------------------------------------------------------------------------------------------- openvino
OPENVINO_HINTS = ("latency", "throughput")


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
        return cls(path, options.threads, options.hint)

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


# ---------------------------------------------------------------------------------------------- torch
class TorchRunner(Runner):
    """A PyTorch module in eager mode (the student as trained, or the teacher), on CPU or CUDA."""

    @classmethod
    def open(cls, backend: str, path: Path, artifact: dict[str, Any], options: "RunOptions") -> "TorchRunner":
        """The student folder ``path`` as trained: its image or text encoder (``artifact['encoder']``)."""
        from edgedistill.export.graph import ImageEncoder, TextEncoder  # deferred: torch

        wrap = ImageEncoder if artifact.get("encoder", "image") == "image" else TextEncoder
        return cls(wrap(_student_model(str(path))), options.device)

    def __init__(self, module: Any, device: str, dtype: Any = None) -> None:
        import torch  # deferred: the device install has no torch

        self.device = torch.device("cuda" if device in ("cuda", "jetson") else "cpu")
        self.backend = f"pytorch-{self.device.type}"
        self.version = torch.__version__
        self.timer = "cuda" if self.device.type == "cuda" else "cpu"
        self.module = module.eval().to(self.device)
        self.dtype = dtype

    def stage(self, x: np.ndarray) -> Any:
        import torch  # deferred: the device install has no torch

        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        return t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t

    def call(self, staged: Any) -> Any:
        import torch  # deferred: the device install has no torch

        with torch.inference_mode():
            return self.module(staged)

    def to_numpy(self, out: Any) -> np.ndarray:
        return out.float().cpu().numpy()


class TorchTrtRunner(TorchRunner):
    """A Torch-TensorRT program (``.ep``), after its GPU and sha256 checks (export.torchtrt.load_torchtrt)."""

    @classmethod
    def open(cls, backend: str, path: Path, artifact: dict[str, Any], options: "RunOptions") -> "TorchTrtRunner":
        return cls(path)

    def __init__(self, path: Path) -> None:
        super().__init__(_Callable(load_torchtrt(path)), "cuda")
        self.backend = "torch-tensorrt"
        self.version = package_version("torch_tensorrt", "torch-tensorrt")
        # the program's shape guard refuses batches outside the profile it was compiled for: skip those
        profile = read_sidecar(Path(path), kind="Torch-TensorRT program", hint=REBUILD_HINT).get("profile") or {}
        self.min_batch = int(profile.get("min", 1))
        self.max_batch = int(profile["max"]) if profile.get("max") else None


@functools.lru_cache(maxsize=2)
def _student_model(folder: str) -> Any:
    """The saved student, loaded once for its image and text rows (fp32, eval mode, CPU until a runner moves it)."""
    from edgedistill.students import load_student  # deferred: the PyTorch backend's stack (torch, open_clip)

    return load_student(Path(folder), "cpu").model.float().eval()


class _Callable:
    """Wrap a callable that is not an nn.Module so TorchRunner can call .eval() and .to() on it."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def eval(self) -> "_Callable":
        return self

    def to(self, device: Any) -> "_Callable":
        return self

    def __call__(self, x: Any) -> Any:
        return self.fn(x)


# ---------------------------------------------------------------------------------------------- tensorrt
class TensorRtRunner(Runner):
    """A serialized TensorRT engine, through export.tensorrt.TrtRunner (which checks GPU, version, sha256)."""
    backend = "tensorrt"
    timer = "cuda"

    @classmethod
    def open(cls, backend: str, path: Path, artifact: dict[str, Any], options: "RunOptions") -> "TensorRtRunner":
        return cls(path)

    def __init__(self, path: Path) -> None:
        self.runner = TrtRunner(path)
        self.version = str(self.runner._trt.__version__)  # JetPack's apt package has no pip metadata
        self.name = self.runner.input_names[0]
        self.min_batch, self.max_batch = self.runner.profile.min, self.runner.profile.max

    def stage(self, x: np.ndarray) -> Any:
        return self.runner._feeds((x,), {})

    def call(self, staged: Any) -> Any:
        return self.runner.run(staged)[self.runner.output_names[0]]

    def to_numpy(self, out: Any) -> np.ndarray:
        return out.float().cpu().numpy()

    def peak_memory(self) -> tuple[float | None, str | None]:
        size = getattr(self.runner.engine, "device_memory_size_v2", None) or \
            getattr(self.runner.engine, "device_memory_size", None)
        return (round(int(size) / 2**20, 1), "engine activation memory") if size else (None, None)


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


@dataclass
class Candidate:
    """One (artifact, backend) the device could run, or the reason it cannot."""
    artifact: dict[str, Any]
    backend: str
    reason: str | None = None                 # why it is skipped (None: runnable)
    make: Callable[[], Runner] | None = field(default=None, repr=False)


def candidates(artifact: dict[str, Any], path: Path, device: str, threads: int | None,
               batch_range: tuple[int, int, int] | None = None, *, spin: bool | None = None,
               hint: str | None = None) -> list[Candidate]:
    """Every backend of ``device`` for one artifact (formats.BACKENDS): runnable ones with a factory, the others
    with the reason. ``batch_range`` (min, opt, max): the batch profile onnxruntime's TensorRT provider builds for;
    ``spin``: onnxruntime's idle-thread spinning; ``hint``: OpenVINO's performance hint (RunOptions).
    """
    fmt = str(artifact.get("format"))
    options = RunOptions(device, threads, batch_range, spin=spin, hint=hint)
    backends = backends_for(fmt, device)
    if not backends:  # named after the backend the format would have elsewhere, so the row says what it is
        name = next((b.name for b in BACKENDS.values() if fmt in b.formats), "-")
        return [Candidate(artifact, name, reason=why_not(fmt, device))]
    out = []
    for b in backends:
        missing = b.missing()
        out.append(Candidate(artifact, b.name, reason=missing) if missing else Candidate(
            artifact, b.name, make=lambda b=b: resolve(b.runner).open(b.name, path, artifact, options)))
    return out
