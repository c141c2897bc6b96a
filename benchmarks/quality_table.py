"""The quality benchmark's table: per-run rows -> cells (mean and std over seeds) -> every method compared with the
default by a paired bootstrap -> Markdown. No torch (numpy and edgedistill.evaluation), so the rule that decides
is tested on its own.

The rule (edgedistill/evaluation/paired.py): on each track, every method is compared with the default method
(DEFAULT) on the scoring split (SCORING_SPLIT): the paired difference of RSUM share of the teacher (this method -
the default, mean over the seeds both ran), its 95% interval from a bootstrap over seed pairs and over the split's
image and caption queries, and the verdict: "beats the default" or "below the default" when the interval excludes
0, else "no difference shown". There is no tie rule: a gap inside the seed spread is not evidence of anything.
A cell without per-query hits (results recorded before they were saved, or stale ones) gets "no per-query hits:
rerun"; a cell run with one seed gets "no difference shown" (one seed says nothing of the seed variation).
Where the convergence check (quality.py: a separate run at half the budget) failed for the cell or for the default,
the verdict says so (NOT_CONVERGED): it holds at this budget, not at convergence; such a method is never "best".
One case is told apart (LOSER_CONVERGED): the interval excludes 0, the losing cell passed its check and the winner
failed it by rising (its B runs scored above its B/2 runs by more than the seed spread). More budget does not help
the loser and has so far only helped the winner, so the verdict is not an artefact of the budget (a short budget
that starves one side deciding the winner); the winner is still not named "best".
The budget-B/2 runs of the convergence check are cells of their own (``at_half``: "supervised/2"), judged against
the default at B like the rest, so a verdict is also shown against a method that does better with fewer steps.
Methods with a question of their own (the selectors: OPTIMA vs uniform vs random) are also compared pair by pair
(``pairwise``), with the same bootstrap.

Per-query hits of a results file ``X.json`` live next to it in ``X_hits/``, one compressed ``.npz`` per cell
(``save_hits`` / ``load_hits``, format CELL_HITS_FORMAT):

    format            str                     CELL_HITS_FORMAT
    track, method     str
    seeds             (S,) int64              the seeds, in the order of the arrays' first axis
    ks                (K,) int64              1, 5, 10
    {split}_i2t       (S, Q, K) bool          per split (scoring, hard, ood): image queries (images with a caption)
    {split}_t2i       (S, T, K) bool          caption queries; True where the rank is below ks[j]
    {split}_teacher_rsum  () float64          the teacher's RSUM on the split, unrounded

    python benchmarks/quality_table.py                                  # benchmarks/results/quality_runs_last.json
    python benchmarks/quality_table.py RESULTS.json --default feature --split hard
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from edgedistill.evaluation.paired import (  # noqa: E402
    A_BEATS_B, B_BEATS_A, NO_DIFFERENCE, PairedResult, paired_bootstrap)

RANK_METRIC = "scoring_rsum_share"
SCORING_SPLIT = "scoring"  # the split of RANK_METRIC, whose per-query hits the paired comparison resamples
DEFAULT = "dsmd+coverage"  # the default recipe's cell: quality.py's f"dsmd+{CANDIDATE}"
N_BOOT = 2000
CELL_HITS_FORMAT = "edgedistill.quality-hits/1"
NO_HITS = "no per-query hits: rerun"
NOT_CONVERGED = "at a budget not past convergence"
LOSER_CONVERGED = "the loser past convergence, the winner still rising"
HALF = "/2"  # a cell of budget-B/2 runs ("supervised/2"): judged against the default at B like any other cell
VERDICTS = {A_BEATS_B: "beats the default", B_BEATS_A: "below the default", NO_DIFFERENCE: NO_DIFFERENCE}
# Columns of the Markdown table: (row key, header, format); twin columns are accuracies in percent.
COLUMNS = (("selection_share", "selection share", "{:.3f}"), ("scoring_i2t_r1", "scoring i2t R@1", "{:.1f}"),
           ("scoring_t2i_r1", "scoring t2i R@1", "{:.1f}"), ("scoring_rsum_share", "scoring share", "{:.3f}"),
           ("hard_rsum_share", "hard share", "{:.3f}"), ("ood_rsum_share", "ood share", "{:.3f}"),
           ("hard_twins_bind", "hard bind", "{:.1f}"), ("hard_twins_swap-position", "hard swap-pos", "{:.1f}"),
           ("ood_twins_bind", "ood bind", "{:.1f}"), ("ood_twins_swap-position", "ood swap-pos", "{:.1f}"))


@dataclass
class SplitHits:
    """One cell's per-query hits on one split, seeds on the first axis."""
    i2t: np.ndarray  # (S, Q, K) bool
    t2i: np.ndarray  # (S, T, K) bool
    teacher_rsum: float


