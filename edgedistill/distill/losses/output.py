"""Output-level distillation terms of DSMD (docs/methods.md#loss-terms): feature, similarity, relation, hard negative.

All terms compare L2-normalised embeddings. Teacher inputs are detached, so a term can never train the teacher.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from edgedistill.distill.losses.base import Embeddings, LossTerm, TermOptions, register_loss


def unit(x: Tensor) -> Tensor:
    """Rows of ``x`` (N, D) scaled to unit L2 norm."""
    return F.normalize(x, dim=-1)


def teacher_unit(x: Tensor) -> Tensor:
    """Teacher rows (N, D), unit norm and detached: no gradient ever flows into the teacher."""
    return F.normalize(x.detach(), dim=-1)


def mean_of(parts: list[Tensor]) -> Tensor | None:
    """Mean of the parts that ran, or None when none did."""
    return torch.stack(parts).mean() if parts else None


def student_text_pairs(e: Embeddings) -> bool:
    """Whether the batch has a trainable student text tower with captions and their teacher embeddings."""
    return e.text_is_student and e.student_text is not None and e.teacher_text is not None


def has_captions(e: Embeddings) -> bool:
    return e.student_text is not None and e.pair_image is not None


def mean_count(counts: list[int]) -> float:
    """The samples behind a mean of parts: the mean of the parts' sample counts (0 when no part ran)."""
    return sum(counts) / len(counts) if counts else 0.0


def image_and_text_samples(e: Embeddings) -> float:
    """Samples of a term on images (B) and, with a student text tower, on captions (P): the mean of the two."""
    counts = [e.student_image.shape[0]]
    if student_text_pairs(e):
        counts.append(e.student_text.shape[0])
    return mean_count(counts)


@register_loss("feature")
class FeatureLoss(LossTerm):
    """Instance-scale term: distance between each student embedding and its teacher embedding.

    Per sample ``sum_d |s^ - t^|`` (l1) or ``sum_d (s^ - t^)^2`` (mse) on image embeddings (B, D), and on text
    embeddings (P, D) when the student has its own text tower (``reduction: mean``: the mean over the D
    dimensions instead of the sum); mean over samples, then over modalities.
    """

    class Options(TermOptions):
        distance: Literal["l1", "mse"] = Field(
            "l1", description="per-sample distance between normalised embeddings: 'l1' (DSMD) or 'mse' "
                              "(squared L2, the feature matching of Li et al. ICCV 2023)")
        reduction: Literal["sum", "mean"] = Field(
            "sum", description="over a sample's D dimensions: 'sum' (the distance) or 'mean' (per element, as "
                               "torch's mse_loss: with distance mse, CLIP-KD's FD)")

    options: Options

    def _distance(self, s: Tensor, t: Tensor) -> Tensor:
        diff = unit(s) - teacher_unit(t)
        per_dim = diff.abs() if self.options.distance == "l1" else diff.pow(2)  # (N, D)
        per_sample = per_dim.sum(-1) if self.options.reduction == "sum" else per_dim.mean(-1)
        return per_sample.mean()

    def forward(self, e: Embeddings) -> Tensor | None:
        parts = [self._distance(e.student_image, e.teacher_image)]
        if student_text_pairs(e):
            parts.append(self._distance(e.student_text, e.teacher_text))
        return mean_of(parts)

    def samples(self, e: Embeddings) -> float:
        return image_and_text_samples(e)


@register_loss("similarity")
class SimilarityLoss(LossTerm):
    """Pair-scale term: ``1 - cos(s_i, t_i)`` per sample, mean over the batch.

    On image embeddings (B, D), and on text embeddings (P, D) when the student has its own text tower; the mean
    over modalities.
    """

    class Options(TermOptions):
        pass

    def forward(self, e: Embeddings) -> Tensor | None:
        def one(s: Tensor, t: Tensor) -> Tensor:
            return (1 - (unit(s) * teacher_unit(t)).sum(-1)).mean()

        parts = [one(e.student_image, e.teacher_image)]
        if student_text_pairs(e):
            parts.append(one(e.student_text, e.teacher_text))
        return mean_of(parts)

    def samples(self, e: Embeddings) -> float:
        return image_and_text_samples(e)


