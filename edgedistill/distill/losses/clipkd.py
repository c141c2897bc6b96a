"""The CLIP-KD terms beyond feature distillation (Yang et al., CVPR 2024; docs/methods.md#icl and
docs/methods.md#logit_kl): interactive contrastive learning and the KL between image-text logit distributions.
CLIP-KD's FD is ``feature`` with ``distance: mse, reduction: mean`` (``reference_dim: 512`` keeps its weights'
meaning at another width, docs/methods.md#feature)."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from edgedistill.distill.losses.base import Embeddings, LossContext, LossTerm, TermOptions, register_loss
from edgedistill.distill.losses.output import mean_of, row_kl, student_text_pairs, teacher_unit, unit

MAX_SCALE = 100.0  # open_clip's clamp of a CLIP logit scale


def pairs_of(e: Embeddings) -> bool:
    """Whether the batch has at least 2 caption pairs with their teacher text embeddings."""
    return (e.student_text is not None and e.teacher_text is not None and e.pair_image is not None
            and e.pair_image.numel() >= 2)


@register_loss("icl")
class InteractiveContrastiveLoss(LossTerm):
    """Interactive contrastive learning (CLIP-KD): the student's embeddings contrasted with the teacher's of the
    other modality, on the batch's P ground-truth pairs.

    ``image``: ``scale * s^_v[pair_image] t^_t^T`` (P, P); ``text`` (only with a student text tower):
    ``scale * s^_t t^_v[pair_image]^T`` (P, P); cross-entropy with target i for row i, mean over the parts.
    The term's own scalar ``log_scale`` (learned with the student, ``learnable``) starts at ``ln(1 / temperature)``;
    ``scale: raw`` multiplies the logits by it as it is, as CLIP-KD's code does (2.66 at the start), ``scale: exp``
    by ``min(exp(log_scale), 100)``, CLIP's convention (14.3 at the start). None with fewer than 2 pairs.
    """

    class Options(TermOptions):
        temperature: float = Field(0.07, gt=0.0, description="the scale parameter starts at ln(1 / temperature), "
                                                              "as CLIP-KD's (with scale: exp the logits' initial "
                                                              "temperature)")
        learnable: bool = Field(True, description="learn the scale parameter with the student, as CLIP-KD does; "
                                                  "false keeps its start")
        scale: Literal["raw", "exp"] = Field(
            "raw", description="raw: the logits are multiplied by the parameter itself (ln(1 / 0.07) = 2.66 at the "
                               "start), as CLIP-KD's code does; exp: by its exp capped at 100 (1 / 0.07 = 14.3), "
                               "CLIP's convention")

    options: Options

    def __init__(self, options: Options, context: LossContext) -> None:
        super().__init__(options, context)
        # One name in either form (open_clip's for a scale kept as a log; checkpoints keep the key): with scale: raw
        # the value itself multiplies the logits, as CLIP-KD's cross_logit_scale, which is never exp'ed.
        start = torch.tensor(math.log(1.0 / options.temperature))
        if options.learnable:
            self.log_scale = nn.Parameter(start)  # trained by the run's optimizer, without weight decay
        else:
            self.register_buffer("log_scale", start)

    def multiplier(self, dtype: torch.dtype) -> Tensor:
        """The logits' scale (scalar): the parameter as it is (raw) or its exp capped at 100 (exp)."""
        param = self.log_scale.to(dtype)
        return param if self.options.scale == "raw" else param.exp().clamp(max=MAX_SCALE)

    def forward(self, e: Embeddings) -> Tensor | None:
        if not pairs_of(e):
            return None
        scale = self.multiplier(e.student_image.dtype)
        target = torch.arange(e.pair_image.numel(), device=e.student_image.device)
        parts = [F.cross_entropy(scale * unit(e.student_image)[e.pair_image] @ teacher_unit(e.teacher_text).T,
                                 target)]
        if student_text_pairs(e):
            parts.append(F.cross_entropy(
                scale * unit(e.student_text) @ teacher_unit(e.teacher_image)[e.pair_image].T, target))
        return mean_of(parts)

    def samples(self, e: Embeddings) -> float:
        return float(e.pair_image.numel())  # the P pairs


@register_loss("logit_kl")
class LogitKLLoss(LossTerm):
    """Logit distillation of CLIP-KD: KL(teacher || student) of the image-text logit distributions of the batch's
    P ground-truth pairs, image-to-text rows and text-to-image rows.

    ``S = min(exp(logit_scale), 100) * s^_v[pair_image] s^_t^T`` (P, P), the student's own logits;
    ``T = teacher_scale * t^_v[pair_image] t^_t^T`` (P, P); ``L = T_kd^2 * (row_kl(S / T_kd, T / T_kd) +
    row_kl(S^T / T_kd, T^T / T_kd)) / 2``. The teacher's scale is its own logit scale, exp'ed (from the context),
    unless ``teacher_temperature`` is set. Both scales follow CLIP's convention (exp of the learned log scale), as
    CLIP-KD's code does here: its models return ``logit_scale.exp()``. None with fewer than 2 pairs.
    """

    class Options(TermOptions):
        temperature: float = Field(1.0, gt=0.0, description="distillation temperature T_kd dividing both "
                                                             "logits (the loss is multiplied by T_kd^2); "
                                                             "CLIP-KD uses 1")
        teacher_temperature: float | None = Field(None, gt=0.0, description="temperature of the teacher's "
                                                                            "logits; null: the teacher's own "
                                                                            "learned logit scale")

    options: Options

    def __init__(self, options: Options, context: LossContext) -> None:
        super().__init__(options, context)
        if options.teacher_temperature is not None:
            self.teacher_scale = 1.0 / options.teacher_temperature
        elif context.teacher_logit_scale is not None:
            self.teacher_scale = float(context.teacher_logit_scale)
        else:
            raise ValueError("loss term logit_kl needs the teacher's logit scale, and this teacher has none; "
                             "set loss.terms.logit_kl.teacher_temperature")

    def forward(self, e: Embeddings) -> Tensor | None:
        if not pairs_of(e):
            return None
        t_scale = torch.tensor(self.teacher_scale, dtype=e.student_image.dtype, device=e.student_image.device)
        s_scale = t_scale if e.logit_scale is None else e.logit_scale.exp().clamp(max=MAX_SCALE)
        tau = self.options.temperature
        student = s_scale * unit(e.student_image)[e.pair_image] @ unit(e.student_text).T / tau  # (P, P)
        teacher = t_scale * teacher_unit(e.teacher_image)[e.pair_image] @ teacher_unit(e.teacher_text).T / tau
        return tau * tau * (row_kl(student, teacher) + row_kl(student.T, teacher.T)) / 2

    def samples(self, e: Embeddings) -> float:
        return float(e.pair_image.numel())  # the P pairs
