"""Process-level tuning for CPU training.

glibc returns every large freed block (above its mmap threshold, at most 32 MB by default) to the kernel at
once, so a CPU training step that frees and re-allocates its activations page-faults all of them again on
every step: the plain student step of benchmarks/loss_overhead.py takes 1.74 s without this tuning, 1.25 s
with it. Raising the threshold keeps freed activations in the heap for the next step, which is what PyTorch's performance guide gets
from jemalloc or tcmalloc. The cost: the process keeps its peak memory instead of handing it back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
_applied = False


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """Ask glibc to keep freed blocks up to ``threshold`` bytes for reuse; True when it took effect.

    Off with EDGEDISTILL_MALLOC_TUNING=0; a no-op on other C libraries and platforms.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get("EDGEDISTILL_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(M_MMAP_THRESHOLD, ctypes.c_int(threshold)) == 1
    ok = mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2 * threshold)) == 1 and ok
    _applied = ok
    return ok
