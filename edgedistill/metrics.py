"""Retrieval and zero-shot evaluation on embeddings; every value is a percentage (0-100) except
``cosine_to_teacher``, which is a plain mean cosine.

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
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def _unit(x: Tensor) -> Tensor:
    """L2-normalised rows, at least float32 (half matmuls lose the ordering of close scores)."""
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    return F.normalize(x, dim=-1)


class NonFiniteEmbeddings(ValueError):
    """Embeddings holding NaN or inf: every score computed from them would be meaningless (NaN ranks first)."""


def check_finite(**embeddings: Tensor) -> None:
    """NonFiniteEmbeddings naming the first (N, D) tensor that holds NaN or inf."""
    for name, x in embeddings.items():
        if x.numel() and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).any(dim=-1).sum()) if x.ndim == 2 else int((~torch.isfinite(x)).sum())
            raise NonFiniteEmbeddings(f"{name} embeddings hold NaN or inf ({bad} of {x.shape[0]} rows)")


def _check_pairs(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor) -> None:
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
    if text_to_image.dtype.is_floating_point or text_to_image.dtype == torch.bool:
        raise ValueError("text_to_image must hold integer image indices")
    if int(text_to_image.min()) < 0 or int(text_to_image.max()) >= image_emb.shape[0]:
        raise ValueError(f"text_to_image holds indices outside 0..{image_emb.shape[0] - 1}")
    check_finite(image=image_emb, text=text_emb)


def _i2t_ranks(img: Tensor, txt: Tensor, t2i: Tensor, chunk: int) -> Tensor:
    """(Q,) long rank of each image that has a caption: wrong captions scoring >= its best own caption."""
    n = img.shape[0]
    has_caption = torch.zeros(n, dtype=torch.bool, device=img.device)
    has_caption[t2i] = True
    queries = has_caption.nonzero().squeeze(1)
    ranks = []
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk]  # (c,)
        scores = img[q] @ txt.T  # (c, T)
        own = t2i.unsqueeze(0) == q.unsqueeze(1)  # (c, T) the query's own captions
        best = scores.masked_fill(~own, float("-inf")).amax(dim=1, keepdim=True)  # (c, 1)
        ranks.append(((scores >= best) & ~own).sum(dim=1))
    return torch.cat(ranks)


def _t2i_ranks(img: Tensor, txt: Tensor, t2i: Tensor, chunk: int) -> Tensor:
    """(T,) long rank of each caption: wrong images scoring >= its own image."""
    ranks = []
    for start in range(0, txt.shape[0], chunk):
        target = t2i[start:start + chunk]  # (c,)
        scores = txt[start:start + chunk] @ img.T  # (c, N)
        rows = torch.arange(len(target), device=img.device)
        own = scores[rows, target].unsqueeze(1)  # (c, 1)
        wrong = torch.ones_like(scores, dtype=torch.bool)
        wrong[rows, target] = False
        ranks.append(((scores >= own) & wrong).sum(dim=1))
    return torch.cat(ranks)


@torch.no_grad()
def retrieval_metrics(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor,
                      ks: tuple[int, ...] = (1, 5, 10), chunk: int = 1024) -> dict[str, float]:
    """Image-text retrieval Recall@K in percent.

    image_emb (N, D), text_emb (T, D), text_to_image (T,) long: the image index of each caption. Embeddings are
    L2-normalised here. Returns ``i2t_r{k}`` and ``t2i_r{k}`` for each k in ks, and ``rsum`` (their sum).
    See the module docstring for the query sets and the tie rule.
    """
    _check_pairs(image_emb, text_emb, text_to_image)
    if chunk < 1:
        raise ValueError("chunk must be at least 1")
    img, txt = _unit(image_emb), _unit(text_emb)
    if txt.dtype != img.dtype:
        img, txt = img.double(), txt.double()
    t2i = text_to_image.to(device=img.device, dtype=torch.long)
    txt = txt.to(img.device)
    ranks = {"i2t": _i2t_ranks(img, txt, t2i, chunk), "t2i": _t2i_ranks(img, txt, t2i, chunk)}
    out: dict[str, float] = {}
    for direction, r in ranks.items():
        for k in ks:
            out[f"{direction}_r{k}"] = 100.0 * (r < k).double().mean().item()
    out["rsum"] = sum(out.values())
    return out


@torch.no_grad()
def zero_shot_accuracy(image_emb: Tensor, class_emb: Tensor, labels: Tensor,
                       chunk: int = 4096) -> dict[str, float]:
    """Zero-shot classification accuracy in percent.

    image_emb (N, D), class_emb (C, D) class-prompt embeddings, labels (N,) long with -1 = unlabelled (ignored).
    The prediction is the class of highest cosine (ties: the lowest class index, as argmax).
    ``zs_top1``: % of labelled images classified right; ``zs_mean_class``: mean over the classes that have
    images of each class's top-1 % (the metric of Li et al. ICCV 2023, robust to unbalanced classes).
    """
    if image_emb.ndim != 2 or class_emb.ndim != 2 or image_emb.shape[1] != class_emb.shape[1]:
        raise ValueError(f"embeddings must be (N, D) and (C, D) of one width; got {tuple(image_emb.shape)} "
                         f"and {tuple(class_emb.shape)}")
    if labels.shape != (image_emb.shape[0],):
        raise ValueError(f"labels must be ({image_emb.shape[0]},); got {tuple(labels.shape)}")
    n_classes = class_emb.shape[0]
    labels = labels.to(device=image_emb.device, dtype=torch.long)
    if bool(((labels < -1) | (labels >= n_classes)).any()):
        raise ValueError(f"labels must be -1 (unlabelled) or in 0..{n_classes - 1}")
    keep = labels >= 0
    if not bool(keep.any()):
        raise ValueError("zero-shot accuracy needs at least one labelled image")
    check_finite(image=image_emb, class_text=class_emb)
    img, cls = _unit(image_emb[keep]), _unit(class_emb).to(image_emb.device)
    if img.dtype != cls.dtype:
        img, cls = img.double(), cls.double()
    y = labels[keep]
    pred = torch.cat([(img[s:s + chunk] @ cls.T).argmax(dim=1) for s in range(0, len(img), chunk)])
    correct = (pred == y).double()
    per_class_hits = torch.zeros(n_classes, dtype=torch.float64, device=y.device).index_add_(0, y, correct)
    per_class_n = torch.bincount(y, minlength=n_classes).double()
    present = per_class_n > 0
    return {"zs_top1": 100.0 * correct.mean().item(),
            "zs_mean_class": 100.0 * (per_class_hits[present] / per_class_n[present]).mean().item()}


def _top1(queries: Tensor, candidates: Tensor, chunk: int) -> Tensor:
    """(Q,) index of each query's highest-scoring candidate (ties: the lowest index)."""
    return torch.cat([(queries[s:s + chunk] @ candidates.T).argmax(dim=1) for s in range(0, len(queries), chunk)])


