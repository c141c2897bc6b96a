"""What the loss terms and the balancer add to the student's plain forward/backward step.

The student (MobileNetV3-Large at 224 px, channels_last, AdamW) trains on one fixed synthetic batch against
synthetic teacher image and caption embeddings (the cached case: no teacher runs). Variants, timed step by
step in interleaved rounds so the machine's drift hits all alike (medians reported):

- plain: forward, `1 - cos(student, teacher)`, backward, optimizer step: the least a distillation step costs;
- the recipe default (feature, similarity, relation, contrastive with a 4096 queue, hard_negative, clip) under
  each balancer (static, dsmd, dwa, uncertainty, gradnorm), through the same modules the trainer calls, plus
  the queue update after the step.

Whole steps on a shared 2-core machine vary by +-15% from one to the next, more than the terms cost, so the
script also times the terms and the balancer alone (forward, their part of the backward down to the student's
projection head, the queue update) over many repetitions, as a share of the plain step: the precise number.

    python benchmarks/loss_overhead.py                   # batch 64, 8 rounds; appends to results/loss_overhead.csv
    python benchmarks/loss_overhead.py --batch 32 --rounds 4 --no-record
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import timm
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import cpu_model, report  # noqa: E402

from edgedistill.distill.balance import build_balancer, validate_balancer  # noqa: E402
from edgedistill.distill.losses import Embeddings, LossContext, build_losses, validate_term_options  # noqa: E402
from edgedistill.distill.recipe import DEFAULT_TERMS  # noqa: E402
from edgedistill.distill.memory import keep_freed_memory  # noqa: E402

BALANCERS = ["static", "dsmd", "dwa", "uncertainty", "gradnorm"]


def terms_alone(balancer_name: str, terms: dict, B: int, D: int, features: int, reps: int = 50) -> float:
    """Median seconds of terms + balancer + their backward to the projection head + queue update, alone."""
    losses = build_losses(terms, LossContext(embed_dim=D))
    head = torch.nn.Linear(features, D)
    balancer = build_balancer(validate_balancer(balancer_name), list(terms), {n: 1.0 for n in terms})
    balancer.bind_shared(list(head.parameters()))
    pooled = torch.randn(B, features)
    t_img, t_txt = F.normalize(torch.randn(B, D), dim=-1), F.normalize(torch.randn(B, D), dim=-1)
    logit_scale = torch.nn.Parameter(torch.tensor(4.6))
    out = []
    for step in range(reps + 5):
        y = head(pooled)
        t = time.perf_counter()
        e = Embeddings(student_image=y, teacher_image=t_img, student_text=t_txt, teacher_text=t_txt,
                       pair_image=torch.arange(B), logit_scale=logit_scale, text_is_student=False)
        values = {k: term(e) for k, term in losses.items()}
        total, _ = balancer({k: v for k, v in values.items() if v is not None}, step)
        total.backward()  # includes the head's weight gradient, which the plain step pays too: an upper bound
        for term in losses.values():
            term.after_step(e)
        if step >= 5:
            out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="mobilenetv3_large_100")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dim", type=int, default=512, help="teacher embedding width (ViT-B-32: 512)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--no-malloc-tuning", action="store_true", help="as the trainer runs without it")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tuned = False if args.no_malloc_tuning else keep_freed_memory()  # what the trainer does on CPU
    B, D = args.batch, args.dim

    model = timm.create_model(args.student, num_classes=D).to(memory_format=torch.channels_last)
    logit_scale = torch.nn.Parameter(torch.tensor(4.6))
    x = torch.randn(B, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    t_img = F.normalize(torch.randn(B, D), dim=-1)
    t_txt = F.normalize(torch.randn(B, D), dim=-1)
    pairs = torch.arange(B)
    terms = {n: validate_term_options(n, {}) for n in DEFAULT_TERMS}

    def make_variant(balancer_name: str | None) -> Callable[[int], None]:
        params = list(model.parameters()) + [logit_scale]
        if balancer_name is None:
            optimizer = torch.optim.AdamW(params, lr=1e-4)

            def plain(step: int) -> None:
                y = model(x)
                (1 - F.cosine_similarity(y, t_img, dim=-1)).mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return plain
        losses = build_losses(terms, LossContext(embed_dim=D))
        balancer = build_balancer(validate_balancer(balancer_name), list(terms), {n: 1.0 for n in terms})
        balancer.bind_shared(list(model.get_classifier().parameters()))
        extra = list(balancer.parameters()) if balancer.learned else []
        optimizer = torch.optim.AdamW(params + extra, lr=1e-4)

        def full(step: int) -> None:
            y = model(x)
            e = Embeddings(student_image=y, teacher_image=t_img, student_text=t_txt, teacher_text=t_txt,
                           pair_image=pairs, logit_scale=logit_scale, text_is_student=False)
            values = {k: term(e) for k, term in losses.items()}
            total, _ = balancer({k: v for k, v in values.items() if v is not None}, step)
            total.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for term in losses.values():
                term.after_step(e)
        return full

    variants = {"plain": make_variant(None)} | {b: make_variant(b) for b in BALANCERS}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for name, fn in variants.items():  # warm-up: oneDNN kernel selection, queue allocation
        fn(0)
    order = random.Random(0)
    for r in range(args.rounds):
        names = list(variants)
        order.shuffle(names)  # no variant always runs first or after the same neighbour
        for name in names:
            t = time.perf_counter()
            variants[name](r + 1)
            times[name].append(time.perf_counter() - t)
        print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), file=sys.stderr)
    component_ms = {b: 1000 * terms_alone(b, terms, B, D, model.get_classifier().in_features) for b in BALANCERS}

    plain = statistics.median(times["plain"])
    row = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "student": args.student, "size": args.size, "batch": B, "dim": D,
        "threads": args.threads, "rounds": args.rounds, "terms": "+".join(DEFAULT_TERMS), "malloc_tuning": tuned,
        "plain_step_s": round(plain, 4),
    }
    for b in BALANCERS:
        row[f"{b}_step_s"] = round(statistics.median(times[b]), 4)
        row[f"{b}_overhead_pct"] = round(100 * (statistics.median(times[b]) / plain - 1), 1)
    row["plain_step_spread_pct"] = round(100 * (max(times["plain"]) - min(times["plain"])) / plain, 1)
    for b in BALANCERS:
        row[f"{b}_terms_alone_ms"] = round(component_ms[b], 2)
        row[f"{b}_terms_alone_pct"] = round(100 * component_ms[b] / 1000 / plain, 2)
    report(row, "loss_overhead", record=not args.no_record)


if __name__ == "__main__":
    main()
