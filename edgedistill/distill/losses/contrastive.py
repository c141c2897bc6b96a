"""Contrastive terms: teacher-keyed InfoNCE with a queue (DSMD, docs/methods.md#contrastive), the student's own
CLIP loss (docs/methods.md#clip), and the symmetric image contrastive loss of Li et al. ICCV 2023
(docs/methods.md#image_contrastive)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from edgedistill.distill.losses.base import Embeddings, LossContext, LossTerm, TermOptions, register_loss
from edgedistill.distill.losses.output import (PartsOptions, combine_parts, combined_count, student_text_pairs,
                                               teacher_unit, unit)


def symmetric_ce(logits: Tensor) -> Tensor:
    """(CE(L, arange) + CE(L^T, arange)) / 2 of an (N, N) logit matrix whose positives are on the diagonal."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


@register_loss("contrastive")
class ContrastiveLoss(LossTerm):
    """Dataset-scale term (MoCo/CRD form): InfoNCE of each student embedding against its own teacher embedding.

    For student rows s (N, D) and teacher rows t (N, D): logits = s^ [t^ ; queue]^T / tau (N, N + filled),
    cross-entropy with target i. Negatives are the other in-batch teacher rows plus a queue of teacher
    embeddings from past steps. Images always; captions too when the student has its own text tower, with their
    own queue. The queues are persistent buffers, so a checkpoint resumes them exactly. The modalities combined
    (``combine``: N rows each).
    """

    class Options(PartsOptions):
        temperature: float = Field(0.07, gt=0.0, description="softmax temperature of the InfoNCE logits")
        queue_size: int = Field(4096, ge=0, description="past teacher embeddings kept as extra negatives, per "
                                                        "modality (0 = in-batch negatives only)")

    options: Options
    MODALITIES = ("image", "text")

    def __init__(self, options: Options, context: LossContext) -> None:
        super().__init__(options, context)
        for m in self.MODALITIES:
            # The queue starts empty; only its filled part is used, so no random placeholder keys.
            self.register_buffer(f"{m}_queue", torch.zeros(options.queue_size, context.embed_dim))
            self.register_buffer(f"{m}_queue_fill", torch.zeros((), dtype=torch.long))
            self.register_buffer(f"{m}_queue_ptr", torch.zeros((), dtype=torch.long))

    def queued(self, modality: str) -> Tensor:
        """The filled part of a modality's queue (F, D); row order does not matter to the loss."""
        return getattr(self, f"{modality}_queue")[: int(getattr(self, f"{modality}_queue_fill"))]

    def _info_nce(self, s: Tensor, t: Tensor, modality: str) -> Tensor | None:
        keys = torch.cat([teacher_unit(t), self.queued(modality).to(t.dtype)])
        if keys.shape[0] < 2:  # one candidate only: the loss would be 0 whatever the student does
            return None
        logits = unit(s) @ keys.T / self.options.temperature
        return F.cross_entropy(logits, torch.arange(s.shape[0], device=s.device))

    def _pairs(self, e: Embeddings) -> list[tuple[str, Tensor, Tensor]]:
        pairs = [("image", e.student_image, e.teacher_image)]
        if student_text_pairs(e):
            pairs.append(("text", e.student_text, e.teacher_text))
        return pairs

    def forward(self, e: Embeddings) -> Tensor | None:
        parts = [(self._info_nce(s, t, m), s.shape[0]) for m, s, t in self._pairs(e)]
        return combine_parts([(v, n) for v, n in parts if v is not None], self.options.combine)

    def samples(self, e: Embeddings) -> float:
        # A modality runs when it has at least 2 keys (its rows and its queue), as in _info_nce.
        return combined_count([s.shape[0] for m, s, t in self._pairs(e)
                               if t.shape[0] + int(getattr(self, f"{m}_queue_fill")) >= 2], self.options.combine)

    @torch.no_grad()
    def after_step(self, e: Embeddings) -> None:
        """Enqueue this step's teacher embeddings (after the step, so a batch is never its own queued negative)."""
        for m, _, t in self._pairs(e):
            self._enqueue(m, t)

    def _enqueue(self, modality: str, keys: Tensor) -> None:
        queue = getattr(self, f"{modality}_queue")
        fill, ptr = getattr(self, f"{modality}_queue_fill"), getattr(self, f"{modality}_queue_ptr")
        size = queue.shape[0]
        if size == 0:
            return
        keys = teacher_unit(keys).to(queue.dtype)[-size:]  # a batch larger than the queue keeps its last rows
        n = keys.shape[0]
        queue[(ptr + torch.arange(n, device=queue.device)) % size] = keys  # ring buffer: wraps around
        ptr.copy_((ptr + n) % size)
        fill.clamp_(max=size - n).add_(n)  # fill = min(fill + n, size), in place so the buffer stays the same


@register_loss("clip")
class ClipLoss(LossTerm):
    """Task term: the student's own image-text contrastive (CLIP) loss on the batch's ground-truth pairs.

    logits = exp(logit_scale).clamp(max=100) * s^_v[pair_image] s^_t^T (P, P), or / temperature when the batch has
    no logit scale; symmetric cross-entropy. None when there are no captions or fewer than 2 pairs.
    """

    class Options(TermOptions):
        temperature: float = Field(0.07, gt=0.0, description="fixed temperature, used only when the student has "
                                                              "no learnable logit scale")

    options: Options

    def forward(self, e: Embeddings) -> Tensor | None:
        if e.student_text is None or e.pair_image is None or e.pair_image.numel() < 2:
            return None
        sims = unit(e.student_image)[e.pair_image] @ unit(e.student_text).T
        if e.logit_scale is None:
            return symmetric_ce(sims / self.options.temperature)
        return symmetric_ce(e.logit_scale.exp().clamp(max=100) * sims)  # open_clip's clamp of the scale

    def samples(self, e: Embeddings) -> float:
        return float(e.pair_image.numel())  # the P pairs


@register_loss("image_contrastive")
class ImageContrastiveLoss(LossTerm):
    """Image contrastive term of Li et al. ICCV 2023: M = s^_v t^_v^T / tau (B, B), symmetric cross-entropy.

    None for a batch of one image (nothing to contrast with).
    """

    class Options(TermOptions):
        temperature: float = Field(0.07, gt=0.0, description="softmax temperature (0.07 fixed in the paper)")

    options: Options

    def forward(self, e: Embeddings) -> Tensor | None:
        if e.student_image.shape[0] < 2:
            return None
        return symmetric_ce(unit(e.student_image) @ teacher_unit(e.teacher_image).T / self.options.temperature)