@torch.no_grad()
def agreement(student_image: Tensor, student_text: Tensor, teacher_image: Tensor, teacher_text: Tensor,
              text_to_image: Tensor, chunk: int = 1024) -> dict[str, float]:
    """How closely the student follows the teacher.

    student_image / teacher_image (N, D), student_text / teacher_text (T, D), text_to_image (T,) long; the student
    must already be at the teacher's width D (ValueError otherwise).

    ``agreement_top1``: % of retrieval queries whose student top-1 neighbour is the teacher's top-1 neighbour; the
    queries are the i2t queries (images with at least one caption, ranking all captions) plus every caption as a
    t2i query (ranking all images); a percentage. ``cosine_to_teacher``: mean over all N images and T texts of
    cos(student, teacher) of the same item; a cosine in [-1, 1], not a percentage (1 = identical directions).
    """
    _check_pairs(student_image, student_text, text_to_image)
    _check_pairs(teacher_image, teacher_text, text_to_image)
    if student_image.shape != teacher_image.shape or student_text.shape != teacher_text.shape:
        raise ValueError(f"student and teacher embeddings must have the same shapes (project the student to the "
                         f"teacher's width first); got images {tuple(student_image.shape)} vs "
                         f"{tuple(teacher_image.shape)}, texts {tuple(student_text.shape)} vs "
                         f"{tuple(teacher_text.shape)}")
    if chunk < 1:
        raise ValueError("chunk must be at least 1")
    dev = student_image.device
    si, st = _unit(student_image), _unit(student_text).to(dev)
    ti, tt = _unit(teacher_image).to(dev), _unit(teacher_text).to(dev)
    if len({si.dtype, st.dtype, ti.dtype, tt.dtype}) > 1:
        si, st, ti, tt = si.double(), st.double(), ti.double(), tt.double()
    t2i = text_to_image.to(device=dev, dtype=torch.long)
    has_caption = torch.zeros(si.shape[0], dtype=torch.bool, device=dev)
    has_caption[t2i] = True
    same_i2t = _top1(si[has_caption], st, chunk) == _top1(ti[has_caption], tt, chunk)
    same_t2i = _top1(st, si, chunk) == _top1(tt, ti, chunk)
    same = torch.cat([same_i2t, same_t2i]).double()
    cos = torch.cat([(si * ti).sum(dim=1), (st * tt).sum(dim=1)]).double()
    return {"agreement_top1": 100.0 * same.mean().item(), "cosine_to_teacher": cos.mean().item()}


