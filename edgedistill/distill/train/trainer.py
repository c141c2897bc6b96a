"""The training loop: steps over epochs, logging, evaluation and the best model, checkpoints, Ctrl-C, and the
summary at the end. What it trains is assembled by ``train.build`` (``Parts``); the run directory is
``train.rundir``."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

import edgedistill.core.atomic as atomic
import edgedistill.distill.distributed as distributed
from edgedistill.distill.balance import Balancer
from edgedistill.distill.cache import FeatureCache
from edgedistill.data.images import BadImages
from edgedistill.core.errors import UserError
from edgedistill.distill.evaluate import SplitTexts, ValData, evaluate_ood, evaluate_student, student_texts, teacher_metrics
from edgedistill.distill.layerwise import Layerwise
from edgedistill.evaluation.metrics import retention
from edgedistill.distill.recipe import Recipe
from edgedistill.distill.select import SelectionControl, Selector
from edgedistill.distill.students import Student, save_student
from edgedistill.distill.teachers import Teacher
from edgedistill.core.terminal import warn
from edgedistill.distill.train.batches import BatchAssembler, EpochBatches, LoaderBatch, TrainImages, collate_train
from edgedistill.distill.train.rundir import MetricsLog, RunDir
from edgedistill.distill.train.step import DistillStep, Optimization

MAX_BAD_STEPS = 3          # non-finite losses in a row before the run stops
FAULT_ENV = "EDGEDISTILL_FAULT_KILL_AFTER_STEP"  # tests: SIGKILL this process after that step (crash-resume test)
FAULT_RANK_ENV = "EDGEDISTILL_FAULT_RANK"          # tests: ... only the process of that rank (default: every one)


@dataclass
class TrainState:
    step: int = 0                 # optimizer steps attempted (skipped non-finite steps included)
    epoch: int = 0
    batch: int = 0                # next batch of the epoch
    skipped: int = 0
    bad_streak: int = 0
    images: int = 0               # training images processed
    train_seconds: float = 0.0    # time in training steps (evaluation excluded)
    best_rsum: float = -1.0
    best_step: int = 0
    best_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Parts:
    """Everything one run trains with, built by ``train.build.build_parts``."""
    recipe: Recipe
    teacher: Teacher
    console: Console
    device: torch.device
    student: Student
    model: torch.nn.Module               # the student's open_clip model (SyncBatchNorm on GPUs when distributed)
    projection: torch.nn.Linear | None   # a student of another width -> the teacher's
    losses: torch.nn.ModuleDict
    balancer: Balancer
    layerwise: Layerwise | None
    selector: Selector | None
    selection: SelectionControl | None
    optim: Optimization
    step_module: DistillStep
    dataset: TrainImages
    batches: EpochBatches
    assemble: BatchAssembler
    bad: BadImages
    train_cache: FeatureCache | None
    val: ValData | None                  # rank 0 only
    ood: ValData | None                  # rank 0 only
    has_val: bool                        # the same on every rank
    describe_prompts: str                # "descriptions" or "plain": how the class texts were made
    total_steps: int
    run: RunDir


class Trainer:
    """Trains ``parts`` to the end (or ``train.max_steps``); ``fit()`` returns the summary (rank 0)."""

    def __init__(self, parts: Parts, resume: bool) -> None:
        self.p, self.state = parts, TrainState()
        self.dist = distributed.current()
        r, run = parts.recipe, parts.run
        resumed = run.will_resume(r, resume)
        if resumed:  # every rank: they continue from the same state
            self._restore(run.load_checkpoint(run.last))
            parts.console.print(f"resuming {run.out} at step {self.state.step} (epoch {self.state.epoch + 1}, "
                                f"batch {self.state.batch})", highlight=False)
        elif resume:
            parts.console.print(f"--resume: no checkpoint in {run.checkpoints} yet; starting the run",
                                highlight=False)
        if self.dist.is_main:
            if resumed:
                run.truncate_log(self.state.step)
            run.start(r, resumed)
        self.log = MetricsLog(run, self.dist.is_main, r.train.tensorboard, self.state.step + 1)
        self.step_fn = distributed.wrap_ddp(parts.step_module, parts.device)
        self._stop_requested = False
        self._frozen_texts: SplitTexts | None = None

    # ------------------------------------------------------------------------------------------- the loop

    def fit(self) -> dict[str, Any]:
        """Train to the end (or train.max_steps), then save the student and the summary."""
        previous = self._install_interrupt_handler()
        try:
            columns = [TextColumn("[bold]distill[/]"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
                       TextColumn("{task.fields[info]}"), TimeRemainingColumn()]
            with Progress(*columns, console=self.p.console, transient=False) as bar:
                task = bar.add_task("distill", total=self.p.total_steps, completed=self.state.step, info="")
                last_eval = self._loop(bar, task)
            if self.p.has_val and last_eval != self.state.step and self.state.best_step != self.state.step:
                self._eval_and_keep_best()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        return self.finish()

    def _loop(self, bar: Progress, task: Any) -> int:
        """Every remaining epoch; returns the step of the last evaluation (-1: none)."""
        r, s, p = self.p.recipe, self.state, self.p
        last_eval = -1
        while s.step < p.total_steps and s.epoch < r.train.epochs:
            p.batches.set_epoch(s.epoch, s.batch)
            p.dataset.epoch = s.epoch
            loader = torch.utils.data.DataLoader(
                p.dataset, batch_sampler=p.batches, num_workers=r.data.workers, collate_fn=collate_train,
                pin_memory=p.device.type == "cuda",
                generator=torch.Generator().manual_seed(r.seed))  # keeps the global RNG untouched
            tick = time.perf_counter()
            for batch in loader:
                for i, why in batch.failed:
                    p.bad.add(i, p.dataset.paths[i], why)
                out, selection = self._train_step(batch)
                s.train_seconds += time.perf_counter() - tick
                if self._after_step(out, selection, bar, task):
                    last_eval = s.step
                if s.step >= p.total_steps:
                    break
                tick = time.perf_counter()
        return last_eval

    def _after_step(self, out: dict[str, Any] | None, selection: dict[str, Any] | None, bar: Progress,
                    task: Any) -> bool:
        """Bookkeeping after a step: log, schedule, evaluate, checkpoint, faults, Ctrl-C. True if it evaluated."""
        r, s, p = self.p.recipe, self.state, self.p
        s.images += p.assemble.batch_images
        self._count(out, bar, task)
        if selection is not None:
            self.log.write({"step": s.step, "epoch": s.epoch, "selection": selection})
        p.optim.scheduler.step()
        end_of_epoch = s.batch >= p.batches.per_epoch
        if end_of_epoch:
            s.epoch, s.batch = s.epoch + 1, 0
        evaluated = p.has_val and (s.step % (r.train.eval_every or p.batches.per_epoch) == 0
                                   or s.step == p.total_steps)
        if evaluated:
            self._eval_and_keep_best()
        due = s.step % (r.train.checkpoint_every or p.batches.per_epoch) == 0 or end_of_epoch \
            or s.step == p.total_steps
        if due and s.bad_streak == 0:  # never checkpoint in the middle of a run of bad steps
            self._save(p.run.last, self._checkpoint())
        self._maybe_fault()
        if distributed.any_rank(self._stop_requested):  # every rank stops after the same step
            if not due and s.bad_streak == 0:
                self._save(p.run.last, self._checkpoint())
            distributed.barrier()  # rank 0 has written last.pt before anyone exits
            raise KeyboardInterrupt
        return evaluated

    def _count(self, out: dict[str, Any] | None, bar: Progress, task: Any) -> None:
        """A skipped step counts towards the streak that stops the run; a good one is shown and logged."""
        r, s = self.p.recipe, self.state
        if out is None:
            s.skipped += 1
            s.bad_streak += 1
            warn(self.p.console, f"step {s.step}: loss is not finite; step skipped")
            if s.bad_streak >= MAX_BAD_STEPS:
                raise UserError(f"the loss was not finite for {MAX_BAD_STEPS} steps in a row (step {s.step}); "
                                f"stopped. The last good checkpoint is {self.p.run.last}. Lower train.lr or "
                                f"check the data, then run again with --resume")
            return
        s.bad_streak = 0
        rate = s.images / max(s.train_seconds, 1e-9)
        info = f"loss {out['loss']:.4f} " + " ".join(f"{k}={w:.2f}" for k, w in out["weights"].items()) + \
            f"  {rate:.1f} img/s"
        bar.update(task, completed=s.step, info=info)
        if s.step % r.train.log_every == 0 or s.step == self.p.total_steps:
            self.log.write({"step": s.step, "epoch": s.epoch, "lr": self.p.optim.lr(), **out,
                            "images_per_s": rate, "skipped": s.skipped})

    def _train_step(self, loaded: LoaderBatch) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """One optimizer step -> (its record, or None when the loss was not finite (or the batch too small) and
        it was skipped; the selection record when a pull ended)."""
        p, s = self.p, self.state
        s.step += 1
        s.batch += 1
        arms = p.selection.arms() if p.selection is not None else []
        batch = p.assemble(s.step, loaded, arms)
        if batch is None:
            return None, None
        total = self.step_fn(batch)
        if p.step_module.last is None:
            raise RuntimeError("the step module recorded no embeddings")
        e, active, weights = p.step_module.last
        finite = bool(torch.isfinite(total))
        if self.dist.enabled:  # every rank computes the same total; agree anyway, or DDP would wait forever
            finite = not distributed.any_rank(not finite)
        out = None
        if not finite:
            p.optim.skip()
        else:
            grad_norm = p.optim.apply(total)
            with torch.no_grad():
                p.model.logit_scale.clamp_(0, math.log(100))
            for term in p.losses.values():
                term.after_step(e)  # the whole batch: every rank's queue gets the same keys
            out = {"loss": float(total.detach()), "terms": {k: float(v.detach()) for k, v in active.items()},
                   "weights": weights}
            if grad_norm is not None:
                out["grad_norm"] = grad_norm  # before clipping; the same on every rank (DDP averaged them)
        return out, p.selection.after_step(arms) if p.selection is not None else None

    def _maybe_fault(self) -> None:
        """Tests: SIGKILL this process after the step named by EDGEDISTILL_FAULT_KILL_AFTER_STEP."""
        step = int(os.environ.get(FAULT_ENV, "0") or 0)
        rank = os.environ.get(FAULT_RANK_ENV, "")
        if step and self.state.step == step and (not rank or int(rank) == self.dist.rank):
            os.kill(os.getpid(), signal.SIGKILL)

    def _install_interrupt_handler(self) -> Any:
        """First Ctrl-C: finish the step, write checkpoints/last.pt, stop. A second one stops at once."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum: int, frame: Any) -> None:
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            self.p.console.print("interrupt: finishing this step and saving a checkpoint (Ctrl-C again to stop at once)",
                                 style="yellow", markup=False)
        return signal.signal(signal.SIGINT, handler)

    # ---------------------------------------------------------------------------------------- evaluation

    def evaluate(self) -> dict[str, float]:
        p, r = self.p, self.p.recipe
        if p.val is None:
            raise RuntimeError("only rank 0 holds the val split")
        texts = None
        if p.student.text_is_teacher:  # a frozen text tower: its val embeddings are the same at every evaluation
            if self._frozen_texts is None:
                self._frozen_texts = student_texts(p.student, p.teacher.tokenizer, p.val.split, p.device)
            texts = self._frozen_texts
        return evaluate_student(p.student, p.val, p.teacher.tokenizer, p.device, r.eval.batch_size, r.data.workers,
                                p.projection, texts=texts, console=p.console)

    def _eval_and_keep_best(self) -> None:
        """Rank 0 evaluates and keeps the best model; the others wait for the outcome (the same TrainState)."""
        s = self.state
        if self.dist.is_main:
            metrics = self.evaluate()
            self.log.write({"step": s.step, "epoch": s.epoch, "eval": metrics})
            score = metrics.get("rsum", metrics.get("cosine_to_teacher", 0.0))  # no captions: closeness to teacher
            if score > s.best_rsum:
                s.best_rsum, s.best_step, s.best_metrics = score, s.step, metrics
                self._save(self.p.run.best, {"step": s.step, "model": self.p.model.state_dict(),
                                             "projection": _state(self.p.projection), "metrics": metrics})
        if self.dist.enabled:
            s.best_rsum, s.best_step, s.best_metrics = distributed.broadcast_object(
                (s.best_rsum, s.best_step, s.best_metrics))

    # ---------------------------------------------------------------------------------------- checkpoints

    def _stateful(self) -> dict[str, Any]:
        """What a checkpoint holds, by its key in the file (None: not in this run)."""
        p = self.p
        return {"model": p.model, "projection": p.projection, "losses": p.losses, "balancer": p.balancer,
                "layerwise": p.layerwise, "selector": p.selector, **p.optim.stateful()}

    def _checkpoint(self) -> dict[str, Any]:
        return {"state": self.state.__dict__.copy(), "rng": _rng_state(),
                **{k: _state(v) for k, v in self._stateful().items()}}

    def _save(self, path: Any, payload: dict[str, Any]) -> None:
        if self.dist.is_main:  # every rank holds the same state; rank 0 writes it
            self.p.run.save_checkpoint(path, payload)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        for key, obj in self._stateful().items():
            if obj is not None:
                obj.load_state_dict(ckpt[key])
        self.state = TrainState(**ckpt["state"])
        _set_rng_state(ckpt["rng"])

    # ------------------------------------------------------------------------------------------- the end

    def finish(self) -> dict[str, Any]:
        """Save the student (best by val RSUM when there is a val split) and write summary.json (rank 0)."""
        p, s = self.p, self.state
        if not self.dist.is_main:
            distributed.barrier()  # until rank 0 has written everything
            return {}
        if p.val is not None and p.run.best.exists():
            p.model.load_state_dict(p.run.load_checkpoint(p.run.best)["model"])
        save_student(p.student, p.run.student,
                     {"teacher": p.teacher.identity, "recipe": p.recipe.name, "step": s.best_step or s.step})
        summary = {**self._scores(), **self._facts()}
        atomic.write_json(p.run.summary, summary)
        self.log.close()
        distributed.barrier()
        return summary

    def _scores(self) -> dict[str, Any]:
        """Teacher and student val metrics, retention, selection and out-of-distribution scores."""
        p, s, r = self.p, self.state, self.p.recipe
        summary: dict[str, Any] = {"teacher": None, "student": None, "retention": None}
        if p.val is not None:
            t = teacher_metrics(p.val)
            summary.update(teacher=t, student=s.best_metrics, retention=retention(s.best_metrics, t),
                           best_step=s.best_step)
        if p.selector is not None and p.layerwise is not None:
            summary["selection"] = p.selector.summary()
            summary["layerwise_modules"] = {sp.name: {"teacher_layer": sp.teacher_layer, "grid": sp.grid,
                                                      "channels": sp.channels} for sp in p.layerwise.specs}
        if p.ood is not None:
            summary["ood_zero_shot"], summary["ood_few_shot"] = evaluate_ood(
                p.student, p.ood, p.teacher.tokenizer, p.device, r.eval.few_shot, r.eval.few_shot_repeats,
                r.eval.tip_alpha, r.eval.tip_beta, r.seed, r.eval.batch_size, r.data.workers, console=p.console,
                prompts=p.describe_prompts)
        return summary

    def _facts(self) -> dict[str, Any]:
        p, s = self.p, self.state
        return {"steps": s.step, "skipped_steps": s.skipped, "epochs": s.epoch, "wall_s": s.train_seconds,
                "train_images_per_s": s.images / max(s.train_seconds, 1e-9),
                "bad_images": len(p.bad.items) + (len(p.train_cache.bad_images) if p.train_cache else 0),
                "device": str(p.device), "processes": self.dist.world_size, "student_vision": p.recipe.student.vision,
                "student_parameters": sum(x.numel() for x in p.model.visual.parameters()),
                "val_images": len(p.val.image_rows) if p.val is not None else 0}


def _state(obj: Any) -> Any:
    return obj.state_dict() if obj is not None else None


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
