"""Loss terms: values against independent numpy references, gradients, None cases, the queue, options."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from edgedistill.distill.losses import LOSSES, Embeddings, LossContext, build_losses, validate_term_options
from edgedistill.distill.losses import alignment, contrastive, output  # noqa: F401  (importing registers the terms)

# ------------------------------------------------------------------------------------- numpy references


def nunit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def nlog_softmax(row: np.ndarray) -> np.ndarray:
    m = row.max()
    return row - m - math.log(np.exp(row - m).sum())


def nkl_rows(student: np.ndarray, teacher: np.ndarray) -> float:
    """mean over rows of KL(softmax(teacher row) || softmax(student row))."""
    total = 0.0
    for s_row, t_row in zip(student, teacher):
        ls, lt = nlog_softmax(s_row), nlog_softmax(t_row)
        total += sum(math.exp(lt[j]) * (lt[j] - ls[j]) for j in range(len(lt)))
    return total / len(student)


def nce(logits: np.ndarray, targets: list[int]) -> float:
    return float(np.mean([-nlog_softmax(row)[y] for row, y in zip(logits, targets)]))


def nsym_ce(logits: np.ndarray) -> float:
    n = len(logits)
    return (nce(logits, list(range(n))) + nce(logits.T, list(range(n)))) / 2


def text_is_student_pairs(b: dict[str, Any]) -> bool:
    return b["text_is_student"] and b["st"] is not None


def ref_feature(b: dict[str, Any], distance: str = "l1", reduction: str = "sum") -> float:
    def one(s: np.ndarray, t: np.ndarray) -> float:
        s, t = nunit(s), nunit(t)
        reduce = np.sum if reduction == "sum" else np.mean
        per = [reduce(np.abs(s[i] - t[i]) if distance == "l1" else (s[i] - t[i]) ** 2) for i in range(len(s))]
        return float(np.mean(per))
    parts = [one(b["sv"], b["tv"])] + ([one(b["st"], b["tt"])] if text_is_student_pairs(b) else [])
    return float(np.mean(parts))


def ref_similarity(b: dict[str, Any]) -> float:
    def one(s: np.ndarray, t: np.ndarray) -> float:
        return float(np.mean([1 - s[i] @ t[i] / np.linalg.norm(s[i]) / np.linalg.norm(t[i]) for i in range(len(s))]))
    parts = [one(b["sv"], b["tv"])] + ([one(b["st"], b["tt"])] if text_is_student_pairs(b) else [])
    return float(np.mean(parts))


def ref_relation(b: dict[str, Any], temperature: float = 0.1,
                 pairs: tuple[str, ...] = ("image", "text", "image_text")) -> float | None:
    def self_rel(s: np.ndarray, t: np.ndarray) -> float | None:
        n = len(s)
        if n < 3:
            return None
        s, t = nunit(s), nunit(t)
        rows_s = [[s[i] @ s[j] / temperature for j in range(n) if j != i] for i in range(n)]
        rows_t = [[t[i] @ t[j] / temperature for j in range(n) if j != i] for i in range(n)]
        return nkl_rows(np.array(rows_s), np.array(rows_t))

    parts = []
    if "image" in pairs:
        parts.append(self_rel(b["sv"], b["tv"]))
    if "text" in pairs and text_is_student_pairs(b):
        parts.append(self_rel(b["st"], b["tt"]))
    if "image_text" in pairs and b["st"] is not None and len(b["pair"]) >= 2:
        sv, tv, st, tt = nunit(b["sv"]), nunit(b["tv"]), nunit(b["st"]), nunit(b["tt"])
        rows_s = np.array([[sv[i] @ st[j] for j in range(len(st))] for i in b["pair"]]) / temperature
        rows_t = np.array([[tv[i] @ tt[j] for j in range(len(tt))] for i in b["pair"]]) / temperature
        parts.append(nkl_rows(rows_s, rows_t))
    parts = [p for p in parts if p is not None]
    return float(np.mean(parts)) if parts else None


def nmax_violation(S: np.ndarray, margin: float) -> float:
    n = len(S)
    total = 0.0
    for i in range(n):
        hardest_row = max(S[i, j] for j in range(n) if j != i)
        hardest_col = max(S[j, i] for j in range(n) if j != i)
        total += max(0.0, margin + hardest_row - S[i, i]) + max(0.0, margin + hardest_col - S[i, i])
    return total / n


def ref_hard_negative(b: dict[str, Any], margin: float = 0.2,
                      pairs: tuple[str, ...] = ("student_teacher", "image_text")) -> float | None:
    mats = []
    if "student_teacher" in pairs:
        mats.append(nunit(b["sv"]) @ nunit(b["tv"]).T)
        if text_is_student_pairs(b):
            mats.append(nunit(b["st"]) @ nunit(b["tt"]).T)
    if "image_text" in pairs and b["st"] is not None:
        mats.append(nunit(b["sv"])[b["pair"]] @ nunit(b["st"]).T)
    parts = [nmax_violation(S, margin) for S in mats if len(S) >= 2]
    return float(np.mean(parts)) if parts else None


def ref_info_nce(s: np.ndarray, t: np.ndarray, queue: np.ndarray, temperature: float) -> float:
    s, keys = nunit(s), nunit(np.concatenate([t, queue]) if len(queue) else t)
    return nce(s @ keys.T / temperature, list(range(len(s))))


def ref_contrastive(b: dict[str, Any], temperature: float = 0.07, image_queue: np.ndarray | None = None,
                    text_queue: np.ndarray | None = None) -> float:
    d = b["sv"].shape[1]
    parts = [ref_info_nce(b["sv"], b["tv"], image_queue if image_queue is not None else np.zeros((0, d)),
                          temperature)]
    if text_is_student_pairs(b):
        parts.append(ref_info_nce(b["st"], b["tt"], text_queue if text_queue is not None else np.zeros((0, d)),
                                  temperature))
    return float(np.mean(parts))


def ref_clip(b: dict[str, Any], temperature: float = 0.07) -> float:
    sims = nunit(b["sv"])[b["pair"]] @ nunit(b["st"]).T
    scale = 1 / temperature if b["logit_scale"] is None else min(math.exp(b["logit_scale"]), 100.0)
    return nsym_ce(scale * sims)


def ref_icl(b: dict[str, Any], temperature: float = 0.07) -> float | None:
    """CLIP-KD's interactive contrastive loss: student image vs teacher text (and student text vs teacher image)."""
    if b["st"] is None or len(b["pair"]) < 2:
        return None
    sv, tv, st, tt = nunit(b["sv"]), nunit(b["tv"]), nunit(b["st"]), nunit(b["tt"])
    scale = min(math.exp(float(np.float32(math.log(1 / temperature)))), 100.0)  # the term keeps log scale in float32
    n = len(b["pair"])
    parts = [nce(scale * sv[b["pair"]] @ tt.T, list(range(n)))]
    if text_is_student_pairs(b):
        parts.append(nce(scale * st @ tv[b["pair"]].T, list(range(n))))
    return float(np.mean(parts))


