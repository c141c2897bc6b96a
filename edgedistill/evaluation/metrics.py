"""Retrieval and zero-shot evaluation on embeddings; every value is a percentage (0-100) except
``cosine_to_teacher``, which is a plain mean cosine. numpy only: the device runtime scores with it too. Inputs may
be numpy arrays or (CPU or GPU) torch tensors; they are read as numpy.

Image-text retrieval follows the standard protocol (docs/methods.md#retrieval):

- image -> text (i2t): each image that has at least one caption ranks all T captions; its rank is the best rank
  among its own captions. Images without captions are not i2t queries (they stay t2i candidates).
- text -> image (t2i): each caption ranks all N images; its one ground-truth image must come first.
- R@K = % of queries with rank < K; rsum = the sum of all the R@K values (the usual RSUM for ks = 1, 5, 10).

Ties: a query's rank is the number of *wrong* candidates that score **greater than or equal to** its best
ground-truth candidate, i.e. a tie is resolved against the query. clip_benchmark ranks with ``torch.topk``, whose
order among equal scores is unspecified; without ties (continuous scores) the two agree exactly, and with ties this
rule is the pessimistic end of what topk may return, so a collapsed student (all embeddings equal) scores 0, not 100.

Scores are computed in chunks of queries, so memory is O(chunk * max(N, T)) beyond the embeddings themselves.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

Array = Any  # a numpy array or a torch tensor (read as numpy)


def as_array(x: Array, dtype: Any = None) -> np.ndarray:
    """``x`` as a numpy array (a torch tensor is detached and brought to the CPU first)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _unit(x: np.ndarray) -> np.ndarray:
    """L2-normalised rows, at least float32 (half precision loses the ordering of close scores)."""
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float32)
    norm = np.sqrt((x * x).sum(axis=-1, keepdims=True))
    return x / np.maximum(norm, 1e-12)


def _same_dtype(*xs: np.ndarray) -> list[np.ndarray]:
    return [x.astype(np.float64) for x in xs] if len({x.dtype for x in xs}) > 1 else list(xs)


class NonFiniteEmbeddings(ValueError):
    """Embeddings holding NaN or inf: every score computed from them would be meaningless (NaN ranks first)."""


def check_finite(**embeddings: Array) -> None:
    """NonFiniteEmbeddings naming the first (N, D) array that holds NaN or inf."""
    for name, x in embeddings.items():
        x = as_array(x)
        if x.size and not np.isfinite(x).all():
            bad = int((~np.isfinite(x)).any(axis=-1).sum()) if x.ndim == 2 else int((~np.isfinite(x)).sum())
            raise NonFiniteEmbeddings(f"{name} embeddings hold NaN or inf ({bad} of {x.shape[0]} rows)")


def _check_pairs(image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: np.ndarray) -> None:
    if image_emb.ndim != 2 or text_emb.ndim != 2:
        raise ValueError(f"embeddings must be (N, D) and (T, D); got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}")
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"image and text embeddings have different widths: {image_emb.shape[1]} "
                         f"vs {text_emb.shape[1]}")
    if image_emb.shape[0] == 0 or text_emb.shape[0] == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    if text_to_image.shape != (text_emb.shape[0],):
        raise ValueError(f"text_to_image must be ({text_emb.shape[0]},), one image index per caption; "
                         f"got {tuple(text_to_image.shape)}")
    if text_to_image.dtype.kind not in "iu":
        raise ValueError("text_to_image must hold integer image indices")
    if int(text_to_image.min()) < 0 or int(text_to_image.max()) >= image_emb.shape[0]:
        raise ValueError(f"text_to_image holds indices outside 0..{image_emb.shape[0] - 1}")
    check_finite(image=image_emb, text=text_emb)


def _i2t_ranks(img: np.ndarray, txt: np.ndarray, t2i: np.ndarray, chunk: int) -> np.ndarray:
    """(Q,) rank of each image that has a caption: wrong captions scoring >= its best own caption."""
    queries = np.flatnonzero(np.bincount(t2i, minlength=img.shape[0]) > 0)
    ranks = []
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk]                      # (c,)
        scores = img[q] @ txt.T                               # (c, T)
        own = t2i[None, :] == q[:, None]                      # (c, T) the query's own captions
        best = np.where(own, scores, -np.inf).max(axis=1, keepdims=True)  # (c, 1)
        ranks.append(((scores >= best) & ~own).sum(axis=1))
    return np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int64)


