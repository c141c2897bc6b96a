"""The trainer: a student against a frozen teacher, with the recipe's loss terms and balancer.

One step: augmented student views of a batch of images -> student embeddings; the teacher's embeddings of the
clean views come from the feature cache (or an online teacher); one caption per captioned image is drawn;
every loss term sees the batch, the balancer combines them, AdamW steps.

Resuming is exact: the batch order of an epoch, each image's augmentation and each step's caption draw are
functions of (seed, epoch, index), never of how many batches ran before, and a checkpoint holds the model,
optimizer, scheduler, AMP scaler, balancer, loss state (queues) and RNG states.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from edgedistill import atomic, distributed
from edgedistill.balance import Balancer, build_balancer, validate_balancer
from edgedistill.cache import (FeatureCache, caches_for_recipe, class_text_features,
                              load_split_manifests)
from edgedistill.data.images import BadImages, open_image, why_unreadable
from edgedistill.data.manifest import Manifest
from edgedistill.data.transforms import student_train_transform
from edgedistill.errors import UserError
from edgedistill.hashing import seed_of
from edgedistill.evaluate import (ValData, class_prompt_sets, evaluate_ood, evaluate_student, label_index, prepare_val,
                                  read_class_descriptions, student_eval_transform, teacher_metrics)
from edgedistill.layerwise import Layerwise
from edgedistill.metrics import retention
from edgedistill.losses import Embeddings, LossContext, build_losses, validate_term_options
from edgedistill.recipe import Recipe, read_yaml, save_recipe
from edgedistill.memory import keep_freed_memory
from edgedistill.select import Selector, build_selector
from edgedistill.students import Student, build_student, save_student
from edgedistill.teachers import Teacher, load_teacher, resolve_device

MAX_BAD_STEPS = 3          # non-finite losses in a row before the run stops
FAULT_ENV = "EDGEDISTILL_FAULT_KILL_AFTER_STEP"  # tests: SIGKILL this process after that step (crash-resume test)
FAULT_RANK_ENV = "EDGEDISTILL_FAULT_RANK"          # tests: ... only the process of that rank (default: every one)

# Recipe keys that may change between a run and its resume (they do not change what is computed).
RESUMABLE_CHANGES = {"train.epochs", "train.max_steps", "train.log_every", "train.eval_every",
                     "train.checkpoint_every", "train.tensorboard", "data.workers", "device", "cache.dir",
                     "eval.batch_size"}


@dataclass
class RunPaths:
    out: Path

    @property
    def checkpoints(self) -> Path: return self.out / "checkpoints"
    @property
    def last(self) -> Path: return self.checkpoints / "last.pt"
    @property
    def best(self) -> Path: return self.checkpoints / "best.pt"
    @property
    def student(self) -> Path: return self.out / "student"
    @property
    def metrics(self) -> Path: return self.out / "metrics.jsonl"
    @property
    def summary(self) -> Path: return self.out / "summary.json"
    @property
    def recipe(self) -> Path: return self.out / "recipe.yaml"
    @property
    def tensorboard(self) -> Path: return self.out / "tensorboard"


class TrainImages(torch.utils.data.Dataset):
    """Training images by manifest index -> (index, student view, teacher view or None, reason or None).

    Each item's augmentation is seeded by (seed, epoch, index), so workers, resume and batch order do not
    change what a given image looks like in a given epoch.
    """

    def __init__(self, paths: list[Path], transform: Callable, seed: int,
                 teacher_transform: Callable | None = None) -> None:
        self.paths, self.transform, self.seed = paths, transform, seed
        self.teacher_transform = teacher_transform
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, torch.Tensor | None, str | None]:
        try:
            image = open_image(self.paths[index])
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed_of(self.seed, self.epoch, index))
                view = self.transform(image)
            teacher_view = self.teacher_transform(image) if self.teacher_transform else None
            return index, view, teacher_view, None
        except Exception as e:  # counted by BadImages in the trainer
            return index, None, None, why_unreadable(e)


def collate_train(items: list) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, list]:
    good = [it for it in items if it[1] is not None]
    bad = [(it[0], it[3]) for it in items if it[1] is None]
    idx = torch.tensor([it[0] for it in good], dtype=torch.long)
    views = torch.stack([it[1] for it in good]) if good else None
    teacher_views = torch.stack([it[2] for it in good]) if good and good[0][2] is not None else None
    return idx, views, teacher_views, bad


class EpochBatches(torch.utils.data.Sampler):
    """Batches of an epoch: a permutation seeded by (seed, epoch), optionally starting at a given batch.

    ``batch_size`` is the global batch. With ``world_size`` > 1 each rank takes its contiguous slice of every
    batch; the slices of all ranks, in rank order, are the batch one process takes, so the run does not depend
    on the number of processes.
    """

    def __init__(self, indices: np.ndarray, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices, self.batch_size, self.seed = indices, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.drop_last = len(indices) >= batch_size  # in-batch terms need full batches; tiny sets keep one
        self.epoch, self.start = 0, 0

    @property
    def per_epoch(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.per_epoch - self.start

    def __iter__(self) -> Iterator[list[int]]:
        perm = np.random.default_rng(seed_of(self.seed, self.epoch)).permutation(self.indices)
        for b in range(self.start, self.per_epoch):
            batch = perm[b * self.batch_size:(b + 1) * self.batch_size]
            yield np.array_split(batch, self.world_size)[self.rank].tolist()


class TeacherFeatures:
    """The teacher's embeddings of a batch: looked up in the cache, or computed online."""

    def __init__(self, teacher: Teacher, cache: FeatureCache | None) -> None:
        self.teacher, self.cache = teacher, cache

    def images(self, indices: torch.Tensor, teacher_views: torch.Tensor | None) -> torch.Tensor:
        if self.cache is not None:
            return self.cache.image_features(indices).float()
        return self.teacher.embed_images(teacher_views).float()

    def texts(self, rows: np.ndarray, captions: list[str]) -> torch.Tensor:
        if self.cache is not None:
            return self.cache.text_features(rows).float()
        return self.teacher.embed_texts(captions).float()