def ref_logit_kl(b: dict[str, Any], teacher_scale: float, temperature: float = 1.0) -> float | None:
    """KL(teacher || student) of the P x P image-text logits, rows and columns, times T^2."""
    if b["st"] is None or len(b["pair"]) < 2:
        return None
    sv, tv, st, tt = nunit(b["sv"]), nunit(b["tv"]), nunit(b["st"]), nunit(b["tt"])
    s_scale = teacher_scale if b["logit_scale"] is None else min(math.exp(b["logit_scale"]), 100.0)
    S = s_scale * sv[b["pair"]] @ st.T / temperature
    T = teacher_scale * tv[b["pair"]] @ tt.T / temperature
    return temperature ** 2 * (nkl_rows(S, T) + nkl_rows(S.T, T.T)) / 2


def ref_image_contrastive(b: dict[str, Any], temperature: float = 0.07) -> float:
    return nsym_ce(nunit(b["sv"]) @ nunit(b["tv"]).T / temperature)


def ref_vl_align(b: dict[str, Any], texts: np.ndarray, k: int = 256, temperature: float = 0.07,
                 labels: np.ndarray | None = None) -> float | None:
    """``labels`` given = filter_wrong on: keep samples whose label is the teacher's argmax."""
    lt_all = nunit(b["tv"]) @ nunit(texts).T / temperature
    ls_all = nunit(b["sv"]) @ nunit(texts).T / temperature
    k = min(k, len(texts))
    rows_s, rows_t = [], []
    for i in range(len(lt_all)):
        if labels is not None and (labels[i] < 0 or int(np.argmax(lt_all[i])) != labels[i]):
            continue
        top = np.argsort(-lt_all[i])[:k]
        rows_s.append(ls_all[i, top])
        rows_t.append(lt_all[i, top])
    return nkl_rows(np.array(rows_s), np.array(rows_t)) if rows_s else None


