"""One evaluation path: the validation split every command scores on, and the one function that scores it.

``distill``, ``eval``, ``export`` and ``bench`` all build a ``ValSplit`` (the readable images of a manifest, their
captions, labels and class prompts, with ``data.class_descriptions`` applied) and score embeddings with
``score``: image-text retrieval R@1/5/10 + RSUM when there are captions, zero-shot accuracy when there are labels
(docs/methods.md#evaluation-metrics). A class's text is the normalised mean embedding of its prompts. The same
student gives the same numbers wherever they are printed.

The teacher's val embeddings come from the feature cache (or one online pass); the student embeds the val
images through open_clip's eval transform at its own size, the transform a user of the saved student gets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import open_clip
import torch
from rich.console import Console

from edgedistill import atomic
from edgedistill.cache import FeatureCache, caches_for_recipe, class_text_features, load_split_manifests
from edgedistill.data.images import BadImages, ImageDataset, collate_images
from edgedistill.data.manifest import Manifest
from edgedistill.documents import RunSummary, read_document
from edgedistill.errors import UserError
from edgedistill.metrics import (NonFiniteEmbeddings, agreement, check_finite, few_shot_accuracy, retention,
                                 retrieval_metrics, zero_shot_accuracy)
from edgedistill.recipe import DEFAULT_DESCRIPTION_PROMPT, DEFAULT_PROMPT, Recipe, load_recipe
from edgedistill.students import Student, load_student
from edgedistill.teachers import Teacher, load_teacher, resolve_device


# ------------------------------------------------------------------------------------------------ class prompts

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


@dataclass(frozen=True)
class ClassPrompts:
    """How a class name becomes its prompts: the recipe's eval.prompt, and its class descriptions if any."""
    prompt: str = DEFAULT_PROMPT
    descriptions: dict[str, list[str]] | None = None
    description_prompt: str = DEFAULT_DESCRIPTION_PROMPT

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> "ClassPrompts":
        d = recipe.data
        return cls(recipe.eval.prompt, read_class_descriptions(d.class_descriptions) if d.class_descriptions else None,
                   d.description_prompt)

    @property
    def kind(self) -> str:
        return "descriptions" if self.descriptions else "plain"

    def sets(self, names: list[str]) -> list[list[str]]:
        return class_prompt_sets(names, self.prompt, self.descriptions, self.description_prompt)


def label_index(labels: list[str | None]) -> tuple[list[str], np.ndarray | None]:
    """Sorted class names and (N,) int64 class index per item (-1: no label); (names, None) without any label."""
    if not any(label is not None for label in labels):
        return [], None
    names = sorted({label for label in labels if label is not None})
    index = {n: k for k, n in enumerate(names)}
    return names, np.asarray([index[label] if label is not None else -1 for label in labels], dtype=np.int64)


def class_embeddings(prompt_embeddings: np.ndarray | torch.Tensor, sets: list[list[str]]) -> torch.Tensor:
    """(P, D) embeddings of every prompt, in ``sets`` order -> (C, D): each class's normalised mean of its
    normalised prompt embeddings."""
    emb = torch.nn.functional.normalize(torch.as_tensor(np.asarray(prompt_embeddings, dtype=np.float32)), dim=-1)
    bounds = np.cumsum([0, *[len(g) for g in sets]])
    if any(len(g) == 0 for g in sets):
        raise ValueError("every class needs at least one prompt")
    return torch.nn.functional.normalize(torch.stack([emb[a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:])]),
                                         dim=-1)


# ------------------------------------------------------------------------------------------------ the split