@dataclass
class RankBatch:
    """What one rank feeds a step: its own images and captions, and what it needs of the whole batch."""
    step: int
    views: torch.Tensor                  # (b, 3, H, W) this rank's student views
    texts: list[str]                     # this rank's drawn captions (read by a student text tower)
    teacher_image: torch.Tensor          # (B, D) teacher embeddings of the whole batch's images
    teacher_text: torch.Tensor | None    # (P, D) ... of the whole batch's drawn captions; None without captions
    pair_image: torch.Tensor | None      # (P,) which of the B images each caption belongs to
    image_sizes: list[int]               # images of each rank (sum B)
    text_sizes: list[int]                # drawn captions of each rank (sum P)
    labels: torch.Tensor | None = None   # (B,) class index of each image, -1 = none; None without class texts
    arms: list[int] = field(default_factory=list)        # layerwise: the modules whose hidden-state terms are on
    hidden: list[torch.Tensor | None] | None = None      # layerwise: (B, g*g, D_t) teacher targets per module


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
        dev = batch.views.device
        t_txt = batch.teacher_text
        lw = self.layerwise if batch.hidden is not None and batch.arms else None
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
            s_txt = None
        elif self.text_is_teacher:
            s_txt = t_txt
        else:
            if s_txt is None:  # this rank drew no caption: an empty part of the batch's captions
                s_txt = t_txt.new_zeros((0, t_txt.shape[1]))
            s_txt = distributed.gather_with_grad(s_txt, batch.text_sizes)
        e = Embeddings(student_image=s_img, teacher_image=batch.teacher_image, student_text=s_txt,
                       teacher_text=t_txt, pair_image=batch.pair_image if t_txt is not None else None,
                       logit_scale=self.model.logit_scale, text_is_student=not self.text_is_teacher,
                       labels=batch.labels)
        values = {name: term(e) for name, term in self.losses.items()}
        if lw is not None:
            assert batch.hidden is not None
            for i in batch.arms:  # the selected modules' hidden-state terms (whole batch, like every term)
                tokens = lw.student_tokens(i)  # (b, g*g, D_t)
                tokens = distributed.gather_with_grad(tokens.flatten(1), batch.image_sizes).view(-1, *tokens.shape[1:])
                values[lw.term_name(i)] = lw.mse(tokens, batch.hidden[i])
            lw.student_outputs.clear()
        active = {k: v for k, v in values.items() if v is not None}
        if not active:
            raise UserError("no loss term applies to this data (terms needing captions on a dataset without "
                            "captions?); add feature or similarity to loss.terms")
        total, weights = self.balancer(active, batch.step)
        self.last = (e, active, weights)
        return total


