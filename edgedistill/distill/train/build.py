"""Assembling a run: from the recipe, the teacher, the manifests and the feature caches to the ``Parts`` the
trainer steps with (student, losses and balancer, layerwise modules and their selector, optimisation, data)."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from rich.console import Console

import edgedistill.distill.distributed as distributed
from edgedistill.distill.balance import Balancer, build_balancer
from edgedistill.distill.cache import FeatureCache, class_text_features
from edgedistill.data.images import BadImages, DecodedImages, open_image
from edgedistill.data.manifest import Manifest
from edgedistill.data.transforms import Render
from edgedistill.core.errors import UserError
from edgedistill.distill.evaluate import ValData, prepare_val, student_eval_transform
from edgedistill.core.hashing import seed_of
from edgedistill.distill.layerwise import HeldBatch, Layerwise
from edgedistill.distill.losses import LossContext, build_losses
from edgedistill.distill.memory import keep_freed_memory
from edgedistill.distill.recipe import Recipe
from edgedistill.runtime.preprocess import image_side
from edgedistill.distill.select import SelectionControl, build_selector
from edgedistill.distill.students import Student, build_student
from edgedistill.distill.teachers import Teacher, resolve_device
from edgedistill.evaluation.split import ClassPrompts, label_index
from edgedistill.distill.train.batches import BatchAssembler, EpochBatches, TeacherFeatures, TrainImages
from edgedistill.distill.train.rundir import RunDir
from edgedistill.distill.train.step import DistillStep, Optimization, param_groups
from edgedistill.distill.train.trainer import Parts
from edgedistill.distill.views import ReinforcedViews, render_of, views_for_recipe


def build_parts(recipe: Recipe, teacher: Teacher, manifests: dict[str, Manifest], caches: dict[str, FeatureCache],
                console: Console) -> Parts:
    """Everything one run trains with. In a distributed run every rank builds the same parts; only rank 0 holds
    the val splits (it alone evaluates)."""
    ctx = distributed.current()
    if recipe.data.batch_size % ctx.world_size:
        raise UserError(f"data.batch_size {recipe.data.batch_size} (the global batch) does not split over "
                        f"{ctx.world_size} processes; make it a multiple of {ctx.world_size}")
    device = resolve_device(distributed.rank_device(recipe.device, ctx))
    if device.type == "cpu":
        keep_freed_memory()
    train, cache = manifests["train"], caches.get("train")
    student, model = _student(recipe, teacher, device)
    layerwise = Layerwise(recipe.loss.layerwise, model, teacher.model, image_side(student.preprocess_cfg)).to(device) \
        if recipe.loss.layerwise is not None else None
    projection = torch.nn.Linear(student.embed_dim, teacher.embed_dim, bias=False).to(device) \
        if student.embed_dim != teacher.embed_dim else None  # another width: a learned map to the teacher's space
    prompts = ClassPrompts.from_recipe(recipe)
    class_root = recipe.cache.root if recipe.train.teacher == "cached" else None  # online: nothing is written
    labels, class_text = _class_texts(recipe, train, teacher, prompts, class_root, device)
    losses = build_losses(recipe.loss.terms, LossContext(embed_dim=teacher.embed_dim, class_text=class_text,
                                                         text_bank=_text_bank(recipe, cache, device),
                                                         teacher_logit_scale=_logit_scale(teacher))).to(device)
    balancer = _balancer(recipe, layerwise, model, device)
    batches = _batches(recipe, train, cache, ctx)
    views = _views(recipe, teacher, train, cache, console)
    total = min(recipe.train.epochs * batches.per_epoch, recipe.train.max_steps or recipe.train.epochs *
                batches.per_epoch)
    amp_dtype = _amp_dtype(recipe, device)
    modules = [m for m in (model, projection, layerwise, losses) if m is not None]  # terms may learn (icl)
    groups = param_groups(modules, recipe.train.weight_decay)
    if balancer.learned:
        groups.append({"params": list(balancer.parameters()), "weight_decay": 0.0})
    optim = Optimization(groups, recipe.train.lr, total, recipe.train.warmup_steps, recipe.train.grad_clip,
                         amp_dtype)
    selector, selection = _selection(recipe, layerwise, model, projection, train, teacher, student, amp_dtype,
                                     device)
    val, ood = _val_splits(recipe, manifests, teacher, caches, console, prompts, class_root, ctx)
    pp = student.preprocess_cfg
    return Parts(
        recipe=recipe, teacher=teacher, console=console, device=device, student=student, model=model,
        projection=projection, losses=losses, balancer=balancer, layerwise=layerwise, selector=selector,
        selection=selection, optim=optim,
        step_module=DistillStep(model, projection, losses, balancer, student.text_is_teacher, teacher.tokenizer,
                                amp_dtype, layerwise),
        dataset=TrainImages([e.image for e in train.entries], render_of(pp), recipe.seed,
                            recipe.data.augment.scale, recipe.data.augment.hflip, _teacher_input(recipe, teacher),
                            views.view_params if views is not None else None,
                            _decoded(recipe, train, console, ctx.world_size)),
        batches=batches, assemble=BatchAssembler(recipe.seed, train, TeacherFeatures(teacher, cache, views), device,
                                                 labels, layerwise),
        bad=BadImages(len(train), recipe.data.max_bad_fraction, "train", console), train_cache=cache,
        val=val, ood=ood, has_val="val" in manifests, describe_prompts=prompts.kind,
        total_steps=total, run=RunDir(recipe.out))


def _decoded(recipe: Recipe, train: Manifest, console: Console, world_size: int) -> DecodedImages | None:
    """data.in_memory: the training images decoded once, before the first step (each rank holds a copy)."""
    if not recipe.data.in_memory:
        return None
    started = time.perf_counter()
    decoded = DecodedImages([e.image for e in train.entries], processes=world_size)
    console.print(f"data.in_memory: {len(decoded)} training images decoded into {decoded.nbytes / 1e6:.0f} MB "
                  f"in {time.perf_counter() - started:.1f} s")
    return decoded


def _teacher_input(recipe: Recipe, teacher: Teacher) -> Render | Callable | None:
    """What TrainImages hands an online teacher: the student's very view (consistent) or the clean crop."""
    if recipe.train.teacher == "cached":  # (layerwise distillation always runs the teacher online)
        return None
    if recipe.train.teacher_view == "consistent":
        return render_of(teacher.preprocess_cfg)
    return teacher.preprocess