def row_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(softmax(teacher) || softmax(student)) of each row of (N, M) logits, mean over the N rows."""
    return F.kl_div(F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits, dim=-1),
                    log_target=True, reduction="batchmean")


def off_diagonal(m: Tensor) -> Tensor:
    """(N, N) -> (N, N - 1): each row without its diagonal entry."""
    n = m.shape[0]
    keep = ~torch.eye(n, dtype=torch.bool, device=m.device)
    return m[keep].view(n, n - 1)


@register_loss("relation")
class RelationLoss(LossTerm):
    """Relation-scale term (DSMD-style reconstruction): match the student's B x B cosine-similarity matrices to
    the teacher's, row by row, by KL(teacher row softmax || student row softmax) at temperature tau.

    Parts: ``image`` (B x B self-similarity of images (B, D), diagonal left out since it is always 1, needs
    B >= 3), ``text`` (same on captions (P, D), only with a student text tower, needs P >= 3), ``image_text``
    (the P captioned images against the P captions, needs P >= 2). Mean over the parts that ran; None if none did.
    """

    class Options(TermOptions):
        temperature: float = Field(0.1, gt=0.0, description="softmax temperature of the similarity rows")
        pairs: list[Literal["image", "text", "image_text"]] = Field(
            ["image", "text", "image_text"], min_length=1,
            description="which similarity matrices to match: image-image, text-text (only with a trainable "
                        "student text tower), image-text (on the batch's ground-truth pairs)")

    options: Options

    def _parts(self, e: Embeddings) -> list[str]:
        """The parts that run on batch ``e`` (a self-similarity row needs >= 2 entries once the diagonal is out)."""
        pairs, parts = self.options.pairs, []
        if "image" in pairs and e.student_image.shape[0] >= 3:
            parts.append("image")
        if "text" in pairs and student_text_pairs(e) and e.student_text.shape[0] >= 3:
            parts.append("text")
        if "image_text" in pairs and has_captions(e) and e.teacher_text is not None and e.pair_image.numel() >= 2:
            parts.append("image_text")
        return parts

    def _self_relation(self, s: Tensor, t: Tensor) -> Tensor:
        s, t = unit(s), teacher_unit(t)
        tau = self.options.temperature
        return row_kl(off_diagonal(s @ s.T) / tau, off_diagonal(t @ t.T) / tau)

    def _part(self, part: str, e: Embeddings) -> Tensor:
        if part == "image":
            return self._self_relation(e.student_image, e.teacher_image)
        if part == "text":
            return self._self_relation(e.student_text, e.teacher_text)
        tau = self.options.temperature
        s_rows = unit(e.student_image)[e.pair_image]
        t_rows = teacher_unit(e.teacher_image)[e.pair_image]
        return row_kl(s_rows @ unit(e.student_text).T / tau, t_rows @ teacher_unit(e.teacher_text).T / tau)

    def forward(self, e: Embeddings) -> Tensor | None:
        return mean_of([self._part(p, e) for p in self._parts(e)])

    def samples(self, e: Embeddings) -> float:
        p = 0 if e.student_text is None else e.student_text.shape[0]
        return mean_count([e.student_image.shape[0] if part == "image" else p for part in self._parts(e)])


def max_violation(scores: Tensor, margin: float) -> Tensor:
    """VSE++ max-violation triplet loss of an (N, N) score matrix whose positives are on the diagonal.

    ``mean_i [relu(margin + max_{j!=i} S_ij - S_ii) + relu(margin + max_{j!=i} S_ji - S_ii)]``.
    """
    n = scores.shape[0]
    positive = scores.diagonal()
    negatives = scores.masked_fill(torch.eye(n, dtype=torch.bool, device=scores.device), float("-inf"))
    row = F.relu(margin + negatives.max(dim=1).values - positive)  # hardest negative for each row item
    col = F.relu(margin + negatives.max(dim=0).values - positive)  # and for each column item
    return (row + col).mean()


@register_loss("hard_negative")
class HardNegativeLoss(LossTerm):
    """Local-scale term: triplet loss with a margin on the hardest in-batch negative (VSE++ max violation).

    Parts: ``student_teacher`` (S = s^ t^T per modality: images (B, D); captions (P, D) when the student has its
    own text tower), ``image_text`` (S = the P captioned student images against the P student captions).
    Each part needs >= 2 rows. Mean over the parts that ran; None if none did.
    """

    class Options(TermOptions):
        margin: float = Field(0.2, ge=0.0, description="triplet margin")
        pairs: list[Literal["student_teacher", "image_text"]] = Field(
            ["student_teacher", "image_text"], min_length=1,
            description="score matrices: student vs teacher embeddings of the same modality, and student "
                        "image vs student text on the batch's ground-truth pairs")

    options: Options

    def _parts(self, e: Embeddings) -> list[str]:
        """The score matrices that run on batch ``e`` (each needs >= 2 rows)."""
        pairs, parts = self.options.pairs, []
        if "student_teacher" in pairs:
            parts += ["image"] if e.student_image.shape[0] >= 2 else []
            parts += ["text"] if student_text_pairs(e) and e.student_text.shape[0] >= 2 else []
        if "image_text" in pairs and has_captions(e) and e.pair_image.numel() >= 2:
            parts.append("image_text")
        return parts

    def _scores(self, part: str, e: Embeddings) -> Tensor:
        if part == "image":
            return unit(e.student_image) @ teacher_unit(e.teacher_image).T  # (B, B)
        if part == "text":
            return unit(e.student_text) @ teacher_unit(e.teacher_text).T  # (P, P)
        return unit(e.student_image)[e.pair_image] @ unit(e.student_text).T  # (P, P)

    def forward(self, e: Embeddings) -> Tensor | None:
        return mean_of([max_violation(self._scores(p, e), self.options.margin) for p in self._parts(e)])

    def samples(self, e: Embeddings) -> float:
        p = 0 if e.student_text is None else e.student_text.shape[0]
        return mean_count([e.student_image.shape[0] if part == "image" else p for part in self._parts(e)])