@dataclass
class CellHits:
    """The per-query hits of one (track, method) over its seeds, per split."""
    seeds: list[int]
    splits: dict[str, SplitHits]
    ks: tuple[int, ...] = (1, 5, 10)

    def of_seed(self, split: str, seed: int) -> dict[str, np.ndarray]:
        k = self.seeds.index(seed)
        return {"i2t": self.splits[split].i2t[k], "t2i": self.splits[split].t2i[k]}


@dataclass
class Cell:
    """One (track, method) over its seeds: mean and sample std of every numeric metric, its per-query hits (None
    when the results hold none) and its comparison with the track's default."""
    track: str
    method: str
    seeds: list[int]
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)  # nan with one seed
    hits: CellHits | None = None
    verdict: str = ""  # "default", a VERDICTS value, NO_HITS, or "no default on this track"
    comparison: PairedResult | None = None  # this method (A) against the default (B)
    converged: bool | None = None  # the convergence check's result; None: not checked
    gain: float | None = None  # the check's selection share at B - at B/2 (mean over seeds); None: not checked

    @property
    def n(self) -> int:
        return len(self.seeds)

    def as_json(self) -> dict[str, Any]:
        """The cell as the results file (results/quality_runs_last.json) records it."""
        out: dict[str, Any] = {"track": self.track, "method": self.method, "seeds": self.seeds, "mean": self.mean,
                               "std": self.std, "verdict": self.verdict, "converged": self.converged}
        c = self.comparison
        if c is not None:
            out["vs_default"] = {"estimate": c.estimate, "ci95": [c.low, c.high], "verdict": c.verdict,
                                 "reason": c.reason, "seeds": c.n_seeds, "image_queries": c.n_image_queries,
                                 "caption_queries": c.n_caption_queries, "n_boot": c.n_boot}
        return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); NaN where undefined (no values; one value for the std)."""
    if not values:
        return math.nan, math.nan
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def cells_of(rows: Iterable[dict[str, Any]], hits: Mapping[tuple[str, str], CellHits] | None = None) -> list[Cell]:
    """Group run rows by (track, method), in first-seen order, with mean and std of each numeric metric, and the
    cell's per-query hits from ``hits`` when they hold exactly the cell's seeds (else None: stale or missing)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["track"], row["method"]), []).append(row)
    cells = []
    for (track, method), runs in groups.items():
        keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        cell = Cell(track, method, [int(r.get("seed", 0)) for r in runs])
        for key in keys:
            values = [float(r[key]) for r in runs if isinstance(r.get(key), (int, float))]
            cell.mean[key], cell.std[key] = mean_std(values)
        found = (hits or {}).get((track, method))
        if found is not None and sorted(found.seeds) == sorted(cell.seeds):
            cell.hits = found
        cells.append(cell)
    return cells


def compare(a: Cell, b: Cell, split: str = SCORING_SPLIT, n_boot: int = N_BOOT, seed: int = 0
            ) -> PairedResult | None:
    """``paired_bootstrap`` of cell ``a`` (A) against cell ``b`` (B) on ``split``, over the seeds both ran (paired
    by seed value); None when either cell has no per-query hits of the split. Inputs that cannot be compared (other
    query sets, another teacher) fail closed to "no difference shown" with the reason."""
    if a.hits is None or b.hits is None or split not in a.hits.splits or split not in b.hits.splits:
        return None
    seeds = [s for s in a.hits.seeds if s in b.hits.seeds]
    ta, tb = a.hits.splits[split].teacher_rsum, b.hits.splits[split].teacher_rsum
    if not math.isclose(ta, tb, rel_tol=1e-9):
        return PairedResult.failed(f"scored against different teachers (RSUM {ta} vs {tb})")
    if not seeds:
        return PairedResult.failed("no seed in common")
    try:
        return paired_bootstrap([a.hits.of_seed(split, s) for s in seeds], [b.hits.of_seed(split, s) for s in seeds],
                                ta, n_boot=n_boot, seed=seed)
    except ValueError as e:
        return PairedResult.failed(str(e))


