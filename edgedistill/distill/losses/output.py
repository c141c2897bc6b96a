"""Output-level distillation terms of DSMD (docs/methods.md#loss-terms): feature, similarity, relation, hard negative.

All terms compare L2-normalised embeddings. Teacher inputs are detached, so a term can never train the teacher.
A term of several parts (an image part on the B images, a caption part on the P captions, ...) combines them by its
``combine`` option: the mean of the parts, or the mean over all their rows (docs/methods.md#coverage).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, ValidationInfo, field_validator
from torch import Tensor

from edgedistill.distill.losses.base import Embeddings, LossTerm, TermOptions, register_loss

Combine = Literal["parts", "rows"]


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


class PartsOptions(TermOptions):
    """Options of a term whose value is made of parts (image rows, caption rows, image-caption rows)."""
    combine: Combine | None = Field(
        None, description="how the parts make the value: 'parts', the mean of the parts' means (a caption row "
                          "then weighs B / P times an image row); 'rows', the mean over all the parts' rows (every "
                          "row alike, the value counts them all); null: 'rows' under a balancer that weighs terms "
                          "by their samples (coverage), else 'parts' (the recipe sets it)")


def combine_parts(parts: list[tuple[Tensor, int]], combine: Combine | None) -> Tensor | None:
    """The value of a term of parts from (part value (scalar), its rows) pairs: with ``combine`` 'rows'
    ``sum_p n_p L_p / sum_p n_p`` (each part weighed by its rows), else the mean of the parts. None when none ran."""
    if not parts:
        return None
    values = torch.stack([v for v, _ in parts])  # (parts,)
    if combine != "rows":
        return values.mean()
    rows = torch.tensor([float(n) for _, n in parts], dtype=values.dtype, device=values.device)
    return (values * rows).sum() / rows.sum()


def combined_count(counts: list[int], combine: Combine | None) -> float:
    """The samples behind a term of parts with these rows per part: their sum ('rows': the value is a mean over
    all of them), else their mean (a mean of parts). 0 when no part ran."""
    return float(sum(counts)) if combine == "rows" else mean_count(counts)


def image_and_text_rows(e: Embeddings) -> list[int]:
    """Rows of a term on images (B) and, with a student text tower, on captions (P)."""
    counts = [e.student_image.shape[0]]
    if student_text_pairs(e):
        counts.append(e.student_text.shape[0])
    return counts


@register_loss("feature")
class FeatureLoss(LossTerm):
    """Instance-scale term: distance between each student embedding and its teacher embedding.

    Per sample ``sum_d |s^ - t^|`` (l1) or ``sum_d (s^ - t^)^2`` (mse) on image embeddings (B, D), and on text
    embeddings (P, D) when the student has its own text tower (``reduction: mean``: that sum divided by D, or by
    ``reference_dim`` when set); mean over samples, then the parts combined (``combine``).
    """

    class Options(PartsOptions):
        distance: Literal["l1", "mse"] = Field(
            "l1", description="per-sample distance between normalised embeddings: 'l1' (DSMD) or 'mse' "
                              "(squared L2, the feature matching of Li et al. ICCV 2023)")
        reduction: Literal["sum", "mean"] = Field(
            "sum", description="over a sample's D dimensions: 'sum' (the distance) or 'mean' (per element, as "
                               "torch's mse_loss: with distance mse, CLIP-KD's FD)")
        reference_dim: PositiveInt | None = Field(
            None, description="with reduction mean: divide a sample's sum by this width instead of its own D, so a "
                              "weight set at that width means the same at any width (512: CLIP-KD's FD weight "
                              "2000 was set on 512-d embeddings); null: D")

        @field_validator("reference_dim")
        @classmethod
        def _only_with_mean(cls, v: int | None, info: ValidationInfo) -> int | None:
            if v is not None and info.data.get("reduction") != "mean":
                raise ValueError("reference_dim needs reduction: mean (it replaces the D of the per-element mean)")
            return v

    options: Options

    def _distance(self, s: Tensor, t: Tensor) -> Tensor:
        """Mean over the N rows of s (N, D) and t (N, D) of each row's distance (scalar)."""
        diff = unit(s) - teacher_unit(t)
        per_dim = diff.abs() if self.options.distance == "l1" else diff.pow(2)  # (N, D)
        if self.options.reduction == "sum":
            per_sample = per_dim.sum(-1)
        elif self.options.reference_dim is None:
            per_sample = per_dim.mean(-1)
        else:
            per_sample = per_dim.sum(-1) / self.options.reference_dim
        return per_sample.mean()

    def forward(self, e: Embeddings) -> Tensor | None:
        parts = [(self._distance(e.student_image, e.teacher_image), e.student_image.shape[0])]
        if student_text_pairs(e):
            parts.append((self._distance(e.student_text, e.teacher_text), e.student_text.shape[0]))
        return combine_parts(parts, self.options.combine)

    def samples(self, e: Embeddings) -> float:
        return combined_count(image_and_text_rows(e), self.options.combine)


@register_loss("similarity")
class SimilarityLoss(LossTerm):
    """Pair-scale term: ``1 - cos(s_i, t_i)`` per sample, mean over the batch.

    On image embeddings (B, D), and on text embeddings (P, D) when the student has its own text tower; the parts
    combined (``combine``).
    """

    class Options(PartsOptions):
        pass

    options: Options

    def forward(self, e: Embeddings) -> Tensor | None:
        def one(s: Tensor, t: Tensor) -> Tensor:
            return (1 - (unit(s) * teacher_unit(t)).sum(-1)).mean()

        parts = [(one(e.student_image, e.teacher_image), e.student_image.shape[0])]
        if student_text_pairs(e):
            parts.append((one(e.student_text, e.teacher_text), e.student_text.shape[0]))
        return combine_parts(parts, self.options.combine)

    def samples(self, e: Embeddings) -> float:
        return combined_count(image_and_text_rows(e), self.options.combine)


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
    (the P captioned images against the P captions, needs P >= 2). The parts that ran combined (``combine``: B
    rows for ``image``, P for the others); None if none did.
    """

    class Options(PartsOptions):
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

    def _rows(self, part: str, e: Embeddings) -> int:
        """Rows of a part: the B images for ``image``, the P captions for the others."""
        return e.student_image.shape[0] if part == "image" else e.student_text.shape[0]

    def forward(self, e: Embeddings) -> Tensor | None:
        return combine_parts([(self._part(p, e), self._rows(p, e)) for p in self._parts(e)], self.options.combine)

    def samples(self, e: Embeddings) -> float:
        return combined_count([self._rows(p, e) for p in self._parts(e)], self.options.combine)


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
    Each part needs >= 2 rows. The parts that ran combined (``combine``: B rows for the image part, P for the
    others); None if none did.
    """

    class Options(PartsOptions):
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

    def _rows(self, part: str, e: Embeddings) -> int:
        """Rows of a part: the B images for ``image``, the P captions for the others."""
        return e.student_image.shape[0] if part == "image" else e.student_text.shape[0]

    def forward(self, e: Embeddings) -> Tensor | None:
        parts = [(max_violation(self._scores(p, e), self.options.margin), self._rows(p, e)) for p in self._parts(e)]
        return combine_parts(parts, self.options.combine)

    def samples(self, e: Embeddings) -> float:
        return combined_count([self._rows(p, e) for p in self._parts(e)], self.options.combine)
