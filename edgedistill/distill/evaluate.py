"""Evaluation of a student and its teacher on a val split (the training stack's side of the one evaluation path:
the split and the scoring are ``edgedistill.evaluation.split``).

The teacher's val embeddings come from the feature cache (or one online pass); the student embeds the val
images through open_clip's eval transform at its own size, the transform a user of the saved student gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from rich.console import Console

import edgedistill.core.atomic as atomic
from edgedistill.distill.cache import FeatureCache, caches_for_recipe, class_text_features, load_split_manifests
from edgedistill.data.batching import ImageDataset, collate_images
from edgedistill.data.images import BadImages
from edgedistill.data.manifest import Manifest
from edgedistill.core.documents import RunSummary, read_document
from edgedistill.core.errors import UserError
from edgedistill.evaluation.metrics import (NonFiniteEmbeddings, agreement, check_finite, few_shot_accuracy, retention,
                                 zero_shot_accuracy)
from edgedistill.distill.recipe import load_recipe
from edgedistill.distill.students import Student, load_student
from edgedistill.distill.teachers import Teacher, load_teacher, resolve_device
from edgedistill.evaluation.split import ClassPrompts, ValSplit, class_embeddings, score


# ------------------------------------------------------------------------------------------------ teacher side

@dataclass
class ValData:
    """A split with the teacher's embeddings of it (L2-normalised)."""
    split: ValSplit
    teacher_image: torch.Tensor               # (N, D)
    teacher_text: torch.Tensor                # (T, D)
    teacher_class_text: torch.Tensor | None   # (C, D)

    @property
    def manifest(self) -> Manifest:
        return self.split.manifest

    @property
    def image_rows(self) -> np.ndarray:
        return self.split.rows


def prepare_val(manifest: Manifest, teacher: Teacher, cache: FeatureCache | None, prompts: ClassPrompts,
                batch_size: int = 64, workers: int = 0, console: Console | None = None,
                cache_root: Path | None = None) -> ValData:
    """The split and the teacher's embeddings of it: from ``cache``, or computed now without one (online mode).

    Class texts are the teacher's normalised mean over each class's prompts; with a ``cache_root`` they are
    embedded once and kept there (``cache.class_text_features``).
    """
    if cache is not None:
        split = ValSplit.from_manifest(manifest, cache.image_ok.astype(bool), prompts)
        t_image = cache.image_features(split.rows).float()
        t_text = cache.text_features(split.text_rows).float() if len(split.text_rows) else torch.zeros(0, cache.dim)
    else:
        embedded, ok = embed_images(lambda x: teacher.embed_images(x), manifest, teacher.preprocess,
                                    teacher.device, batch_size, workers, console, "val (teacher)")
        split = ValSplit.from_manifest(manifest, ok, prompts)
        t_image = embedded[torch.from_numpy(ok)]
        t_text = torch.cat([teacher.embed_texts(split.captions[i:i + 256]).cpu()
                            for i in range(0, len(split.captions), 256)]) if split.captions else \
            torch.zeros(0, teacher.embed_dim)
    class_text = class_text_features(teacher, split.class_prompts, cache_root) if split.class_prompts else None
    return ValData(split, t_image.cpu(), t_text.cpu(), class_text)


def teacher_metrics(val: ValData) -> dict[str, float]:
    return score(val.split, val.teacher_image, val.teacher_text, val.teacher_class_text, "the teacher")


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


# ------------------------------------------------------------------------------------------------ student side

def student_eval_transform(student: Student) -> Any:
    p = student.preprocess_cfg
    return open_clip.image_transform(p["size"], is_train=False, mean=p["mean"], std=p["std"],
                                     resize_mode=p.get("resize_mode"), interpolation=p.get("interpolation"))


@dataclass
class SplitTexts:
    """A text tower's embeddings of a split: its captions (T, D) and its class texts (C, D) or None."""
    text: torch.Tensor
    class_text: torch.Tensor | None


@torch.no_grad()
def student_texts(student: Student, tokenizer: Any, split: ValSplit, device: torch.device,
                  batch_size: int = 256) -> SplitTexts:
    """The student's own text tower (fp32) on the split's captions and class prompts, normalised."""
    model = student.model
    was = model.training
    model.eval()
    try:
        def embed(texts: list[str]) -> torch.Tensor:
            if not texts:
                return torch.zeros(0, student.embed_dim)
            return torch.cat([model.encode_text(tokenizer(texts[i:i + batch_size]).to(device), normalize=True)
                              .float().cpu() for i in range(0, len(texts), batch_size)])
        text = embed(split.captions)
        class_text = class_embeddings(embed(split.prompt_texts), split.class_prompts) if split.class_prompts else None
    finally:
        model.train(was)
    return SplitTexts(text, class_text)


@torch.no_grad()
def student_images(student: Student, split: ValSplit, device: torch.device, batch_size: int, workers: int,
                   console: Console | None, what: str = "val") -> torch.Tensor:
    """(N, D) normalised student embeddings of the split's images (eval mode, open_clip's eval transform)."""
    model = student.model
    was = model.training
    model.eval()
    try:
        image, _ = embed_images(lambda x: model.encode_image(x, normalize=True), split.manifest,
                                student_eval_transform(student), device, batch_size, workers, console, what)
    finally:
        model.train(was)
    return image[torch.from_numpy(split.rows)]