def mean_class_top1(pred: Tensor, labels: Tensor, n_classes: int) -> float:
    """Mean over the classes present in ``labels`` (N,) of each class's top-1 % of predictions ``pred`` (N,)."""
    correct = (pred == labels).double()
    hits = torch.zeros(n_classes, dtype=torch.float64, device=labels.device).index_add_(0, labels, correct)
    count = torch.bincount(labels, minlength=n_classes).double()
    present = count > 0
    return 100.0 * (hits[present] / count[present]).mean().item()


def prototype_logits(queries: Tensor, support: Tensor, support_labels: Tensor, n_classes: int) -> Tensor:
    """Cosine to each class prototype (the normalised mean of its normalised support embeddings).

    queries (Q, D), support (S, D), support_labels (S,) long in 0..C-1 -> (Q, C); a class without support
    scores -inf.
    """
    s = _unit(support)
    proto = torch.zeros(n_classes, s.shape[1], dtype=s.dtype, device=s.device).index_add_(0, support_labels, s)
    has = torch.bincount(support_labels, minlength=n_classes) > 0
    logits = _unit(queries).to(s.dtype) @ _unit(proto).T
    return logits.masked_fill(~has.unsqueeze(0), float("-inf"))


def tip_adapter_logits(queries: Tensor, support: Tensor, support_labels: Tensor, n_classes: int,
                       class_emb: Tensor | None = None, alpha: float = 1.0, beta: float = 5.5) -> Tensor:
    """Tip-Adapter (Zhang et al. 2022) without training: ``100 q^ W^T + alpha * exp(-beta (1 - q^ F^T)) L``.

    queries (Q, D), support F (S, D) with labels (S,) as one-hot L (S, C), class_emb W (C, D) the zero-shot class
    texts (left out when None) -> (Q, C).
    """
    q, f = _unit(queries), _unit(support).to(_unit(queries).dtype)
    onehot = F.one_hot(support_labels, n_classes).to(q.dtype)
    logits = alpha * torch.exp(-beta * (1.0 - q @ f.T)) @ onehot
    if class_emb is not None:
        logits = logits + 100.0 * q @ _unit(class_emb).to(q.dtype).T
    return logits


