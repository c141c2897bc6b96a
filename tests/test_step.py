"""The training step's forward: each term's sample count reaches a balancer that asks for it."""

from __future__ import annotations

import torch

from edgedistill.distill.balance import build_balancer, validate_balancer
from edgedistill.distill.losses import LossContext, build_losses, validate_term_options
from edgedistill.distill.train.batches import RankBatch
from edgedistill.distill.train.step import DistillStep

D = 6


class Stub(torch.nn.Module):
    """A student with open_clip's surface: encode_image and a logit scale."""

    def __init__(self) -> None:
        super().__init__()
        self.visual = torch.nn.Linear(3 * 2 * 2, D)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x.flatten(1))


def step_for(balancer: str, **options: object) -> DistillStep:
    terms = {n: validate_term_options(n, {}) for n in ("feature", "clip", "relation")}
    losses = build_losses(terms, LossContext(D))
    bal = build_balancer(validate_balancer({"name": balancer, **options}), list(terms), {})
    return DistillStep(Stub(), None, losses, bal, text_is_teacher=True, tokenizer=None, amp_dtype=None)


def batch(B: int = 8, pairs: tuple[int, ...] = (1, 5, 6)) -> RankBatch:
    g = torch.Generator().manual_seed(0)
    t_img = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)
    t_txt = torch.nn.functional.normalize(torch.randn(len(pairs), D, generator=g), dim=1)
    return RankBatch(step=0, views=torch.randn(B, 3, 2, 2, generator=g), texts=["x"] * len(pairs),
                     teacher_image=t_img, teacher_text=t_txt, pair_image=torch.tensor(pairs),
                     image_sizes=[B], text_sizes=[len(pairs)])


def test_coverage_gets_each_terms_sample_count():
    step = step_for("coverage", equalise=False)
    step(batch())
    _, active, weights = step.last
    # feature sees the 8 images, clip the 3 pairs, relation is the mean of its image (8) and image_text (3) parts
    assert weights == {"feature": 1.0, "clip": 3 / 8, "relation": 5.5 / 8}
    total = step(batch())
    assert torch.isfinite(total) and total.requires_grad


def test_a_balancer_without_counts_is_not_given_them():
    seen = []
    step = step_for("static")
    original = step.balancer.forward

    def spy(losses, s, counts=None):
        seen.append(counts)
        return original(losses, s, counts)

    step.balancer.forward = spy  # type: ignore[method-assign]
    step(batch())
    assert seen == [None]