def _views(recipe: Recipe, teacher: Teacher, train: Manifest, cache: FeatureCache | None,
           console: Console) -> ReinforcedViews | None:
    """The reinforced cache: stored views with the teacher's embedding of each (cached, consistent teacher)."""
    if cache is None or recipe.train.teacher_view != "consistent":
        return None
    return views_for_recipe(recipe, teacher, train, cache, console)


def _student(recipe: Recipe, teacher: Teacher, device: torch.device) -> tuple[Student, torch.nn.Module]:
    torch.manual_seed(recipe.seed)
    student = build_student(recipe.student, teacher, recipe.name, seed=recipe.seed)
    model = student.model.to(device)
    # channels_last: the layout oneDNN (CPU) and tensor cores run convolutions fastest in.
    model.visual.to(memory_format=torch.channels_last)
    if distributed.current().enabled and recipe.train.sync_batchnorm and device.type == "cuda":
        # BatchNorm statistics of the global batch: the number of GPUs does not change the result. (CPU/gloo
        # cannot: torch's SyncBatchNorm runs on GPUs only, so CPU ranks normalise with their own slice.)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        student.model = model
    return student, model


def _class_texts(recipe: Recipe, train: Manifest, teacher: Teacher, prompts: ClassPrompts, root: object,
                 device: torch.device) -> tuple[np.ndarray | None, torch.Tensor | None]:
    """The training images' class index ((N,), -1 = none) and the teacher's class texts (C, D), when a term uses
    them and the images have labels."""
    classes, labels = label_index([e.label for e in train.entries])
    terms = recipe.loss.terms
    if labels is None:
        if "classification" in terms:
            raise UserError(f"loss.terms.classification needs class labels in data.train ({train.path} has no "
                            f"\"label\" on its images); remove the term or add labels")
        return None, None
    if not {"vl_align", "classification"} & set(terms):
        return None, None
    return labels, class_text_features(teacher, prompts.sets(classes), root).to(device)  # type: ignore[arg-type]


def _logit_scale(teacher: Teacher) -> float | None:
    """The teacher's CLIP logit scale, exp'ed (logit_kl's teacher logits); None for a model without one."""
    scale = getattr(teacher.model, "logit_scale", None)
    return float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else None


CAPTION_BANK_TERMS = ("vl_align", "caption_rank")  # the terms with a bank_size that rank training captions


