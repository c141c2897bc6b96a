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
from edgedistill.cache import (FeatureCache, caches_for_recipe, class_text_features,
                              load_split_manifests)
from edgedistill.data.images import BadImages, ImageDataset, collate_images
from edgedistill.data.manifest import Manifest
from edgedistill.documents import RunSummary, read_document
from edgedistill.errors import UserError
from edgedistill.metrics import (NonFiniteEmbeddings, agreement, check_finite, few_shot_accuracy, retention,
                                 retrieval_metrics, zero_shot_accuracy)
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
    class_prompts: list[str]          # (C,) the first prompt of each class
    teacher_class_text: torch.Tensor | None  # (C, D) the normalised mean over each class's prompts
    class_prompt_sets: list[list[str]] | None = None  # (C,) every prompt of each class (None: class_prompts)


DEFAULT_DESCRIPTION_PROMPT = "a photo of {label} . {description}"


def read_class_descriptions(path: Path) -> dict[str, list[str]]:
    """``data.class_descriptions``: a JSON object, class name -> list of attribute sentences (or one sentence)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data.class_descriptions {path} not found; give a JSON file mapping each class name to a "
                        f"list of attribute sentences")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"data.class_descriptions {path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"data.class_descriptions {path}: expected a JSON object (class name -> list of sentences)")
    out: dict[str, list[str]] = {}
    for name, sentences in raw.items():
        if isinstance(sentences, str):
            sentences = [sentences]
        if not isinstance(sentences, list) or not sentences or not all(isinstance(x, str) and x.strip()
                                                                        for x in sentences):
            raise UserError(f"data.class_descriptions {path}: class '{name}' needs a non-empty list of sentences")
        out[str(name)] = [x.strip() for x in sentences]
    return out


def class_prompt_sets(names: list[str], prompt: str, descriptions: dict[str, list[str]] | None = None,
                      description_prompt: str = DEFAULT_DESCRIPTION_PROMPT) -> list[list[str]]:
    """Each class's prompts: ``description_prompt`` once per attribute sentence of a described class, else
    ``prompt`` (e.g. "a photo of red star . it has five points", or "a photo of a red star.")."""
    descriptions = descriptions or {}
    return [[description_prompt.format(label=n, description=d) for d in descriptions[n]] if n in descriptions
            else [prompt.format(label=n)] for n in names]


def label_index(labels: list[str | None]) -> tuple[list[str], torch.Tensor | None]:
    """Sorted class names and (N,) long class index per item (-1: no label); (names, None) without any label."""
    if not any(label is not None for label in labels):
        return [], None
    names = sorted({label for label in labels if label is not None})
    index = {n: k for k, n in enumerate(names)}
    return names, torch.tensor([index[label] if label is not None else -1 for label in labels], dtype=torch.long)


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
                batch_size: int = 64, workers: int = 0, console: Console | None = None,
                descriptions: dict[str, list[str]] | None = None,
                description_prompt: str = DEFAULT_DESCRIPTION_PROMPT, cache_root: Path | None = None) -> ValData:
    """Teacher embeddings of the val split: from ``cache``, or computed now when there is none (online mode).

    Class texts: ``descriptions`` (class -> attribute sentences) make a class's text the mean of its described
    prompts; with a ``cache_root`` they are embedded once and kept there (see ``cache.class_text_features``).
    """
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
    names, labels = label_index([manifest.entries[i].label for i in rows])
    sets = class_prompt_sets(names, prompt, descriptions, description_prompt)
    class_text = class_text_features(teacher, sets, cache_root) if sets else None
    return ValData(manifest, rows, teacher_image.cpu(), captions, teacher_text.cpu(),
                   torch.from_numpy(np.asarray(t2i, dtype=np.int64)), labels, names, [p[0] for p in sets], class_text,
                   sets)


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


def student_class_text(student: Student, tokenizer: Any, val: ValData, device: torch.device) -> torch.Tensor | None:
    """(C, D) the student's own class texts: the normalised mean over each class's prompts."""
    sets = val.class_prompt_sets or [[p] for p in val.class_prompts]
    if not sets:
        return None
    emb = student_text_embeddings(student, tokenizer, [p for group in sets for p in group], device)
    bounds = np.cumsum([0, *[len(g) for g in sets]])
    return torch.nn.functional.normalize(torch.stack([emb[a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:])]),
                                         dim=-1)


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
        image = _student_images(student, val, device, batch_size, workers, console, "val")
        if text_from_cache and student.text_is_teacher:
            text, class_text = val.teacher_text, val.teacher_class_text
        else:
            text = student_text_embeddings(student, tokenizer, val.captions, device)
            class_text = student_class_text(student, tokenizer, val, device)
    finally:
        model.train(was_training)
    try:
        return _student_metrics(val, image, text, class_text, projection)
    except NonFiniteEmbeddings as e:
        raise UserError(f"the student's {e} on {val.manifest.path}: its weights are damaged or the training "
                        f"diverged (lower train.lr and distill again)") from e


def _student_metrics(val: ValData, image: torch.Tensor, text: torch.Tensor, class_text: torch.Tensor | None,
                     projection: torch.nn.Module | None) -> dict[str, float]:
    metrics: dict[str, float] = {}
    if len(val.captions):
        metrics.update(retrieval_metrics(image, text, val.text_to_image))
    if val.labels is not None and class_text is not None:
        metrics.update(zero_shot_accuracy(image, class_text, val.labels))
    s_image, s_text = image, text
    if projection is not None:  # applied on the CPU copies; the training module stays where it is
        w = projection.weight.detach().float().cpu()
        b = projection.bias.detach().float().cpu() if projection.bias is not None else None
        s_image = torch.nn.functional.normalize(torch.nn.functional.linear(image, w, b), dim=-1)
        s_text = torch.nn.functional.normalize(torch.nn.functional.linear(text, w, b), dim=-1) if len(text) else text
    if len(val.captions):
        metrics.update(agreement(s_image, s_text, val.teacher_image, val.teacher_text, val.text_to_image))
    else:
        check_finite(student_image=s_image)
        cos = torch.nn.functional.cosine_similarity(s_image, val.teacher_image, dim=-1).mean().item()
        metrics["cosine_to_teacher"] = cos
    return metrics


def _student_images(student: Student, val: ValData, device: torch.device, batch_size: int, workers: int,
                    console: Console | None, what: str) -> torch.Tensor:
    """(N, D) normalised student embeddings of the split's readable images (the model must be in eval mode)."""
    image, _ = embed_images(lambda x: student.model.encode_image(x, normalize=True), val.manifest,
                            student_eval_transform(student), device, batch_size, workers, console, what)
    return image[torch.from_numpy(val.image_rows)]