def judge(cells: list[Cell], default: str = DEFAULT, split: str = SCORING_SPLIT, n_boot: int = N_BOOT,
          seed: int = 0) -> list[Cell]:
    """Compare every cell of every track with the track's ``default`` cell (see the module docstring); returns
    ``cells``."""
    for cell in cells:
        ref = next((c for c in cells if c.track == cell.track and c.method == default), None)
        cell.comparison = None
        if ref is None:
            cell.verdict = "no default on this track"
        elif cell is ref:
            cell.verdict = "default"
        else:
            cell.comparison = compare(cell, ref, split, n_boot, seed)
            cell.verdict = NO_HITS if cell.comparison is None else VERDICTS[cell.comparison.verdict]
        if ref is not None and False in (cell.converged, ref.converged):
            cell.verdict += f" ({budget_note(cell, ref)})"
    return cells


def budget_note(cell: Cell, ref: Cell) -> str:
    """The qualifier of a verdict where ``cell`` or the default ``ref`` failed its convergence check:
    LOSER_CONVERGED when the interval excludes 0, the losing side passed its check and the winning side failed it
    by rising (gain above 0; NaN fails closed), else NOT_CONVERGED."""
    c = cell.comparison
    if c is None or c.reason or c.verdict not in (A_BEATS_B, B_BEATS_A):
        return NOT_CONVERGED
    loser, winner = (ref, cell) if c.verdict == A_BEATS_B else (cell, ref)
    rising = winner.gain is not None and winner.gain > 0
    return LOSER_CONVERGED if loser.converged is True and winner.converged is False and rising else NOT_CONVERGED


def mark_convergence(cells: list[Cell], checks: Iterable[Mapping[str, Any]]) -> list[Cell]:
    """Set each cell's ``converged`` and ``gain`` from quality.py's convergence checks ({track, method, converged,
    difference}; a check without a difference leaves the gain None); cells without a check keep theirs. Returns
    ``cells``."""
    found = {(c["track"], c["method"]): c for c in checks}
    for cell in cells:
        check = found.get((cell.track, cell.method))
        if check is not None:
            cell.converged = bool(check["converged"])
            gain = check.get("difference")
            cell.gain = float(gain) if isinstance(gain, (int, float)) and not isinstance(gain, bool) else None
    return cells


def best_everywhere(cells: list[Cell], candidates: Iterable[str] | None = None, split: str = SCORING_SPLIT,
                    n_boot: int = N_BOOT, seed: int = 0) -> list[str]:
    """Methods (among ``candidates``, default all) that ran on every track, whose budget is not shown short of
    convergence, and that no other cell of any track is shown to beat (paired interval above 0): best, or no
    difference shown from the best. A comparison without
    per-query hits, or that fails closed, shows nothing, so the method does not qualify (it is not known to hold)."""
    tracks = list(dict.fromkeys(c.track for c in cells))
    out = []
    for method in dict.fromkeys(c.method for c in cells):
        if candidates is not None and method not in candidates:
            continue
        mine = {c.track: c for c in cells if c.method == method}
        if set(mine) != set(tracks) or any(c.converged is False for c in mine.values()):
            continue

        def holds(cell: Cell) -> bool:
            for other in (c for c in cells if c.track == cell.track and c is not cell):
                result = compare(other, cell, split, n_boot, seed)
                if result is None or result.reason or result.verdict == A_BEATS_B:
                    return False
            return True

        if all(holds(mine[t]) for t in tracks):
            out.append(method)
    return out


def pairwise(cells: list[Cell], methods: Iterable[str], split: str = SCORING_SPLIT, n_boot: int = N_BOOT,
             seed: int = 0) -> list[tuple[Cell, Cell, PairedResult | None]]:
    """Every pair of ``methods`` that ran on one track, the earlier in ``methods`` as A, by ``compare``: a question
    among themselves (OPTIMA vs uniform vs random) that the comparison of each with the default does not answer."""
    order = list(methods)
    out = []
    for track in dict.fromkeys(c.track for c in cells):
        mine = sorted((c for c in cells if c.track == track and c.method in order), key=lambda c: order.index(c.method))
        out += [(a, b, compare(a, b, split, n_boot, seed)) for i, a in enumerate(mine) for b in mine[i + 1:]]
    return out