def cosine_schedule(total: int, warmup: int) -> Callable[[int], float]:
    warmup = min(warmup, max(total // 5, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def _param_groups(modules: list[torch.nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    # No decay on biases, norm weights, embeddings' scale and the logit scale (the usual CLIP practice).
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _recipe_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        path = f"{prefix}{k}"
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict) and not path.startswith("loss.terms"):
            keys += _recipe_differences(a, b, path + ".")
        elif a != b and path not in RESUMABLE_CHANGES:
            keys.append(path)
    return keys


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


class Trainer:
    """Holds everything of one run; ``fit()`` trains to the end (or ``train.max_steps``)."""

    def __init__(self, recipe: Recipe, teacher: Teacher, manifests: dict[str, Manifest],
                 caches: dict[str, FeatureCache], console: Console, resume: bool = False) -> None:
        # In a distributed run (torchrun) only rank 0 prints, writes and evaluates; every rank trains.
        self.dist = distributed.current()
        if not self.dist.is_main:
            console = Console(quiet=True)
        self.recipe, self.teacher, self.console = recipe, teacher, console
        self.paths = RunPaths(Path(recipe.out))
        refuse_existing_run(self.paths, resume)
        world = self.dist.world_size
        if recipe.data.batch_size % world:
            raise UserError(f"data.batch_size {recipe.data.batch_size} (the global batch) does not split over "
                            f"{world} processes; make it a multiple of {world}")
        self.device = resolve_device(distributed.rank_device(recipe.device, self.dist))
        if self.device.type == "cpu":
            keep_freed_memory()
        self.train_manifest = manifests["train"]
        self.train_cache = caches.get("train")
        torch.manual_seed(recipe.seed)
        self.student: Student = build_student(recipe.student, teacher, recipe.name, seed=recipe.seed)
        # channels_last: the layout oneDNN (CPU) and tensor cores run convolutions fastest in.
        self.model = self.student.model.to(self.device)
        self.model.visual.to(memory_format=torch.channels_last)
        if self.dist.enabled and recipe.train.sync_batchnorm and self.device.type == "cuda":
            # BatchNorm statistics of the global batch: the number of GPUs does not change the result. (CPU/gloo
            # cannot: torch's SyncBatchNorm runs on GPUs only, so CPU ranks normalise with their own slice.)
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.student.model = self.model
        self.layerwise: Layerwise | None = None
        self.selector: Selector | None = None
        if recipe.loss.layerwise is not None:
            size = self.student.preprocess_cfg["size"]
            size = int(size[-1] if isinstance(size, (list, tuple)) else size)
            self.layerwise = Layerwise(recipe.loss.layerwise, self.model, teacher.model, size).to(self.device)
            self.selector = build_selector(recipe.select, self.layerwise.names, seed=recipe.seed)
        self.projection: torch.nn.Linear | None = None
        if self.student.embed_dim != teacher.embed_dim:  # another width: a learned map to the teacher's space
            self.projection = torch.nn.Linear(self.student.embed_dim, teacher.embed_dim, bias=False).to(self.device)
        self.features = TeacherFeatures(teacher, self.train_cache)
        self.captions = self.train_manifest.all_captions()
        self.offsets = self.train_manifest.caption_offsets

        self.descriptions = read_class_descriptions(recipe.data.class_descriptions) \
            if recipe.data.class_descriptions else None
        # Class texts are kept next to the feature cache; a run with the teacher online writes no cache at all.
        self._class_text_root = recipe.cache.root if recipe.train.teacher == "cached" \
            else None
        context = LossContext(embed_dim=teacher.embed_dim, text_bank=self._text_bank(),
                              class_text=self._class_text())
        terms = {n: validate_term_options(n, o) for n, o in recipe.loss.terms.items()}
        self.losses = build_losses(terms, context).to(self.device)
        names, base = list(terms), {n: o.weight for n, o in terms.items()}
        if self.layerwise is not None:  # one term per module; a module that is off leaves the balancer untouched
            for i in range(len(self.layerwise.specs)):
                names.append(self.layerwise.term_name(i))
                base[self.layerwise.term_name(i)] = recipe.loss.layerwise.weight
        self.balancer: Balancer = build_balancer(validate_balancer(recipe.loss.balancer), names,
                                                 base).to(self.device)
        self.balancer.bind_shared(self._shared_layer())

        ok = self.train_cache.image_ok.astype(bool) if self.train_cache is not None \
            else np.ones(len(self.train_manifest), dtype=bool)
        self.batches = EpochBatches(np.flatnonzero(ok), recipe.data.batch_size, recipe.seed, self.dist.rank, world)
        if self.batches.per_epoch == 0:
            raise UserError(f"data.train: no readable images in {self.train_manifest.path}")
        total = recipe.train.epochs * self.batches.per_epoch
        self.total_steps = min(total, recipe.train.max_steps or total)

        modules: list[torch.nn.Module] = [self.model] + ([self.projection] if self.projection else []) + \
            ([self.layerwise] if self.layerwise is not None else [])
        groups = _param_groups(modules, recipe.train.weight_decay)
        if self.balancer.learned:
            groups.append({"params": list(self.balancer.parameters()), "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, lr=recipe.train.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_schedule(self.total_steps, recipe.train.warmup_steps))
        self.amp_dtype = None
        if self.device.type == "cuda" and recipe.train.amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        pp = self.student.preprocess_cfg
        transform = student_train_transform(pp["size"], pp["mean"], pp["std"], recipe.data.augment.scale,
                                            recipe.data.augment.hflip)
        self.dataset = TrainImages([e.image for e in self.train_manifest.entries], transform, recipe.seed,
                                   teacher.preprocess if self.train_cache is None else None)
        self.bad = BadImages(len(self.train_manifest), recipe.data.max_bad_fraction, "train", console)
        self.state = TrainState()
        self.val: ValData | None = None
        self.has_val = "val" in manifests  # the same on every rank; only rank 0 holds (and evaluates) the val data
        if self.has_val and self.dist.is_main:
            self.val = prepare_val(manifests["val"], teacher, caches.get("val"), recipe.eval.prompt,
                                   recipe.data.batch_size, recipe.data.workers, console, self.descriptions,
                                   recipe.data.description_prompt, self._class_text_root)
        self.ood: ValData | None = None
        if "ood_val" in manifests and self.dist.is_main:
            self.ood = prepare_val(manifests["ood_val"], teacher, caches.get("ood_val"), recipe.eval.prompt,
                                   recipe.data.batch_size, recipe.data.workers, console, self.descriptions,
                                   recipe.data.description_prompt, self._class_text_root)
            check_ood_classes(manifests)
        self._held: tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]] | None = None
        if self.selector is not None and self.selector.needs_reward:
            self._held = self._held_batch()
        self._prepare_run_dir(resume)
        self.tb = None
        if recipe.train.tensorboard and self.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.paths.tensorboard), purge_step=self.state.step + 1)
        self.step_module = DistillStep(self.model, self.projection, self.losses, self.balancer,
                                       self.student.text_is_teacher, teacher.tokenizer, self.amp_dtype,
                                       self.layerwise)
        self._arms: list[int] = []
        self.step_fn: torch.nn.Module = self.step_module
        self._batch_images = 0  # images of the latest batch, all ranks together
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel
            # find_unused_parameters: a step's total may not reach every parameter (see DistillStep); DDP then
            # leaves the gradient of a parameter no rank used at None, as one process would. No buffer sync in
            # forward: queues and balancer state are identical by construction, and rank 0's BatchNorm running
            # statistics are the ones saved.
            no_sync = {"forward_sync_buffers": False} \
                if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
                else {"broadcast_buffers": False}
            self.step_fn = DistributedDataParallel(
                self.step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True, **no_sync)

    # ------------------------------------------------------------------------------------------ set-up

    def _text_bank(self) -> torch.Tensor | None:
        if "vl_align" not in self.recipe.loss.terms or self.train_cache is None or self.train_cache.n_texts == 0:
            return None
        n, size = self.train_cache.n_texts, int(self.recipe.loss.terms["vl_align"]["bank_size"])
        rows = np.arange(n) if n <= size else \
            np.sort(np.random.default_rng(self.recipe.seed).choice(n, size, replace=False))
        return self.train_cache.text_features(rows).float().to(self.device)

    def _class_text(self) -> torch.Tensor | None:
        """The teacher's class texts of the training classes, when a term uses them and the images have labels.

        Sets ``train_classes`` (sorted names) and ``train_labels`` ((N,) class index per training image, -1 = none).
        """
        r = self.recipe
        self.train_classes, labels = label_index([e.label for e in self.train_manifest.entries])
        self.train_labels: np.ndarray | None = None
        wanted = {"vl_align", "classification"} & set(r.loss.terms)
        if labels is None:
            if "classification" in r.loss.terms:
                raise UserError(f"loss.terms.classification needs class labels in data.train ({self.train_manifest.path} "
                                f"has no \"label\" on its images); remove the term or add labels")
            return None
        if not wanted:
            return None
        self.train_labels = labels.numpy()
        sets = class_prompt_sets(self.train_classes, r.eval.prompt, self.descriptions, r.data.description_prompt)
        return class_text_features(self.teacher, sets, self._class_text_root).to(self.device)

    def _held_batch(self) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """The reward's held batch: a seeded sample of training images, clean views for student and teacher.

        -> (student views (H, 3, S, S), teacher embeddings (H, D), teacher targets per module), on the device.
        """
        assert self.layerwise is not None and self.selector is not None
        want = self.selector.options.held_batch
        order = np.random.default_rng(seed_of(self.recipe.seed, 31337)).permutation(len(self.train_manifest))
        transform = student_eval_transform(self.student)
        views, teacher_views = [], []
        for i in order:
            try:
                image = open_image(self.train_manifest.entries[int(i)].image)
            except Exception:  # noqa: BLE001 - an unreadable image is simply not held
                continue
            views.append(transform(image))
            teacher_views.append(self.teacher.preprocess(image))
            if len(views) == want:
                break
        if len(views) < 2:
            raise UserError("select: the held batch needs at least 2 readable training images")
        t_emb, targets = self.layerwise.teacher_targets(self.teacher, torch.stack(teacher_views).to(self.device))
        return (torch.stack(views).to(self.device, memory_format=torch.channels_last), t_emb.to(self.device),
                [t.to(self.device) for t in targets])

    @torch.no_grad()
    def _held_loss(self) -> float:
        """The distillation loss on the held batch (eval mode): mean hidden-state MSE over every module plus the
        squared distance of the normalised output embeddings. The same number on every rank (rank 0's)."""
        assert self._held is not None and self.layerwise is not None
        views, t_emb, targets = self._held
        lw = self.layerwise
        was = self.model.training
        self.model.eval()
        lw.capturing = True
        try:
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                s_img = self.model.encode_image(views)
            s_img = s_img.float()
            if self.projection is not None:
                s_img = self.projection(s_img)
            hidden = torch.stack([lw.mse(lw.student_tokens(i).float(), targets[i]) for i in range(len(lw.specs))])
            out = (torch.nn.functional.normalize(s_img, dim=-1)
                   - torch.nn.functional.normalize(t_emb, dim=-1)).pow(2).sum(-1).mean()
            value = float(hidden.mean() + out)
        finally:
            lw.capturing = False
            lw.student_outputs.clear()
            self.model.train(was)
        return float(distributed.broadcast_object(value))

    def _after_selection_step(self) -> dict[str, Any] | None:
        """Count the step for the selector; at the end of a pull measure the reward -> the record to log."""
        sel = self.selector
        if sel is None or not self._arms:
            return None
        sel.stepped(self._arms)
        if not sel.pull_done:
            return None
        before = float(sel.loss_before)
        after = self._held_loss()
        reward = (before - after) / max(abs(before), 1e-12) if sel.options.reward == "relative" else before - after
        arm = int(sel.current)
        sel.observe(reward)
        sel.loss_before.fill_(after)  # the next pull starts from here: one measurement per pull
        record: dict[str, Any] = {"module": sel.names[arm], "reward": reward, "loss_before": before,
                                  "loss_after": after, "counts": sel.counts()}
        posterior = sel.posterior()
        if posterior is not None:
            record["posterior_mean"] = {k: v[0] for k, v in posterior.items()}
            record["posterior_std"] = {k: v[1] for k, v in posterior.items()}
        return record

    def _shared_layer(self) -> list[torch.nn.Parameter]:
        # The last layer every term's gradient flows through: the vision tower's projection head.
        trunk = getattr(self.model.visual, "trunk", None)
        head = trunk.get_classifier() if trunk is not None and hasattr(trunk, "get_classifier") else None
        params = [p for p in head.parameters()] if isinstance(head, torch.nn.Module) else []
        return params or [p for p in self.model.visual.parameters()][-2:]

    def _prepare_run_dir(self, resume: bool) -> None:
        paths = self.paths
        if resume and paths.last.exists():
            old = read_yaml(paths.recipe, "run recipe") if paths.recipe.exists() else {}
            changed = _recipe_differences(old or {}, self.recipe.model_dump(mode="json"))
            if changed:
                raise UserError(f"--resume: the recipe changed since the run started ({', '.join(changed[:3])}); "
                                f"resume with the recipe in {paths.recipe}, or start a new run with out=...")
            self._load_checkpoint(paths.last)  # every rank: they continue from the same state
            self.console.print(f"resuming {paths.out} at step {self.state.step} (epoch {self.state.epoch + 1}, "
                               f"batch {self.state.batch})", highlight=False)
            if self.dist.is_main:
                self._truncate_metrics(self.state.step)
        elif resume:
            self.console.print(f"--resume: no checkpoint in {paths.checkpoints} yet; starting the run",
                               highlight=False)
        if not self.dist.is_main:
            return
        if not resume or not paths.last.exists():
            paths.metrics.unlink(missing_ok=True)
        save_recipe(self.recipe, paths.recipe)

    def _truncate_metrics(self, step: int) -> None:
        """Drop log lines written after the checkpoint (their steps run again)."""
        if not self.paths.metrics.exists():
            return
        kept = []
        for line in self.paths.metrics.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
        atomic.write_text(self.paths.metrics, "".join(k + "\n" for k in kept))

    # -------------------------------------------------------------------------------------- checkpoints

    def _checkpoint(self) -> dict[str, Any]:
        s = self.state
        return {
            "format": 1, "state": s.__dict__.copy(),
            "model": self.model.state_dict(),
            "projection": self.projection.state_dict() if self.projection else None,
            "losses": self.losses.state_dict(), "balancer": self.balancer.state_dict(),
            "layerwise": self.layerwise.state_dict() if self.layerwise is not None else None,
            "selector": self.selector.state_dict() if self.selector is not None else None,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": _rng_state(),
        }

    def _save(self, path: Path, payload: dict[str, Any] | None = None) -> None:
        if not self.dist.is_main:  # every rank holds the same state; rank 0 writes it
            return
        with atomic.atomic_path(path) as tmp:
            torch.save(payload if payload is not None else self._checkpoint(), tmp)

    def _load_checkpoint(self, path: Path) -> None:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"--resume: cannot read {path} ({str(e).splitlines()[0][:120]}); "
                            "delete it to restart the run") from e
        self.model.load_state_dict(ckpt["model"])
        if self.projection is not None:
            self.projection.load_state_dict(ckpt["projection"])
        self.losses.load_state_dict(ckpt["losses"])
        self.balancer.load_state_dict(ckpt["balancer"])
        if self.layerwise is not None:
            self.layerwise.load_state_dict(ckpt["layerwise"])
        if self.selector is not None:
            self.selector.load_state_dict(ckpt["selector"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(**ckpt["state"])
        _set_rng_state(ckpt["rng"])

    # ------------------------------------------------------------------------------------------- logging

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.paths.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in _flatten(record).items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    # ------------------------------------------------------------------------------------------ one step

    def _pairs(self, indices: torch.Tensor) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """One caption per captioned image of the batch, drawn from (seed, step): rows, positions, texts."""
        rng = np.random.default_rng(seed_of(self.recipe.seed, 7919, self.state.step))
        rows, positions = [], []
        for pos, i in enumerate(indices.tolist()):
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            if hi > lo:
                rows.append(int(rng.integers(lo, hi)))
                positions.append(pos)
        return np.asarray(rows, dtype=np.int64), np.asarray(positions, dtype=np.int64), \
            [self.captions[r] for r in rows]

    def _rank_batch(self, indices: torch.Tensor, views: torch.Tensor | None,
                    teacher_views: torch.Tensor | None) -> RankBatch | None:
        """This rank's part of the step and the whole batch's bookkeeping; None when the batch is too small.

        The caption draw is made for the whole batch (the indices of all ranks, in rank order), so it is the
        draw one process makes; each rank then embeds its own captions.
        """
        dev, ctx = self.device, self.dist
        sizes = distributed.gather_sizes(len(indices))
        self._batch_images = sum(sizes)
        if sum(sizes) < 2 or min(sizes) == 0:  # in-batch terms need 2 images; a rank without any cannot step
            return None
        everyone = distributed.all_gather_rows(indices, sizes)
        rows, positions, texts = self._pairs(everyone)
        bounds = np.cumsum([0, *sizes])
        text_sizes = [int(((positions >= a) & (positions < b)).sum()) for a, b in zip(bounds[:-1], bounds[1:])]
        mine = np.flatnonzero((positions >= bounds[ctx.rank]) & (positions < bounds[ctx.rank + 1]))
        my_texts = [texts[i] for i in mine]
        hidden: list[torch.Tensor | None] | None = None
        with torch.no_grad():
            if self.layerwise is not None and self._arms:
                assert teacher_views is not None  # layerwise runs the teacher online
                local, targets = self.layerwise.teacher_targets(self.teacher, teacher_views.to(dev, non_blocking=True))
                t_img = distributed.all_gather_rows(local.to(dev), sizes)
                hidden = [distributed.all_gather_rows(t.flatten(1), sizes).view(-1, *t.shape[1:])
                          if i in self._arms else None for i, t in enumerate(targets)]
            else:
                t_img = distributed.all_gather_rows(self.features.images(indices, teacher_views).to(dev), sizes)
            t_txt = None
            if len(rows):
                local = self.features.texts(rows[mine], my_texts).to(dev) if len(mine) else \
                    torch.zeros(0, self.teacher.embed_dim, device=dev)
                t_txt = distributed.all_gather_rows(local, text_sizes)
        assert views is not None
        return RankBatch(
            step=self.state.step, views=views.to(dev, non_blocking=True, memory_format=torch.channels_last),
            texts=my_texts, teacher_image=t_img, teacher_text=t_txt,
            pair_image=torch.from_numpy(positions).to(dev) if t_txt is not None else None,
            image_sizes=sizes, text_sizes=text_sizes,
            labels=torch.from_numpy(self.train_labels[everyone.cpu().numpy()]).to(dev)
            if self.train_labels is not None else None,
            arms=list(self._arms), hidden=hidden)

    def _step(self, indices: torch.Tensor, views: torch.Tensor | None, teacher_views: torch.Tensor | None
              ) -> dict[str, Any] | None:
        """One optimizer step; None when the loss was not finite (or the batch too small) and it was skipped."""
        self._arms = []
        if self.selector is not None:
            if self.selector.needs_reward and bool(torch.isnan(self.selector.loss_before)):
                self.selector.loss_before.fill_(self._held_loss())  # the first pull's "before"
            self._arms = self.selector.active()
        batch = self._rank_batch(indices, views, teacher_views)
        if batch is None:
            self._arms = []
        if batch is None:
            return None
        total = self.step_fn(batch)
        assert self.step_module.last is not None
        e, active, weights = self.step_module.last
        finite = bool(torch.isfinite(total))
        if self.dist.enabled:  # every rank computes the same total; agree anyway, or DDP would wait forever
            finite = not distributed.any_rank(not finite)
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.scaler.scale(total).backward()
        grad_norm = None
        if self.recipe.train.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.recipe.train.grad_clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        for term in self.losses.values():
            term.after_step(e)  # the whole batch: every rank's queue gets the same keys
        out = {"loss": float(total.detach()), "terms": {k: float(v.detach()) for k, v in active.items()},
               "weights": weights}
        if grad_norm is not None:
            out["grad_norm"] = grad_norm  # before clipping; the same on every rank (DDP averaged the gradients)
        return out

    # ---------------------------------------------------------------------------------------- evaluation

    def evaluate(self) -> dict[str, float]:
        assert self.val is not None
        r = self.recipe
        return evaluate_student(self.student, self.val, self.teacher.tokenizer, self.device, r.eval.batch_size,
                                r.data.workers, self.projection, text_from_cache=True, console=self.console)

    def _eval_and_keep_best(self) -> None:
        """Rank 0 evaluates and keeps the best model; the others wait for the outcome (the same TrainState)."""
        s = self.state
        if self.dist.is_main:
            metrics = self.evaluate()
            self._log({"step": s.step, "epoch": s.epoch, "eval": metrics})
            score = metrics.get("rsum", metrics.get("cosine_to_teacher", 0.0))  # no captions: closeness to teacher
            if score > s.best_rsum:
                s.best_rsum, s.best_step, s.best_metrics = score, s.step, metrics
                self._save(self.paths.best, {"format": 1, "step": s.step, "model": self.model.state_dict(),
                                             "projection": self.projection.state_dict() if self.projection else None,
                                             "metrics": metrics})
        if self.dist.enabled:
            s.best_rsum, s.best_step, s.best_metrics = distributed.broadcast_object(
                (s.best_rsum, s.best_step, s.best_metrics))

    # ------------------------------------------------------------------------------------------- the loop

    def fit(self) -> dict[str, Any]:
        """Train to the end (or train.max_steps), then save the student and the summary."""
        r = self.recipe
        per_epoch = self.batches.per_epoch
        eval_every = r.train.eval_every or per_epoch
        ckpt_every = r.train.checkpoint_every or per_epoch
        fault_step = int(os.environ.get(FAULT_ENV, "0") or 0)
        fault_rank = os.environ.get(FAULT_RANK_ENV, "")
        if fault_rank and int(fault_rank) != self.dist.rank:
            fault_step = 0
        columns = [TextColumn("[bold]distill[/]"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn()]
        self._stop_requested = False
        previous = self._install_interrupt_handler()
        try:
            self._loop(per_epoch, eval_every, ckpt_every, fault_step, columns)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        return self.finish()

    def _install_interrupt_handler(self) -> Any:
        """First Ctrl-C: finish the step, write checkpoints/last.pt, stop. A second one stops at once."""
        import threading
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum: int, frame: Any) -> None:
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            self.console.print("[yellow]interrupt: finishing this step and saving a checkpoint (Ctrl-C again to "
                               "stop at once)[/]")
        return signal.signal(signal.SIGINT, handler)

    def _loop(self, per_epoch: int, eval_every: int, ckpt_every: int, fault_step: int, columns: list) -> None:
        r, s = self.recipe, self.state
        last_eval = -1
        with Progress(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task("distill", total=self.total_steps, completed=s.step, info="")
            while s.step < self.total_steps and s.epoch < r.train.epochs:
                self.batches.set_epoch(s.epoch, s.batch)
                self.dataset.epoch = s.epoch
                loader = torch.utils.data.DataLoader(
                    self.dataset, batch_sampler=self.batches, num_workers=r.data.workers,
                    collate_fn=collate_train, pin_memory=self.device.type == "cuda",
                    generator=torch.Generator().manual_seed(r.seed))  # keeps the global RNG untouched
                tick = time.perf_counter()
                for indices, views, teacher_views, failed in loader:
                    for i, why in failed:
                        self.bad.add(i, self.dataset.paths[i], why)
                    s.step += 1
                    s.batch += 1
                    out = self._step(indices, views, teacher_views)
                    selection = self._after_selection_step()
                    now = time.perf_counter()
                    s.train_seconds += now - tick
                    s.images += self._batch_images
                    if out is None:
                        s.skipped += 1
                        s.bad_streak += 1
                        self.console.print(f"[yellow]warning:[/] step {s.step}: loss is not finite; step skipped",
                                           highlight=False)
                        if s.bad_streak >= MAX_BAD_STEPS:
                            raise UserError(
                                f"the loss was not finite for {MAX_BAD_STEPS} steps in a row (step {s.step}); "
                                f"stopped. The last good checkpoint is {self.paths.last}. Lower train.lr or "
                                f"check the data, then run again with --resume")
                    else:
                        s.bad_streak = 0
                        rate = s.images / max(s.train_seconds, 1e-9)
                        info = f"loss {out['loss']:.4f} " + " ".join(
                            f"{k}={w:.2f}" for k, w in out["weights"].items()) + f"  {rate:.1f} img/s"
                        bar.update(task, completed=s.step, info=info)
                        if s.step % r.train.log_every == 0 or s.step == self.total_steps:
                            self._log({"step": s.step, "epoch": s.epoch, "lr": self.scheduler.get_last_lr()[0],
                                       **out, "images_per_s": rate, "skipped": s.skipped})
                    if selection is not None:
                        self._log({"step": s.step, "epoch": s.epoch, "selection": selection})
                    self.scheduler.step()
                    end_of_epoch = s.batch >= per_epoch
                    if end_of_epoch:
                        s.epoch, s.batch = s.epoch + 1, 0
                    if self.has_val and (s.step % eval_every == 0 or s.step == self.total_steps):
                        self._eval_and_keep_best()
                        last_eval = s.step
                    due = s.step % ckpt_every == 0 or end_of_epoch or s.step == self.total_steps
                    if due and s.bad_streak == 0:  # never checkpoint in the middle of a run of bad steps
                        self._save(self.paths.last)
                    if fault_step and s.step == fault_step:
                        os.kill(os.getpid(), signal.SIGKILL)
                    if distributed.any_rank(self._stop_requested):  # every rank stops after the same step
                        if not due and s.bad_streak == 0:
                            self._save(self.paths.last)
                        distributed.barrier()  # rank 0 has written last.pt before anyone exits
                        raise KeyboardInterrupt
                    if s.step >= self.total_steps:
                        break
                    tick = time.perf_counter()
        if self.has_val and last_eval != s.step and s.best_step != s.step:
            self._eval_and_keep_best()

    def finish(self) -> dict[str, Any]:
        """Save the student (best by val RSUM when there is a val split) and write summary.json (rank 0)."""
        s = self.state
        if not self.dist.is_main:
            distributed.barrier()  # until rank 0 has written everything
            return {}
        if self.val is not None and self.paths.best.exists():
            best = torch.load(self.paths.best, map_location="cpu", weights_only=True)
            self.model.load_state_dict(best["model"])
        save_student(self.student, self.paths.student,
                     {"teacher": self.teacher.identity, "recipe": self.recipe.name, "step": s.best_step or s.step})
        summary: dict[str, Any] = {"teacher": None, "student": None, "retention": None}
        if self.val is not None:
            t = teacher_metrics(self.val)
            summary["teacher"] = t
            summary["student"] = s.best_metrics
            summary["retention"] = retention(s.best_metrics, t)
            summary["best_step"] = s.best_step
        if self.selector is not None and self.layerwise is not None:
            summary["selection"] = self.selector.summary()
            summary["layerwise_modules"] = {sp.name: {"teacher_layer": sp.teacher_layer, "grid": sp.grid,
                                                      "channels": sp.channels} for sp in self.layerwise.specs}
        if self.ood is not None:
            r = self.recipe
            summary["ood_zero_shot"], summary["ood_few_shot"] = evaluate_ood(
                self.student, self.ood, self.teacher.tokenizer, self.device, r.eval.few_shot, r.eval.few_shot_repeats,
                r.eval.tip_alpha, r.eval.tip_beta, r.seed, r.eval.batch_size, r.data.workers, console=self.console,
                prompts="descriptions" if self.descriptions else "plain")
        summary.update({
            "steps": s.step, "skipped_steps": s.skipped, "epochs": s.epoch,
            "wall_s": s.train_seconds, "train_images_per_s": s.images / max(s.train_seconds, 1e-9),
            "bad_images": len(self.bad.items) + (len(self.train_cache.bad_images) if self.train_cache else 0),
            "device": str(self.device), "processes": self.dist.world_size, "student_vision": self.recipe.student.vision,
            "student_parameters": sum(p.numel() for p in self.model.visual.parameters()),
            "val_images": len(self.val.image_rows) if self.val is not None else 0,
        })
        atomic.write_json(self.paths.summary, summary)
        if self.tb is not None:
            self.tb.close()
        distributed.barrier()
        return summary


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


def refuse_existing_run(paths: RunPaths, resume: bool) -> None:
    if paths.last.exists() and not resume:
        raise UserError(f"{paths.out} already holds a run (checkpoints/last.pt); add --resume to continue it, "
                        f"or set out=... for a new run")


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def distill(recipe: Recipe, console: Console | None = None, resume: bool = False) -> dict[str, Any] | None:
    """Everything ``edgedistill distill`` does: teacher, caches, student, training, summary.

    Under torchrun every process runs this; it joins the process group from the environment. Returns the
    summary on rank 0 and None on the other ranks.
    """
    ctx = distributed.init_from_env(recipe.device)
    if not ctx.is_main:
        console = Console(quiet=True)
    console = console or Console(stderr=True, soft_wrap=True)
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
            if os.environ.get(distributed.LAUNCHED_ENV):  # `--nproc`: the launcher names the rank that stopped
                raise SystemExit(distributed.LOST_CONTACT_EXIT) from e
            last = RunPaths(Path(recipe.out)).last
            why = (str(e).splitlines() or [type(e).__name__])[0][:160]
            raise UserError(f"rank {ctx.rank} lost contact with the other processes of this run: another rank "
                            f"stopped or hangs ({why}); {last} is intact: run the same command again with "
                            f"--resume") from e
        raise
    finally:
        distributed.cleanup()


def _distill(recipe: Recipe, console: Console, resume: bool, ctx: distributed.Context) -> dict[str, Any]:
    refuse_existing_run(RunPaths(Path(recipe.out)), resume)
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
    trainer = Trainer(recipe, teacher, manifests, caches, console, resume=resume)
    per_rank = f" ({recipe.data.batch_size // ctx.world_size} on each of {ctx.world_size} processes)" \
        if ctx.enabled else ""
    console.print(f"student {recipe.student.vision} ({sum(p.numel() for p in trainer.model.visual.parameters()) / 1e6:.2f}M "
                  f"vision parameters), {trainer.total_steps} steps of {recipe.data.batch_size}{per_rank} on "
                  f"{trainer.device}; run directory {trainer.paths.out}", highlight=False)
    if trainer.layerwise is not None and trainer.selector is not None:
        mods = ", ".join(f"{sp.name}->teacher block {sp.teacher_layer} ({sp.grid}x{sp.grid})"
                         for sp in trainer.layerwise.specs)
        console.print(f"layerwise distillation, the teacher runs online (hidden states are not cached); modules: "
                      f"{mods}; selection: {trainer.selector.name}", highlight=False)
    return trainer.fit()
