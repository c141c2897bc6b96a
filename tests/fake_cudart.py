"""A strict stand-in for NVIDIA cuda-python's runtime bindings, for running the TensorRT runner without a GPU.

The module it makes has only the members edgedistill uses, each with cuda-python's documented name, parameter
names and return convention (a tuple whose first element is a ``cudaError_t``; on an error the values are None),
so a misspelt call, a wrong keyword or an unchecked error fails here as it would on a GPU. docs/gpu.md lists the
calls; tests/test_export_tensorrt.py compares these signatures and enum values with the real module when
cuda-python is installed.

Device memory is numpy byte buffers at fake 256-byte aligned addresses (as ``cudaMalloc``'s are); ``cudaMemcpyAsync``
copies between them and real host pointers (``array.ctypes.data``) in the direction its ``kind`` names, and
refuses a direction that does not match the pointers. Streams must be created before use and are gone once
destroyed. ``FakeCuda.view`` is the fake TensorRT context's way into that memory (tests/fake_tensorrt.py).

Every call is recorded in ``calls`` as a tuple (name, args...).
"""

from __future__ import annotations

import ctypes
import enum
import importlib.machinery
import sys
import types
from typing import Any

import numpy as np

ALIGNMENT = 256
BASE = 0x1000_0000_0000  # far from where Linux maps a process's own memory

# cudaError_t: the members edgedistill can meet, with CUDA's values and cudaGetErrorString's texts
ERRORS = {
    "cudaSuccess": (0, "no error"),
    "cudaErrorInvalidValue": (1, "invalid argument"),
    "cudaErrorMemoryAllocation": (2, "out of memory"),
    "cudaErrorInsufficientDriver": (35, "CUDA driver version is insufficient for CUDA runtime version"),
    "cudaErrorNoDevice": (100, "no CUDA-capable device is detected"),
    "cudaErrorInvalidDevice": (101, "invalid device ordinal"),
    "cudaErrorInvalidResourceHandle": (400, "invalid resource handle"),
}