def _t2i_ranks(img: np.ndarray, txt: np.ndarray, t2i: np.ndarray, chunk: int) -> np.ndarray:
    """(T,) rank of each caption: wrong images scoring >= its own image."""
    ranks = []
    for start in range(0, txt.shape[0], chunk):
        target = t2i[start:start + chunk]                     # (c,)
        scores = txt[start:start + chunk] @ img.T             # (c, N)
        rows = np.arange(len(target))
        own = scores[rows, target][:, None]                   # (c, 1)
        wrong = np.ones_like(scores, dtype=bool)
        wrong[rows, target] = False
        ranks.append(((scores >= own) & wrong).sum(axis=1))
    return np.concatenate(ranks)


def retrieval_ranks(image_emb: Array, text_emb: Array, text_to_image: Array,
                    chunk: int = 1024) -> dict[str, np.ndarray]:
    """The 0-based rank of each query's first correct answer: ``i2t`` (one per image with a caption, in image
    order) and ``t2i`` (one per caption); the inputs checked and L2-normalised (NaN or inf raise
    ``NonFiniteEmbeddings``). Recall@K is the share of ranks below K (``retrieval_metrics``, ``paired``)."""
    image_emb, text_emb, t2i = as_array(image_emb), as_array(text_emb), as_array(text_to_image)
    _check_pairs(image_emb, text_emb, t2i)
    if chunk < 1:
        raise ValueError("chunk must be at least 1")
    img, txt = _same_dtype(_unit(image_emb), _unit(text_emb))
    t2i = t2i.astype(np.int64)
    return {"i2t": _i2t_ranks(img, txt, t2i, chunk), "t2i": _t2i_ranks(img, txt, t2i, chunk)}


def retrieval_metrics(image_emb: Array, text_emb: Array, text_to_image: Array, ks: tuple[int, ...] = (1, 5, 10),
                      chunk: int = 1024) -> dict[str, float]:
    """Image-text retrieval Recall@K in percent.

    image_emb (N, D), text_emb (T, D), text_to_image (T,) int: the image index of each caption. Embeddings are
    L2-normalised here. Returns ``i2t_r{k}`` and ``t2i_r{k}`` for each k in ks, and ``rsum`` (their sum).
    See the module docstring for the query sets and the tie rule.
    """
    out: dict[str, float] = {}
    for direction, r in retrieval_ranks(image_emb, text_emb, text_to_image, chunk).items():
        for k in ks:
            out[f"{direction}_r{k}"] = 100.0 * float((r < k).mean())
    out["rsum"] = sum(out.values())
    return out


def zero_shot_accuracy(image_emb: Array, class_emb: Array, labels: Array, chunk: int = 4096) -> dict[str, float]:
    """Zero-shot classification accuracy in percent.

    image_emb (N, D), class_emb (C, D) class-prompt embeddings, labels (N,) int with -1 = unlabelled (ignored).
    The prediction is the class of highest cosine (ties: the lowest class index, as argmax).
    ``zs_top1``: % of labelled images classified right; ``zs_mean_class``: mean over the classes that have
    images of each class's top-1 % (the metric of Li et al. ICCV 2023, robust to unbalanced classes).
    """
    image_emb, class_emb, labels = as_array(image_emb), as_array(class_emb), as_array(labels).astype(np.int64)
    if image_emb.ndim != 2 or class_emb.ndim != 2 or image_emb.shape[1] != class_emb.shape[1]:
        raise ValueError(f"embeddings must be (N, D) and (C, D) of one width; got {tuple(image_emb.shape)} "
                         f"and {tuple(class_emb.shape)}")
    if labels.shape != (image_emb.shape[0],):
        raise ValueError(f"labels must be ({image_emb.shape[0]},); got {tuple(labels.shape)}")
    n_classes = class_emb.shape[0]
    if ((labels < -1) | (labels >= n_classes)).any():
        raise ValueError(f"labels must be -1 (unlabelled) or in 0..{n_classes - 1}")
    keep = labels >= 0
    if not keep.any():
        raise ValueError("zero-shot accuracy needs at least one labelled image")
    check_finite(image=image_emb, class_text=class_emb)
    img, cls = _same_dtype(_unit(image_emb[keep]), _unit(class_emb))
    y = labels[keep]
    pred = np.concatenate([(img[s:s + chunk] @ cls.T).argmax(axis=1) for s in range(0, len(img), chunk)])
    return {"zs_top1": 100.0 * float((pred == y).mean()), "zs_mean_class": mean_class_top1(pred, y, n_classes)}