def pairwise_markdown(pairs: list[tuple[Cell, Cell, PairedResult | None]], labels: dict[str, str] | None = None,
                      split: str = SCORING_SPLIT) -> str:
    """``pairwise``'s comparisons, a line each: A - B with its 95% interval and who is shown better (if anyone)."""
    labels = labels or {}
    lines = [f"| track | A | B | seeds | Δ {split} share A - B [95% CI] | verdict |", "|---|---|---|---:|---:|---|"]
    for a, b, c in pairs:
        name_a, name_b = labels.get(a.method, a.method), labels.get(b.method, b.method)
        if c is None:
            diff, verdict = "-", NO_HITS
        elif c.reason:
            diff, verdict = "-", f"{NO_DIFFERENCE} ({c.reason})"
        else:
            diff = f"{c.estimate:+.3f} [{c.low:+.3f}, {c.high:+.3f}]"
            verdict = {A_BEATS_B: f"{name_a} beats {name_b}", B_BEATS_A: f"{name_b} beats {name_a}"}.get(
                c.verdict, NO_DIFFERENCE)
        seeds = "-" if c is None or c.reason else str(c.n_seeds)
        lines.append(f"| {a.track} | {name_a} | {name_b} | {seeds} | {diff} | {verdict} |")
    return "\n".join(lines) + "\n"


def _fmt(cell: Cell, key: str, fmt: str) -> str:
    mean, std = cell.mean.get(key, math.nan), cell.std.get(key, math.nan)
    if not math.isfinite(mean):
        return "-"
    return fmt.format(mean) + (f" ± {fmt.format(std)}" if math.isfinite(std) else "")


def _versus(cell: Cell) -> tuple[str, str]:
    """(paired difference with its interval, verdict) of the table's last two columns."""
    c = cell.comparison
    if c is None:
        return "-", cell.verdict
    if c.reason:
        return "-" if not math.isfinite(c.estimate) else f"{c.estimate:+.3f}", f"{cell.verdict} ({c.reason})"
    return f"{c.estimate:+.3f} [{c.low:+.3f}, {c.high:+.3f}]", cell.verdict


