"""The validation split every command scores on, and the one function that scores it (torch-free).

``distill``, ``eval``, ``export`` and ``bench`` all build a ``ValSplit`` (the readable images of a manifest, their
captions, labels and class prompts, with ``data.class_descriptions`` applied) and score embeddings with ``score``:
image-text retrieval R@1/5/10 + RSUM when there are captions, zero-shot accuracy when there are labels
(docs/methods.md#evaluation-metrics). A class's text is the normalised mean embedding of its prompts. The same
student gives the same numbers wherever they are printed. numpy only: a device's bench scores with it too.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from rich.console import Console

from edgedistill.data.images import BadImages, open_image, why_unreadable
from edgedistill.data.records import Manifest
from edgedistill.core.errors import UserError
from edgedistill.evaluation.metrics import NonFiniteEmbeddings, as_array, retrieval_metrics, zero_shot_accuracy
from edgedistill.runtime.encoder import DEFAULT_PROMPT
from edgedistill.runtime.preprocess import Preprocess

DEFAULT_DESCRIPTION_PROMPT = "a photo of {label} . {description}"      # data.description_prompt (Li et al.'s form)


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
    def from_recipe(cls, recipe: Any) -> "ClassPrompts":
        """From a Recipe (read by duck typing: this module imports no training stack)."""
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


def class_embeddings(prompt_embeddings: Any, sets: list[list[str]]) -> np.ndarray:
    """(P, D) embeddings of every prompt, in ``sets`` order -> (C, D) float32: each class's normalised mean of its
    normalised prompt embeddings."""
    emb = _unit(as_array(prompt_embeddings, np.float32))
    bounds = np.cumsum([0, *[len(g) for g in sets]])
    if any(len(g) == 0 for g in sets):
        raise ValueError("every class needs at least one prompt")
    return _unit(np.stack([emb[a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:])]))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


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


def decode_split(manifest: Manifest, preprocess: Mapping[str, Any], console: Console | None = None,
                 what: str = "val") -> tuple[np.ndarray, np.ndarray]:
    """Every image of ``manifest`` through open_clip's eval transform (``runtime.preprocess``, the same pixels as
    open_clip's torchvision transform) -> ((N_ok, 3, H, W) float32, ok (N,) bool); unreadable images are skipped
    and counted. Decoding runs in threads (PIL releases the GIL while it decodes and resizes)."""
    pre = Preprocess(preprocess)
    bad = BadImages(len(manifest), 1.0, what, console)

    def load(path: Any) -> np.ndarray | str:
        try:
            return pre.image(open_image(path))
        except Exception as e:  # noqa: BLE001 - a bad file is counted, not fatal
            return why_unreadable(e)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(load, [e.image for e in manifest.entries]))
    ok = np.array([not isinstance(r, str) for r in results], dtype=bool)
    for i, r in enumerate(results):
        if isinstance(r, str):
            bad.add(i, manifest.entries[i].image, r)
    if not ok.any():
        raise UserError(f"{manifest.path}: no readable {what} image to measure accuracy on")
    return np.stack([r for r in results if not isinstance(r, str)]).astype(np.float32), ok


def score(split: ValSplit, image: Any, text: Any = None, class_text: Any = None,
          what: str = "the student") -> dict[str, float]:
    """The metrics of one model on ``split``: image (N, D) ranked against text (T, D) for retrieval (when the split
    has captions) and against class_text (C, D) for zero-shot (when it has labels); values rounded to 1e-4.
    Non-finite embeddings are a UserError, never a score. Embeddings may be numpy arrays or torch tensors."""
    img = as_array(image, np.float32)
    out: dict[str, float] = {}
    try:
        if len(split.captions) and text is not None:
            out.update(retrieval_metrics(img, as_array(text, np.float32), split.text_to_image))
        if split.labels is not None and class_text is not None:
            out.update(zero_shot_accuracy(img, as_array(class_text, np.float32), split.labels))
    except NonFiniteEmbeddings as e:
        raise UserError(f"{what}: {e} on {split.manifest.path}; its weights are damaged or its training "
                        f"diverged") from e
    return {k: round(float(v), 4) for k, v in out.items()}
