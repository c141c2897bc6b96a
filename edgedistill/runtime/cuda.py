"""NVIDIA's ``cuda-python`` runtime bindings, the device layer's way to the GPU without torch.

The TensorRT runner (runtime/tensorrt.py) allocates its device buffers, stream and copies here, and the sidecar's
device identity (GPU name, compute capability, SM count, CUDA version) comes from here too. Every binding returns
a tuple whose first element is a ``cudaError_t``; ``check`` turns anything but ``cudaSuccess`` into one UserError
line naming the call, the error and the fix. docs/gpu.md lists each call against cuda-python's documentation.

``cuda-python`` is imported lazily (the `gpu` extra; on a Jetson, pip install it beside JetPack): the module
imports on a CPU machine, and its tests run against the strict fake in tests/fake_cudart.py.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType
from typing import Any

from edgedistill.core.errors import UserError

INSTALL = ("pip install -e '.[gpu]' (cuda-python), or on a Jetson pip install 'cuda-python==12.*' beside "
           "JetPack's CUDA 12")


def cuda_python_missing() -> str | None:
    """None when cuda-python's runtime bindings are importable here, else what to install (no import)."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            if importlib.util.find_spec(name) is not None:
                return None
        except (ImportError, ValueError):  # a parent package that is missing or half-installed
            continue
    return f"cuda-python is not installed ({INSTALL})"


def cudart(what: str = "the TensorRT runner") -> ModuleType:
    """cuda-python's runtime module: ``cuda.bindings.runtime`` (cuda-python 12.8 and newer), else the older
    ``cuda.cudart``; a one-line UserError when neither is installed."""
    try:
        from cuda.bindings import runtime  # deferred: cuda-python is an extra (gpu) and needs an NVIDIA driver
        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart as runtime  # deferred: cuda-python before 12.8 (JetPack 6's CUDA 12.6 era)
        return runtime
    except ImportError:
        raise UserError(f"{what} needs NVIDIA's cuda-python, which is not installed: {INSTALL}") from None


def error_text(rt: ModuleType, err: Any) -> str:
    """'cudaErrorNoDevice: no CUDA-capable device is detected' for a ``cudaError_t``."""
    def text(fn: str) -> str | None:
        try:
            got = getattr(rt, fn)(err)
            value = got[1] if isinstance(got, tuple) else got
            return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        except Exception:  # noqa: BLE001 - describing an error must never raise another one
            return None
    name = text("cudaGetErrorName") or getattr(err, "name", None) or f"cudaError {int(err)}"
    desc = text("cudaGetErrorString")
    return f"{name}: {desc}" if desc else str(name)


def _hint(rt: ModuleType, err: Any, hint: str) -> str:
    codes = rt.cudaError_t
    if err == getattr(codes, "cudaErrorInsufficientDriver", None):
        return ("the NVIDIA driver is older than this cuda-python's CUDA: install the cuda-python major that the "
                "driver supports (nvidia-smi shows it), e.g. pip install 'cuda-python==12.*'")
    if err in (getattr(codes, "cudaErrorNoDevice", None), getattr(codes, "cudaErrorInvalidDevice", None)):
        return ("no NVIDIA GPU is visible: run on the machine with the GPU (check nvidia-smi and "
                "CUDA_VISIBLE_DEVICES)")
    if err == getattr(codes, "cudaErrorMemoryAllocation", None):
        return "the GPU is out of memory: free GPU memory, or rebuild with a smaller batch max"
    return hint


def check(rt: ModuleType, result: Any, call: str, hint: str = "") -> Any:
    """The values of a cuda-python call's ``(err, *values)`` result: None, the one value, or a tuple of them.

    Anything but ``cudaSuccess`` is a one-line UserError naming ``call``, the CUDA error and the fix."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        fix = _hint(rt, err, hint)
        raise UserError(f"CUDA {call} failed ({error_text(rt, err)})" + (f": {fix}" if fix else ""))
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def require_cuda(what: str) -> ModuleType:
    """cuda-python's runtime module once it sees at least one NVIDIA GPU; else a one-line UserError."""
    rt = cudart(what)
    result = rt.cudaGetDeviceCount()
    err, count = result[0], (result[1] if len(result) > 1 else None)
    if err != rt.cudaError_t.cudaSuccess or not count:
        why = error_text(rt, err) if err != rt.cudaError_t.cudaSuccess else "0 devices"
        raise UserError(f"{what} needs an NVIDIA GPU and CUDA sees none (cudaGetDeviceCount: {why}): run it on "
                        f"the target device with its NVIDIA driver and pip install -e '.[gpu]', or export with "
                        f"--format onnx for CPU")
    return rt


def cuda_version(rt: ModuleType) -> str:
    """The CUDA runtime version as "12.6" (``cudaRuntimeGetVersion``: 1000 * major + 10 * minor)."""
    version = int(check(rt, rt.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion"))
    return f"{version // 1000}.{version % 1000 // 10}"


def gpu_properties(device: int = 0, what: str = "the TensorRT runner") -> dict[str, Any]:
    """GPU ``device``'s name, compute capability ("8.7"), SM count and total memory, and the CUDA version."""
    rt = require_cuda(what)
    props = check(rt, rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name
    if isinstance(name, (bytes, bytearray)):  # char[256]: NUL-padded bytes
        name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
    return {"gpu_name": str(name).strip(), "compute_capability": f"{int(props.major)}.{int(props.minor)}",
            "sm_count": int(props.multiProcessorCount), "total_memory": int(props.totalGlobalMem),
            "cuda": cuda_version(rt)}


def free_memory() -> int | None:
    """Free device memory in bytes (``cudaMemGetInfo``), None where cuda-python or a GPU is not there.

    Device-wide, so other processes count; on a Jetson the GPU shares system memory and this is the system's."""
    if cuda_python_missing() is not None:
        return None
    try:
        rt = cudart()
        free, _total = check(rt, rt.cudaMemGetInfo(), "cudaMemGetInfo")
    except UserError:
        return None
    return int(free)
