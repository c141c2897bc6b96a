"""Caption ranking on every image, captioned or not (docs/methods.md#caption_rank).

Most training images have no caption, but the teacher can still say how it ranks the training captions for each
of them: this term teaches the student that ranking, so the uncaptioned images carry text-side knowledge too.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from edgedistill.distill.losses.alignment import caption_bank, usable_rows
from edgedistill.distill.losses.base import Embeddings, LossContext, LossTerm, TermOptions, register_loss
from edgedistill.distill.losses.output import row_kl, teacher_unit, unit


@register_loss("caption_rank")
class CaptionRankLoss(LossTerm):
    """KL between the teacher's and the student's distributions over a bank of caption embeddings, per image.

    Captions C (K, D): the teacher's cached embeddings of a fixed seeded sample of ``bank_size`` training captions
    (the caption bank ``vl_align`` uses; the text tower is frozen, so they never change), else the batch's own
    teacher caption embeddings t_t (P, D) (teacher online: no cache, so no bank). With
    ``p_t = softmax(t^_v C^T / tau)`` and ``p_s = softmax(s^_v C^T / tau)`` (B, K):
    ``L = mean over the B images of KL(p_t || p_s)``. Every image counts, captioned or not: the term needs no
    pairs. None with fewer than 2 usable captions (nothing to rank).
    """

    class Options(TermOptions):
        temperature: float = Field(0.05, gt=0.0, description="softmax temperature of both image-caption "
                                                              "distributions (the benchmark chooses it on the "
                                                              "selection split)")
        bank_size: int = Field(8192, ge=2, description="how many training captions (a fixed seeded sample of "
                                                        "the teacher's cached caption embeddings) each image "
                                                        "ranks")

    options: Options

    def __init__(self, options: Options, context: LossContext) -> None:
        super().__init__(options, context)
        # Non-persistent: follows .to(device), not saved (rebuilt from the cache, the same on resume).
        self.register_buffer("text_bank", caption_bank(context.text_bank, options.bank_size), persistent=False)

    def _captions(self, e: Embeddings) -> Tensor | None:
        """The captions every image ranks (K, D), or None when there are fewer than 2."""
        bank: Tensor | None = self.text_bank
        if bank is not None:
            return bank
        if e.teacher_text is None:
            return None
        texts = usable_rows(e.teacher_text)
        return texts if texts.shape[0] >= 2 else None

    def forward(self, e: Embeddings) -> Tensor | None:
        texts = self._captions(e)
        if texts is None:
            return None
        texts = teacher_unit(texts).to(e.student_image.dtype)                        # (K, D)
        tau = self.options.temperature
        logits_t = teacher_unit(e.teacher_image) @ texts.T / tau                     # (B, K)
        logits_s = unit(e.student_image) @ texts.T / tau                             # (B, K)
        return row_kl(logits_s, logits_t)

    @torch.no_grad()
    def samples(self, e: Embeddings) -> float:
        return float(e.student_image.shape[0]) if self._captions(e) is not None else 0.0  # every image
