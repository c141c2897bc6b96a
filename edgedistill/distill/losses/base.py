"""The loss-term interface: the batch a term sees (``Embeddings``), what it may use when built
(``LossContext``), its base class and options, and the registry the terms are named in.

A term's ``forward`` returns its value (a scalar) or None; its ``samples`` says how many samples that value
averages over, so a balancer can weigh a term on a few captioned pairs below one on every image."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from edgedistill.core.registry import ComponentOptions, Registry


class TermOptions(ComponentOptions):
    """Options every term has; a term's own options subclass this."""
    weight: float = Field(1.0, ge=0.0, description="base weight; adaptive balancers multiply their weight by it")


@dataclass
class Embeddings:
    """One training batch, every embedding at the teacher's width D (a student of another width is projected).

    B images; P <= B of them come with a caption (one caption each, drawn per step).
    Teacher embeddings are L2-normalised and carry no gradient; student embeddings are raw (not normalised).
    """
    student_image: Tensor                   # (B, D)
    teacher_image: Tensor                   # (B, D)
    student_text: Tensor | None = None      # (P, D): the student's text embeddings of the P captions
    teacher_text: Tensor | None = None      # (P, D)
    pair_image: Tensor | None = None        # (P,) long: which of the B images each caption belongs to
    logit_scale: Tensor | None = None       # scalar: the student's learnable log logit scale (open_clip's, not exp'ed)
    text_is_student: bool = False           # True when student_text comes from a trainable student text tower
    labels: Tensor | None = None            # (B,) long class index, -1 = no label (classification, vl_align)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossContext:
    """What a term may need at construction time."""
    embed_dim: int
    text_bank: Tensor | None = None         # (K, D) teacher text embeddings, L2-normalised (vl_align's candidates)
    class_text: Tensor | None = None        # (C, D) teacher class-prompt embeddings when labels exist
    teacher_logit_scale: float | None = None  # the teacher's CLIP logit scale, exp'ed (logit_kl's teacher logits)


class LossTerm(nn.Module):
    name: ClassVar[str] = ""
    Options: ClassVar[type[TermOptions]] = TermOptions

    def __init__(self, options: TermOptions, context: LossContext) -> None:
        super().__init__()
        self.options = options
        self.context = context

    def forward(self, e: Embeddings) -> Tensor | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def samples(self, e: Embeddings) -> float:
        """How many samples this term's value averages over in batch ``e`` (the ``coverage`` balancer weighs
        terms by it): the B images by default; a term on caption pairs counts its P pairs, and a term made of
        parts the sum of their rows (``combine: rows``, a mean over all of them) or the mean of their counts
        (``combine: parts``, a mean of the parts). Only asked when the term returned a value."""
        return float(e.student_image.shape[0])

    @torch.no_grad()
    def after_step(self, e: Embeddings) -> None:
        """Called once after each optimizer step with that step's batch (e.g. to enqueue teacher keys)."""


LOSSES = Registry("loss term")
register_loss = LOSSES.register
