"""One training step: the forward that DDP wraps (a rank's batch -> the balanced total of the whole batch), and
the optimisation around it (AdamW with a warm-up cosine schedule, AMP loss scaling, gradient clipping)."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

import edgedistill.distill.distributed as distributed
from edgedistill.distill.balance import Balancer
from edgedistill.core.errors import UserError
from edgedistill.distill.layerwise import Layerwise
from edgedistill.distill.losses import Embeddings
from edgedistill.distill.train.batches import RankBatch


class DistillStep(torch.nn.Module):
    """One step's forward: a rank's batch -> the balanced total loss of the whole batch. What DDP wraps.

    The student embeds this rank's images (and captions); the embeddings of all ranks are gathered with
    autograd (``distributed.gather_with_grad``), so every loss term and the balancer see the whole batch, exactly
    as in one process, and keep identical state (queues, EMAs) on every rank. DDP wraps this module rather than
    the student alone so that it sees which parameters the total reaches in a step (the logit scale without the
    clip term, a text tower in a batch without captions) and leaves the others alone.
    ``last`` holds (Embeddings, active term values, weights) of the latest call.
    """

    def __init__(self, model: torch.nn.Module, projection: torch.nn.Linear | None, losses: torch.nn.ModuleDict,
                 balancer: Balancer, text_is_teacher: bool, tokenizer: Callable, amp_dtype: torch.dtype | None,
                 layerwise: Layerwise | None = None) -> None:
        super().__init__()
        self.model, self.projection, self.losses, self.balancer = model, projection, losses, balancer
        self.text_is_teacher, self.tokenizer, self.amp_dtype = text_is_teacher, tokenizer, amp_dtype
        self.layerwise = layerwise
        self.last: tuple[Embeddings, dict[str, torch.Tensor], dict[str, float]] | None = None

    def forward(self, batch: RankBatch) -> torch.Tensor:
        lw = self.layerwise if batch.hidden is not None and batch.arms else None
        s_img, s_txt = self._embed(batch, lw)
        e = Embeddings(student_image=s_img, teacher_image=batch.teacher_image, student_text=s_txt,
                       teacher_text=batch.teacher_text,
                       pair_image=batch.pair_image if batch.teacher_text is not None else None,
                       logit_scale=self.model.logit_scale, text_is_student=not self.text_is_teacher,
                       labels=batch.labels)
        values = {name: term(e) for name, term in self.losses.items()}
        if lw is not None:
            values.update(self._hidden_terms(lw, batch))
        active = {k: v for k, v in values.items() if v is not None}
        if not active:
            raise UserError("no loss term applies to this data (terms needing captions on a dataset without "
                            "captions?); add feature or similarity to loss.terms")
        total, weights = self.balancer(active, batch.step, self._counts(e, active) if self.balancer.uses_counts
                                       else None)
        self.last = (e, active, weights)
        return total

    def _counts(self, e: Embeddings, active: dict[str, torch.Tensor]) -> dict[str, float]:
        """Samples behind each active term's value: its own count, the B images for a hidden-state term."""
        images = float(e.student_image.shape[0])
        return {n: float(self.losses[n].samples(e)) if n in self.losses else images for n in active}

    def _embed(self, batch: RankBatch, lw: Layerwise | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The whole batch's student embeddings at the teacher's width: (B, D) images, (P, D) texts or None."""
        dev, t_txt = batch.views.device, batch.teacher_text
        with torch.autocast(dev.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            if lw is not None:
                lw.capturing = True
            try:
                s_img = self.model.encode_image(batch.views)
            finally:
                if lw is not None:
                    lw.capturing = False
            s_txt = None
            if t_txt is not None and not self.text_is_teacher and batch.texts:
                s_txt = self.model.encode_text(self.tokenizer(batch.texts).to(dev))
        s_img = s_img.float()
        s_txt = s_txt.float() if s_txt is not None else None
        if self.projection is not None:
            s_img = self.projection(s_img)
            s_txt = self.projection(s_txt) if s_txt is not None else None
        s_img = distributed.gather_with_grad(s_img, batch.image_sizes)
        if t_txt is None:
            return s_img, None
        if self.text_is_teacher:
            return s_img, t_txt
        if s_txt is None:  # this rank drew no caption: an empty part of the batch's captions
            s_txt = t_txt.new_zeros((0, t_txt.shape[1]))
        return s_img, distributed.gather_with_grad(s_txt, batch.text_sizes)

    def _hidden_terms(self, lw: Layerwise, batch: RankBatch) -> dict[str, torch.Tensor]:
        """The on modules' hidden-state terms over the whole batch (like every term)."""
        values = {}
        hidden = batch.hidden or []
        for i in batch.arms:
            tokens = lw.student_tokens(i)  # (b, g*g, D_t)
            tokens = distributed.gather_with_grad(tokens.flatten(1), batch.image_sizes).view(-1, *tokens.shape[1:])
            values[lw.term_name(i)] = lw.mse(tokens, hidden[i])
        lw.student_outputs.clear()
        return values


def cosine_schedule(total: int, warmup: int) -> Callable[[int], float]:
    """LR factor per step: linear warm-up (at most a fifth of the run), then cosine decay to zero."""
    warmup = min(warmup, max(total // 5, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def param_groups(modules: list[torch.nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases, norm weights and the logit scale (the usual CLIP practice)."""
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Optimization:
    """AdamW, its schedule, the AMP scaler and gradient clipping; ``apply(total)`` takes one optimizer step."""

    def __init__(self, groups: list[dict[str, Any]], lr: float, total_steps: int, warmup_steps: int,
                 grad_clip: float, amp_dtype: torch.dtype | None) -> None:
        self.optimizer = torch.optim.AdamW(groups, lr=lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cosine_schedule(total_steps, warmup_steps))
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        self.grad_clip = grad_clip

    def skip(self) -> None:
        """A step whose loss was not finite: drop its gradients."""
        self.optimizer.zero_grad(set_to_none=True)

    def apply(self, total: torch.Tensor) -> float | None:
        """Backward, clip, step; returns the gradient norm before clipping (None without clipping)."""
        self.scaler.scale(total).backward()
        grad_norm = None
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def stateful(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler}