@dataclass
class ValSplit:
    """The readable images of a manifest with their captions, labels and class prompts: what every evaluation
    scores on."""
    manifest: Manifest
    rows: np.ndarray                # (N,) manifest indices of the readable images
    captions: list[str]             # (T,) captions of those images
    text_rows: np.ndarray           # (T,) their rows in the manifest (and in the feature cache)
    text_to_image: np.ndarray       # (T,) int64, into the N images
    labels: np.ndarray | None       # (N,) int64 class index, -1 = unlabelled; None when the split has no labels
    class_names: list[str] = field(default_factory=list)
    class_prompts: list[list[str]] = field(default_factory=list)   # (C,) every prompt of each class

    @classmethod
    def from_manifest(cls, manifest: Manifest, readable: np.ndarray, prompts: ClassPrompts) -> "ValSplit":
        rows = np.flatnonzero(readable)
        offsets = manifest.caption_offsets
        caption_rows = [np.arange(offsets[i], offsets[i + 1]) for i in rows]
        text_rows = np.concatenate(caption_rows) if caption_rows else np.zeros(0, dtype=np.int64)
        t2i = np.concatenate([np.full(len(r), k) for k, r in enumerate(caption_rows)]) if caption_rows else \
            np.zeros(0, dtype=np.int64)
        all_captions = manifest.all_captions()
        names, labels = label_index([manifest.entries[i].label for i in rows])
        return cls(manifest, rows, [all_captions[r] for r in text_rows], text_rows.astype(np.int64),
                   t2i.astype(np.int64), labels, names, prompts.sets(names))

    @property
    def image_paths(self) -> list[Path]:
        return [self.manifest.entries[i].image for i in self.rows]

    @property
    def prompt_texts(self) -> list[str]:
        """Every class prompt, class by class (what a text encoder embeds for ``class_embeddings``)."""
        return [p for group in self.class_prompts for p in group]

    def describe(self) -> dict[str, Any]:
        """What export.json records of the split, so bench scores with the same prompts without the recipe."""
        return {"manifest": str(self.manifest.path), "images": len(self.rows), "captions": len(self.captions),
                "class_names": self.class_names, "class_prompts": self.class_prompts}


def decode_split(manifest: Manifest, transform: Callable, console: Console | None = None,
                 what: str = "val") -> tuple[np.ndarray, np.ndarray]:
    """Every image of ``manifest`` through ``transform`` -> ((N_ok, 3, H, W) float32, ok (N,) bool); unreadable
    images are skipped and counted."""
    dataset = ImageDataset([e.image for e in manifest.entries], transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=0, collate_fn=collate_images)
    bad = BadImages(len(dataset), 1.0, what, console)
    images: list[np.ndarray | None] = [None] * len(dataset)
    for indices, batch, failed in loader:
        for i, why in failed:
            bad.add(i, dataset.paths[i], why)
        if batch is not None:
            for i, img in zip(indices.tolist(), batch):
                images[i] = img.numpy()
    ok = np.array([im is not None for im in images], dtype=bool)
    if not ok.any():
        raise UserError(f"{manifest.path}: no readable {what} image to measure accuracy on")
    return np.stack([im for im in images if im is not None]).astype(np.float32), ok


def score(split: ValSplit, image: Any, text: Any = None, class_text: Any = None,
          what: str = "the student") -> dict[str, float]:
    """The metrics of one model on ``split``: image (N, D) ranked against text (T, D) for retrieval (when the split
    has captions) and against class_text (C, D) for zero-shot (when it has labels); values rounded to 1e-4.
    Non-finite embeddings are a UserError, never a score."""
    img = _tensor(image)
    out: dict[str, float] = {}
    try:
        if len(split.captions) and text is not None:
            out.update(retrieval_metrics(img, _tensor(text), torch.from_numpy(split.text_to_image)))
        if split.labels is not None and class_text is not None:
            out.update(zero_shot_accuracy(img, _tensor(class_text), torch.from_numpy(split.labels)))
    except NonFiniteEmbeddings as e:
        raise UserError(f"{what}: {e} on {split.manifest.path}; its weights are damaged or its training "
                        f"diverged") from e
    return {k: round(float(v), 4) for k, v in out.items()}


def _tensor(x: Any) -> torch.Tensor:
    return x.float().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x, dtype=np.float32))


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


__all__ = ["ClassPrompts", "SplitTexts", "ValData", "ValSplit", "class_embeddings", "class_prompt_sets",
           "decode_split", "embed_images", "evaluate_ood", "evaluate_student", "label_index",
           "prepare_val", "read_class_descriptions", "run_eval", "score", "student_eval_transform", "student_images",
           "student_texts", "teacher_metrics"]
