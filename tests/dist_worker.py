"""Run by tests/test_distributed.py under torchrun (2 gloo processes): gathers and gradnorm vs one process.

Each rank holds a slice of one batch; the loss of the whole (gathered) batch must give, after DDP's average,
the gradient one process computes on the whole batch; and gradnorm's weights must move the same way.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

import edgedistill.distill.distributed as distributed
from edgedistill.distill.balance import build_balancer, validate_balancer


def losses(s: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Two batch-wide terms of (B, D) rows: a contrastive one and a per-sample one."""
    logits = F.normalize(s, dim=-1) @ F.normalize(t, dim=-1).T / 0.1
    return {"contrastive": F.cross_entropy(logits, torch.arange(len(s))),
            "feature": (F.normalize(s, dim=-1) - F.normalize(t, dim=-1)).abs().sum(-1).mean()}


class Step(torch.nn.Module):
    """Shared layer + gradnorm balancer -> total of the whole batch (what DDP wraps, as in the trainer)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(5, 3, bias=False)
        with torch.no_grad():
            self.layer.weight.copy_(w)
        self.balancer = build_balancer(validate_balancer("gradnorm"), ["contrastive", "feature"], {})
        self.balancer.bind_shared(list(self.layer.parameters()))

    def forward(self, x: torch.Tensor, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        s = distributed.gather_with_grad(self.layer(x), sizes)
        return self.balancer(losses(s, t), 0)[0]


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    x, t, w = torch.randn(7, 5), torch.randn(7, 3), torch.randn(3, 5)
    sizes = [4, 3]  # uneven slices
    start = sum(sizes[:rank])

    step = Step(w)
    ddp = torch.nn.parallel.DistributedDataParallel(step)  # kept: its backward hooks need it alive
    ddp(x[start:start + sizes[rank]], t, sizes).backward()
    # gradnorm's own measure: the gradient norm of one term on the shared layer, whole batch
    s = distributed.gather_with_grad(step.layer(x[start:start + sizes[rank]]), sizes)
    norm = step.balancer._grad_norm(losses(s, t)["contrastive"])
    dist.destroy_process_group()  # the reference below is one process with the whole batch

    reference = Step(w)
    reference(x, t, [7]).backward()
    torch.testing.assert_close(norm, reference.balancer._grad_norm(losses(reference.layer(x), t)["contrastive"]))
    torch.testing.assert_close(step.layer.weight.grad, reference.layer.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(step.balancer.weights, reference.balancer.weights, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(reference.balancer.weights, torch.ones(2))  # gradnorm did move its weights
    print(f"rank {rank}: ok")


if __name__ == "__main__":
    main()
