"""Loss terms: values against independent numpy references, gradients, None cases, the queue, options."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from edgedistill.distill.losses import LOSSES, Embeddings, LossContext, build_losses, validate_term_options
from edgedistill.distill.losses import alignment, contrastive, output, ranking  # noqa: F401  (registers terms)

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


def ref_icl(b: dict[str, Any], temperature: float = 0.07, scale_form: str = "raw") -> float | None:
    """CLIP-KD's interactive contrastive loss: student image vs teacher text (and student text vs teacher image).

    The logits' multiplier is the parameter ln(1 / temperature) itself (``raw``, CLIP-KD's code) or its exp capped
    at 100 (``exp``, CLIP's convention)."""
    if b["st"] is None or len(b["pair"]) < 2:
        return None
    sv, tv, st, tt = nunit(b["sv"]), nunit(b["tv"]), nunit(b["st"]), nunit(b["tt"])
    param = float(np.float32(math.log(1 / temperature)))  # the term keeps its parameter in float32
    scale = param if scale_form == "raw" else min(math.exp(param), 100.0)
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



def ref_caption_rank(b: dict[str, Any], captions: np.ndarray, temperature: float = 0.05) -> float:
    """mean over all B images of KL(softmax(t^_v C^^T / tau) || softmax(s^_v C^^T / tau)); C = the captions."""
    c = nunit(captions)
    return nkl_rows(nunit(b["sv"]) @ c.T / temperature, nunit(b["tv"]) @ c.T / temperature)

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
@pytest.mark.parametrize("temperature", [0.07, 0.005])  # exp: 1 / 0.005 > 100 exercises the cap
def test_icl_matches_numpy(B, P, tis, temperature):
    e, b = make_batch(B, P, text_is_student=tis, seed=61)
    close(term("icl", temperature=temperature)(e), ref_icl(b, temperature, "raw"))  # the default: CLIP-KD's code
    for scale in ("raw", "exp"):
        close(term("icl", temperature=temperature, scale=scale)(e), ref_icl(b, temperature, scale))
        close(term("icl", temperature=temperature, scale=scale, learnable=False)(e), ref_icl(b, temperature, scale))


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



# ------------------------------------------------------------------------------------------- caption_rank


def bank_context(K: int = 12, D: int = 8, seed: int = 70) -> tuple[LossContext, np.ndarray]:
    """A context with a caption bank of K raw (not normalised) teacher caption embeddings, and the bank."""
    bank = np.random.default_rng(seed).normal(size=(K, D))
    return LossContext(embed_dim=D, text_bank=torch.tensor(bank)), bank


def test_caption_rank_golden_value():
    """t^_v = e1, s^_v = e2 (scaled: the term normalises), C = {e1, e2}, tau = 0.5: logits_t = [2, 0],
    logits_s = [0, 2], so KL(p_t || p_s) = (sigmoid(2) - sigmoid(-2)) * 2 = 2 tanh(1)."""
    bank = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    e = Embeddings(student_image=torch.tensor([[0.0, 5.0]], dtype=torch.float64),
                   teacher_image=torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    got = term("caption_rank", D=2, context=LossContext(embed_dim=2, text_bank=bank), temperature=0.5)(e)
    close(got, 2 * math.tanh(1.0))
    assert 2 * math.tanh(1.0) == pytest.approx(1.5231883119115295, rel=1e-15)


@pytest.mark.parametrize("B,P,tis", SHAPES + [(6, 0, True), (1, 0, False)])
@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_caption_rank_matches_numpy_on_the_bank_for_every_image(B, P, tis, temperature):
    context, bank = bank_context()
    e, b = make_batch(B, P, text_is_student=tis, seed=71)
    loss = term("caption_rank", context=context, temperature=temperature)
    close(loss(e), ref_caption_rank(b, bank, temperature))
    assert loss.samples(e) == B  # every image, captioned or not


def test_caption_rank_without_a_bank_ranks_the_batch_captions():
    e, b = make_batch(7, 4, seed=72)  # teacher online: no cache, no bank
    close(term("caption_rank", temperature=0.1)(e), ref_caption_rank(b, b["tt"], 0.1))


def test_caption_rank_runs_on_a_batch_without_any_caption():
    context, bank = bank_context()
    e, b = make_batch(5, 0, seed=73)
    assert e.student_text is None and e.teacher_text is None and e.pair_image is None
    e.student_image.requires_grad_()
    loss = term("caption_rank", context=context)
    out = loss(e)
    close(out, ref_caption_rank(b, bank))
    out.backward()
    assert e.student_image.grad.abs().sum() > 0 and loss.samples(e) == 5


def test_caption_rank_is_zero_for_the_teacher_and_positive_otherwise():
    context, _ = bank_context()
    e, _ = make_batch(6, 0, seed=74)
    loss = term("caption_rank", context=context)
    assert loss(e).item() > 1e-3
    e.student_image = e.teacher_image.clone() * 3  # the teacher's directions, another norm
    assert loss(e).item() == pytest.approx(0.0, abs=1e-12)


def test_caption_rank_is_invariant_to_a_common_scaling_of_the_embeddings():
    context, bank = bank_context()
    e, _ = make_batch(6, 3, seed=75)
    want = term("caption_rank", context=context)(e).item()
    scaled = LossContext(embed_dim=8, text_bank=torch.tensor(bank) * 7.5)
    e.student_image, e.teacher_image = e.student_image * 0.01, e.teacher_image * 40
    assert term("caption_rank", context=scaled)(e).item() == pytest.approx(want, rel=1e-12)


def test_caption_rank_bank_never_holds_nan_or_zero_rows():
    context, bank = bank_context(K=10)
    dirty = torch.tensor(np.concatenate([bank[:4], np.full((1, 8), np.nan), bank[4:7], np.zeros((1, 8)),
                                         np.array([[np.inf] + [0.0] * 7]), bank[7:]]))
    e, b = make_batch(6, 0, seed=76)
    loss = term("caption_rank", context=LossContext(embed_dim=8, text_bank=dirty))
    assert loss.text_bank.shape == (10, 8) and torch.isfinite(loss.text_bank).all()
    close(loss(e), ref_caption_rank(b, bank))
    # batch captions (no bank) are cleaned the same way
    e2, b2 = make_batch(6, 4, seed=77)
    e2.teacher_text[1] = float("nan")
    close(term("caption_rank")(e2), ref_caption_rank(b2, b2["tt"][[0, 2, 3]]))
    # a bank with fewer than 2 usable rows is no bank (the batch's captions are used)
    one = torch.tensor(np.concatenate([bank[:1], np.full((3, 8), np.nan)]))
    close(term("caption_rank", context=LossContext(embed_dim=8, text_bank=one))(e2),
          ref_caption_rank(b2, b2["tt"][[0, 2, 3]]))


def test_a_bank_larger_than_bank_size_is_sampled_the_same_way_for_caption_rank_and_vl_align():
    """The run draws one bank at the largest bank_size of its terms; a term with a smaller one keeps a fixed
    uniform sample of it (the same rows for every term with that size)."""
    context, bank = bank_context(K=20)
    rank, align = term("caption_rank", context=context, bank_size=7), term("vl_align", context=context, bank_size=7)
    assert rank.text_bank.shape == (7, 8)
    torch.testing.assert_close(rank.text_bank, align.text_bank)
    rows = [int(np.argmin(np.linalg.norm(nunit(bank) - r, axis=1))) for r in rank.text_bank.numpy()]
    assert len(set(rows)) == 7 and rows == sorted(rows)  # distinct bank rows, in bank order
    assert rows != list(range(7))  # a sample of the whole bank, not its first rows
    e, b = make_batch(5, 0, seed=78)
    close(rank(e), ref_caption_rank(b, bank[rows]))
    # a bank_size of at least the bank keeps it whole
    torch.testing.assert_close(term("caption_rank", context=context).text_bank, torch.tensor(nunit(bank)))


def test_caption_rank_gradcheck_on_the_bank_without_captions():
    context, _ = bank_context(K=6, D=5)
    e, _ = make_batch(4, 0, D=5, seed=79)
    loss = term("caption_rank", D=5, context=context, temperature=0.2).double()

    def f(sv: torch.Tensor) -> torch.Tensor:
        e.student_image = sv
        return loss(e)

    assert torch.autograd.gradcheck(f, (e.student_image.detach().requires_grad_(),))

# --------------------------------------------------------------------------------------------- gradients

GRAD_TERMS: list[tuple[str, dict[str, Any]]] = [
    ("feature", {"distance": "l1"}), ("feature", {"distance": "mse"}), ("similarity", {}), ("relation", {}),
    ("hard_negative", {"margin": 2.0}), ("contrastive", {"queue_size": 3}), ("clip", {}),
    ("image_contrastive", {}), ("vl_align", {"k": 3}), ("feature", {"distance": "mse", "reduction": "mean"}),
    ("icl", {}), ("logit_kl", {}), ("logit_kl", {"temperature": 2.0}), ("caption_rank", {}),
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
    if name not in ("image_contrastive", "vl_align", "classification", "caption_rank"):  # never the student's text
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
    assert term("caption_rank")(make_batch(6, 0)[0]) is None  # no bank and no captions: nothing to rank
    assert term("caption_rank")(make_batch(6, 1)[0]) is None  # one caption: the KL would be 0 whatever
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
            "clip": P, "image_contrastive": B, "vl_align": B, "icl": P, "logit_kl": P, "caption_rank": B}[name]


@pytest.mark.parametrize("B,P,tis", SHAPES + [(7, 1, True), (6, 0, False)])
@pytest.mark.parametrize("name", ["feature", "similarity", "relation", "hard_negative", "contrastive", "clip",
                                  "image_contrastive", "vl_align", "icl", "logit_kl", "caption_rank"])
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


# ------------------------------------------------------------------ icl's scale: CLIP-KD's raw parameter


def identity_pairs() -> Embeddings:
    """2 images, both captioned, D = 2: each student image is its caption's teacher embedding, so ICL's image
    logits are ``scale * I`` and each row's cross-entropy is ``log(1 + exp(-scale))``."""
    eye = torch.eye(2, dtype=torch.float64)
    return Embeddings(student_image=eye.clone(), teacher_image=eye.clone(), student_text=eye.clone(),
                      teacher_text=eye.clone(), pair_image=torch.tensor([0, 1]))


def test_icl_multiplies_by_the_raw_parameter_by_default_as_clip_kd_does():
    """CLIP-KD's KDClipLoss: logits = cross_logit_scale * s^ t^T with cross_logit_scale = ln(1 / 0.07), never
    exp'ed: CE = log(1 + exp(-ln(1 / 0.07))) = log(1 + 0.07) = log(1.07). CLIP's convention (scale: exp)
    multiplies by exp(ln(1 / 0.07)) = 1 / 0.07 = 14.29: CE = log(1 + exp(-14.29)), about 6.2e-7."""
    e = identity_pairs()
    param = float(np.float32(math.log(1 / 0.07)))  # kept in float32
    raw = term("icl", D=2)
    assert raw.log_scale.item() == pytest.approx(2.6592600369327779, rel=1e-7)  # ln(1 / 0.07), learned
    assert raw(e).item() == pytest.approx(math.log1p(math.exp(-param)), rel=1e-12)
    assert raw(e).item() == pytest.approx(math.log(1.07), rel=1e-6)
    exp = term("icl", D=2, scale="exp")
    assert exp(e).item() == pytest.approx(math.log1p(math.exp(-math.exp(param))), rel=1e-6)
    assert exp(e).item() < 1e-6 < raw(e).item()


def test_icl_raw_scale_is_learned_and_starts_at_the_log_of_one_over_temperature():
    e, _ = make_batch(6, 4, seed=65, dtype=torch.float32)
    for scale in ("raw", "exp"):
        learned = term("icl", scale=scale, temperature=0.05)
        assert learned.log_scale.item() == pytest.approx(math.log(1 / 0.05), rel=1e-6)
        learned(e).backward()
        assert learned.log_scale.grad is not None and learned.log_scale.grad.abs() > 0
    with pytest.raises(ValueError, match="scale"):
        validate_term_options("icl", {"scale": "exp2"})


# ----------------------------------------------------------------- FD's per-element mean at another width


def rotated_rows(D: int, angle: float, n: int = 4) -> Embeddings:
    """n teacher rows e_{2i} and student rows turned by ``angle`` towards e_{2i+1} (scaled by 3: the term
    normalises): every pair is ``angle`` apart, so ||s^ - t^||^2 = 2 - 2 cos(angle) at any width D >= 2n."""
    t = torch.zeros(n, D, dtype=torch.float64)
    s = torch.zeros(n, D, dtype=torch.float64)
    for i in range(n):
        t[i, 2 * i] = 1.0
        s[i, 2 * i], s[i, 2 * i + 1] = 3 * math.cos(angle), 3 * math.sin(angle)
    return Embeddings(student_image=s, teacher_image=t)


def test_fd_of_one_angle_is_four_times_larger_at_128_than_at_512_dims_unless_reduced_per_512():
    """CLIP-KD's FD (mse_loss of normalised embeddings: the mean over D) with its weight 2000 was set at 512-d. The
    same angle between student and teacher gives (2 - 2 cos) / D: 4 x larger at 128-d. reference_dim: 512 divides
    the per-sample sum by 512 at any width, so the weight means what it meant at 512-d."""
    angle = 0.3
    squared = 2 - 2 * math.cos(angle)
    mean = {D: term("feature", D=D, distance="mse", reduction="mean")(rotated_rows(D, angle)).item()
            for D in (128, 512)}
    assert mean[128] == pytest.approx(squared / 128, rel=1e-12) and mean[512] == pytest.approx(squared / 512, rel=1e-12)
    assert mean[128] / mean[512] == pytest.approx(4.0, rel=1e-12)
    per_512 = {D: term("feature", D=D, distance="mse", reduction="mean", reference_dim=512)(rotated_rows(D, angle))
               .item() for D in (128, 512, 768)}
    for D, value in per_512.items():
        assert value == pytest.approx(squared / 512, rel=1e-12), D
    assert per_512[512] == pytest.approx(mean[512], rel=1e-12)  # at 512-d it is CLIP-KD's mse_loss


@pytest.mark.parametrize("B,P,tis", SHAPES)
@pytest.mark.parametrize("distance", ["l1", "mse"])
def test_feature_reference_dim_divides_the_per_sample_sum_by_it(B, P, tis, distance):
    e, b = make_batch(B, P, text_is_student=tis, seed=66)
    close(term("feature", distance=distance, reduction="mean", reference_dim=512)(e),
          ref_feature(b, distance, "sum") / 512)


def test_feature_reference_dim_needs_the_mean_reduction():
    with pytest.raises(ValueError, match="reference_dim"):
        validate_term_options("feature", {"reference_dim": 512})  # reduction: sum (the default)
    with pytest.raises(ValueError, match="reference_dim"):
        validate_term_options("feature", {"reduction": "mean", "reference_dim": 0})


# --------------------------------------------------- combine: rows, every row of a term of parts counts alike


def row_parts(name: str, b: dict[str, Any]) -> list[tuple[float, int]]:
    """(numpy value, rows) of each part of a term of parts, from the references above on one part at a time."""
    image_only = {**b, "text_is_student": False}
    text_as_image = {**b, "sv": b["st"], "tv": b["tt"], "st": None, "tt": None, "pair": None,
                     "text_is_student": False}
    B, P, tis = len(b["sv"]), 0 if b["st"] is None else len(b["st"]), text_is_student_pairs(b)
    parts: list[tuple[float | None, int]] = []
    if name in ("feature", "similarity", "contrastive"):
        ref = {"feature": ref_feature, "similarity": ref_similarity, "contrastive": ref_contrastive}[name]
        parts.append((ref({**image_only, "st": None}), B))
        if tis:
            parts.append((ref(text_as_image), P))
    elif name == "relation":
        parts.append((ref_relation(image_only, 0.1, ("image",)), B))
        if tis:
            parts.append((ref_relation(b, 0.1, ("text",)), P))
        parts.append((ref_relation(b, 0.1, ("image_text",)), P))
    else:  # hard_negative
        parts.append((ref_hard_negative({**image_only, "st": None}, 0.2, ("student_teacher",)), B))
        if tis:
            parts.append((ref_hard_negative(text_as_image, 0.2, ("student_teacher",)), P))
        parts.append((ref_hard_negative(b, 0.2, ("image_text",)), P))
    return [(v, n) for v, n in parts if v is not None]


@pytest.mark.parametrize("B,P,tis", SHAPES)
@pytest.mark.parametrize("name", ["feature", "similarity", "relation", "hard_negative", "contrastive"])
def test_combine_rows_is_the_mean_over_every_row_of_the_parts(name, B, P, tis):
    """combine: rows weighs each part by its rows (one caption row weighs what one image row does) and counts them
    all; combine: parts is the plain mean of the parts, as before."""
    e, b = make_batch(B, P, text_is_student=tis, seed=67)
    parts = row_parts(name, b)
    rows = sum(n for _, n in parts)
    by_rows = term(name, combine="rows")
    close(by_rows(e), sum(v * n for v, n in parts) / rows)
    assert by_rows.samples(e) == rows
    by_parts = term(name, combine="parts")
    close(by_parts(e), float(np.mean([v for v, _ in parts])))
    assert by_parts.samples(e) == pytest.approx(rows / len(parts))
    close(term(name)(e), float(np.mean([v for v, _ in parts])))  # outside a recipe null is 'parts'


def test_a_caption_row_of_a_term_of_parts_weighs_like_an_image_row_with_combine_rows():
    """32 images, 2 captioned, a student text tower: feature (mse) with one student row 0.3 rad off its teacher,
    either an image row or a caption row. As a mean of two parts the caption row weighs 32 / 2 = 16 x the image
    row; with combine: rows both weigh 1 / 34."""
    B, P, D, angle = 32, 2, 8, 0.3
    d = 2 - 2 * math.cos(angle)

    def one_row_off(kind: str) -> Embeddings:
        t_img = torch.zeros(B, D, dtype=torch.float64)
        t_img[:, 0] = 1.0
        s_img, t_txt = t_img.clone(), t_img[:P].clone()
        s_txt = t_txt.clone()
        off = s_img if kind == "image" else s_txt
        off[0, 0], off[0, 1] = math.cos(angle), math.sin(angle)
        return Embeddings(student_image=s_img, teacher_image=t_img, student_text=s_txt, teacher_text=t_txt,
                          pair_image=torch.arange(P), text_is_student=True)

    parts, rows = term("feature", distance="mse", combine="parts"), term("feature", distance="mse", combine="rows")
    image, caption = one_row_off("image"), one_row_off("caption")
    assert parts(caption).item() / parts(image).item() == pytest.approx(B / P, rel=1e-9)  # 16
    assert rows(caption).item() == pytest.approx(rows(image).item(), rel=1e-9)
    assert rows(image).item() == pytest.approx(d / (B + P), rel=1e-9) and rows.samples(image) == B + P
