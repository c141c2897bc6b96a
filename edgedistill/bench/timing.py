"""Latency statistics: warm-up, then N timed calls; percentiles, never one run.

Why: docs/design.md#conditions-on-every-number.

Inputs are staged by the caller before timing starts, so only inference is timed (``--e2e`` stages nothing and
times decode + preprocessing too). GPU calls are timed with CUDA events recorded on the stream the work runs
on (the torch runners); CPU calls, and GPU runners whose call waits for the GPU (TensorRT's engine runner,
onnxruntime's providers), with ``time.perf_counter``. ``cpu_load(n)`` runs n busy processes beside the timing:
latency under contention, the normal state of an edge box that also runs its application (CPU runtimes rank
differently there: docs/design.md#formats-and-backends).

A ratio between two models (the student is Nx faster) comes from ``interleave``: the models take turns within
each round, so a machine that slows down or speeds up mid-run moves both sides of every round's ratio; the
ratio is reported as the median with the min-max over the rounds (``ratio_spread``), never as one number. The
1-minute load average is recorded around the timing and ``busy_by_others`` says when other work shared the CPU.
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

from edgedistill.core.gates import at_most, finite


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


# ------------------------------------------------------------------------------------------- ratios
ROUNDS = 5            # interleaved rounds behind a latency ratio
BUSY_FRACTION = 0.5   # warn above this share of the usable CPUs kept busy by other processes


def interleave(blocks: dict[str, Callable[[], list[float]]], rounds: int = ROUNDS) -> dict[str, list[float]]:
    """Each name's p50 (ms) in each round; within a round the names take turns in the given order (teacher,
    student, teacher, student...). A block times one turn (warm-up done by the caller) and returns its times."""
    if rounds < 1:
        raise ValueError(f"interleave: {rounds} rounds")
    p50s: dict[str, list[float]] = {name: [] for name in blocks}
    for _ in range(rounds):
        for name, block in blocks.items():
            p50s[name].append(float(np.median(block())))
    return p50s


@dataclass
class Ratio:
    """``numerator / denominator`` per round (e.g. teacher p50 / student p50: how many times faster)."""
    median: float
    low: float
    high: float
    per_round: list[float]

    def as_dict(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.low, "max": self.high, "rounds": len(self.per_round),
                "per_round": self.per_round}


def ratio_spread(numerators: list[float], denominators: list[float]) -> Ratio | None:
    """The per-round ratios' median and range; None (no claim) when the rounds do not pair up or any value is
    missing, not finite or not positive."""
    if not numerators or len(numerators) != len(denominators):
        return None
    if not all(finite(v) and v > 0 for v in [*numerators, *denominators]):
        return None
    ratios = [n / d for n, d in zip(numerators, denominators)]
    return Ratio(round(float(np.median(ratios)), 3), round(min(ratios), 3), round(max(ratios), 3),
                 [round(r, 3) for r in ratios])


def ratio_text(ratio: dict[str, Any] | None, word: str = "faster") -> str:
    """'2.9x faster (2.3-3.4x over 5 interleaved rounds)' from ``Ratio.as_dict()``; 'not measured' without one."""
    if not ratio:
        return f"{word or 'ratio'}: not measured"
    def x(v: float) -> str:  # 2.9, 12.3; 0.05 below 1 (a slower student's ratio keeps its digits)
        return f"{v:.1f}" if v >= 1 else f"{v:.2f}"
    return (f"{x(ratio['median'])}x{' ' + word if word else ''} ({x(ratio['min'])}-{x(ratio['max'])}x over "
            f"{ratio['rounds']} interleaved rounds)")


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none, e.g. Windows)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def busy_by_others(before: float | None, after: float | None, cpus: int, own: int) -> dict[str, Any]:
    """What the load average says about the timing: the record for the report, with a one-line ``warning`` when
    more than BUSY_FRACTION of the usable CPUs ran other work. The load average counts our own timed threads
    (``own``: threads + --load processes) too, so they are taken off the higher of the two readings; an unknown
    load fails closed (a warning that the quiet could not be checked)."""
    record: dict[str, Any] = {"load1_before": before, "load1_after": after, "cpus": cpus, "own_threads": own,
                              "others_per_cpu": None, "busy": True, "warning": None}
    if not (finite(before) and finite(after)) or cpus < 1:
        record["warning"] = "the load average could not be read: whether other work shared the CPU is unknown"
        return record
    others = max(0.0, max(before, after) - own)  # type: ignore[type-var]
    record["others_per_cpu"] = round(others / cpus, 2)
    record["busy"] = not at_most(record["others_per_cpu"], BUSY_FRACTION)
    if record["busy"]:
        record["warning"] = (f"the machine was busy while timing (load {before:.1f} before, {after:.1f} after, "
                             f"{cpus} CPUs, ~{others:.1f} busy with other work): latencies and ratios are slower "
                             f"and noisier than on a quiet machine")
    return record


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
