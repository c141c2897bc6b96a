"""The quality benchmark's table: per-run rows -> cells (mean and std over seeds) -> verdicts against the seed
spread -> Markdown. Pure Python (no torch), so the rule that decides a tie is tested on its own.

The rule: on each track the best cell is the one with the highest mean of the ranking metric (iid RSUM share). A
cell whose mean is below the best by less than the seed spread, the larger of the two cells' standard deviations
(sample std over seeds), is a tie with the best. A cell with one seed has no spread and gets no verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

RANK_METRIC = "iid_rsum_share"
# Columns of the Markdown table: (row key, header, format); twin columns are accuracies in percent.
COLUMNS = (("iid_i2t_r1", "iid i2t R@1", "{:.1f}"), ("iid_rsum_share", "iid share", "{:.3f}"),
           ("hard_rsum_share", "hard share", "{:.3f}"), ("ood_rsum_share", "ood share", "{:.3f}"),
           ("hard_twins_bind", "hard bind", "{:.1f}"), ("hard_twins_swap-position", "hard swap-pos", "{:.1f}"),
           ("ood_twins_bind", "ood bind", "{:.1f}"), ("ood_twins_swap-position", "ood swap-pos", "{:.1f}"))


@dataclass
class Cell:
    """One (track, method) over its seeds: mean and sample std of every numeric metric."""
    track: str
    method: str
    seeds: list[int]
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)  # nan with one seed
    verdict: str = ""  # "best", "tie", "below", or "1 seed"
    gap: float = math.nan  # best mean - this mean, of RANK_METRIC
    spread: float = math.nan  # the seed spread the gap was compared with

    @property
    def n(self) -> int:
        return len(self.seeds)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); NaN where undefined (no values; one value for the std)."""
    if not values:
        return math.nan, math.nan
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def cells_of(rows: Iterable[dict[str, Any]]) -> list[Cell]:
    """Group run rows by (track, method), in first-seen order, with mean and std of each numeric metric."""
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
        cells.append(cell)
    return cells


def judge(cells: list[Cell], metric: str = RANK_METRIC) -> list[Cell]:
    """Mark every cell of every track against its track's best (see the module docstring); returns ``cells``.

    A NaN mean is never best and never a tie (it fails closed, like every gate).
    """
    for track in dict.fromkeys(c.track for c in cells):
        group = [c for c in cells if c.track == track and math.isfinite(c.mean.get(metric, math.nan))]
        if not group:
            continue
        best = max(group, key=lambda c: c.mean[metric])
        for cell in (c for c in cells if c.track == track):
            value = cell.mean.get(metric, math.nan)
            cell.gap = best.mean[metric] - value
            cell.spread = max(cell.std.get(metric, math.nan), best.std.get(metric, math.nan))
            if cell is best:
                cell.verdict = "best"
            elif cell.n < 2 or best.n < 2:
                cell.verdict = "1 seed"
            elif math.isfinite(cell.gap) and math.isfinite(cell.spread) and cell.gap < cell.spread:
                cell.verdict = "tie"
            else:
                cell.verdict = "below"
    return cells


def best_everywhere(cells: list[Cell], candidates: Iterable[str] | None = None) -> list[str]:
    """Methods (among ``candidates``, default all) that are best or tied with the best on every track they ran."""
    tracks = list(dict.fromkeys(c.track for c in cells))
    out = []
    for method in dict.fromkeys(c.method for c in cells):
        if candidates is not None and method not in candidates:
            continue
        mine = {c.track: c for c in cells if c.method == method}
        if set(mine) == set(tracks) and all(mine[t].verdict in ("best", "tie") for t in tracks):
            out.append(method)
    return out


def _fmt(cell: Cell, key: str, fmt: str) -> str:
    mean, std = cell.mean.get(key, math.nan), cell.std.get(key, math.nan)
    if not math.isfinite(mean):
        return "-"
    return fmt.format(mean) + (f" ± {fmt.format(std)}" if math.isfinite(std) else "")


def markdown(cells: list[Cell], labels: dict[str, str] | None = None) -> str:
    """The table: one line per cell, mean ± std over seeds, the verdict against the track's best."""
    labels = labels or {}
    head = ["track", "method", "seeds", *(h for _, h, _ in COLUMNS), "vs best (iid share)"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|" + "---:|" * len(COLUMNS) + "---|"]
    for c in cells:
        verdict = c.verdict
        if c.verdict in ("tie", "below"):
            verdict += f" ({-c.gap:+.3f}, spread {c.spread:.3f})"
        cols = [_fmt(c, key, fmt) for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join([c.track, labels.get(c.method, c.method), str(c.n), *cols, verdict]) + " |")
    return "\n".join(lines) + "\n"