@torch.no_grad()
def evaluate_ood(student: Student, ood: ValData, tokenizer: Any, device: torch.device, few_shot: list[int],
                 repeats: int = 3, alpha: float = 1.0, beta: float = 5.5, seed: int = 0, batch_size: int = 128,
                 workers: int = 0, text_from_cache: bool = True, console: Console | None = None,
                 prompts: str = "plain") -> tuple[dict[str, Any], dict[str, Any]]:
    """Zero-shot and few-shot accuracy on classes never trained on (``data.ood_val``), student and teacher.

    Zero-shot: mean per-class top-1 % against the class texts (``*_mean_class``) and overall top-1 %. Few-shot:
    for each k, ``k`` support images per class, the rest are queries; the prototype classifier and Tip-Adapter
    over the embeddings, without training (``metrics.few_shot_accuracy``), mean per-class top-1 %.
    Returns (``ood_zero_shot``, ``ood_few_shot``) as written to summary.json.
    """
    if ood.labels is None or ood.teacher_class_text is None:
        raise UserError(f"data.ood_val {ood.manifest.path} has no class labels; OOD evaluation needs a \"label\" "
                        f"on its images")
    model = student.model
    was_training = model.training
    model.eval()
    try:
        image = _student_images(student, ood, device, batch_size, workers, console, "ood_val")
        class_text = ood.teacher_class_text if (text_from_cache and student.text_is_teacher) \
            else student_class_text(student, tokenizer, ood, device)
    finally:
        model.train(was_training)
    try:
        check_finite(student_image=image, student_class_text=class_text)
    except NonFiniteEmbeddings as e:
        raise UserError(f"the {e} on {ood.manifest.path}: the student's weights are damaged or the training "
                        f"diverged") from e
    s_zs = zero_shot_accuracy(image, class_text, ood.labels)
    t_zs = zero_shot_accuracy(ood.teacher_image, ood.teacher_class_text, ood.labels)
    zero_shot = {"student_mean_class": s_zs["zs_mean_class"], "student_top1": s_zs["zs_top1"],
                 "teacher_mean_class": t_zs["zs_mean_class"], "teacher_top1": t_zs["zs_top1"],
                 "classes": len(ood.class_names), "images": int((ood.labels >= 0).sum()), "prompts": prompts}
    few: dict[str, Any] = {"repeats": repeats, "k": {}}
    for k in few_shot:
        s_fs = few_shot_accuracy(image, ood.labels, k, class_text, repeats, seed, alpha, beta)
        t_fs = few_shot_accuracy(ood.teacher_image, ood.labels, k, ood.teacher_class_text, repeats, seed, alpha, beta)
        if s_fs:
            few["k"][str(k)] = {"prototype": s_fs["prototype"], "tip_adapter": s_fs["tip_adapter"],
                                "teacher_prototype": t_fs["prototype"], "teacher_tip_adapter": t_fs["tip_adapter"],
                                "classes": int(s_fs["classes"])}
    return zero_shot, few


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
    descriptions = read_class_descriptions(recipe.data.class_descriptions) if recipe.data.class_descriptions else None
    val = prepare_val(manifests["val"], teacher, caches["val"].cache, recipe.eval.prompt, descriptions=descriptions,
                      description_prompt=recipe.data.description_prompt,
                      cache_root=recipe.cache.root)
    student_metrics = evaluate_student(student, val, teacher.tokenizer, teacher.device, recipe.eval.batch_size,
                                       recipe.data.workers, console=console)
    t = teacher_metrics(val)
    result = {"teacher": t, "student": student_metrics,
              "retention": retention(student_metrics, t),
              "steps": read_document(run_dir / "summary.json", RunSummary, "run summary", "distill again").steps
              if (run_dir / "summary.json").exists() else 0,
              "train_images_per_s": 0.0, "val_images": len(val.image_rows)}
    atomic.write_json(run_dir / "eval.json", result)
    return result
