"""The quality benchmark's table code: mean and std over seeds, and the rule that calls a difference a tie."""

import math

import pytest

from benchmarks.quality_table import best_everywhere, cells_of, judge, markdown


def rows(track: str, method: str, shares: list[float], **extra: float) -> list[dict]:
    return [{"track": track, "method": method, "seed": s, "iid_rsum_share": v, "label": "x", **extra}
            for s, v in enumerate(shares)]


def test_mean_and_sample_std_over_seeds():
    (cell,) = cells_of(rows("t", "a", [0.90, 0.92, 0.94], hard_twins_bind=50.0))
    assert cell.seeds == [0, 1, 2] and cell.n == 3
    assert cell.mean["iid_rsum_share"] == pytest.approx(0.92)
    assert cell.std["iid_rsum_share"] == pytest.approx(0.02)  # sample std (n - 1)
    assert cell.std["hard_twins_bind"] == 0.0 and "label" not in cell.mean


def test_a_gap_inside_the_seed_spread_is_a_tie_and_outside_is_below():
    cells = judge(cells_of(rows("t", "best", [0.95, 0.96, 0.97])      # mean 0.96, std 0.01
                           + rows("t", "close", [0.95, 0.955, 0.96])   # 0.005 below: inside 0.01
                           + rows("t", "far", [0.93, 0.931, 0.932])))  # 0.029 below: outside
    verdict = {c.method: c.verdict for c in cells}
    assert verdict == {"best": "best", "close": "tie", "far": "below"}
    far = next(c for c in cells if c.method == "far")
    assert far.gap == pytest.approx(0.029) and far.spread == pytest.approx(0.01)  # the larger of the two stds


def test_the_spread_is_the_larger_std_of_the_two_cells():
    cells = judge(cells_of(rows("t", "steady", [0.95, 0.95, 0.95])
                           + rows("t", "noisy", [0.90, 0.98, 0.94])))  # mean 0.94, std 0.04 > gap 0.01
    assert {c.method: c.verdict for c in cells} == {"steady": "best", "noisy": "tie"}


def test_one_seed_gets_no_verdict_and_nan_never_wins():
    cells = judge(cells_of(rows("t", "a", [0.9]) + rows("t", "b", [0.8]) + rows("t", "c", [math.nan])))
    assert {c.method: c.verdict for c in cells} == {"a": "best", "b": "1 seed", "c": "1 seed"}
    cells = judge(cells_of(rows("t", "a", [0.9, 0.91]) + rows("t", "nan", [math.nan, math.nan])))
    assert {c.method: c.verdict for c in cells} == {"a": "best", "nan": "below"}


def test_best_everywhere_needs_best_or_tie_on_every_track():
    data = (rows("transfer", "a", [0.95, 0.96, 0.97]) + rows("transfer", "b", [0.955, 0.96, 0.965])
            + rows("compression", "a", [0.80, 0.81, 0.82]) + rows("compression", "b", [0.90, 0.91, 0.92])
            + rows("transfer", "c", [0.99, 0.99, 0.99]))  # c is best on transfer but never ran on compression
    cells = judge(cells_of(data))
    # c is far ahead on transfer (a and b fall below it) but has no compression cell: nobody qualifies
    assert best_everywhere(cells) == []
    cells = judge(cells_of([r for r in data if r["method"] != "c"]))
    assert best_everywhere(cells) == ["b"]
    assert best_everywhere(cells, candidates=["a"]) == []


def test_markdown_shows_mean_std_and_verdict():
    cells = judge(cells_of(rows("t", "a", [0.95, 0.97], iid_i2t_r1=90.0) + rows("t", "b", [0.90, 0.91])))
    text = markdown(cells, labels={"a": "method A"})
    assert "| t | method A | 2 | 90.0 ± 0.0 | 0.960 ± 0.014 |" in text
    assert "below (-0.055, spread 0.014)" in text
