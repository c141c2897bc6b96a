"""What this process may ask of the machine: CPU threads and the memory one batch takes
(docs/runtime.md#what-load-trusts).

A thread count beyond the CPUs the process may run on does not run faster: onnxruntime starts one pool thread per
count, and 2000 of them on two cores took longer than 40 s to open a session. A batch whose input and output
tensors do not fit in the memory left is a crash (or the OOM killer) well after the command started; both are
refused up front in one line.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

from edgedistill.core.errors import UserError

CPU_MAX = Path("/sys/fs/cgroup/cpu.max")   # cgroup v2: "<quota> <period>" or "max <period>"
MEMINFO = Path("/proc/meminfo")
MEMORY_SHARE = 0.5   # a batch's tensors may take this share of MemAvailable (the runtime needs room of its own)


def usable_cpus() -> tuple[int, str]:
    """(CPUs this process may use, what limits it): the affinity mask, and the cgroup CPU quota when it is lower."""
    try:
        count, why = len(os.sched_getaffinity(0)), "its CPU affinity"
    except (AttributeError, OSError):  # not Linux
        count, why = os.cpu_count() or 1, "the CPU count"
    quota = cgroup_cpus()
    if quota is not None and quota < count:
        count, why = quota, f"the cgroup quota in {CPU_MAX}"
    return max(count, 1), why


def cgroup_cpus(path: Path = CPU_MAX) -> int | None:
    """CPUs the cgroup v2 quota allows (rounded up), or None: no file, no quota ("max") or unreadable."""
    try:
        quota, period = path.read_text().split()[:2]
        if quota == "max":
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError, ZeroDivisionError):
        return None


def check_threads(threads: object, flag: str = "threads") -> int | None:
    """``threads`` (None: the runtime's default) checked: a whole number from 1 to the usable CPUs, else UserError."""
    if threads is None:
        return None
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise UserError(f"{flag} must be a whole number of at least 1, not {threads!r}")
    limit, why = usable_cpus()
    if threads > limit:
        raise UserError(f"{flag} {threads} is more than the {limit} CPUs this process may use ({why}); "
                        f"give {limit} or fewer")
    return threads


def available_memory(path: Path = MEMINFO) -> int | None:
    """MemAvailable in bytes, or None where /proc/meminfo does not say (the batch check is then skipped)."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_batch(batch: object, input_shape: Sequence[int], output_dim: int = 0, *, flag: str = "batch",
                itemsize: int = 4) -> int:
    """``batch`` checked against memory: its input (batch x ``input_shape``, e.g. (3, H, W)) and output
    (batch x ``output_dim``) tensors, ``itemsize`` bytes an element, must fit in MEMORY_SHARE of MemAvailable.
    A whole number of at least 1, else UserError."""
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise UserError(f"{flag} must be a whole number of at least 1, not {batch!r}")
    per_item = (math.prod(int(d) for d in input_shape) + int(output_dim)) * itemsize
    need, free = batch * per_item, available_memory()
    if free is not None and need > MEMORY_SHARE * free:
        fits = max(1, int(MEMORY_SHARE * free // max(per_item, 1)))
        raise UserError(f"{flag} {batch} needs {need / 2**30:.1f} GiB for its input and output tensors, more than "
                        f"{MEMORY_SHARE:.0%} of the {free / 2**30:.1f} GiB of memory available (MemAvailable); "
                        f"give {fits} or fewer")
    return batch
