"""Runners: one artifact on one backend, with inputs staged where the backend reads them.

Backends by device (an artifact runs on every backend of the device that can run it; the rest are listed as
skipped with the reason):

    device   onnx graphs                                   TensorRT engine   Torch-TensorRT   PyTorch student
    cpu      onnxruntime-cpu                               -                 -                pytorch-cpu
    cuda     onnxruntime-cuda, onnxruntime-tensorrt         tensorrt          torch-tensorrt   pytorch-cuda
    jetson   (as cuda)

A runner's ``stage(x)`` puts a numpy batch where the backend wants it (a CUDA tensor, an onnxruntime value on
the GPU, or the array itself), ``call(staged)`` runs one inference on it, and ``embed(x)`` returns float32
embeddings for the accuracy pass. GPU runners enqueue on torch's current stream, so CUDA events time them.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgedistill.errors import UserError


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
        """(N, ...) -> (N, D) float32, in batches the backend accepts."""
        step = min(batch, self.max_batch or batch)
        outs = [self.to_numpy(self.call(self.stage(x[i:i + step]))) for i in range(0, len(x), step)]
        return np.concatenate(outs).astype(np.float32)

    def peak_memory_reset(self) -> None:
        if self.timer == "cuda":
            import torch
            torch.cuda.reset_peak_memory_stats()
        else:
            from edgedistill.bench.timing import reset_peak_rss
            reset_peak_rss()

    def peak_memory(self) -> tuple[float | None, str | None]:
        """(MiB, what was measured): torch's CUDA allocator peak on GPU, the process's peak RSS on CPU."""
        if self.timer == "cuda":
            import torch
            return round(torch.cuda.max_memory_allocated() / 2**20, 1), "cuda allocated (torch)"
        from edgedistill.bench.timing import peak_rss_mb
        peak = peak_rss_mb()
        return peak, ("process peak rss" if peak is not None else None)


# ---------------------------------------------------------------------------------------------- onnxruntime
ORT_PROVIDERS = {"onnxruntime-cpu": "CPUExecutionProvider", "onnxruntime-cuda": "CUDAExecutionProvider",
                 "onnxruntime-tensorrt": "TensorrtExecutionProvider"}


class OrtRunner(Runner):
    """An ONNX graph in onnxruntime. On GPU providers the input is bound on the device (io binding), so the
    host-to-device copy is staged, not timed."""

    def __init__(self, path: Path, precision: str, backend: str, threads: int | None) -> None:
        from edgedistill.export.graph import ort_session

        self.backend = backend
        self.version = package_version("onnxruntime-gpu", "onnxruntime")
        provider = ORT_PROVIDERS[backend]
        providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CUDAExecutionProvider",
                                                                             "CPUExecutionProvider"]
        if provider == "TensorrtExecutionProvider":
            providers = [provider, "CUDAExecutionProvider"]
        self.session = ort_session(path, threads, providers=providers)
        used = self.session.get_providers()
        if used[0] != provider:
            raise UserError(f"onnxruntime fell back to {used[0]} for {Path(path).name} instead of {provider}; "
                            f"check the onnxruntime-gpu, CUDA and cuDNN installation")
        self.input_name = self.session.get_inputs()[0].name
        self.on_gpu = provider != "CPUExecutionProvider"

    def stage(self, x: np.ndarray) -> Any:
        if not self.on_gpu:
            return {self.input_name: np.ascontiguousarray(x)}
        import onnxruntime as ort

        binding = self.session.io_binding()
        value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), "cuda", 0)
        binding.bind_ortvalue_input(self.input_name, value)
        binding.bind_output(self.session.get_outputs()[0].name, "cuda", 0)
        return binding, value  # keep the device value alive with the binding

    def call(self, staged: Any) -> Any:
        if not self.on_gpu:
            return self.session.run(None, staged)[0]
        binding, _ = staged
        self.session.run_with_iobinding(binding)  # synchronous: returns when the GPU is done
        return binding

    def to_numpy(self, out: Any) -> np.ndarray:
        if self.on_gpu:
            return np.asarray(out.copy_outputs_to_cpu()[0], dtype=np.float32)
        return np.asarray(out, dtype=np.float32)


# ---------------------------------------------------------------------------------------------- torch
class TorchRunner(Runner):
    """A PyTorch module in eager mode (the student as trained, or the teacher), on CPU or CUDA."""

    def __init__(self, module: Any, device: str, dtype: Any = None) -> None:
        import torch

        self.device = torch.device("cuda" if device in ("cuda", "jetson") else "cpu")
        self.backend = f"pytorch-{self.device.type}"
        self.version = torch.__version__
        self.timer = "cuda" if self.device.type == "cuda" else "cpu"
        self.module = module.eval().to(self.device)
        self.dtype = dtype

    def stage(self, x: np.ndarray) -> Any:
        import torch

        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        return t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t

    def call(self, staged: Any) -> Any:
        import torch

        with torch.inference_mode():
            return self.module(staged)

    def to_numpy(self, out: Any) -> np.ndarray:
        return out.float().cpu().numpy()


class TorchTrtRunner(TorchRunner):
    """A Torch-TensorRT program (``.ep``), after its GPU and sha256 checks (export.torchtrt.load_torchtrt)."""

    def __init__(self, path: Path) -> None:
        from edgedistill.export.torchtrt import load_torchtrt

        super().__init__(_Callable(load_torchtrt(path)), "cuda")
        self.backend = "torch-tensorrt"
        self.version = package_version("torch_tensorrt", "torch-tensorrt")


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

    def __init__(self, path: Path) -> None:
        from edgedistill.export.tensorrt import TrtRunner

        self.runner = TrtRunner(path)
        self.version = package_version("tensorrt", "tensorrt-cu12", "tensorrt-cu13")
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
class Candidate:
    """One (artifact, backend) the device could run, or the reason it cannot."""
    artifact: dict[str, Any]
    backend: str
    reason: str | None = None                 # why it is skipped (None: runnable)
    make: Callable[[], Runner] | None = field(default=None, repr=False)


def ort_gpu_providers() -> set[str]:
    import onnxruntime as ort

    return set(ort.get_available_providers())


def candidates(artifact: dict[str, Any], path: Path, device: str, threads: int | None) -> list[Candidate]:
    """Every backend of ``device`` for one export.json artifact: runnable ones with a factory, others with why."""
    fmt, precision = artifact.get("format"), artifact.get("precision", "fp32")
    gpu = device in ("cuda", "jetson")
    if fmt == "onnx":
        if not gpu:
            return [Candidate(artifact, "onnxruntime-cpu",
                              make=lambda: OrtRunner(path, precision, "onnxruntime-cpu", threads))]
        out = []
        available = ort_gpu_providers()
        for backend in ("onnxruntime-cuda", "onnxruntime-tensorrt"):
            provider = ORT_PROVIDERS[backend]
            if provider not in available:
                why = f"onnxruntime has no {provider} here (pip install onnxruntime-gpu" + \
                      (", with TensorRT libraries)" if "Tensorrt" in provider else ")")
                out.append(Candidate(artifact, backend, reason=why))
            else:
                out.append(Candidate(artifact, backend,
                                     make=lambda b=backend: OrtRunner(path, precision, b, threads)))
        return out
    if fmt == "trt":
        if not gpu:
            return [Candidate(artifact, "tensorrt", reason="TensorRT engines run on a GPU: use --device cuda or "
                                                           "jetson on the machine the engine was built for")]
        if package_version("tensorrt", "tensorrt-cu12", "tensorrt-cu13") is None:
            return [Candidate(artifact, "tensorrt", reason="tensorrt is not installed (pip install "
                                                           "'edgedistill[gpu]'; on a Jetson it comes with JetPack)")]
        return [Candidate(artifact, "tensorrt", make=lambda: TensorRtRunner(path))]
    if fmt == "torchtrt":
        if not gpu:
            return [Candidate(artifact, "torch-tensorrt", reason="Torch-TensorRT programs run on a GPU: use "
                                                                 "--device cuda")]
        return [Candidate(artifact, "torch-tensorrt", make=lambda: TorchTrtRunner(path))]
    if fmt == "npy":
        return [Candidate(artifact, "-", reason="precomputed text embeddings, not a model (used by devices that "
                                                "run no text encoder)")]
    return [Candidate(artifact, "-", reason=f"unknown artifact format {fmt!r}; this edgedistill cannot run it")]