@torch.no_grad()
def few_shot_accuracy(image_emb: Tensor, labels: Tensor, k: int, class_emb: Tensor | None = None,
                      repeats: int = 3, seed: int = 0, alpha: float = 1.0, beta: float = 5.5) -> dict[str, float]:
    """Few-shot classification of new classes from ``k`` support images per class, without training.

    image_emb (N, D), labels (N,) long (-1 = unlabelled, ignored). For each of ``repeats`` seeded draws, k images
    of every class are the support set and the rest of the labelled images the queries; a class needs more than
    k images to take part. Returns the mean over draws of the mean per-class top-1 % of the prototype classifier
    (``prototype``) and of Tip-Adapter (``tip_adapter``; with ``class_emb`` (C, D) its zero-shot part is on),
    and ``classes`` (how many classes took part). Empty dict when no class has more than k images.
    """
    if image_emb.ndim != 2 or labels.shape != (image_emb.shape[0],):
        raise ValueError(f"need (N, D) embeddings and (N,) labels; got {tuple(image_emb.shape)} and "
                         f"{tuple(labels.shape)}")
    labels = labels.long().cpu()
    emb = image_emb.float().cpu()
    check_finite(image=emb, **({"class_text": class_emb} if class_emb is not None else {}))
    n_classes = int(labels.max().item()) + 1 if len(labels) and int(labels.max()) >= 0 else 0
    if class_emb is not None:
        n_classes = max(n_classes, class_emb.shape[0])
    members = {c: np.flatnonzero(labels.numpy() == c) for c in range(n_classes)}
    usable = [c for c, m in members.items() if len(m) > k]
    if not usable:
        return {}
    scores: dict[str, list[float]] = {"prototype": [], "tip_adapter": []}
    for r in range(repeats):
        rng = np.random.default_rng([seed, k, r])
        support, query = [], []
        for c in usable:
            perm = rng.permutation(members[c])
            support.append(perm[:k])
            query.append(perm[k:])
        s_idx, q_idx = torch.from_numpy(np.concatenate(support)), torch.from_numpy(np.concatenate(query))
        s_lab, q_lab = labels[s_idx], labels[q_idx]
        pred = prototype_logits(emb[q_idx], emb[s_idx], s_lab, n_classes).argmax(dim=1)
        scores["prototype"].append(mean_class_top1(pred, q_lab, n_classes))
        tip = tip_adapter_logits(emb[q_idx], emb[s_idx], s_lab, n_classes, class_emb, alpha, beta)
        no_support = torch.bincount(s_lab, minlength=n_classes).unsqueeze(0) == 0
        tip = tip.masked_fill(no_support, float("-inf"))  # the same candidates as the prototypes
        scores["tip_adapter"].append(mean_class_top1(tip.argmax(dim=1), q_lab, n_classes))
    return {**{name: float(np.mean(v)) for name, v in scores.items()}, "classes": float(len(usable))}


def retention(student: dict[str, float] | None, teacher: dict[str, float] | None, key: str = "rsum"
              ) -> dict[str, float] | None:
    """``{key: student / teacher}``, the share of the teacher's score the student keeps; None when either score is
    missing, not finite, or the teacher's is not positive (a ratio of those would read as a pass or a failure)."""
    s, t = (student or {}).get(key), (teacher or {}).get(key)
    if s is None or t is None or not (math.isfinite(s) and math.isfinite(t)) or t <= 0:
        return None
    return {key: s / t}


def _check_twins(image_emb: Tensor, text_emb: Tensor, twins: Sequence[dict], text_to_image: Tensor,
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


def twin_accuracy(image_emb: Tensor, text_emb: Tensor, twins: Sequence[dict], text_to_image: Tensor,
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
    _check_twins(image_emb, text_emb, twins, text_to_image, direction)
    img = F.normalize(image_emb.float(), dim=-1)
    txt = F.normalize(text_emb.float(), dim=-1)
    t2i = text_to_image.long().to(img.device)
    n = img.shape[0]
    # The mean cosine over an image's captions is the dot product with their mean embedding.
    count = torch.bincount(t2i, minlength=n).to(img.dtype)  # (N,)
    mean_caption = torch.zeros_like(img).index_add_(0, t2i, txt) / count.clamp(min=1)[:, None]  # (N, D)
    a = torch.tensor([int(t["a"]) for t in twins], device=img.device)  # (P,)
    b = torch.tensor([int(t["b"]) for t in twins], device=img.device)  # (P,)
    if bool((count[a] == 0).any() or (count[b] == 0).any()):
        raise ValueError("every twin image needs at least one caption")

    def score(i: Tensor, j: Tensor) -> Tensor:  # (P,) image i against the captions of j
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


__all__ = ["NonFiniteEmbeddings", "agreement", "check_finite", "few_shot_accuracy", "mean_class_top1",
           "prototype_logits", "retention", "retrieval_metrics", "tip_adapter_logits", "twin_accuracy",
           "zero_shot_accuracy"]
