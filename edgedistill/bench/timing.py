"""Latency statistics: warm-up, then N timed calls; percentiles, never one run.

Why: docs/design.md#conditions-on-every-number.

Inputs are staged by the caller before timing starts, so only inference is timed (``--e2e`` stages nothing and
times decode + preprocessing too). GPU calls are timed with CUDA events recorded on the stream the work runs
on (the torch runners); CPU calls, and GPU runners whose call waits for the GPU (TensorRT's engine runner,
onnxruntime's providers), with ``time.perf_counter``. ``cpu_load(n)`` runs n busy processes beside the timing:
latency under contention, the normal state of an edge box that also runs its application (CPU runtimes rank
differently there: docs/design.md#formats-and-backends).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import numpy as np


@dataclass
class Latency:
    """Per-call latency of one (artifact, backend, batch) in milliseconds."""
    batch: int
    warmup: int
    iters: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    throughput_ips: float      # items per second: batch / mean latency
    peak_mem_mb: float | None = None
    peak_mem_kind: str | None = None   # "cuda allocated", "process rss", ...

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(times_ms: list[float] | np.ndarray, batch: int, warmup: int) -> Latency:
    """Percentiles of ``times_ms``; throughput = items per second at the mean latency."""
    t = np.asarray(times_ms, dtype=np.float64)
    if t.size == 0:
        raise ValueError("no timed iterations")
    p50, p90, p99 = np.percentile(t, [50, 90, 99])
    mean = float(t.mean())
    return Latency(batch=batch, warmup=warmup, iters=int(t.size), p50_ms=round(float(p50), 4),
                   p90_ms=round(float(p90), 4), p99_ms=round(float(p99), 4), mean_ms=round(mean, 4),
                   std_ms=round(float(t.std(ddof=1)) if t.size > 1 else 0.0, 4), min_ms=round(float(t.min()), 4),
                   throughput_ips=round(batch * 1000.0 / mean, 2) if mean > 0 else float("inf"))


def time_cpu(call: Callable[[], Any], warmup: int, iters: int) -> list[float]:
    """Wall time of ``iters`` calls after ``warmup`` untimed ones (ms)."""

    for _ in range(warmup):
        call()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def time_cuda(call: Callable[[], Any], warmup: int, iters: int) -> list[float]:
    """GPU time of each call between two CUDA events on the current stream (ms).

    ``call`` must enqueue its work on torch's current stream (the torch runners, ``timer = "cuda"``), so the end
    event waits for it; the host-side enqueue cost is inside the window too, as for any real caller. Runners
    whose call returns when the GPU is done (TensorRT's, onnxruntime's GPU providers) are timed with
    ``time_cpu``: their work is on a stream of their own, which these events would not wait for.
    """
    import torch  # deferred: CUDA timing only; CPU timing works without torch

    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends):
        start.record()
        call()
        end.record()
        end.synchronize()  # one call at a time: latency, not pipelined throughput
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


# ------------------------------------------------------------------------------------------- background load
# A busy loop that ignores Ctrl-C (the parent kills it) and ends by itself within milliseconds once its parent is
# gone, so a parent killed with SIGKILL leaves nothing spinning either.
_BUSY = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
parent = int(sys.argv[1])
while os.getppid() == parent:
    for _ in range(20000):
        pass
"""


@contextlib.contextmanager
def cpu_load(n: int) -> Iterator[list[int]]:
    """``n`` processes that busy-loop on the CPU while the block runs (latency under contention, as on an edge box
    running its application); yields their pids. They are killed and reaped on exit, an exception or Ctrl-C
    included; ``n`` = 0 starts nothing."""
    if n < 0:
        raise ValueError(f"cpu_load: {n} processes")
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(n):  # -I -S: no site packages, so each starts in milliseconds and imports nothing of ours
            procs.append(subprocess.Popen([sys.executable, "-I", "-S", "-c", _BUSY, str(os.getpid())],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait()