class FakeCuda:
    """One fake GPU (or none: ``devices=0``) behind a fake ``cuda.bindings.runtime`` module (``.runtime``).

    ``fail``: call name -> (error name, successful calls before it fails), e.g.
    ``{"cudaMalloc": ("cudaErrorMemoryAllocation", 1)}`` fails the second allocation. ``misalign``: cudaMalloc
    hands out addresses 16 bytes past a 256-byte boundary (what cudaMalloc never does), to test the check."""

    def __init__(self, *, devices: int = 1, name: str = "NVIDIA GeForce RTX 4090", capability: tuple = (8, 9),
                 sm_count: int = 128, total: int = 24 << 30, version: int = 12060,
                 fail: dict[str, tuple[str, int]] | None = None, misalign: bool = False) -> None:
        self.devices, self.total, self.version = devices, total, version
        self.device = dict(name=name, capability=capability, sm_count=sm_count)
        self.fail = dict(fail or {})
        self.misalign = misalign
        self.calls: list[tuple] = []
        self.memory: dict[int, np.ndarray] = {}   # live allocations: address -> bytes
        self.streams: set[int] = set()
        self._next, self._next_stream = BASE, 1
        self.runtime = self._module()

    # ------------------------------------------------------------------------------------------ helpers
    def allocation(self, address: int, nbytes: int) -> tuple[np.ndarray, int] | None:
        """(the allocation holding [address, address + nbytes), offset into it), or None when there is none."""
        for start, buffer in self.memory.items():
            if start <= address and address + nbytes <= start + buffer.size:
                return buffer, address - start
        return None

    def view(self, address: int, nbytes: int) -> np.ndarray:
        """The device bytes at ``address`` (what a kernel would read or write); KeyError outside an allocation."""
        found = self.allocation(address, nbytes)
        if found is None:
            raise KeyError(f"no device allocation holds {nbytes} bytes at {address:#x}")
        buffer, offset = found
        return buffer[offset:offset + nbytes]

    def allocated(self) -> int:
        return sum(b.size for b in self.memory.values())

    def install(self, monkeypatch: Any, path: str = "cuda.bindings.runtime") -> None:
        """Make ``from cuda.bindings import runtime`` (cuda-python 12.8+) or, with ``path="cuda.cudart"``,
        ``from cuda import cudart`` (older releases; the new path then fails to import) give this fake."""
        cuda = _package("cuda")
        if path == "cuda.bindings.runtime":
            bindings = _package("cuda.bindings")
            bindings.runtime = self.runtime
            cuda.bindings = bindings
            entries = {"cuda": cuda, "cuda.bindings": bindings, "cuda.bindings.runtime": self.runtime}
        elif path == "cuda.cudart":
            cuda.cudart = self.runtime
            entries = {"cuda": cuda, "cuda.bindings": None, "cuda.bindings.runtime": None,
                       "cuda.cudart": self.runtime}
        else:
            raise ValueError(path)
        self.runtime.__name__ = path
        self.runtime.__spec__ = importlib.machinery.ModuleSpec(path, None)
        for name, module in entries.items():
            monkeypatch.setitem(sys.modules, name, module)

    # ------------------------------------------------------------------------------------------ the module
    def _module(self) -> types.ModuleType:
        fake = self
        rt = types.ModuleType("cuda.bindings.runtime")
        rt.__spec__ = importlib.machinery.ModuleSpec("cuda.bindings.runtime", None)
        cudaError_t = enum.IntEnum("cudaError_t", {k: v for k, (v, _) in ERRORS.items()})
        cudaMemcpyKind = enum.IntEnum("cudaMemcpyKind", {
            "cudaMemcpyHostToHost": 0, "cudaMemcpyHostToDevice": 1, "cudaMemcpyDeviceToHost": 2,
            "cudaMemcpyDeviceToDevice": 3, "cudaMemcpyDefault": 4})
        ok = cudaError_t.cudaSuccess

        class cudaStream_t:  # noqa: N801 - cuda-python's name
            def __init__(self, init_value: int = 0) -> None:
                self._value = int(init_value)

            def __int__(self) -> int:
                return self._value

            def __repr__(self) -> str:
                return f"<cudaStream_t {self._value:#x}>"

        class cudaDeviceProp:  # noqa: N801 - cuda-python's name; only the fields edgedistill reads
            def __init__(self) -> None:
                self.name = fake.device["name"].encode()  # char[256]
                self.major, self.minor = fake.device["capability"]
                self.multiProcessorCount = fake.device["sm_count"]
                self.totalGlobalMem = fake.total

        def failing(call: str) -> Any:
            rule = fake.fail.get(call)
            if rule is None:
                return None
            error, after = rule
            if after > 0:
                fake.fail[call] = (error, after - 1)
                return None
            return cudaError_t[error]

        def live_stream(stream: Any) -> bool:
            return isinstance(stream, cudaStream_t) and int(stream) in fake.streams

        def cudaGetDeviceCount() -> tuple:
            fake.calls.append(("cudaGetDeviceCount",))
            err = failing("cudaGetDeviceCount")
            if err is not None:
                return err, None
            return (ok, fake.devices) if fake.devices else (cudaError_t.cudaErrorNoDevice, None)

        def cudaGetDeviceProperties(device: int) -> tuple:
            fake.calls.append(("cudaGetDeviceProperties", device))
            if not isinstance(device, int):
                raise TypeError("cudaGetDeviceProperties(int device)")
            if not 0 <= device < fake.devices:
                return cudaError_t.cudaErrorInvalidDevice, None
            return ok, cudaDeviceProp()

        def cudaRuntimeGetVersion() -> tuple:
            fake.calls.append(("cudaRuntimeGetVersion",))
            return ok, fake.version

        def cudaMemGetInfo() -> tuple:
            fake.calls.append(("cudaMemGetInfo",))
            if not fake.devices:
                return cudaError_t.cudaErrorNoDevice, None, None
            return ok, fake.total - fake.allocated(), fake.total

        def cudaMalloc(size: int) -> tuple:
            fake.calls.append(("cudaMalloc", size))
            if not isinstance(size, int) or size < 0:
                raise TypeError("cudaMalloc(size_t size)")
            err = failing("cudaMalloc") or (None if fake.devices else cudaError_t.cudaErrorNoDevice)
            if err is None and fake.allocated() + size > fake.total:
                err = cudaError_t.cudaErrorMemoryAllocation
            if err is not None:
                return err, None
            address = fake._next + (16 if fake.misalign else 0)
            fake._next += -(-(size + 16) // ALIGNMENT) * ALIGNMENT + ALIGNMENT  # a gap between blocks
            fake.memory[address] = np.zeros(size, np.uint8)
            return ok, address

        def cudaFree(devPtr: int) -> tuple:  # noqa: N803 - cuda-python's parameter name
            fake.calls.append(("cudaFree", devPtr))
            if devPtr not in fake.memory:
                return (cudaError_t.cudaErrorInvalidValue,)
            del fake.memory[devPtr]
            return (ok,)

        def cudaStreamCreate() -> tuple:
            fake.calls.append(("cudaStreamCreate",))
            err = failing("cudaStreamCreate") or (None if fake.devices else cudaError_t.cudaErrorNoDevice)
            if err is not None:
                return err, None
            handle = 0x5000 + fake._next_stream
            fake._next_stream += 1
            fake.streams.add(handle)
            return ok, cudaStream_t(handle)

        def cudaStreamSynchronize(stream: Any) -> tuple:
            fake.calls.append(("cudaStreamSynchronize", int(stream)))
            if not live_stream(stream):
                return (cudaError_t.cudaErrorInvalidResourceHandle,)
            return (failing("cudaStreamSynchronize") or ok,)

        def cudaStreamDestroy(stream: Any) -> tuple:
            fake.calls.append(("cudaStreamDestroy", int(stream)))
            if not live_stream(stream):
                return (cudaError_t.cudaErrorInvalidResourceHandle,)
            fake.streams.discard(int(stream))
            return (ok,)

        def cudaMemcpyAsync(dst: int, src: int, count: int, kind: Any, stream: Any) -> tuple:
            if not isinstance(kind, cudaMemcpyKind):
                raise TypeError("cudaMemcpyAsync: kind must be a cudaMemcpyKind")
            fake.calls.append(("cudaMemcpyAsync", kind.name, count))
            if not live_stream(stream):
                return (cudaError_t.cudaErrorInvalidResourceHandle,)
            if not all(isinstance(v, int) for v in (dst, src, count)) or count < 0:
                return (cudaError_t.cudaErrorInvalidValue,)
            err = failing("cudaMemcpyAsync")
            if err is not None:
                return (err,)
            if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
                target = fake.allocation(dst, count)
                if target is None or fake.allocation(src, 1) is not None:  # dst not device, or src not host
                    return (cudaError_t.cudaErrorInvalidValue,)
                buffer, offset = target
                buffer[offset:offset + count] = np.frombuffer(ctypes.string_at(src, count), np.uint8)
            elif kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:
                source = fake.allocation(src, count)
                if source is None or fake.allocation(dst, 1) is not None:
                    return (cudaError_t.cudaErrorInvalidValue,)
                buffer, offset = source
                ctypes.memmove(dst, buffer.ctypes.data + offset, count)
            else:
                return (cudaError_t.cudaErrorInvalidValue,)  # edgedistill copies host<->device only
            return (ok,)

        def cudaGetErrorName(error: Any) -> tuple:
            return ok, cudaError_t(error).name.encode()

        def cudaGetErrorString(error: Any) -> tuple:
            return ok, ERRORS[cudaError_t(error).name][1].encode()

        for obj in (cudaError_t, cudaMemcpyKind, cudaStream_t, cudaDeviceProp, cudaGetDeviceCount,
                    cudaGetDeviceProperties, cudaRuntimeGetVersion, cudaMemGetInfo, cudaMalloc, cudaFree,
                    cudaStreamCreate, cudaStreamSynchronize, cudaStreamDestroy, cudaMemcpyAsync, cudaGetErrorName,
                    cudaGetErrorString):
            setattr(rt, obj.__name__, obj)
        return rt


FUNCTIONS = ("cudaGetDeviceCount", "cudaGetDeviceProperties", "cudaRuntimeGetVersion", "cudaMemGetInfo",
             "cudaMalloc", "cudaFree", "cudaStreamCreate", "cudaStreamSynchronize", "cudaStreamDestroy",
             "cudaMemcpyAsync", "cudaGetErrorName", "cudaGetErrorString")


def _package(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []  # a package: its submodules come from sys.modules
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    return module


def block_cuda_python(monkeypatch: Any) -> None:
    """Make every cuda-python import fail, as on a machine without it."""
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