def _top1(queries: np.ndarray, candidates: np.ndarray, chunk: int) -> np.ndarray:
    """(Q,) index of each query's highest-scoring candidate (ties: the lowest index)."""
    if len(queries) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([(queries[s:s + chunk] @ candidates.T).argmax(axis=1)
                           for s in range(0, len(queries), chunk)])


def agreement(student_image: Array, student_text: Array, teacher_image: Array, teacher_text: Array,
              text_to_image: Array, chunk: int = 1024) -> dict[str, float]:
    """How closely the student follows the teacher.

    student_image / teacher_image (N, D), student_text / teacher_text (T, D), text_to_image (T,) int; the student
    must already be at the teacher's width D (ValueError otherwise).

    ``agreement_top1``: % of retrieval queries whose student top-1 neighbour is the teacher's top-1 neighbour; the
    queries are the i2t queries (images with at least one caption, ranking all captions) plus every caption as a
    t2i query (ranking all images); a percentage. ``cosine_to_teacher``: mean over all N images and T texts of
    cos(student, teacher) of the same item; a cosine in [-1, 1], not a percentage (1 = identical directions).
    """
    si, st, ti, tt = (as_array(x) for x in (student_image, student_text, teacher_image, teacher_text))
    t2i = as_array(text_to_image)
    _check_pairs(si, st, t2i)
    _check_pairs(ti, tt, t2i)
    if si.shape != ti.shape or st.shape != tt.shape:
        raise ValueError(f"student and teacher embeddings must have the same shapes (project the student to the "
                         f"teacher's width first); got images {tuple(si.shape)} vs {tuple(ti.shape)}, texts "
                         f"{tuple(st.shape)} vs {tuple(tt.shape)}")
    if chunk < 1:
        raise ValueError("chunk must be at least 1")
    si, st, ti, tt = _same_dtype(_unit(si), _unit(st), _unit(ti), _unit(tt))
    has_caption = np.bincount(t2i.astype(np.int64), minlength=si.shape[0]) > 0
    same_i2t = _top1(si[has_caption], st, chunk) == _top1(ti[has_caption], tt, chunk)
    same_t2i = _top1(st, si, chunk) == _top1(tt, ti, chunk)
    same = np.concatenate([same_i2t, same_t2i]).astype(np.float64)
    cos = np.concatenate([(si * ti).sum(axis=1), (st * tt).sum(axis=1)]).astype(np.float64)
    return {"agreement_top1": 100.0 * float(same.mean()), "cosine_to_teacher": float(cos.mean())}


def mean_class_top1(pred: Array, labels: Array, n_classes: int) -> float:
    """Mean over the classes present in ``labels`` (N,) of each class's top-1 % of predictions ``pred`` (N,)."""
    pred, labels = as_array(pred).astype(np.int64), as_array(labels).astype(np.int64)
    correct = (pred == labels).astype(np.float64)
    hits = np.bincount(labels, weights=correct, minlength=n_classes)
    count = np.bincount(labels, minlength=n_classes).astype(np.float64)
    present = count > 0
    return 100.0 * float((hits[present] / count[present]).mean())


def prototype_logits(queries: Array, support: Array, support_labels: Array, n_classes: int) -> np.ndarray:
    """Cosine to each class prototype (the normalised mean of its normalised support embeddings).

    queries (Q, D), support (S, D), support_labels (S,) int in 0..C-1 -> (Q, C); a class without support
    scores -inf.
    """
    s = _unit(as_array(support))
    y = as_array(support_labels).astype(np.int64)
    proto = np.zeros((n_classes, s.shape[1]), dtype=s.dtype)
    np.add.at(proto, y, s)
    has = np.bincount(y, minlength=n_classes) > 0
    logits = _unit(as_array(queries)).astype(s.dtype) @ _unit(proto).T
    return np.where(has[None, :], logits, -np.inf)


