"""Evaluation of a student (and its teacher) on the recipe's val split: retrieval, zero-shot, agreement.

The teacher's val embeddings come from the feature cache (or one online pass); the student embeds the val
images through open_clip's eval transform at its own size, the transform a user of the saved student gets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from rich.console import Console

from edgedistill import atomic
from edgedistill.cache import FeatureCache, caches_for_recipe, load_split_manifests
from edgedistill.data.images import BadImages, ImageDataset, collate_images
from edgedistill.data.manifest import Manifest
from edgedistill.errors import UserError
from edgedistill.metrics import agreement, retrieval_metrics, zero_shot_accuracy
from edgedistill.recipe import load_recipe
from edgedistill.students import Student, load_student
from edgedistill.teachers import Teacher, load_teacher, resolve_device


@dataclass
class ValData:
    """The val split with the teacher's embeddings, restricted to the images the teacher could read."""
    manifest: Manifest
    image_rows: np.ndarray            # (N,) manifest indices of the readable images
    teacher_image: torch.Tensor       # (N, D) L2-normalised
    captions: list[str]               # (T,) captions of those images
    teacher_text: torch.Tensor        # (T, D)
    text_to_image: torch.Tensor       # (T,) long, into the N images
    labels: torch.Tensor | None       # (N,) long class index, -1 = unlabelled; None when the split has no labels
    class_names: list[str]
    class_prompts: list[str]
    teacher_class_text: torch.Tensor | None  # (C, D)


def select_rows(manifest: Manifest, ok: np.ndarray) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Readable images, their caption rows in the manifest, and each caption's image position."""
    rows = np.flatnonzero(ok)
    offsets = manifest.caption_offsets
    caption_rows = [np.arange(offsets[i], offsets[i + 1]) for i in rows]
    text_rows = np.concatenate(caption_rows) if caption_rows else np.zeros(0, dtype=np.int64)
    text_to_image = np.concatenate([np.full(len(r), k) for k, r in enumerate(caption_rows)]) \
        if caption_rows else np.zeros(0, dtype=np.int64)
    all_captions = manifest.all_captions()
    return rows, [all_captions[r] for r in text_rows], text_rows, text_to_image


def prepare_val(manifest: Manifest, teacher: Teacher, cache: FeatureCache | None, prompt: str,
                batch_size: int = 64, workers: int = 0, console: Console | None = None) -> ValData:
    """Teacher embeddings of the val split: from ``cache``, or computed now when there is none (online mode)."""
    if cache is not None:
        ok = cache.image_ok.astype(bool)
        rows, captions, text_rows, t2i = select_rows(manifest, ok)
        teacher_image = cache.image_features(rows).float()
        teacher_text = cache.text_features(text_rows).float() if len(text_rows) else torch.zeros(0, cache.dim)
    else:
        teacher_image, ok = embed_images(lambda x: teacher.embed_images(x), manifest, teacher.preprocess,
                                         teacher.device, batch_size, workers, console, "val (teacher)")
        rows, captions, text_rows, t2i = select_rows(manifest, ok)
        teacher_image = teacher_image[torch.from_numpy(ok)]
        teacher_text = torch.cat([teacher.embed_texts(captions[i:i + 256]).cpu()
                                  for i in range(0, len(captions), 256)]) if captions else \
            torch.zeros(0, teacher.embed_dim)
    labels, names = None, []
    entry_labels = [manifest.entries[i].label for i in rows]
    if any(label is not None for label in entry_labels):
        names = sorted({label for label in entry_labels if label is not None})
        index = {n: k for k, n in enumerate(names)}
        labels = torch.tensor([index[label] if label is not None else -1 for label in entry_labels])
    prompts = [prompt.format(label=n) for n in names]
    class_text = teacher.embed_texts(prompts).cpu() if prompts else None
    return ValData(manifest, rows, teacher_image.cpu(), captions, teacher_text.cpu(),
                   torch.from_numpy(np.asarray(t2i, dtype=np.int64)), labels, names, prompts, class_text)


@torch.no_grad()
def embed_images(encode: Any, manifest: Manifest, transform: Any, device: torch.device, batch_size: int,
                 workers: int, console: Console | None, what: str) -> tuple[torch.Tensor, np.ndarray]:
    """All manifest images through ``encode`` -> ((N, D) float32 on CPU, zero rows for unreadable; ok (N,))."""
    dataset = ImageDataset([e.image for e in manifest.entries], transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate_images, pin_memory=device.type == "cuda")
    bad = BadImages(len(dataset), 1.0, what, console)
    out: torch.Tensor | None = None
    ok = np.zeros(len(dataset), dtype=bool)
    for indices, images, failed in loader:
        for i, why in failed:
            bad.add(i, dataset.paths[i], why)
        if images is None:
            continue
        emb = encode(images.to(device, non_blocking=True)).float().cpu()
        if out is None:
            out = torch.zeros(len(dataset), emb.shape[1])
        out[indices] = emb
        ok[indices.numpy()] = True
    return (out if out is not None else torch.zeros(len(dataset), 1)), ok


