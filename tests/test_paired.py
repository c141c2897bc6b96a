"""Per-query retrieval hits (equal to retrieval_metrics), the paired two-level bootstrap and the convergence check."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgedistill.evaluation.metrics import NonFiniteEmbeddings, retrieval_metrics
from edgedistill.evaluation.paired import (A_BEATS_B, B_BEATS_A, NO_DIFFERENCE, RetrievalHits, convergence_check,
                                           paired_bootstrap, retrieval_hits)


def random_pairs(seed: int, n_images: int, dim: int = 8, noise: float = 1.0, uncaptioned: int = 0):
    """Images, 1-5 captions each (noisy copies of their image, shuffled), caption -> image; the last
    ``uncaptioned`` images have no caption (t2i candidates only)."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n_images, dim))
    captioned = n_images - uncaptioned
    t2i = np.repeat(np.arange(captioned), rng.integers(1, 6, captioned))
    t2i = t2i[rng.permutation(len(t2i))]
    txt = img[t2i] + noise * rng.standard_normal((len(t2i), dim))
    return img, txt, t2i


@pytest.mark.parametrize("seed,n_images,noise,uncaptioned,chunk", [(0, 30, 0.8, 0, 7), (1, 50, 1.5, 5, 1024),
                                                                   (2, 12, 3.0, 2, 1), (3, 40, 0.3, 0, 16)])
def test_hits_reproduce_retrieval_metrics_exactly(seed, n_images, noise, uncaptioned, chunk):
    img, txt, t2i = random_pairs(seed, n_images, noise=noise, uncaptioned=uncaptioned)
    hits = retrieval_hits(img, txt, t2i, chunk=chunk)
    assert hits.i2t.dtype == bool and hits.i2t.shape == (n_images - uncaptioned, 3)  # one row per image query
    assert hits.t2i.shape == (len(t2i), 3)                                           # one row per caption
    assert (hits.i2t[:, :-1] <= hits.i2t[:, 1:]).all()  # a hit at k is a hit at every larger k
    ref = retrieval_metrics(img, txt, t2i, chunk=chunk)
    assert hits.recalls() == ref  # the same floats, not approximately
    assert hits.rsum == ref["rsum"]
    six = [100.0 * float(m[:, j].mean()) for m in (hits.i2t, hits.t2i) for j in range(3)]
    assert sum(six) == ref["rsum"]  # RSUM = the sum of the six means x 100


def test_hits_with_float32_other_ks_and_ties():
    img, txt, t2i = random_pairs(4, 25)
    ks = (1, 2, 3, 20)
    hits = retrieval_hits(img.astype(np.float32), txt.astype(np.float32), t2i, ks=ks)
    assert hits.ks == ks and hits.recalls() == retrieval_metrics(img.astype(np.float32), txt.astype(np.float32),
                                                                 t2i, ks=ks)
    collapsed = retrieval_hits(np.ones((4, 3)), np.ones((6, 3)), np.array([0, 0, 1, 2, 3, 3]))
    assert not collapsed.i2t[:, 0].any() and not collapsed.t2i[:, 0].any()  # ties resolved against the query
    assert collapsed.recalls() == retrieval_metrics(np.ones((4, 3)), np.ones((6, 3)), np.array([0, 0, 1, 2, 3, 3]))


def test_hits_refuse_what_retrieval_metrics_refuses():
    img, txt, t2i = random_pairs(5, 10)
    img[3, 0] = np.nan
    with pytest.raises(NonFiniteEmbeddings):
        retrieval_hits(img, txt, t2i)
    with pytest.raises(ValueError):
        retrieval_hits(np.ones((3, 4)), np.ones((2, 5)), np.array([0, 1]))


# ---------------------------------------------------------------------------------------- the paired bootstrap

TEACHER = 550.0


def hits_of(rng: np.random.Generator, n_img: int, n_cap: int, p: float) -> dict[str, np.ndarray]:
    """Random nested hits: each query's rank drawn so that P(hit at R@10) = p, R@5 and R@1 inside it."""
    def nested(n: int) -> np.ndarray:
        u = rng.random(n)[:, None]
        return u < np.array([p * 0.5, p * 0.8, p])[None, :]
    return {"i2t": nested(n_img), "t2i": nested(n_cap)}


def improve(h: dict[str, np.ndarray], rng: np.random.Generator, share: float) -> dict[str, np.ndarray]:
    """``h`` with a fraction ``share`` of the queries turned into hits at every k (never worse on any query)."""
    out = {}
    for key, m in h.items():
        m = m.copy()
        m[rng.random(len(m)) < share] = True
        out[key] = m
    return out


