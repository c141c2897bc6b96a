"""What a benchmark ran on: the device's description that goes into every row of the report.

``cpu``: the CPU model, cores and the thread count used. ``cuda``: GPU name, compute capability, driver,
clocks (from ``nvidia-smi`` where it is installed). ``jetson``: the board model, L4T release and power mode
(``nvpmodel -q``) on top of the CUDA description; a machine that is not a Jetson is refused (jetson.py).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
from dataclasses import asdict, is_dataclass
from typing import Any

import edgedistill.runtime.jetson as jetson
from edgedistill.runtime.device import cpu_model, isa_flags
from edgedistill.runtime.formats import DEVICES
from edgedistill.core.errors import UserError



def _plain(obj: Any) -> Any:
    return asdict(obj) if is_dataclass(obj) and not isinstance(obj, type) else obj


def nvidia_smi() -> dict[str, str]:
    """Driver version and clocks of GPU 0 from nvidia-smi; {} where it is missing (Jetsons have none)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {}
    fields = ("driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "power.limit", "pstate")
    try:
        out = subprocess.run([exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    values = [v.strip() for v in out.strip().splitlines()[0].split(",")] if out.strip() else []
    return {k.replace(".", "_"): v for k, v in zip(fields, values)}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def require_cuda(device: str) -> None:
    try:
        import torch  # deferred: only --device cuda/jetson asks torch about the GPU
    except ImportError:
        raise UserError(f"--device {device} times GPU runs with torch's CUDA events, and torch is not installed "
                        f"here; install torch for this machine (on a Jetson: NVIDIA's wheel for your JetPack) or "
                        f"use --device cpu") from None

    if not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible to torch on this machine; use --device cpu, "
                        f"or run on the GPU machine (--host user@address)")


def describe_device(device: str, threads: int) -> dict[str, Any]:
    """The conditions every row names: device kind, processor, threads, and the accelerator when there is one."""
    if device not in DEVICES:
        raise UserError(f"--device {device!r} is not one of {', '.join(DEVICES)}")
    info: dict[str, Any] = {"device": device, "cpu": cpu_model(), "cpu_flags": list(isa_flags()), "cpu_cores": os.cpu_count(), "threads": threads,
                            "hostname": platform.node(), "platform": platform.platform(),
                            "torch": _version("torch")}  # None on a device install without torch
    if device == "jetson":

        board = jetson.require_jetson()
        info["jetson"] = _plain(board)
        mode = jetson.power_mode()
        if isinstance(mode, tuple):  # (mode or None, reason)
            mode, reason = mode
            if mode is None:
                info["power_mode_unknown"] = reason
        info["power_mode"] = _plain(mode)
    if device in ("cuda", "jetson"):
        require_cuda(device)
        import torch  # deferred: GPU devices only (CUDA events and buffers come from torch there)

        props = torch.cuda.get_device_properties(0)
        info.update({"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}",
                     "gpu_memory_mb": round(props.total_memory / 2**20), "cuda": torch.version.cuda})
        info.update(nvidia_smi())
    return info


def describe_short(info: dict[str, Any]) -> str:
    """One line for the terminal and the markdown header."""
    if info["device"] == "cpu":
        return f"cpu: {info['cpu']}, {info['threads']} threads"
    gpu = f"{info.get('gpu')} (sm {info.get('compute_capability')}, CUDA {info.get('cuda')})"
    if info["device"] == "jetson":
        board = info.get("jetson") or {}
        model = board.get("model") if isinstance(board, dict) else board
        mode = info.get("power_mode") or {}
        name = mode.get("name") if isinstance(mode, dict) else mode
        return f"jetson: {model}, power mode {name or 'unknown'}, {gpu}"
    return f"cuda: {gpu}, driver {info.get('driver_version', '?')}"
