"""Deciding whether method A beats method B on a scoring split: per-query retrieval hits, a paired two-level
bootstrap of the difference in RSUM share, and a convergence check. numpy only (torch-free, like ``metrics``).

A difference is claimed only when (1) every run trained to convergence (``convergence_check``), (2) it is scored
on a split never used to select a checkpoint or a setting, (3) the seeds are paired across the methods (seed s
means the same initialisation and data order for A and B) and (4) the paired 95% interval of the difference
excludes 0 (``paired_bootstrap``). Otherwise the verdict is "no difference shown" -- not "a tie": a tie would be a
claim of equality, which no interval here shows.

Per-query hits. For one model on one split, ``retrieval_hits`` returns boolean matrices: ``i2t`` (Q, K), one row
per image query (an image with at least one caption, in image order), column j true when the query's rank is
below ``ks[j]``; ``t2i`` (T, K), one row per caption. Ranks and the tie rule are those of
``metrics.retrieval_metrics``, so R@k is 100 x a column's mean and RSUM the sum of the six means x 100, exactly
(``RetrievalHits.recalls``).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from edgedistill.core.gates import finite
from edgedistill.evaluation.metrics import Array, as_array, retrieval_ranks

A_BEATS_B = "A beats B"
B_BEATS_A = "B beats A"
NO_DIFFERENCE = "no difference shown"
LEVELS = ("seeds", "queries")
_CHUNK = 250  # bootstrap replicates drawn at a time (fixed, so a seed gives the same replicates on any machine)


@dataclass(frozen=True)
class RetrievalHits:
    """Per-query hits of one model on one split: ``i2t`` (Q, K) and ``t2i`` (T, K) booleans, rank < ``ks[j]``."""
    i2t: np.ndarray
    t2i: np.ndarray
    ks: tuple[int, ...] = (1, 5, 10)

    def recalls(self) -> dict[str, float]:
        """The keys and values of ``retrieval_metrics``: ``i2t_r{k}``, ``t2i_r{k}`` (percent) and ``rsum``, computed
        in the same order with the same arithmetic, so they are equal to its floats, not just close."""
        out: dict[str, float] = {}
        for direction, hits in (("i2t", self.i2t), ("t2i", self.t2i)):
            for j, k in enumerate(self.ks):
                out[f"{direction}_r{k}"] = 100.0 * float(hits[:, j].mean())
        out["rsum"] = sum(out.values())
        return out

    @property
    def rsum(self) -> float:
        return self.recalls()["rsum"]


def retrieval_hits(image_emb: Array, text_emb: Array, text_to_image: Array, ks: tuple[int, ...] = (1, 5, 10),
                   chunk: int = 1024) -> RetrievalHits:
    """Per-query hits of image->text and text->image retrieval (see the module docstring); the inputs and checks of
    ``metrics.retrieval_metrics`` (NaN or inf embeddings raise ``NonFiniteEmbeddings``)."""
    ranks = retrieval_ranks(image_emb, text_emb, text_to_image, chunk)
    ks = tuple(int(k) for k in ks)
    kk = np.asarray(ks)[None, :]
    return RetrievalHits(i2t=ranks["i2t"][:, None] < kk, t2i=ranks["t2i"][:, None] < kk, ks=ks)


def _replicates(d_img: np.ndarray, d_cap: np.ndarray, per_seed: np.ndarray, teacher: float, n_boot: int,
                seed: int, levels: tuple[str, ...]) -> np.ndarray:
    """(n_boot,) bootstrap replicates of the mean share difference (``paired_bootstrap`` says how they are drawn):
    d_img (S, Q) and d_cap (S, T) hold A's hits minus B's per seed and query, per_seed (S,) the whole-split
    differences."""
    n_seeds, n_img, n_cap = d_img.shape[0], d_img.shape[1], d_cap.shape[1]
    rng = np.random.default_rng(seed)
    replicates = []
    for start in range(0, n_boot, _CHUNK):
        m = min(_CHUNK, n_boot - start)
        seed_w = _counts(rng, n_seeds, m) if "seeds" in levels else np.ones((m, n_seeds))
        if "queries" in levels:
            img_w, cap_w = _counts(rng, n_img, m), _counts(rng, n_cap, m)
            diff = 100.0 * (img_w @ d_img.T / n_img + cap_w @ d_cap.T / n_cap) / teacher  # (m, S)
        else:
            diff = np.broadcast_to(per_seed, (m, n_seeds))
        replicates.append((seed_w * diff).sum(axis=1) / n_seeds)
    return np.concatenate(replicates)


@dataclass(frozen=True)
class PairedResult:
    """The paired comparison of A with B: ``estimate`` = mean over seeds of (RSUM share of A - RSUM share of B) on
    the whole scoring split; ``low``, ``high`` its percentile interval; ``verdict`` one of A_BEATS_B, B_BEATS_A,
    NO_DIFFERENCE; ``reason`` why no interval could be computed (empty when one was)."""
    estimate: float
    low: float
    high: float
    verdict: str
    reason: str = ""
    n_seeds: int = 0
    n_image_queries: int = 0
    n_caption_queries: int = 0
    n_boot: int = 0
    confidence: float = 0.95
    levels: tuple[str, ...] = LEVELS

    @classmethod
    def failed(cls, reason: str, estimate: float = math.nan, **counts: Any) -> "PairedResult":
        """Fail closed: no interval, verdict "no difference shown", with ``reason``."""
        return cls(estimate=estimate, low=math.nan, high=math.nan, verdict=NO_DIFFERENCE, reason=reason, **counts)


def _stack(hits: Sequence[Any], name: str, who: str) -> np.ndarray:
    """(S, rows, K) float64 of the ``name`` ("i2t"/"t2i") matrices of every seed of one method."""
    mats = [as_array(h[name] if isinstance(h, Mapping) else getattr(h, name)) for h in hits]
    shapes = {m.shape for m in mats}
    if len(shapes) != 1 or mats[0].ndim != 2:
        raise ValueError(f"{who}'s {name} hit matrices must be (queries, K) of one shape for every seed; "
                         f"got {sorted(shapes)}")
    return np.stack(mats).astype(np.float64)


def _counts(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    """(m, n) how often each of n items is drawn in each of m resamples of n draws with replacement."""
    draws = rng.integers(0, n, size=(m, n)) + (np.arange(m) * n)[:, None]
    return np.bincount(draws.ravel(), minlength=m * n).reshape(m, n).astype(np.float64)


def paired_bootstrap(a_hits: Sequence[Any], b_hits: Sequence[Any], teacher_rsum: float, n_boot: int = 2000,
                     seed: int = 0, levels: Sequence[str] = LEVELS, confidence: float = 0.95) -> PairedResult:
    """Paired two-level bootstrap of the difference in RSUM share of the teacher between method A and method B.

    ``a_hits[s]`` and ``b_hits[s]`` are the per-query hits (``RetrievalHits`` or a mapping with ``"i2t"`` (Q, K) and
    ``"t2i"`` (T, K)) of A and B trained with seed s (the same seed index: the same initialisation and data order
    for both), scored on the same Q image queries and T caption queries. ``teacher_rsum`` is the teacher's RSUM on
    that split (a fixed denominator: the teacher is not resampled).

    Statistic: share(X, s) = RSUM of X's seed-s run / teacher_rsum, RSUM = 100 x sum over the K ks of the i2t and
    t2i hit rates; the estimate is the mean over seeds of share(A, s) - share(B, s) on the whole split.

    Each of ``n_boot`` replicates draws, independently:
      - S seed indices from the S seed pairs, with replacement (a drawn index takes A's and B's run of that seed);
      - Q image queries from the Q, and T caption queries from the T, with replacement -- one query resample per
        replicate, shared by A and B (the pairing by query is kept) and by every seed (all runs are scored on the
        same finite set, so its sampling error is common to them);
    and recomputes the statistic on the drawn seeds and queries. Both levels, because a difference must hold
    beyond the seeds that were run (training varies from seed to seed) and beyond the queries that were scored (the
    scoring set is a finite sample of scenes). The interval is the percentile interval: the (1 - confidence) / 2 and
    (1 + confidence) / 2 quantiles of the replicates (numpy's linear interpolation). ``levels`` restricts the
    resampling to ``("seeds",)`` or ``("queries",)``, to see what each level contributes; a decision uses both.

    Verdict: A_BEATS_B when the interval lies above 0, B_BEATS_A below 0, else NO_DIFFERENCE. It fails closed to
    NO_DIFFERENCE, with a reason and no interval, when a hit value or the teacher's RSUM is NaN or inf, the
    teacher's RSUM is not positive, or fewer than 2 seed pairs are given while the seed level is resampled (with
    one seed nothing is known of the seed variation). With few seeds the seed level is coarse: S = 3 seeds give
    10 distinct resamples, and the bootstrap variance of a mean over S seeds is (S - 1) / S of the usual estimate
    (s^2 / S), so for small S the seed level's share of the interval is, if anything, too narrow.

    Mismatched inputs (a different number of seeds for A and B, different query counts, values other than 0/1)
    raise ValueError. The same ``seed`` and inputs give the same replicates.
    """
    levels = tuple(levels)
    if not levels or any(level not in LEVELS for level in levels):
        raise ValueError(f"levels must be a non-empty subset of {LEVELS}, got {levels}")
    if n_boot < 1:
        raise ValueError("n_boot must be at least 1")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if len(a_hits) != len(b_hits):
        raise ValueError(f"seeds must be paired: A has {len(a_hits)} seeds, B has {len(b_hits)}")
    if len(a_hits) == 0:
        raise ValueError("no seeds to compare")
    a_i2t, a_t2i = _stack(a_hits, "i2t", "A"), _stack(a_hits, "t2i", "A")
    b_i2t, b_t2i = _stack(b_hits, "i2t", "B"), _stack(b_hits, "t2i", "B")
    if a_i2t.shape != b_i2t.shape or a_t2i.shape != b_t2i.shape:
        raise ValueError(f"A and B must be scored on the same queries: i2t {a_i2t.shape[1:]} vs {b_i2t.shape[1:]}, "
                         f"t2i {a_t2i.shape[1:]} vs {b_t2i.shape[1:]}")
    n_seeds, n_img, n_cap = a_i2t.shape[0], a_i2t.shape[1], a_t2i.shape[1]
    if n_img == 0 or n_cap == 0:
        raise ValueError("the scoring split needs at least one image query and one caption query")
    counts = {"n_seeds": n_seeds, "n_image_queries": n_img, "n_caption_queries": n_cap, "n_boot": n_boot,
              "confidence": confidence, "levels": levels}
    arrays = (a_i2t, a_t2i, b_i2t, b_t2i)
    if not all(np.isfinite(x).all() for x in arrays):
        return PairedResult.failed("a hit value is NaN or inf", **counts)
    if any(((x != 0) & (x != 1)).any() for x in arrays):
        raise ValueError("hit matrices must hold 0/1 (booleans)")
    if not finite(teacher_rsum):
        return PairedResult.failed(f"the teacher's RSUM is not a finite number ({teacher_rsum})", **counts)
    if teacher_rsum <= 0:
        return PairedResult.failed(f"the teacher's RSUM is not positive ({teacher_rsum})", **counts)
    teacher = float(teacher_rsum)
    # Per seed and query: A's hits minus B's, summed over the ks (RSUM is linear in the per-query hits).
    d_img = (a_i2t - b_i2t).sum(axis=2)  # (S, Q)
    d_cap = (a_t2i - b_t2i).sum(axis=2)  # (S, T)
    per_seed = 100.0 * (d_img.mean(axis=1) + d_cap.mean(axis=1)) / teacher  # (S,) share(A, s) - share(B, s)
    estimate = float(per_seed.mean())
    if "seeds" in levels and n_seeds < 2:
        return PairedResult.failed("one seed pair: the seed level cannot be resampled (run at least 2 seeds)",
                                   estimate=estimate, **counts)
    reps = _replicates(d_img, d_cap, per_seed, teacher, n_boot, seed, levels)
    if not np.isfinite(reps).all():
        return PairedResult.failed("a bootstrap replicate is NaN or inf", estimate=estimate, **counts)
    tail = (1.0 - confidence) / 2.0
    low, high = (float(v) for v in np.quantile(reps, [tail, 1.0 - tail]))
    verdict = A_BEATS_B if low > 0 else B_BEATS_A if high < 0 else NO_DIFFERENCE
    return PairedResult(estimate=estimate, low=low, high=high, verdict=verdict, **counts)


@dataclass(frozen=True)
class ConvergenceCheck:
    """``converged``: |mean_difference| < seed_spread, both finite. ``mean_difference``: mean over seeds of
    (selection score at budget B - score at budget B/2); ``seed_spread``: sample std (n - 1) over seeds of the
    budget-B scores; ``reason``: why it is not converged (empty when it is)."""
    converged: bool
    mean_difference: float
    seed_spread: float
    reason: str = ""
    per_seed: tuple[float, ...] = field(default_factory=tuple)


def convergence_check(full_budget: Sequence[float], half_budget: Sequence[float]) -> ConvergenceCheck:
    """Did training converge? ``full_budget[s]`` is the selection score (on the selection split, not the scoring
    split) of the seed-s run with budget B, ``half_budget[s]`` that of a separate seed-s run with budget B/2.

    Converged when the mean over seeds of the paired difference (B - B/2) is smaller in size than the seed spread
    of the budget-B runs: doubling the budget moved the score less than the seeds do. Fails closed (not converged,
    with a reason) on a NaN or inf score, fewer than 2 seeds (no spread) or a zero spread; unequal lengths (seeds
    not paired) raise ValueError.
    """
    full = [float(v) for v in full_budget]
    half = [float(v) for v in half_budget]
    if len(full) != len(half):
        raise ValueError(f"seeds must be paired: {len(full)} budget-B scores, {len(half)} budget-B/2 scores")
    if not full:
        raise ValueError("no seeds")
    diffs = tuple(f - h for f, h in zip(full, half))
    mean_diff = math.fsum(diffs) / len(diffs)
    # statistics.stdev sums exactly (fractions): equal scores have a spread of exactly 0, not a rounding residue
    spread = statistics.stdev(full) if len(full) >= 2 and all(math.isfinite(v) for v in full) else math.nan
    if not all(math.isfinite(v) for v in full + half):
        return ConvergenceCheck(False, mean_diff, spread, "a selection score is NaN or inf", diffs)
    if len(full) < 2:
        return ConvergenceCheck(False, mean_diff, spread, "one seed: no seed spread to compare with", diffs)
    if abs(mean_diff) < spread:
        return ConvergenceCheck(True, mean_diff, spread, "", diffs)
    # A score that falls with the budget is past its best (overfitting), not still climbing: say which.
    trend = "lowered" if mean_diff < 0 else "raised"
    return ConvergenceCheck(False, mean_diff, spread, f"doubling the budget {trend} the score by {abs(mean_diff):.4g}, "
                                                      f"not less than the seed spread {spread:.4g}", diffs)


__all__ = ["A_BEATS_B", "B_BEATS_A", "ConvergenceCheck", "LEVELS", "NO_DIFFERENCE", "PairedResult", "RetrievalHits",
           "convergence_check", "paired_bootstrap", "retrieval_hits"]
