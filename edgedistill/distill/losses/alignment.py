"""Vision-language alignment and classification terms of Li et al. ICCV 2023.

docs/methods.md#vl_align and docs/methods.md#classification describe them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from edgedistill.distill.losses.base import Embeddings, LossContext, LossTerm, TermOptions, register_loss
from edgedistill.distill.losses.output import row_kl, teacher_unit, unit

BANK_SAMPLE_SEED = 0  # the fixed sample a term with a smaller bank_size takes of the shared caption bank


def usable_rows(texts: Tensor) -> Tensor:
    """The rows of ``texts`` (K, D) with finite, non-zero embeddings (K', D), detached: a NaN or an all-zero
    caption embedding would make every logit row NaN or be a meaningless candidate."""
    texts = texts.detach()
    return texts[torch.isfinite(texts).all(dim=1) & (texts.abs().sum(dim=1) > 0)]


def caption_bank(bank: Tensor | None, size: int) -> Tensor | None:
    """A term's candidate captions from the context's text bank (K, D) -> (min(K', size), D), L2-normalised.

    The run draws one bank (a seeded sample of the cached training captions) at the largest ``bank_size`` of its
    terms (``train/build.py``); a term keeps the usable rows (``usable_rows``) and, when more than its own
    ``size`` remain, a fixed uniform sample of ``size`` of them, in bank order. None without a bank or with fewer
    than 2 usable rows (nothing to rank).
    """
    if bank is None:
        return None
    bank = usable_rows(bank)
    if bank.shape[0] > size:
        pick = torch.randperm(bank.shape[0], generator=torch.Generator().manual_seed(BANK_SAMPLE_SEED))[:size]
        bank = bank[pick.sort().values.to(bank.device)]
    return teacher_unit(bank) if bank.shape[0] >= 2 else None


@register_loss("vl_align")
class VLAlignLoss(LossTerm):
    """Keep the student's image-to-text alignment coherent with the teacher's.

    Candidate texts T (K, D): the teacher's class-prompt embeddings when the batch has labels, else the context's
    text bank, else the batch's own teacher caption embeddings. With logits_t = t^_v T^T / tau and
    logits_s = s^_v T^T / tau (B, K): forward KL(softmax(teacher) || softmax(student)) over each sample's teacher
    top-k candidates, mean over samples. None without candidates (or with fewer than 2, where the KL is 0).
    """

    class Options(TermOptions):
        k: int = Field(256, ge=1, description="compare the distributions over each image's teacher top-k texts "
                                              "(all candidates when there are fewer)")
        temperature: float = Field(0.07, gt=0.0, description="softmax temperature of the image-text logits")
        filter_wrong: bool = Field(False, description="with class texts and labels: skip samples the teacher "
                                                      "misclassifies and unlabelled samples (label -1)")
        bank_size: int = Field(8192, ge=2, description="without class texts: how many training captions (a fixed "
                                                        "seeded sample) the teacher's top-k is taken from")

    options: Options

    def __init__(self, options: Options, context: LossContext) -> None:
        super().__init__(options, context)
        # Non-persistent buffers: they follow .to(device) but are not saved (they are rebuilt from the teacher).
        bank = context.class_text
        self.register_buffer("class_text", None if bank is None else teacher_unit(bank), persistent=False)
        self.register_buffer("text_bank", caption_bank(context.text_bank, options.bank_size), persistent=False)

    def _candidates(self, e: Embeddings) -> tuple[Tensor | None, bool]:
        """(the candidate texts (K, D) or None, whether they are class texts)."""
        class_text: Tensor | None = self.class_text
        text_bank: Tensor | None = self.text_bank
        by_class = class_text is not None and e.labels is not None
        texts = class_text if by_class else text_bank if text_bank is not None else e.teacher_text
        return (texts if texts is not None and texts.shape[0] >= 2 else None), by_class

    def _kept(self, logits_t: Tensor, e: Embeddings, by_class: bool) -> Tensor | None:
        """(B,) bool: the images this term uses (filter_wrong with class texts), or None for all."""
        if not (self.options.filter_wrong and by_class):
            return None
        return (e.labels >= 0) & (logits_t.argmax(dim=1) == e.labels)

    def _teacher_logits(self, texts: Tensor, e: Embeddings) -> Tensor:
        return teacher_unit(e.teacher_image) @ texts.T / self.options.temperature  # (B, K)

    def forward(self, e: Embeddings) -> Tensor | None:
        texts, by_class = self._candidates(e)
        if texts is None:
            return None
        texts = teacher_unit(texts).to(e.student_image.dtype)
        logits_t = self._teacher_logits(texts, e)
        logits_s = unit(e.student_image) @ texts.T / self.options.temperature
        keep = self._kept(logits_t, e, by_class)
        if keep is not None:
            if not keep.any():
                return None
            logits_t, logits_s = logits_t[keep], logits_s[keep]
        top = logits_t.topk(min(self.options.k, texts.shape[0]), dim=1).indices  # the teacher's top-k texts
        return row_kl(logits_s.gather(1, top), logits_t.gather(1, top))

    @torch.no_grad()
    def samples(self, e: Embeddings) -> float:
        texts, by_class = self._candidates(e)
        if texts is None:
            return 0.0
        keep = self._kept(self._teacher_logits(teacher_unit(texts).to(e.teacher_image.dtype), e), e, by_class)
        return float(e.student_image.shape[0] if keep is None else keep.sum())


@register_loss("classification")
class ClassificationLoss(LossTerm):
    """Cross-entropy of the student's image against the teacher's class-text embeddings (Li et al. ICCV 2023).

    With C class texts T (C, D) (the teacher's embeddings of the training classes' prompts) and labels y (B,):
    ``logits = s^_v T^T / tau`` (B, C); mean over the labelled samples (label >= 0) of ``CE(logits, y)``.
    None without class texts, labels or a labelled sample.
    """

    class Options(TermOptions):
        temperature: float = Field(0.07, gt=0.0, description="softmax temperature of the image-class logits")

    options: Options

    def __init__(self, options: Options, context: LossContext) -> None:
        super().__init__(options, context)
        bank = context.class_text
        self.register_buffer("class_text", None if bank is None else teacher_unit(bank), persistent=False)

    def forward(self, e: Embeddings) -> Tensor | None:
        class_text: Tensor | None = self.class_text
        if class_text is None or e.labels is None:
            return None
        keep = e.labels >= 0
        if not bool(keep.any()):
            return None
        texts = teacher_unit(class_text).to(e.student_image.dtype)
        logits = unit(e.student_image[keep]) @ texts.T / self.options.temperature
        return F.cross_entropy(logits, e.labels[keep].long())

    def samples(self, e: Embeddings) -> float:
        return float((e.labels >= 0).sum()) if e.labels is not None else 0.0  # the labelled images