def tip_adapter_logits(queries: Array, support: Array, support_labels: Array, n_classes: int,
                       class_emb: Array | None = None, alpha: float = 1.0, beta: float = 5.5) -> np.ndarray:
    """Tip-Adapter (Zhang et al. 2022) without training: ``100 q^ W^T + alpha * exp(-beta (1 - q^ F^T)) L``.

    queries (Q, D), support F (S, D) with labels (S,) as one-hot L (S, C), class_emb W (C, D) the zero-shot class
    texts (left out when None) -> (Q, C).
    """
    q = _unit(as_array(queries))
    f = _unit(as_array(support)).astype(q.dtype)
    onehot = np.eye(n_classes, dtype=q.dtype)[as_array(support_labels).astype(np.int64)]
    logits = alpha * np.exp(-beta * (1.0 - q @ f.T)) @ onehot
    if class_emb is not None:
        logits = logits + 100.0 * q @ _unit(as_array(class_emb)).astype(q.dtype).T
    return logits


def few_shot_accuracy(image_emb: Array, labels: Array, k: int, class_emb: Array | None = None,
                      repeats: int = 3, seed: int = 0, alpha: float = 1.0, beta: float = 5.5) -> dict[str, float]:
    """Few-shot classification of new classes from ``k`` support images per class, without training.

    image_emb (N, D), labels (N,) int (-1 = unlabelled, ignored). For each of ``repeats`` seeded draws, k images
    of every class are the support set and the rest of the labelled images the queries; a class needs more than
    k images to take part. Returns the mean over draws of the mean per-class top-1 % of the prototype classifier
    (``prototype``) and of Tip-Adapter (``tip_adapter``; with ``class_emb`` (C, D) its zero-shot part is on),
    and ``classes`` (how many classes took part). Empty dict when no class has more than k images.
    """
    emb, labels = as_array(image_emb, np.float32), as_array(labels).astype(np.int64)
    if emb.ndim != 2 or labels.shape != (emb.shape[0],):
        raise ValueError(f"need (N, D) embeddings and (N,) labels; got {tuple(emb.shape)} and {tuple(labels.shape)}")
    check_finite(image=emb, **({"class_text": class_emb} if class_emb is not None else {}))
    n_classes = int(labels.max()) + 1 if len(labels) and int(labels.max()) >= 0 else 0
    if class_emb is not None:
        n_classes = max(n_classes, as_array(class_emb).shape[0])
    members = {c: np.flatnonzero(labels == c) for c in range(n_classes)}
    usable = [c for c, m in members.items() if len(m) > k]
    if not usable:
        return {}
    scores: dict[str, list[float]] = {"prototype": [], "tip_adapter": []}
    for r in range(repeats):
        rng = np.random.default_rng([seed, k, r])
        perms = [rng.permutation(members[c]) for c in usable]
        s_idx = np.concatenate([p[:k] for p in perms])
        q_idx = np.concatenate([p[k:] for p in perms])
        s_lab, q_lab = labels[s_idx], labels[q_idx]
        pred = prototype_logits(emb[q_idx], emb[s_idx], s_lab, n_classes).argmax(axis=1)
        scores["prototype"].append(mean_class_top1(pred, q_lab, n_classes))
        tip = tip_adapter_logits(emb[q_idx], emb[s_idx], s_lab, n_classes, class_emb, alpha, beta)
        no_support = np.bincount(s_lab, minlength=n_classes)[None, :] == 0
        tip = np.where(no_support, -np.inf, tip)  # the same candidates as the prototypes
        scores["tip_adapter"].append(mean_class_top1(tip.argmax(axis=1), q_lab, n_classes))
    return {**{name: float(np.mean(v)) for name, v in scores.items()}, "classes": float(len(usable))}