def _text_bank(recipe: Recipe, cache: FeatureCache | None, device: torch.device) -> torch.Tensor | None:
    """The caption bank (vl_align's candidates without class texts, caption_rank's captions): a seeded sample of
    the cached training captions, as many as the largest bank_size of those terms (a term with a smaller one
    keeps a fixed sample of it)."""
    sizes = [int(o.bank_size) for name, o in recipe.loss.terms.items()  # type: ignore[attr-defined]
             if name in CAPTION_BANK_TERMS]
    if not sizes or cache is None or cache.n_texts == 0:
        return None
    n, size = cache.n_texts, max(sizes)
    rows = np.arange(n) if n <= size else np.sort(np.random.default_rng(recipe.seed).choice(n, size, replace=False))
    return cache.text_features(rows).float().to(device)


def _balancer(recipe: Recipe, layerwise: Layerwise | None, model: torch.nn.Module,
              device: torch.device) -> Balancer:
    """The recipe's balancer over every term, one per layerwise module too (a module that is off leaves it be)."""
    base = {n: o.weight for n, o in recipe.loss.terms.items()}
    if layerwise is not None:
        base.update({layerwise.term_name(i): recipe.loss.layerwise.weight  # type: ignore[union-attr]
                     for i in range(len(layerwise.specs))})
    balancer = build_balancer(recipe.loss.balancer, list(base), base).to(device)
    # The last layer every term's gradient flows through: the vision tower's projection head (gradnorm uses it).
    trunk = getattr(model.visual, "trunk", None)
    head = trunk.get_classifier() if trunk is not None and hasattr(trunk, "get_classifier") else None
    params = list(head.parameters()) if isinstance(head, torch.nn.Module) else []
    balancer.bind_shared(params or list(model.visual.parameters())[-2:])
    return balancer


def _batches(recipe: Recipe, train: Manifest, cache: FeatureCache | None,
             ctx: distributed.Context) -> EpochBatches:
    ok = cache.image_ok.astype(bool) if cache is not None else np.ones(len(train), dtype=bool)
    batches = EpochBatches(np.flatnonzero(ok), recipe.data.batch_size, recipe.seed, ctx.rank, ctx.world_size)
    if batches.per_epoch == 0:
        raise UserError(f"data.train: no readable images in {train.path}")
    return batches


def _amp_dtype(recipe: Recipe, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or not recipe.train.amp:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _selection(recipe: Recipe, layerwise: Layerwise | None, model: torch.nn.Module,
               projection: torch.nn.Module | None, train: Manifest, teacher: Teacher, student: Student,
               amp_dtype: torch.dtype | None, device: torch.device) -> tuple[object, SelectionControl | None]:
    """The module selector and what drives it (the reward's held batch and loss), with loss.layerwise."""
    if layerwise is None or recipe.select is None:
        return None, None
    selector = build_selector(recipe.select, layerwise.names, seed=recipe.seed)
    if not selector.needs_reward:
        return selector, SelectionControl(selector, lambda: float("nan"))
    held = _held_batch(layerwise, train, teacher, student, recipe.seed, selector.options.held_batch, device)
    return selector, SelectionControl(selector, lambda: distributed.broadcast_object(
        layerwise.held_loss(model, projection, held, amp_dtype)))  # rank 0's number on every rank


def _held_batch(layerwise: Layerwise, train: Manifest, teacher: Teacher, student: Student, seed: int, want: int,
                device: torch.device) -> HeldBatch:
    """A seeded sample of readable training images, clean views for student and teacher, and its targets."""
    order = np.random.default_rng(seed_of(seed, 31337)).permutation(len(train))
    transform = student_eval_transform(student)
    views, teacher_views = [], []
    for i in order:
        try:
            image = open_image(train.entries[int(i)].image)
        except Exception:  # noqa: BLE001 - an unreadable image is simply not held
            continue
        views.append(transform(image))
        teacher_views.append(teacher.preprocess(image))
        if len(views) == want:
            break
    if len(views) < 2:
        raise UserError("select: the held batch needs at least 2 readable training images")
    t_emb, targets = layerwise.teacher_targets(teacher, torch.stack(teacher_views).to(device))
    return HeldBatch(torch.stack(views).to(device, memory_format=torch.channels_last), t_emb.to(device),
                     [t.to(device) for t in targets])


def _val_splits(recipe: Recipe, manifests: dict[str, Manifest], teacher: Teacher, caches: dict[str, FeatureCache],
                console: Console, prompts: ClassPrompts, class_root: object,
                ctx: distributed.Context) -> tuple[ValData | None, ValData | None]:
    """Rank 0's val and ood_val splits with the teacher's embeddings."""
    if not ctx.is_main:
        return None, None
    out = []
    for split in ("val", "ood_val"):
        out.append(prepare_val(manifests[split], teacher, caches.get(split), prompts, recipe.data.batch_size,
                               recipe.data.workers, console, class_root)  # type: ignore[arg-type]
                   if split in manifests else None)
    return out[0], out[1]
