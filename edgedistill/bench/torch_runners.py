"""The runners that need torch: the PyTorch student and Torch-TensorRT programs. They live outside the torch-free
runtime; ``runtime.formats.BACKENDS`` names them as "module:Class" strings, imported only when used. (TensorRT
engines run in the runtime itself: runtime.backends.TensorRtRunner, with buffers from cuda-python.)
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgedistill.export.torchtrt import REBUILD_HINT, load_torchtrt
from edgedistill.runtime.backends import Runner, RunOptions, package_version
from edgedistill.runtime.tensorrt import read_sidecar


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

    def peak_memory_reset(self) -> None:
        if self.timer != "cuda":
            return super().peak_memory_reset()
        import torch  # deferred: the device install has no torch
        torch.cuda.reset_peak_memory_stats()

    def peak_memory(self) -> tuple[float | None, str | None]:
        """torch's CUDA allocator peak on a GPU, the process's peak RSS on the CPU."""
        if self.timer != "cuda":
            return super().peak_memory()
        import torch  # deferred: the device install has no torch
        return round(torch.cuda.max_memory_allocated() / 2**20, 1), "cuda allocated (torch)"


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
    from edgedistill.distill.students import load_student  # deferred: the PyTorch backend's stack (torch, open_clip)

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


def student_tokenizer(folder: Path) -> Any:
    """The PyTorch student's own tokenizer (open_clip's, from the student folder): ``formats.FORMATS['pytorch']``."""
    import open_clip  # deferred: the training stack

    return open_clip.get_tokenizer(f"local-dir:{folder}")