# ---------------------------------------------------------------------------------------------- batches


def make_batch(B: int = 6, P: int = 6, D: int = 8, text_is_student: bool = True, seed: int = 0,
               logit_scale: float | None = 2.3, dtype: torch.dtype = torch.float64,
               requires_grad: bool = False) -> tuple[Embeddings, dict[str, Any]]:
    """A batch as torch Embeddings and as numpy arrays. P = 0: no captions."""
    rng = np.random.default_rng(seed)
    sv = rng.normal(size=(B, D))
    tv = nunit(rng.normal(size=(B, D)))
    st = rng.normal(size=(P, D)) if P else None
    tt = nunit(rng.normal(size=(P, D))) if P else None
    pair = np.sort(rng.choice(B, size=P, replace=False)) if P else None
    b = {"sv": sv, "tv": tv, "st": st, "tt": tt, "pair": pair, "logit_scale": logit_scale,
         "text_is_student": text_is_student}

    def t(x: np.ndarray | None, grad: bool = False) -> torch.Tensor | None:
        return None if x is None else torch.tensor(x, dtype=dtype, requires_grad=grad)

    e = Embeddings(student_image=t(sv, requires_grad), teacher_image=t(tv, requires_grad),
                   student_text=t(st, requires_grad), teacher_text=t(tt, requires_grad),
                   pair_image=None if pair is None else torch.tensor(pair, dtype=torch.long),
                   logit_scale=None if logit_scale is None else t(np.array(logit_scale), requires_grad),
                   text_is_student=text_is_student)
    return e, b


TEACHER_SCALE = 30.0  # the teacher's logit scale in the tests' contexts (logit_kl)


def term(name: str, D: int = 8, context: LossContext | None = None, **options: Any) -> torch.nn.Module:
    opts = validate_term_options(name, options)
    return build_losses({name: opts}, context or LossContext(embed_dim=D, teacher_logit_scale=TEACHER_SCALE))[name]


# (B, P, text_is_student): all pairs, P < B, and a student without its own text tower
SHAPES = [(6, 6, True), (7, 4, True), (7, 4, False), (5, 2, True)]


def close(got: torch.Tensor | None, want: float | None) -> None:
    if want is None:
        assert got is None
        return
    assert got is not None and got.dim() == 0 and got.dtype == torch.float64
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


# ------------------------------------------------------------------------------------------------ values


