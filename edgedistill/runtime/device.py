"""Which machine this is, as far as choosing an artifact goes: the CPU's model and the instruction-set flags INT8
speed and accuracy depend on (without VNNI onnxruntime's u8s8 kernels can saturate: docs/runtime.md#int8), and
the device a load runs on (cpu, cuda, jetson)."""

from __future__ import annotations

import platform
import re
from pathlib import Path

from edgedistill.core.errors import UserError
from edgedistill.runtime.formats import DEVICES
from edgedistill.runtime.jetson import detect_jetson

# The flags that decide which INT8 kernels a CPU runtime uses (x86: AVX2 / AVX-512 / VNNI / AMX; ARM: dot product
# and i8mm); recorded with every measurement so a cached choice is only reused on a CPU that computes alike.
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_tile", "amx_int8", "asimd", "asimddp", "i8mm", "sve")
_CPUINFO = Path("/proc/cpuinfo")


def cpu_model() -> str:
    try:
        for line in _CPUINFO.read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def isa_flags() -> tuple[str, ...]:
    """The INT8-relevant instruction-set flags of this CPU (Linux /proc/cpuinfo 'flags' or ARM 'Features')."""
    try:
        text = _CPUINFO.read_text()
    except OSError:
        return ()
    match = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.M)
    have = set(match.group(1).split()) if match else set()
    return tuple(f for f in ISA_FLAGS if f in have)


def has_vnni() -> bool:
    """Whether onnxruntime's x86 INT8 kernels have VNNI (AVX512-VNNI or AVX-VNNI) here."""
    return bool({"avx512_vnni", "avx_vnni"} & set(isa_flags()))


def resolve_device(device: str) -> str:
    """auto -> jetson on a Jetson, cuda where a GPU backend sees a GPU, else cpu; a named GPU must be there."""
    if device not in ("auto", *DEVICES):
        raise UserError(f"device {device!r} is not one of auto, {', '.join(DEVICES)}")
    if device == "auto":
        return "jetson" if detect_jetson() is not None else "cuda" if gpu_visible() else "cpu"
    if device in ("cuda", "jetson") and not gpu_visible():
        raise UserError(f"device {device}: no CUDA GPU is visible here (onnxruntime sees no CUDA provider and "
                        f"TensorRT no device); use device='cpu' or 'auto'")
    return device


def gpu_visible() -> bool:
    """Whether the NVIDIA driver sees a CUDA GPU (``cuDeviceGetCount`` through ctypes): the question every GPU
    runtime here (onnxruntime-gpu, TensorRT, torch) depends on, asked without importing any of them."""
    import ctypes  # deferred: only GPU questions need the driver library

    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            driver = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return False
    count = ctypes.c_int(0)
    return driver.cuInit(0) == 0 and driver.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def gpu_name() -> str | None:
    """GPU 0's name from the NVIDIA driver (``cuDeviceGetName``), None without one: part of a measurement's key."""
    import ctypes  # deferred: only GPU questions need the driver library

    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    name, device = ctypes.create_string_buffer(256), ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGet(ctypes.byref(device), 0) != 0 or \
            driver.cuDeviceGetName(name, 256, device) != 0:
        return None
    return name.value.decode(errors="replace")
