"""Which artifact and backend run a tower on this device: measured here, not guessed (docs/runtime.md#choosing).

INT8 accuracy and speed depend on the CPU's instruction set and on the runtime, so ``load`` decides on the device:
every runnable (artifact, backend) embeds the export's probe set, those whose minimum cosine to the fp32 reference
reaches the tolerance are timed briefly at batch 1 and at the caller's batch, and the fastest is chosen. The
result is cached per (export, probe, CPU model and ISA flags, GPU, runtime versions, threads, batch, request), with
the machine's load when it was measured, so the next load costs nothing. Where measuring is not wanted the rule
never prefers INT8 without evidence; a bench report measured on this device is evidence too (``bench_evidence``).
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable

import numpy as np
from pydantic import ConfigDict, Field, ValidationError

import edgedistill.core.atomic as atomic
from edgedistill.core.documents import Document, read_document
from edgedistill.core.errors import UserError
from edgedistill.core.gates import at_least, at_most
from edgedistill.core.hashing import sha256_json
from edgedistill.core.locations import default_cache_root
from edgedistill.core.terminal import safe
from edgedistill.runtime.backends import Runner
from edgedistill.runtime.device import cpu_model, gpu_name, isa_flags
from edgedistill.runtime.formats import BACKENDS
from edgedistill.runtime.manifest import DamagedBundle
from edgedistill.runtime.probe import unit

TOLERANCE = 0.99          # minimum cosine to the fp32 reference on the probe for an artifact to be trusted here
R1_TOLERANCE = 0.5        # points of val R@1 below the fp32 artifact that a bench report's row may lose
TIME_PER_CALL_S = 0.08    # timing per (candidate, batch, round): the whole first load stays within a few seconds
ROUNDS = 2                # interleaved rounds, so a noisy moment does not decide alone
# Without evidence (no measurement, no bench report from this device), fastest-believed first but never INT8
# before a precision that needs none: INT8 can lose accuracy on CPUs without VNNI (docs/runtime.md#int8).
RULE_ORDER = {"cpu": ("fp32", "int8", "fp16"), "cuda": ("fp16", "fp32", "int8"), "jetson": ("fp16", "fp32", "int8")}
RUNTIMES = ("onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt")


@dataclass(frozen=True)
class Choice:
    """One (artifact, backend) that can run a tower here: the export.json entry, its folder, the backend."""
    artifact: dict[str, Any]
    export_dir: Path
    backend: str

    @property
    def path(self) -> Path:
        return self.export_dir / self.artifact["path"]

    @property
    def key(self) -> str:
        return f"{self.artifact.get('name')}@{self.backend}"

    def describe(self) -> dict[str, Any]:
        return {"artifact": self.artifact.get("name"), "path": str(self.path), "backend": self.backend,
                "precision": self.artifact.get("precision"), "format": self.artifact.get("format")}


@dataclass
class Measured:
    """One candidate on the probe: minimum cosine to the reference and p50 latency (ms) by batch."""
    key: str
    precision: str
    cosine_min: float | None = None
    p50_ms: dict[str, float] = field(default_factory=dict)
    ok: bool = False
    reason: str | None = None


def rule_rank(options: list[Choice], device: str) -> list[Choice]:
    """The options in the order of the rule: the backend table's order, then the device's precision order."""
    order, prec = list(BACKENDS), RULE_ORDER[device]
    return sorted(options, key=lambda c: (order.index(c.backend), prec.index(c.artifact.get("precision", "fp32"))))


def recorded_loss(choice: Choice) -> str | None:
    """Why the export's own check rules this option out on this CPU, or None: an artifact whose val image->text
    R@1 fell more than R1_TOLERANCE points below the PyTorch student's when the export checked it on onnxruntime
    on this very CPU (model and INT8 flags: ``checked_on``). The probe's cosine cannot see a loss that small in
    ranking, the export's full val split can; on another CPU the probe decides. A drop that is not a finite number
    rules the option out (fails closed); a missing one leaves the decision to the probe."""
    a, where = choice.artifact, choice.artifact.get("checked_on") or {}
    drop = a.get("val_r1_drop")
    if drop is None or choice.backend != "onnxruntime-cpu" or where.get("cpu") != cpu_model() or \
            list(where.get("flags") or []) != list(isa_flags()):
        return None
    if at_most(drop, R1_TOLERANCE):
        return None
    return f"loses {drop:.1f} points of val image->text R@1 on this CPU (the export's own check)"


def trusted(options: list[Choice], notes: list[str]) -> list[Choice]:
    """The options without a recorded loss here (``recorded_loss``); all of them, with a note, if none is left."""
    kept = [c for c in options if recorded_loss(c) is None]
    for c in options:
        if c not in kept:
            notes.append(f"{c.key} left out: {recorded_loss(c)}")
    return kept or options


# ------------------------------------------------------------------------------------------------- measuring
def _tile(x: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([x] * -(-batch // len(x)))[:batch] if len(x) < batch else x[:batch]


def _time(runner: Runner, staged: Any, seconds: float) -> list[float]:
    runner.call(staged)  # warm
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        t0 = time.perf_counter()
        runner.to_numpy(runner.call(staged))
        times.append((time.perf_counter() - t0) * 1000)
    return times


def measure(options: list[Choice], inputs: np.ndarray, reference: np.ndarray, batches: Iterable[int],
            open_runner: Callable[[Choice], Runner], tolerance: float = TOLERANCE) -> list[Measured]:
    """Each option's minimum cosine to ``reference`` on ``inputs`` and, for those within ``tolerance``, its p50
    latency at each batch (interleaved rounds). A runner that fails to open or run is a failed candidate."""
    batches = sorted(set(batches))
    results, runners = [], {}
    for c in options:
        m = Measured(c.key, str(c.artifact.get("precision")))
        results.append(m)
        try:
            runner = open_runner(c)
            cos = (unit(runner.embed(inputs, max(batches))) * reference).sum(axis=1)
        except DamagedBundle:
            raise  # the export is wrong, not this device: an error to fix
        except UserError as e:
            m.reason = str(e)
            continue
        m.cosine_min = round(float(cos.min()), 6) if np.isfinite(cos).all() else float("nan")
        m.ok = at_least(m.cosine_min, tolerance)  # a NaN cosine fails closed
        if not m.ok:
            m.reason = f"minimum cosine to fp32 {m.cosine_min:.4f} < {tolerance} on this device"
        else:
            runners[c.key] = runner
    samples: dict[tuple[str, int], list[float]] = {}
    for _ in range(ROUNDS):
        for batch in batches:
            for key, runner in runners.items():
                lo, hi = runner.min_batch, runner.max_batch or batch
                if lo <= batch <= hi:
                    staged = runner.stage(_tile(inputs, batch))
                    samples.setdefault((key, batch), []).extend(_time(runner, staged, TIME_PER_CALL_S))
    for m in results:
        m.p50_ms = {str(b): round(float(np.median(samples[(m.key, b)])), 4) for b in batches
                    if (m.key, b) in samples}
    return results


def fastest(options: list[Choice], measured: list[Measured], batch: int) -> Choice | None:
    """The accurate option with the lowest p50 at ``batch`` (then at batch 1); None when none is accurate."""
    by_key = {m.key: m for m in measured}
    good = [c for c in options if c.key in by_key and by_key[c.key].ok and str(batch) in by_key[c.key].p50_ms]
    if not good:
        return None
    return min(good, key=lambda c: (by_key[c.key].p50_ms[str(batch)], by_key[c.key].p50_ms.get("1", 0.0)))


# ------------------------------------------------------------------------------------------------- the cache
def device_key(device: str, threads: int | None, batch: int, extra: dict[str, Any]) -> dict[str, Any]:
    """What a measurement holds for: the CPU (model, ISA flags), the GPU, runtime versions and the conditions."""
    versions = {}
    for name in RUNTIMES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"device": device, "cpu": cpu_model(), "flags": list(isa_flags()),
            "gpu": gpu_name() if device != "cpu" else None, "runtimes": versions, "threads": threads,
            "batch": batch, **extra}


def cache_path(key: dict[str, Any]) -> Path:
    return default_cache_root() / "choices" / f"{sha256_json(key)[:32]}.json"


def read_cached(key: dict[str, Any]) -> dict[str, list[Measured]] | None:
    """The cached measurements for ``key``, or None (missing, from another key, or damaged: measured again)."""
    path = cache_path(key)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("key") != key:
            return None
        towers = {tower: [Measured(**m) for m in rows] for tower, rows in doc["towers"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    good = all(isinstance(m.ok, bool) and isinstance(m.p50_ms, dict) and all(at_least(v, 0.0) for v in
               m.p50_ms.values()) and (m.cosine_min is None or isinstance(m.cosine_min, float))
               for rows in towers.values() for m in rows)
    return towers if good else None


def write_cached(key: dict[str, Any], towers: dict[str, list[Measured]]) -> Path:
    path = cache_path(key)
    doc = {"key": key, "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
           "towers": {tower: [asdict(m) for m in rows] for tower, rows in towers.items()}}
    try:
        atomic.write_json(path, doc)
    except (OSError, UserError):
        pass  # an unwritable cache costs a measurement next time, nothing else
    return path


# ------------------------------------------------------------------------------------------------- bench reports
class _Strict(Document):
    model_config = ConfigDict(extra="allow", strict=True)


class BenchDevice(_Strict):
    """``device_info`` of a bench report: where it was measured."""
    device: str
    cpu: str | None = None
    cpu_flags: list[str] | None = None


class EvidenceReport(_Strict):
    """A bench report as choice evidence: where it was measured, and its rows (each checked on its own)."""
    device_info: BenchDevice
    rows: list[Any]


class EvidenceRow(_Strict):
    """One row of a bench report that can rank a choice: numbers are numbers, finite and in range."""
    artifact: str
    backend: str
    status: str
    batch: Annotated[int, Field(ge=1)]
    precision: str | None = None
    role: str = "student"
    p50_ms: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    i2t_r1: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)] | None = None


def _evidence_rows(path: Path, rows: list[Any]) -> list[EvidenceRow]:
    """The rows that are well formed; each other one is skipped with a one-line warning naming it and its field
    (a bench report only ranks choices: without a row, load() measures here instead)."""
    good = []
    for i, raw in enumerate(rows):
        if isinstance(raw, dict) and (raw.get("status") != "ok" or raw.get("role", "student") != "student"):
            continue  # failed, skipped and teacher rows rank nothing
        try:
            good.append(EvidenceRow.model_validate(raw))
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "(the row)"
            warnings.warn(f"bench report {safe(path)}: row {i} skipped, field '{where}': {err['msg']}; bench again",
                          stacklevel=4)
    return good


def bench_evidence(folders: Iterable[Path], device: str, batch: int) -> dict[str, float]:
    """p50 (ms) at ``batch`` by choice key from the first bench.json in ``folders`` measured on this CPU and device,
    keeping only rows that are accurate: image rows within R1_TOLERANCE points of val R@1 of the best fp32 row,
    rows without accuracy (text towers) only at fp32. {} when no report matches. A damaged report, or row, is
    skipped with a warning (docs/runtime.md#what-load-trusts)."""
    for folder in folders:
        path = Path(folder) / "bench.json"
        if not path.is_file():
            continue
        try:
            report = read_document(path, EvidenceReport, "bench report", "bench again")
        except UserError as e:
            warnings.warn(f"{e} (not used to choose)", stacklevel=3)
            continue
        info = report.device_info
        if info.device != device or info.cpu != cpu_model() or \
                (info.cpu_flags is not None and list(info.cpu_flags) != list(isa_flags())):
            continue
        rows = _evidence_rows(path, report.rows)
        best_fp32 = max((r.i2t_r1 for r in rows if r.precision == "fp32" and r.i2t_r1 is not None), default=None)
        out = {}
        for r in rows:
            accurate = r.precision == "fp32" if r.i2t_r1 is None or best_fp32 is None else \
                at_least(r.i2t_r1, best_fp32 - R1_TOLERANCE)
            if accurate and r.batch == batch and r.p50_ms is not None:
                out[f"{r.artifact}@{r.backend}"] = r.p50_ms
        if out:
            return out
    return {}
