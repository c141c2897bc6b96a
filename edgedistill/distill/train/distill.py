"""``edgedistill distill``: teacher, feature caches, the trainer, the summary; one process or every rank of a
torchrun job."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

import edgedistill.core.atomic as atomic
import edgedistill.distill.distributed as distributed
from edgedistill.distill.cache import FeatureCache, caches_for_recipe, load_split_manifests
from edgedistill.data.manifest import Manifest
from edgedistill.core.errors import UserError
from edgedistill.distill.recipe import Recipe
from edgedistill.distill.teachers import Teacher, load_teacher
from edgedistill.core.terminal import make_console
from edgedistill.distill.train.build import build_parts
from edgedistill.distill.train.rundir import RunDir
from edgedistill.distill.train.trainer import Trainer


def build_trainer(recipe: Recipe, teacher: Teacher, manifests: dict[str, Manifest],
                  caches: dict[str, FeatureCache], console: Console, resume: bool = False) -> Trainer:
    """A trainer for ``recipe`` (its parts built, the run directory checked, a checkpoint restored on resume)."""
    RunDir(Path(recipe.out)).refuse_existing(resume)
    if not distributed.current().is_main:
        console = make_console(quiet=True)  # in a distributed run only rank 0 prints
    return Trainer(build_parts(recipe, teacher, manifests, caches, console), resume)


def check_ood_classes(manifests: dict[str, Manifest]) -> None:
    """``data.ood_val`` must be labelled, with classes disjoint from the training labels (one-line UserError)."""
    if "ood_val" not in manifests:
        return
    ood = {e.label for e in manifests["ood_val"].entries if e.label is not None}
    if not ood:
        raise UserError(f"data.ood_val {manifests['ood_val'].path} has no class labels; out-of-distribution "
                        f"evaluation needs a \"label\" on its images")
    both = sorted(ood & {e.label for e in manifests["train"].entries if e.label is not None})
    if both:
        raise UserError(f"data.ood_val must hold classes disjoint from the training classes; {len(both)} are in "
                        f"both (first: '{both[0]}')")


def distill(recipe: Recipe, console: Console | None = None, resume: bool = False) -> dict[str, Any] | None:
    """Everything ``edgedistill distill`` does: teacher, caches, student, training, summary.

    Under torchrun every process runs this; it joins the process group from the environment. Returns the
    summary on rank 0 and None on the other ranks.
    """
    ctx = distributed.init_from_env(recipe.device)
    if not ctx.is_main:
        console = make_console(quiet=True)
    console = console or make_console(stderr=True, soft_wrap=True)
    try:
        summary = _distill(recipe, console, resume, ctx)
        return summary if ctx.is_main else None
    except UserError as e:
        if ctx.is_main:
            raise
        if "--debug" in sys.argv:
            raise UserError(f"rank {ctx.rank}: {e}") from e
        raise SystemExit(2) from e  # every rank meets the same error; rank 0 says it once
    except Exception as e:
        if ctx.enabled and distributed.is_comm_failure(e):
            raise _lost_contact(recipe, ctx, e) from e
        raise
    finally:
        distributed.cleanup()


def _lost_contact(recipe: Recipe, ctx: distributed.Context, e: Exception) -> BaseException:
    if os.environ.get(distributed.LAUNCHED_ENV):  # `--nproc`: the launcher names the rank that stopped
        return SystemExit(distributed.LOST_CONTACT_EXIT)
    why = (str(e).splitlines() or [type(e).__name__])[0][:160]
    return UserError(f"rank {ctx.rank} lost contact with the other processes of this run: another rank stopped or "
                     f"hangs ({why}); {RunDir(Path(recipe.out)).last} is intact: run the same command again with "
                     f"--resume")


def _distill(recipe: Recipe, console: Console, resume: bool, ctx: distributed.Context) -> dict[str, Any]:
    RunDir(Path(recipe.out)).refuse_existing(resume)
    if ctx.is_main:  # rank 0 writes the run directory; find out now, not after the cache build and training
        atomic.writable_dir(recipe.out, "out")
    with distributed.main_first():  # rank 0 indexes webdataset shards first; the others read its index
        manifests = load_split_manifests(recipe)
    check_ood_classes(manifests)
    with console.status(f"loading teacher {recipe.teacher.model}"):
        teacher = load_teacher(recipe.teacher, distributed.rank_device(recipe.device, ctx), seed=recipe.seed)
    caches: dict[str, FeatureCache] = {}
    if recipe.train.teacher == "cached":
        caches = {k: v.cache for k, v in caches_for_recipe(recipe, teacher, manifests, console).items()}
    trainer = build_trainer(recipe, teacher, manifests, caches, console, resume=resume)
    _announce(trainer, console, ctx)
    return trainer.fit()


def _announce(trainer: Trainer, console: Console, ctx: distributed.Context) -> None:
    p = trainer.p
    r = p.recipe
    per_rank = f" ({r.data.batch_size // ctx.world_size} on each of {ctx.world_size} processes)" if ctx.enabled else ""
    console.print(f"student {r.student.vision} ({sum(x.numel() for x in p.model.visual.parameters()) / 1e6:.2f}M "
                  f"vision parameters), {p.total_steps} steps of {r.data.batch_size}{per_rank} on {p.device}; run "
                  f"directory {p.run.out}", highlight=False)
    if p.layerwise is not None and p.selector is not None:
        mods = ", ".join(f"{sp.name}->teacher block {sp.teacher_layer} ({sp.grid}x{sp.grid})"
                         for sp in p.layerwise.specs)
        console.print(f"layerwise distillation, the teacher runs online (hidden states are not cached); modules: "
                      f"{mods}; selection: {p.selector.name}", highlight=False)