def student_eval_transform(student: Student) -> Any:
    p = student.preprocess_cfg
    return open_clip.image_transform(p["size"], is_train=False, mean=p["mean"], std=p["std"],
                                     resize_mode=p.get("resize_mode"), interpolation=p.get("interpolation"))


@torch.no_grad()
def student_text_embeddings(student: Student, tokenizer: Any, texts: list[str], device: torch.device,
                            batch_size: int = 256) -> torch.Tensor:
    """(T, D) normalised embeddings from the student's own text tower."""
    if not texts:
        return torch.zeros(0, student.embed_dim)
    model = student.model.eval()
    return torch.cat([model.encode_text(tokenizer(texts[i:i + batch_size]).to(device), normalize=True).float().cpu()
                      for i in range(0, len(texts), batch_size)])


def teacher_metrics(val: ValData) -> dict[str, float]:
    metrics = retrieval_metrics(val.teacher_image, val.teacher_text, val.text_to_image) if len(val.captions) else {}
    if val.labels is not None and val.teacher_class_text is not None:
        metrics.update(zero_shot_accuracy(val.teacher_image, val.teacher_class_text, val.labels))
    return metrics


@torch.no_grad()
def evaluate_student(student: Student, val: ValData, tokenizer: Any, device: torch.device, batch_size: int = 128,
                     workers: int = 0, projection: torch.nn.Module | None = None,
                     text_from_cache: bool = False, console: Console | None = None) -> dict[str, float]:
    """Retrieval, zero-shot and agreement of the student on the val split.

    ``text_from_cache``: a student whose text tower is the teacher's (frozen) reuses the teacher's cached text
    embeddings instead of recomputing them (they are the same up to float16 rounding); ``projection`` maps a
    student of another width to the teacher's for the agreement measures.
    """
    model = student.model
    was_training = model.training
    model.eval()
    try:
        image, ok = embed_images(lambda x: model.encode_image(x, normalize=True), val.manifest,
                                 student_eval_transform(student), device, batch_size, workers, console, "val")
        image = image[torch.from_numpy(val.image_rows)]
        if text_from_cache and student.text_is_teacher:
            text, class_text = val.teacher_text, val.teacher_class_text
        else:
            text = student_text_embeddings(student, tokenizer, val.captions, device)
            class_text = student_text_embeddings(student, tokenizer, val.class_prompts, device) \
                if val.class_prompts else None
    finally:
        model.train(was_training)
    metrics: dict[str, float] = {}
    if len(val.captions):
        metrics.update(retrieval_metrics(image, text, val.text_to_image))
    if val.labels is not None and class_text is not None:
        metrics.update(zero_shot_accuracy(image, class_text, val.labels))
    s_image, s_text = image, text
    if projection is not None:
        proj = projection.cpu().float()
        s_image = torch.nn.functional.normalize(proj(image), dim=-1)
        s_text = torch.nn.functional.normalize(proj(text), dim=-1) if len(text) else text
        projection.to(device)
    if len(val.captions):
        metrics.update(agreement(s_image, s_text, val.teacher_image, val.teacher_text, val.text_to_image))
    else:
        cos = torch.nn.functional.cosine_similarity(s_image, val.teacher_image, dim=-1).mean().item()
        metrics["cosine_to_teacher"] = cos
    return metrics


def run_eval(run_dir: Path, device: str, console: Console) -> dict[str, Any]:
    """``edgedistill eval RUN_DIR``: the saved student against the teacher on the run's val split -> eval.json."""
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise UserError(f"{run_dir} is not a run directory (no recipe.yaml); give the out folder of a distill run")
    recipe = load_recipe(run_dir / "recipe.yaml", [f"device={device}"])
    manifests = load_split_manifests(recipe)
    if "val" not in manifests:
        raise UserError(f"{run_dir}: the recipe has no data.val split to evaluate on")
    student = load_student(run_dir / "student", resolve_device(device))
    teacher = load_teacher(recipe.teacher, recipe.device, seed=recipe.seed)
    caches = caches_for_recipe(recipe, teacher, {"val": manifests["val"]}, console)
    val = prepare_val(manifests["val"], teacher, caches["val"].cache, recipe.eval.prompt)
    student_metrics = evaluate_student(student, val, teacher.tokenizer, teacher.device, recipe.eval.batch_size,
                                       recipe.data.workers, console=console)
    t = teacher_metrics(val)
    result = {"teacher": t, "student": student_metrics,
              "retention": {"rsum": student_metrics["rsum"] / t["rsum"]} if t.get("rsum") else None,
              "steps": json.loads((run_dir / "summary.json").read_text()).get("steps", 0)
              if (run_dir / "summary.json").exists() else 0,
              "train_images_per_s": 0.0, "val_images": len(val.image_rows)}
    atomic.write_json(run_dir / "eval.json", result)
    return result