def retention(student: dict[str, float] | None, teacher: dict[str, float] | None, key: str = "rsum"
              ) -> dict[str, float] | None:
    """``{key: student / teacher}``, the share of the teacher's score the student keeps; None when either score is
    missing, not finite, or the teacher's is not positive (a ratio of those would read as a pass or a failure)."""
    s, t = (student or {}).get(key), (teacher or {}).get(key)
    if s is None or t is None or not (math.isfinite(s) and math.isfinite(t)) or t <= 0:
        return None
    return {key: s / t}


def _check_twins(image_emb: np.ndarray, text_emb: np.ndarray, twins: Sequence[dict], text_to_image: np.ndarray,
                 direction: str) -> None:
    if direction not in ("i2t", "t2i", "group"):
        raise ValueError(f"direction must be 'i2t', 't2i' or 'group', got '{direction}'")
    if not twins:
        raise ValueError("twins is empty")
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"embeddings must be (N, D) and (T, D); got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}")
    if text_to_image.shape != (text_emb.shape[0],):
        raise ValueError(f"text_to_image must be ({text_emb.shape[0]},); got {tuple(text_to_image.shape)}")


def twin_accuracy(image_emb: Array, text_emb: Array, twins: Sequence[dict], text_to_image: Array,
                  direction: str = "i2t") -> dict[str, float]:
    """Winoground-style accuracy on twin pairs, in percent (0-100) per edit type plus ``"all"``.

    ``image_emb`` (N, D) and ``text_emb`` (T, D) embeddings (normalised here again), ``text_to_image`` (T,) the
    image index of each caption, ``twins`` a list of ``{"a", "b", "edit"}`` (image indices and the edit's name, as
    in the scenes dataset's ``*_twins.json``). An image's score for a set of captions is the mean cosine over those
    captions. A pair counts as correct for ``"i2t"`` when image a scores a's captions above b's and image b scores
    b's above a's; for ``"t2i"`` when a's captions score image a above image b and b's captions score b above a;
    ``"group"`` needs both. Ties are wrong. Edit types appear in the order of their first pair (for the scenes
    twins, which take the edits in turn, the order of ``EDITS``); edit types with no pairs are left out.
    """
    image_emb, text_emb, t2i = as_array(image_emb), as_array(text_emb), as_array(text_to_image).astype(np.int64)
    _check_twins(image_emb, text_emb, twins, t2i, direction)
    img, txt = _unit(image_emb.astype(np.float32)), _unit(text_emb.astype(np.float32))
    n = img.shape[0]
    # The mean cosine over an image's captions is the dot product with their mean embedding.
    count = np.bincount(t2i, minlength=n).astype(img.dtype)  # (N,)
    mean_caption = np.zeros_like(img)
    np.add.at(mean_caption, t2i, txt)
    mean_caption /= np.maximum(count, 1)[:, None]  # (N, D)
    a = np.asarray([int(t["a"]) for t in twins])  # (P,)
    b = np.asarray([int(t["b"]) for t in twins])  # (P,)
    if (count[a] == 0).any() or (count[b] == 0).any():
        raise ValueError("every twin image needs at least one caption")

    def score(i: np.ndarray, j: np.ndarray) -> np.ndarray:  # (P,) image i against the captions of j
        return (img[i] * mean_caption[j]).sum(-1)

    aa, ab, ba, bb = score(a, a), score(a, b), score(b, a), score(b, b)
    i2t = (aa > ab) & (bb > ba)
    t2i_ok = (aa > ba) & (bb > ab)
    ok = {"i2t": i2t, "t2i": t2i_ok, "group": i2t & t2i_ok}[direction].tolist()
    edits = [str(t["edit"]) for t in twins]
    result = {}
    for edit in dict.fromkeys(edits):
        hits = [o for o, e in zip(ok, edits) if e == edit]
        result[edit] = 100.0 * sum(hits) / len(hits)
    result["all"] = 100.0 * sum(ok) / len(ok)
    return result


__all__ = ["NonFiniteEmbeddings", "agreement", "as_array", "check_finite", "few_shot_accuracy", "mean_class_top1",
           "prototype_logits", "retention", "retrieval_metrics", "tip_adapter_logits", "twin_accuracy",
           "zero_shot_accuracy"]