def test_a_clearly_better_on_every_seed_and_query_gives_an_interval_above_0():
    rng = np.random.default_rng(0)
    b = [hits_of(rng, 300, 900, 0.5) for _ in range(3)]
    a = [improve(h, rng, 0.3) for h in b]
    r = paired_bootstrap(a, b, TEACHER, n_boot=500)
    assert r.verdict == A_BEATS_B and 0 < r.low <= r.estimate <= r.high and not r.reason
    assert (r.n_seeds, r.n_image_queries, r.n_caption_queries, r.n_boot) == (3, 300, 900, 500)
    # the estimate is the mean over seeds of the difference in RSUM share
    share = [(RetrievalHits(x["i2t"], x["t2i"]).rsum - RetrievalHits(y["i2t"], y["t2i"]).rsum) / TEACHER
             for x, y in zip(a, b)]
    assert r.estimate == pytest.approx(np.mean(share), abs=1e-12)
    swapped = paired_bootstrap(b, a, TEACHER, n_boot=500)
    assert swapped.verdict == B_BEATS_A and swapped.high < 0
    assert swapped.estimate == pytest.approx(-r.estimate) and swapped.low == pytest.approx(-r.high)


def test_identical_methods_show_no_difference():
    rng = np.random.default_rng(1)
    b = [hits_of(rng, 200, 600, 0.6) for _ in range(3)]
    r = paired_bootstrap(b, [dict(h) for h in b], TEACHER, n_boot=300)
    assert r.verdict == NO_DIFFERENCE and r.low <= 0 <= r.high and r.estimate == 0.0 and not r.reason


def test_two_different_but_equally_good_methods_show_no_difference():
    rng = np.random.default_rng(2)
    a = [hits_of(rng, 300, 900, 0.6) for _ in range(4)]
    b = [hits_of(rng, 300, 900, 0.6) for _ in range(4)]
    r = paired_bootstrap(a, b, TEACHER, n_boot=1000)
    assert r.verdict == NO_DIFFERENCE and r.low < 0 < r.high


def test_one_noisy_seed_widens_the_interval_the_seed_level_matters():
    """Four seeds where A is a little better, one where A collapsed: queries alone see a confident win, the seed
    level sees that one seed in five undoes it."""
    rng = np.random.default_rng(3)
    b = [hits_of(rng, 400, 1200, 0.6) for _ in range(5)]
    a = [improve(h, rng, 0.12) for h in b[:4]] + [hits_of(rng, 400, 1200, 0.45)]  # seed 4: A fell apart
    queries = paired_bootstrap(a, b, TEACHER, n_boot=1000, levels=("queries",))
    both = paired_bootstrap(a, b, TEACHER, n_boot=1000)
    seeds = paired_bootstrap(a, b, TEACHER, n_boot=1000, levels=("seeds",))
    assert queries.estimate == both.estimate == seeds.estimate
    assert both.high - both.low > 3 * (queries.high - queries.low)
    assert both.high - both.low >= seeds.high - seeds.low > queries.high - queries.low
    assert queries.verdict == A_BEATS_B and both.verdict == NO_DIFFERENCE
    # the four steady seeds alone: both levels agree that A is better
    steady = paired_bootstrap(a[:4], b[:4], TEACHER, n_boot=1000)
    assert steady.verdict == A_BEATS_B


def test_the_query_level_matters_on_a_small_scoring_set():
    """Every seed gives the same small gain: the seeds alone see no spread at all, the queries do."""
    rng = np.random.default_rng(4)
    base = hits_of(rng, 30, 60, 0.5)
    better = improve(base, rng, 0.1)
    a, b = [better] * 3, [base] * 3
    seeds = paired_bootstrap(a, b, TEACHER, n_boot=500, levels=("seeds",))
    both = paired_bootstrap(a, b, TEACHER, n_boot=500)
    assert seeds.low == seeds.high == pytest.approx(seeds.estimate)
    assert both.high - both.low > 0