@pytest.mark.parametrize("B,P,tis", SHAPES)
@pytest.mark.parametrize("distance", ["l1", "mse"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_feature_matches_numpy(B, P, tis, distance, reduction):
    e, b = make_batch(B, P, text_is_student=tis)
    close(term("feature", distance=distance, reduction=reduction)(e), ref_feature(b, distance, reduction))


def test_feature_mean_reduction_is_torchs_mse_loss_on_normalised_embeddings():
    """CLIP-KD's FD: F.mse_loss between the L2-normalised embeddings (mean over every element)."""
    e, _ = make_batch(6, 0, D=8, seed=60)
    want = torch.nn.functional.mse_loss(torch.nn.functional.normalize(e.student_image, dim=1), e.teacher_image)
    close(term("feature", distance="mse", reduction="mean")(e), want.item())


@pytest.mark.parametrize("B,P,tis", SHAPES + [(6, 1, True), (6, 0, True)])
@pytest.mark.parametrize("temperature", [0.07, 0.005])  # 1 / 0.005 > 100 exercises the clamp
def test_icl_matches_numpy(B, P, tis, temperature):
    e, b = make_batch(B, P, text_is_student=tis, seed=61)
    close(term("icl", temperature=temperature)(e), ref_icl(b, temperature))
    close(term("icl", temperature=temperature, learnable=False)(e), ref_icl(b, temperature))


@pytest.mark.parametrize("B,P,tis", SHAPES + [(6, 1, True), (6, 0, True)])
@pytest.mark.parametrize("logit_scale", [2.3, 5.0, None])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_logit_kl_matches_numpy(B, P, tis, logit_scale, temperature):
    e, b = make_batch(B, P, text_is_student=tis, seed=62, logit_scale=logit_scale)
    close(term("logit_kl", temperature=temperature)(e), ref_logit_kl(b, TEACHER_SCALE, temperature))
    close(term("logit_kl", temperature=temperature, teacher_temperature=0.05)(e),
          ref_logit_kl(b, 1 / 0.05, temperature))


def test_logit_kl_needs_a_teacher_scale_and_is_zero_when_the_student_is_the_teacher():
    with pytest.raises(ValueError, match="teacher_temperature"):
        term("logit_kl", context=LossContext(embed_dim=8))
    e, _ = make_batch(5, 4, seed=63, logit_scale=math.log(TEACHER_SCALE))
    e.student_image, e.student_text = e.teacher_image.clone() * 3, e.teacher_text.clone()  # same directions
    assert term("logit_kl")(e).item() == pytest.approx(0.0, abs=1e-12)


def test_icl_scale_is_learned_or_fixed():
    learned, fixed = term("icl"), term("icl", learnable=False)
    assert [n for n, _ in learned.named_parameters()] == ["log_scale"]
    assert list(fixed.parameters()) == [] and "log_scale" in fixed.state_dict()
    e, _ = make_batch(6, 4, seed=64, dtype=torch.float32)
    learned(e).backward()
    assert learned.log_scale.grad is not None and learned.log_scale.grad.abs() > 0


@pytest.mark.parametrize("B,P,tis", SHAPES)
def test_similarity_matches_numpy(B, P, tis):
    e, b = make_batch(B, P, text_is_student=tis, seed=1)
    close(term("similarity")(e), ref_similarity(b))


@pytest.mark.parametrize("B,P,tis", SHAPES)
@pytest.mark.parametrize("pairs", [("image", "text", "image_text"), ("image",), ("text",), ("image_text",)])
def test_relation_matches_numpy(B, P, tis, pairs):
    e, b = make_batch(B, P, text_is_student=tis, seed=2)
    close(term("relation", temperature=0.2, pairs=list(pairs))(e), ref_relation(b, 0.2, pairs))


@pytest.mark.parametrize("B,P,tis", SHAPES)
@pytest.mark.parametrize("pairs", [("student_teacher", "image_text"), ("student_teacher",), ("image_text",)])
def test_hard_negative_matches_numpy(B, P, tis, pairs):
    e, b = make_batch(B, P, text_is_student=tis, seed=3)
    # a large margin makes every hinge active, a small one leaves some at zero: both branches are compared
    for margin in (0.05, 0.2, 2.0):
        close(term("hard_negative", margin=margin, pairs=list(pairs))(e), ref_hard_negative(b, margin, pairs))


@pytest.mark.parametrize("B,P,tis", SHAPES)
def test_contrastive_matches_numpy_without_and_with_queue(B, P, tis):
    e, b = make_batch(B, P, text_is_student=tis, seed=4)
    loss = term("contrastive", temperature=0.1, queue_size=16).double()  # a float64 queue: exact comparison
    close(loss(e), ref_contrastive(b, 0.1))
    e2, b2 = make_batch(B, P, text_is_student=tis, seed=5)
    loss.after_step(e2)
    text_queue = b2["tt"] if tis else None
    close(loss(e), ref_contrastive(b, 0.1, image_queue=b2["tv"], text_queue=text_queue))


@pytest.mark.parametrize("B,P,tis", SHAPES)
@pytest.mark.parametrize("logit_scale", [2.3, 5.0, None])  # exp(5) > 100 exercises the clamp
def test_clip_matches_numpy(B, P, tis, logit_scale):
    e, b = make_batch(B, P, text_is_student=tis, seed=6, logit_scale=logit_scale)
    close(term("clip", temperature=0.05)(e), ref_clip(b, 0.05))


@pytest.mark.parametrize("B", [2, 7])
def test_image_contrastive_matches_numpy(B):
    e, b = make_batch(B, 0, seed=7)
    close(term("image_contrastive", temperature=0.1)(e), ref_image_contrastive(b, 0.1))


@pytest.mark.parametrize("k", [1, 3, 256])
def test_vl_align_matches_numpy_for_each_candidate_source(k):
    D = 8
    rng = np.random.default_rng(8)
    class_text, text_bank = rng.normal(size=(10, D)), rng.normal(size=(12, D))
    context = LossContext(embed_dim=D, text_bank=torch.tensor(text_bank), class_text=torch.tensor(class_text))
    e, b = make_batch(7, 4, seed=9)
    # without labels: the text bank, even though class texts exist
    close(term("vl_align", k=k, context=context)(e), ref_vl_align(b, text_bank, k))
    # with labels: the class texts
    e.labels = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    close(term("vl_align", k=k, context=context)(e), ref_vl_align(b, class_text, k))
    # no bank and no class texts: the batch's own captions
    close(term("vl_align", k=k, D=D)(e), ref_vl_align(b, b["tt"], k))


def test_vl_align_filter_wrong():
    D = 8
    rng = np.random.default_rng(10)
    class_text = rng.normal(size=(6, D))
    context = LossContext(embed_dim=D, class_text=torch.tensor(class_text))
    e, b = make_batch(8, 3, seed=11)
    argmax = np.argmax(nunit(b["tv"]) @ nunit(class_text).T, axis=1)
    labels = argmax.copy()
    labels[[1, 4]] = (argmax[[1, 4]] + 1) % 6   # the teacher gets these wrong
    labels[6] = -1                              # unlabelled
    e.labels = torch.tensor(labels)
    got = term("vl_align", k=4, filter_wrong=True, context=context)(e)
    close(got, ref_vl_align(b, class_text, 4, labels=labels))
    # without filtering every sample counts, and the result differs
    close(term("vl_align", k=4, context=context)(e), ref_vl_align(b, class_text, 4))
    assert got.item() != pytest.approx(ref_vl_align(b, class_text, 4))
    # a text bank without labels is never filtered
    bank_context = LossContext(embed_dim=D, text_bank=torch.tensor(class_text))
    e.labels = None
    close(term("vl_align", k=4, filter_wrong=True, context=bank_context)(e), ref_vl_align(b, class_text, 4))


# --------------------------------------------------------------------------------------------- gradients

GRAD_TERMS: list[tuple[str, dict[str, Any]]] = [
    ("feature", {"distance": "l1"}), ("feature", {"distance": "mse"}), ("similarity", {}), ("relation", {}),
    ("hard_negative", {"margin": 2.0}), ("contrastive", {"queue_size": 3}), ("clip", {}),
    ("image_contrastive", {}), ("vl_align", {"k": 3}), ("feature", {"distance": "mse", "reduction": "mean"}),
    ("icl", {}), ("logit_kl", {}), ("logit_kl", {"temperature": 2.0}),
]


@pytest.mark.parametrize("name,options", GRAD_TERMS, 
                         ids=lambda x: x if isinstance(x, str) else ",".join(f"{k}={v}" for k, v in x.items()))
@pytest.mark.parametrize("P", [4, 3])
def test_gradcheck_wrt_student(name, options, P):
    e, _ = make_batch(4, P, D=5, seed=12)
    loss = term(name, D=5, **options).double()
    if name == "contrastive":
        loss.after_step(make_batch(4, P, D=5, seed=13)[0])  # the queue takes part in the gradient too

    def f(sv: torch.Tensor, st: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        e.student_image, e.student_text, e.logit_scale = sv, st, scale
        return loss(e)

    inputs = tuple(x.detach().requires_grad_() for x in (e.student_image, e.student_text, e.logit_scale))
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_student_gets_gradients_teacher_none(name):
    e, _ = make_batch(6, 4, seed=14, requires_grad=True, dtype=torch.float32)
    context = None
    if name == "classification":  # needs class texts and labels
        context = LossContext(embed_dim=8, class_text=torch.randn(5, 8))
        e.labels = torch.tensor([0, 1, 2, 3, 4, -1])
    loss = term(name, context=context)
    if name == "contrastive":
        loss.after_step(make_batch(6, 4, seed=15)[0])
    out = loss(e)
    assert out.dtype == torch.float32
    out.backward()
    assert e.teacher_image.grad is None and e.teacher_text.grad is None
    assert e.student_image.grad.abs().sum() > 0
    if name not in ("image_contrastive", "vl_align", "classification"):  # those never look at the student's text
        assert e.student_text.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- None cases


def test_none_cases():
    one, _ = make_batch(1, 0)        # one image, no captions
    two, _ = make_batch(2, 0)
    assert term("hard_negative")(one) is None
    assert term("image_contrastive")(one) is None
    assert term("contrastive")(one) is None          # empty queue, one candidate
    assert term("relation")(two) is None             # image part needs 3 rows
    assert term("relation", pairs=["image_text"])(make_batch(6, 1)[0]) is None
    assert term("relation", pairs=["text"])(make_batch(6, 4, text_is_student=False)[0]) is None
    assert term("hard_negative", pairs=["image_text"])(make_batch(6, 1)[0]) is None
    assert term("clip")(make_batch(6, 0)[0]) is None
    assert term("clip")(make_batch(6, 1)[0]) is None
    assert term("vl_align")(make_batch(6, 0)[0]) is None  # no candidates at all
    for name in ("icl", "logit_kl"):  # pairs: at least 2
        assert term(name)(make_batch(6, 0)[0]) is None and term(name)(make_batch(6, 1)[0]) is None
    # the feature terms always have the image part
    assert term("feature")(one) is not None and term("similarity")(one) is not None


def test_relation_skips_parts_that_cannot_run():
    e, b = make_batch(2, 2, seed=16)  # image and text parts need 3 rows; only image_text runs
    close(term("relation")(e), ref_relation(b, 0.1, ("image_text",)))


def test_vl_align_filter_wrong_none_when_no_sample_remains():
    class_text = torch.randn(5, 8, dtype=torch.float64)
    e, _ = make_batch(4, 2)
    e.labels = torch.full((4,), -1)
    assert term("vl_align", filter_wrong=True, context=LossContext(8, class_text=class_text))(e) is None


# ------------------------------------------------------------------------------------------------- queue


def test_queue_ring_buffer_wraps_and_resumes_from_state_dict():
    D = 4
    loss = term("contrastive", D=D, queue_size=5, temperature=0.1).double()
    keys = [make_batch(3, 2, D=D, seed=20 + i)[0] for i in range(3)]
    loss.after_step(keys[0])
    assert int(loss.image_queue_fill) == 3 and int(loss.image_queue_ptr) == 3
    torch.testing.assert_close(loss.queued("image"), keys[0].teacher_image)
    assert int(loss.text_queue_fill) == 2
    loss.after_step(keys[1])  # 3 + 3 > 5: wraps around, the oldest row is overwritten
    assert int(loss.image_queue_fill) == 5 and int(loss.image_queue_ptr) == 1
    k0, k1 = keys[0].teacher_image, keys[1].teacher_image
    torch.testing.assert_close(loss.image_queue, torch.cat([k1[2:], k0[1:], k1[:2]]))

    e, b = make_batch(4, 3, D=D, seed=30)
    close(loss(e), ref_contrastive(b, 0.1, image_queue=loss.image_queue.numpy(),
                                   text_queue=loss.queued("text").numpy()))

    fresh = term("contrastive", D=D, queue_size=5, temperature=0.1).double()
    fresh.load_state_dict(loss.state_dict())
    assert loss(e).item() == fresh(e).item()
    loss.after_step(keys[2]), fresh.after_step(keys[2])  # and they stay in step afterwards
    assert loss(e).item() == fresh(e).item()
    assert int(fresh.image_queue_ptr) == 4


def test_queue_batch_larger_than_queue_keeps_last_rows():
    loss = term("contrastive", D=4, queue_size=3)
    e, _ = make_batch(5, 0, D=4, seed=40)
    loss.after_step(e)
    assert int(loss.image_queue_fill) == 3
    torch.testing.assert_close(loss.image_queue, e.teacher_image[-3:].float())


def test_queue_text_only_with_student_text_and_zero_size():
    loss = term("contrastive", D=4, queue_size=8)
    loss.after_step(make_batch(3, 2, D=4, text_is_student=False)[0])
    assert int(loss.image_queue_fill) == 3 and int(loss.text_queue_fill) == 0
    empty = term("contrastive", D=4, queue_size=0)
    e, b = make_batch(3, 2, D=4)
    empty.after_step(e)
    close(empty(e), ref_contrastive(b))


# ----------------------------------------------------------------------------------------------- options


def test_option_errors_name_the_key():
    with pytest.raises(ValueError, match="queue_size"):
        validate_term_options("contrastive", {"queue": 5})
    with pytest.raises(ValueError, match="queue_size"):
        validate_term_options("contrastive", {"queue_size": -1})
    with pytest.raises(ValueError, match="distance"):
        validate_term_options("feature", {"distance": "l2"})
    with pytest.raises(ValueError) as err:
        validate_term_options("contrastiv", {})
    assert "did you mean 'contrastive'" in str(err.value)
    for name in LOSSES:
        assert name in str(err.value)


def test_every_option_is_documented():
    for name, cls in LOSSES.items():
        for key, field in cls.Options.model_fields.items():
            assert field.description, f"{name}.{key} has no description"


def test_build_every_term_with_defaults():
    validate_term_options("feature", None)  # loads the built-in terms
    names = sorted(LOSSES)
    assert {"feature", "similarity", "relation", "hard_negative", "contrastive", "clip", "image_contrastive",
            "vl_align", "classification", "icl", "logit_kl"} <= set(names)
    losses = build_losses({n: validate_term_options(n, None) for n in names},
                          LossContext(embed_dim=8, class_text=torch.randn(5, 8), teacher_logit_scale=50.0))
    assert list(losses) == names
    e, _ = make_batch(6, 4, D=8, dtype=torch.float32)
    e.labels = torch.tensor([0, 1, 2, 3, 4, 0])  # classification needs labels (and class texts)
    for name, loss in losses.items():
        out = loss(e)
        assert out is not None and out.dim() == 0 and torch.isfinite(out), name


# ---------------------------------------------------------------------------------------------- sample counts


def expected_samples(name: str, B: int, P: int, tis: bool) -> float:
    """Samples behind each term's value: B per image part, P per caption part, the mean over the parts that run."""
    def mean(parts: list[int]) -> float:
        return sum(parts) / len(parts)
    text = [P] if tis else []
    return {"feature": mean([B] + text), "similarity": mean([B] + text),
            "contrastive": mean([B] * (B >= 2) + [P] * (tis and P >= 2)),  # an empty queue: 2 rows for 2 keys
            "relation": mean([B] * (B >= 3) + [P] * (tis and P >= 3) + [P] * (P >= 2)),
            "hard_negative": mean([B] * (B >= 2) + [P] * (tis and P >= 2) + [P] * (P >= 2)),
            "clip": P, "image_contrastive": B, "vl_align": B, "icl": P, "logit_kl": P}[name]


@pytest.mark.parametrize("B,P,tis", SHAPES + [(7, 1, True), (6, 0, False)])
@pytest.mark.parametrize("name", ["feature", "similarity", "relation", "hard_negative", "contrastive", "clip",
                                  "image_contrastive", "vl_align", "icl", "logit_kl"])
def test_samples_counts_what_each_term_averages_over(name, B, P, tis):
    e, _ = make_batch(B, P, text_is_student=tis, seed=50)
    loss = term(name)
    if loss(e) is None:
        return
    assert loss.samples(e) == pytest.approx(expected_samples(name, B, P, tis))


def test_samples_of_the_filtered_and_labelled_terms():
    D = 8
    class_text = torch.tensor(np.random.default_rng(51).normal(size=(4, D)))
    e, b = make_batch(6, 2, seed=52)
    argmax = np.argmax(nunit(b["tv"]) @ nunit(class_text.numpy()).T, axis=1)
    labels = argmax.copy()
    labels[0] = (argmax[0] + 1) % 4  # the teacher is wrong on image 0
    labels[3] = -1                   # image 3 has no label
    e.labels = torch.tensor(labels)
    context = LossContext(embed_dim=D, class_text=class_text)
    assert term("vl_align", filter_wrong=True, context=context).samples(e) == 4
    assert term("vl_align", context=context).samples(e) == 6
    assert term("classification", context=context).samples(e) == 5
