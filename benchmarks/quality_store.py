"""The store of finished benchmark runs (``<work>/quality-cells/``) and its restoration from a recorded results file.

A run is kept as ``<run>.npz`` (per-query hits) and ``<run>.json`` (its row and the overrides it ran with), so an
interrupted benchmark resumes. The store lives beside the data and is lost with the machine; the results files
under benchmarks/results/ are not. ``restore`` puts a recorded benchmark's runs back into an empty store so that a
later session can add seeds or cells to it instead of training every run again. It does so only where the record
was made under the same conditions (``IDENTITY``: CPU model, torch, data size, teacher, plan), and it leaves one
restored run out to be trained again: ``check_restored`` then requires that run's fresh row and hits to be identical
to the recorded ones (training here is deterministic on one CPU model), and removes every restored run otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.quality_table import at_half, hits_folder, hits_path, load_hits

# The stamp fields a record must share with this benchmark for its runs to be restored.
IDENTITY = ("machine", "torch", "n", "captioned", "teacher_held_out")
# Plan fields that change a run, with the value a record made before the field existed had.
PLAN_IDENTITY = {"looks": None, "subset": None, "pull_steps": None, "selector_budget": None, "held_out_every": 1}
# Row fields that are timings or thread counts, not results: they may differ between a run and its rerun.
NOT_RESULTS = ("train_s", "run_s", "threads")


def save_run(store: Path, run: Any, overrides: list[str], row: dict[str, Any], hits: dict[str, Any]) -> None:
    """``<store>/<run>.npz`` (per-query hits) then ``<run>.json`` (the row and the overrides it ran with): the
    JSON is written last, by rename, so a run with a JSON is whole."""
    from edgedistill.core.atomic import atomic_path, write_json

    store.mkdir(parents=True, exist_ok=True)
    arrays = {f"{split}__{k}": np.asarray(v[k]) for split, v in hits.items() for k in ("i2t", "t2i", "ks")}
    arrays.update({f"{split}__teacher_rsum": np.array(float(v["teacher_rsum"])) for split, v in hits.items()})
    with atomic_path(store / f"{run.name}.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    write_json(store / f"{run.name}.json", {"overrides": overrides, "row": row})


def load_run(store: Path, run: Any, overrides: list[str]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A saved run made with exactly ``overrides`` (else None: not run, or run with other settings)."""
    try:
        saved = json.loads((store / f"{run.name}.json").read_text(encoding="utf-8"))
        if saved.get("overrides") != overrides:
            return None
        with np.load(store / f"{run.name}.npz", allow_pickle=False) as z:
            hits: dict[str, Any] = {}
            for name in z.files:
                split, key = name.split("__")
                hits.setdefault(split, {})[key] = float(z[name]) if key == "teacher_rsum" else z[name]
        for v in hits.values():
            v["ks"] = tuple(int(k) for k in v["ks"])
        return saved["row"], hits
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None


def identity_mismatch(stamp: dict[str, Any], identity: dict[str, Any]) -> str | None:
    """Why a record's ``stamp`` was not made under ``identity`` (this benchmark's IDENTITY fields and its plan),
    or None when it was."""
    for key in IDENTITY:
        if stamp.get(key) != identity.get(key):
            return f"its {key} is {stamp.get(key)!r}, here {identity.get(key)!r}"
    try:
        plan = json.loads(stamp.get("plan", ""))
    except (TypeError, json.JSONDecodeError):
        return "it records no plan"
    for key, before in PLAN_IDENTITY.items():
        if plan.get(key, before) != identity["plan"].get(key):
            return f"its plan's {key} is {plan.get(key, before)!r}, here {identity['plan'].get(key)!r}"
    return None


@dataclass
class Restored:
    """What ``restore`` did: the runs it put into the store, and the one it left out to be trained again with the
    row and hits the record holds for it (None when nothing was restored)."""
    runs: list[str]
    check: str | None = None
    expected: tuple[dict[str, Any], dict[str, Any]] | None = None


def recorded_runs(results_json: Path) -> dict[tuple[str, str, int, int], tuple[dict[str, Any], dict[str, Any]]]:
    """{(track, method, seed, steps): (row, hits)} of every run a results file records with its hits."""
    recorded = json.loads(results_json.read_text(encoding="utf-8"))
    folder = hits_folder(results_json)
    out = {}
    for row, half in [(r, False) for r in recorded["rows"]] + [(r, True) for r in recorded.get("half_budget_rows", [])]:
        path = hits_path(folder, row["track"], at_half(row["method"]) if half else row["method"])
        if not path.is_file():
            continue
        cell = load_hits(path)
        if row["seed"] not in cell.seeds:
            continue
        k = cell.seeds.index(row["seed"])
        hits = {split: {"i2t": h.i2t[k], "t2i": h.t2i[k], "teacher_rsum": h.teacher_rsum, "ks": cell.ks}
                for split, h in cell.splits.items()}
        out[(row["track"], row["method"], int(row["seed"]), int(row["steps"]))] = (row, hits)
    return out


def restore(store: Path, results_json: Path, runs: list[Any], overrides_of: Callable[[Any], list[str]],
            identity: dict[str, Any]) -> Restored:
    """Put the runs of ``runs`` that ``results_json`` records into ``store`` (with the overrides they get here),
    except the one with the fewest steps, left to be trained again as the check. Runs already in the store are
    left as they are. ValueError when the record was made under other conditions (``identity_mismatch``)."""
    stamp = json.loads(results_json.read_text(encoding="utf-8")).get("stamp", {})
    why = identity_mismatch(stamp, identity)
    if why is not None:
        raise ValueError(f"{results_json.name} cannot be restored here: {why}")
    recorded = recorded_runs(results_json)
    overrides = {r.name: overrides_of(r) for r in runs}  # a recipe load each: once per run
    found = [r for r in runs if (r.track, r.method, r.seed, r.steps) in recorded
             and load_run(store, r, overrides[r.name]) is None]
    if not found:
        return Restored(runs=[])
    check = min(found, key=lambda r: r.steps)
    for run in found:
        if run is not check:
            row, hits = recorded[(run.track, run.method, run.seed, run.steps)]
            save_run(store, run, overrides[run.name], row, hits)
    return Restored(runs=[r.name for r in found if r is not check], check=check.name,
                    expected=recorded[(check.track, check.method, check.seed, check.steps)])


def same_results(a: tuple[dict[str, Any], dict[str, Any]], b: tuple[dict[str, Any], dict[str, Any]]) -> bool:
    """Whether two (row, hits) of one run hold the same results: every row field but timings, every hit."""
    (row_a, hits_a), (row_b, hits_b) = a, b
    if {k: v for k, v in row_a.items() if k not in NOT_RESULTS} != \
            {k: v for k, v in row_b.items() if k not in NOT_RESULTS}:
        return False
    if set(hits_a) != set(hits_b):
        return False
    return all(np.array_equal(np.asarray(hits_a[s][k]), np.asarray(hits_b[s][k]))
               for s in hits_a for k in ("i2t", "t2i", "ks", "teacher_rsum"))


def check_restored(store: Path, restored: Restored, fresh: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """Keep the restored runs only when the check run, trained here, gave the recorded results; otherwise remove
    them from the store and raise ValueError."""
    if restored.expected is None or same_results(restored.expected, fresh):
        return
    for name in restored.runs:
        for suffix in (".json", ".npz"):
            (store / f"{name}{suffix}").unlink(missing_ok=True)
    raise ValueError(f"{restored.check} trained here differs from its record: the {len(restored.runs)} restored "
                     "runs were removed from the store (train them again, without --restore)")