@pytest.mark.parametrize("where", ["a", "b", "teacher", "teacher_inf", "teacher_zero"])
def test_nan_fails_closed(where):
    rng = np.random.default_rng(5)
    b = [hits_of(rng, 50, 100, 0.5) for _ in range(3)]
    a = [improve(h, rng, 0.5) for h in b]  # clearly better: only the NaN can stop the verdict
    teacher = {"teacher": math.nan, "teacher_inf": math.inf, "teacher_zero": 0.0}.get(where, TEACHER)
    if where in ("a", "b"):
        side = a if where == "a" else b
        side[1] = {"i2t": side[1]["i2t"].astype(float), "t2i": side[1]["t2i"]}
        side[1]["i2t"][7, 2] = math.nan
    r = paired_bootstrap(a, b, teacher, n_boot=100)
    assert r.verdict == NO_DIFFERENCE and r.reason
    assert math.isnan(r.low) and math.isnan(r.high)


def test_one_seed_fails_closed_and_mismatches_raise():
    rng = np.random.default_rng(6)
    b = [hits_of(rng, 50, 100, 0.5) for _ in range(2)]
    a = [improve(h, rng, 0.5) for h in b]
    one = paired_bootstrap(a[:1], b[:1], TEACHER, n_boot=100)
    assert one.verdict == NO_DIFFERENCE and "seed" in one.reason and one.estimate > 0
    assert paired_bootstrap(a[:1], b[:1], TEACHER, n_boot=100, levels=("queries",)).verdict == A_BEATS_B
    with pytest.raises(ValueError, match="paired"):
        paired_bootstrap(a, b[:1], TEACHER)
    with pytest.raises(ValueError, match="same queries"):
        paired_bootstrap(a, [hits_of(rng, 51, 100, 0.5) for _ in range(2)], TEACHER)
    with pytest.raises(ValueError, match="0/1"):
        paired_bootstrap([{"i2t": h["i2t"] * 2, "t2i": h["t2i"]} for h in a], b, TEACHER)
    with pytest.raises(ValueError, match="levels"):
        paired_bootstrap(a, b, TEACHER, levels=("images",))


def test_the_bootstrap_is_reproducible_with_its_seed():
    rng = np.random.default_rng(7)
    b = [hits_of(rng, 100, 300, 0.5) for _ in range(3)]
    a = [hits_of(rng, 100, 300, 0.55) for _ in range(3)]
    first = paired_bootstrap(a, b, TEACHER, n_boot=600, seed=11)
    assert paired_bootstrap(a, b, TEACHER, n_boot=600, seed=11) == first
    other = paired_bootstrap(a, b, TEACHER, n_boot=600, seed=12)
    assert other.estimate == first.estimate and (other.low, other.high) != (first.low, first.high)


def test_retrieval_hits_objects_are_accepted():
    rng = np.random.default_rng(8)
    b = [hits_of(rng, 40, 80, 0.5) for _ in range(2)]
    as_objects = [RetrievalHits(h["i2t"], h["t2i"]) for h in b]
    assert paired_bootstrap(as_objects, b, TEACHER, n_boot=50).estimate == 0.0


# ---------------------------------------------------------------------------------------------- convergence

def test_converged_when_doubling_the_budget_moves_less_than_the_seeds():
    c = convergence_check([0.80, 0.84, 0.88], [0.79, 0.845, 0.87])  # differences +0.01, -0.005, +0.01
    assert c.converged and not c.reason
    assert c.mean_difference == pytest.approx(0.005) and c.seed_spread == pytest.approx(0.04)


def test_not_converged_when_the_score_still_climbs():
    c = convergence_check([0.80, 0.84, 0.88], [0.70, 0.75, 0.77])
    assert not c.converged and "seed spread" in c.reason and "raised the score by 0.1," in c.reason
    assert c.mean_difference == pytest.approx(0.1) and c.seed_spread == pytest.approx(0.04)
    down = convergence_check([0.70, 0.75, 0.77], [0.80, 0.84, 0.88])  # worse with more budget: also not converged
    assert not down.converged and down.mean_difference == pytest.approx(-0.1)
    assert "lowered the score by 0.1," in down.reason  # past its best, not still climbing


def test_convergence_fails_closed():
    nan = convergence_check([0.8, math.nan, 0.85], [0.8, 0.8, 0.85])
    assert not nan.converged and "NaN" in nan.reason and math.isnan(nan.mean_difference)
    assert not convergence_check([0.8, 0.82], [0.8, math.inf]).converged
    one = convergence_check([0.8], [0.8])
    assert not one.converged and math.isnan(one.seed_spread) and "one seed" in one.reason
    flat = convergence_check([0.8, 0.8, 0.8], [0.8, 0.8, 0.8])  # no spread: |0| < 0 is false
    assert not flat.converged
    with pytest.raises(ValueError, match="paired"):
        convergence_check([0.8, 0.9], [0.8])