def evaluate_student(student: Student, val: ValData, tokenizer: Any, device: torch.device, batch_size: int = 128,
                     workers: int = 0, projection: torch.nn.Module | None = None, texts: SplitTexts | None = None,
                     console: Console | None = None) -> dict[str, float]:
    """Retrieval, zero-shot and agreement with the teacher of the student on the val split.

    ``texts``: the student's text embeddings of the split when already known (a frozen text tower embeds them
    once per run); ``projection`` maps a student of another width to the teacher's for the agreement measures.
    """
    image = student_images(student, val.split, device, batch_size, workers, console)
    texts = texts or student_texts(student, tokenizer, val.split, device)
    metrics = score(val.split, image, texts.text, texts.class_text, "the student")
    metrics.update(_agreement(val, image, texts.text, projection))
    return metrics


def _agreement(val: ValData, image: torch.Tensor, text: torch.Tensor,
               projection: torch.nn.Module | None) -> dict[str, float]:
    """Top-1 agreement and cosine to the teacher (at the teacher's width)."""
    s_image, s_text = image, text
    if projection is not None:  # applied on the CPU copies; the training module stays where it is
        w = projection.weight.detach().float().cpu()
        b = projection.bias.detach().float().cpu() if projection.bias is not None else None
        s_image = torch.nn.functional.normalize(torch.nn.functional.linear(image, w, b), dim=-1)
        s_text = torch.nn.functional.normalize(torch.nn.functional.linear(text, w, b), dim=-1) if len(text) else text
    try:
        check_finite(student_image=s_image, student_text=s_text)
        if len(val.split.captions):
            return agreement(s_image, s_text, val.teacher_image, val.teacher_text,
                             torch.from_numpy(val.split.text_to_image))
        return {"cosine_to_teacher": torch.nn.functional.cosine_similarity(s_image, val.teacher_image,
                                                                           dim=-1).mean().item()}
    except NonFiniteEmbeddings as e:
        raise UserError(f"the student's {e} on {val.manifest.path}: its weights are damaged or the training "
                        f"diverged (lower train.lr and distill again)") from e


def evaluate_ood(student: Student, ood: ValData, tokenizer: Any, device: torch.device, few_shot: list[int],
                 repeats: int = 3, alpha: float = 1.0, beta: float = 5.5, seed: int = 0, batch_size: int = 128,
                 workers: int = 0, console: Console | None = None,
                 prompts: str = "plain") -> tuple[dict[str, Any], dict[str, Any]]:
    """Zero-shot and few-shot accuracy on classes never trained on (``data.ood_val``), student and teacher.

    Zero-shot: mean per-class top-1 % against the class texts (``*_mean_class``) and overall top-1 %. Few-shot:
    for each k, ``k`` support images per class, the rest are queries; the prototype classifier and Tip-Adapter
    over the embeddings, without training (``metrics.few_shot_accuracy``), mean per-class top-1 %.
    Returns (``ood_zero_shot``, ``ood_few_shot``) as written to summary.json.
    """
    split = ood.split
    if split.labels is None or ood.teacher_class_text is None:
        raise UserError(f"data.ood_val {ood.manifest.path} has no class labels; OOD evaluation needs a \"label\" "
                        f"on its images")
    image = student_images(student, split, device, batch_size, workers, console, "ood_val")
    class_text = student_texts(student, tokenizer, split, device).class_text
    try:
        check_finite(student_image=image, student_class_text=class_text)
    except NonFiniteEmbeddings as e:
        raise UserError(f"the {e} on {ood.manifest.path}: the student's weights are damaged or the training "
                        f"diverged") from e
    labels = torch.from_numpy(split.labels)
    s_zs = zero_shot_accuracy(image, class_text, labels)
    t_zs = zero_shot_accuracy(ood.teacher_image, ood.teacher_class_text, labels)
    zero_shot = {"student_mean_class": s_zs["zs_mean_class"], "student_top1": s_zs["zs_top1"],
                 "teacher_mean_class": t_zs["zs_mean_class"], "teacher_top1": t_zs["zs_top1"],
                 "classes": len(split.class_names), "images": int((labels >= 0).sum()), "prompts": prompts}
    few: dict[str, Any] = {"repeats": repeats, "k": {}}
    for k in few_shot:
        s_fs = few_shot_accuracy(image, labels, k, class_text, repeats, seed, alpha, beta)
        t_fs = few_shot_accuracy(ood.teacher_image, labels, k, ood.teacher_class_text, repeats, seed, alpha, beta)
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
    val = prepare_val(manifests["val"], teacher, caches["val"].cache, ClassPrompts.from_recipe(recipe),
                      cache_root=recipe.cache.root)
    student_metrics = evaluate_student(student, val, teacher.tokenizer, teacher.device, recipe.eval.batch_size,
                                       recipe.data.workers, console=console)
    t = teacher_metrics(val)
    summary = run_dir / "summary.json"
    result = {"teacher": t, "student": student_metrics, "retention": retention(student_metrics, t),
              "steps": read_document(summary, RunSummary, "run summary", "distill again").steps
              if summary.exists() else 0,
              "train_images_per_s": 0.0, "val_images": len(val.image_rows)}
    atomic.write_json(run_dir / "eval.json", result)
    return result


__all__ = ["SplitTexts", "ValData", "embed_images", "evaluate_ood", "evaluate_student", "prepare_val", "run_eval",
           "student_eval_transform", "student_images", "student_texts", "teacher_metrics"]