def markdown(cells: list[Cell], labels: dict[str, str] | None = None, split: str = SCORING_SPLIT) -> str:
    """The table: one line per cell, mean ± std over seeds, and the paired difference from the track's default
    with its 95% interval and the verdict."""
    labels = labels or {}
    head = ["track", "method", "seeds", *(h for _, h, _ in COLUMNS), f"Δ {split} share vs default [95% CI]",
            "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|" + "---:|" * len(COLUMNS) + "---:|---|"]
    for c in cells:
        cols = [_fmt(c, key, fmt) for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join([c.track, labels.get(c.method, c.method), str(c.n), *cols, *_versus(c)])
                     + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- per-query hits on disk


def run_hits(scores: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """One run's hits from quality.py's scores ({split: {"student": {..., "hits"}, "teacher": {..., "rsum"}}}):
    {split: {"i2t", "t2i", "teacher_rsum"}}."""
    return {split: {"i2t": np.asarray(s["student"]["hits"].i2t, dtype=bool),
                    "t2i": np.asarray(s["student"]["hits"].t2i, dtype=bool),
                    "teacher_rsum": float(s["teacher"]["rsum"]), "ks": tuple(s["student"]["hits"].ks)}
            for split, s in scores.items()}


def gather_hits(runs: Mapping[tuple[str, str, int], Mapping[str, Mapping[str, Any]]]
                ) -> dict[tuple[str, str], CellHits]:
    """{(track, method, seed): run_hits(...)} -> {(track, method): CellHits}, seeds in first-seen order; a split
    is kept only when every seed of the cell has it, with one shape and one teacher RSUM."""
    groups: dict[tuple[str, str], dict[int, Mapping[str, Mapping[str, Any]]]] = {}
    for (track, method, seed), splits in runs.items():
        groups.setdefault((track, method), {})[int(seed)] = splits
    out = {}
    for key, by_seed in groups.items():
        seeds = list(by_seed)
        splits: dict[str, SplitHits] = {}
        ks: tuple[int, ...] = (1, 5, 10)
        for split in by_seed[seeds[0]]:
            per = [by_seed[s].get(split) for s in seeds]
            if any(p is None for p in per) or len({np.shape(p["i2t"]) for p in per}) != 1 \
                    or len({np.shape(p["t2i"]) for p in per}) != 1 or len({p["teacher_rsum"] for p in per}) != 1:
                continue
            ks = tuple(per[0].get("ks", ks))
            splits[split] = SplitHits(i2t=np.stack([np.asarray(p["i2t"], dtype=bool) for p in per]),
                                      t2i=np.stack([np.asarray(p["t2i"], dtype=bool) for p in per]),
                                      teacher_rsum=float(per[0]["teacher_rsum"]))
        out[key] = CellHits(seeds=seeds, splits=splits, ks=ks)
    return out


def hits_folder(results_json: Path) -> Path:
    """Where the per-cell hits of ``X.json`` live: ``X_hits/`` beside it."""
    return results_json.with_name(results_json.stem + "_hits")


def hits_path(folder: Path, track: str, method: str) -> Path:
    return folder / re.sub(r"[^\w.+-]", "_", f"{track}-{method}.npz")


def save_hits(folder: Path, track: str, method: str, hits: CellHits) -> Path:
    """Write one cell's hits (the format of the module docstring) to ``folder``; returns the file."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {"format": np.array(CELL_HITS_FORMAT), "track": np.array(track),
                              "method": np.array(method), "seeds": np.asarray(hits.seeds, dtype=np.int64),
                              "ks": np.asarray(hits.ks, dtype=np.int64)}
    for split, h in hits.splits.items():
        arrays[f"{split}_i2t"] = np.asarray(h.i2t, dtype=bool)
        arrays[f"{split}_t2i"] = np.asarray(h.t2i, dtype=bool)
        arrays[f"{split}_teacher_rsum"] = np.array(float(h.teacher_rsum))
    path = hits_path(folder, track, method)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return path


def save_all_hits(results_json: Path, cells: Iterable[Cell]) -> Path:
    """Write the hits of every cell that has them to ``hits_folder(results_json)``, after removing the files of an
    earlier run there (the folder belongs to ``results_json``); returns the folder."""
    folder = hits_folder(results_json)
    for old in folder.glob("*.npz") if folder.is_dir() else []:
        old.unlink()
    for cell in cells:
        if cell.hits is not None:
            save_hits(folder, cell.track, cell.method, cell.hits)
    return folder


def load_hits(path: Path) -> CellHits:
    """One cell's hits from ``save_hits``'s file (ValueError for another format)."""
    with np.load(path, allow_pickle=False) as z:
        if "format" not in z.files or str(z["format"]) != CELL_HITS_FORMAT:
            raise ValueError(f"{path} is not a {CELL_HITS_FORMAT} file")
        splits = {name[:-4]: SplitHits(i2t=z[name].astype(bool), t2i=z[name[:-4] + "_t2i"].astype(bool),
                                       teacher_rsum=float(z[name[:-4] + "_teacher_rsum"]))
                  for name in z.files if name.endswith("_i2t")}
        return CellHits(seeds=[int(s) for s in z["seeds"]], splits=splits, ks=tuple(int(k) for k in z["ks"]))


def at_half(method: str) -> str:
    """The method name of a cell of budget-B/2 runs."""
    return method + HALF


def with_half_budget(rows: list[dict[str, Any]], half_rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The budget-B rows and the budget-B/2 rows as cells of their own (``at_half``): a verdict against the
    default at B must also hold against a method at half its budget (a baseline that overfits with more steps is
    then judged at its better budget too)."""
    return [*rows, *({**r, "method": at_half(r["method"])} for r in half_rows)]


def load_results(results_json: Path) -> list[Cell]:
    """The cells of a recorded results file (its ``rows``, and its ``half_budget_rows`` as the ``at_half`` cells it
    recorded), with the hits found beside it (none for results recorded before hits were saved) and its
    convergence checks."""
    recorded = json.loads(Path(results_json).read_text())
    tabled = {c["method"] for c in recorded.get("cells", [])}
    rows = with_half_budget(recorded["rows"], [r for r in recorded.get("half_budget_rows", [])
                                               if at_half(r["method"]) in tabled])
    folder = hits_folder(Path(results_json))
    hits = {}
    for track, method in dict.fromkeys((r["track"], r["method"]) for r in rows):
        path = hits_path(folder, track, method)
        if path.is_file():
            hits[(track, method)] = load_hits(path)
    return mark_convergence(cells_of(rows, hits), recorded.get("convergence", []))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="The quality table of a recorded results file, every method "
                                             "compared with the default by a paired bootstrap.")
    ap.add_argument("results", type=Path, nargs="?", default=REPO / "benchmarks" / "results" /
                    "quality_runs_last.json")
    ap.add_argument("--default", default=DEFAULT, help=f"the method every other is compared with ({DEFAULT})")
    ap.add_argument("--split", default=SCORING_SPLIT, help=f"the scoring split ({SCORING_SPLIT})")
    ap.add_argument("--n-boot", type=int, default=N_BOOT)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cells = judge(load_results(args.results), args.default, args.split, args.n_boot, args.seed)
    print(markdown(cells, split=args.split), end="")


if __name__ == "__main__":
    main()
