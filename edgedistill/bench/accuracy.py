"""The val data a bench measures accuracy on, staged once as arrays, and the accuracy of one artifact.

The split is the evaluation's own (``evaluate.ValSplit``, with the class prompts the export recorded, so the
zero-shot numbers use the recipe's prompts and class descriptions) and so is the scoring (``evaluate.score``).
Every artifact is scored against fp32 references for the other tower: an image artifact's embeddings are ranked
against the reference caption and class-prompt embeddings, a text artifact's against the reference image
embeddings, so each row shows what its own precision and backend cost. The references are the PyTorch student's
(fp32, the numbers ``distill`` reports) where the student folder is at hand, else the fp32 ONNX graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from rich.console import Console

from edgedistill.data.manifest import load_manifest
from edgedistill.evaluation.split import ClassPrompts, ValSplit, class_embeddings, decode_split, score


def class_prompts(val_doc: dict[str, Any] | None, fallback: str | None = None) -> ClassPrompts:
    """The class prompts an export recorded (export.json ``val.prompts``); older exports: ``fallback`` prompt."""
    recorded = (val_doc or {}).get("prompts")
    if recorded:
        return ClassPrompts(recorded["prompt"], recorded.get("descriptions"), recorded["description_prompt"])
    return ClassPrompts(fallback) if fallback else ClassPrompts()


@dataclass
class BenchVal:
    """The split and its inputs, staged once: (N, 3, H, W) float32 images, (T, L) caption tokens and (P, L) tokens
    of every class prompt (None without labels)."""
    split: ValSplit
    images: np.ndarray
    tokens: np.ndarray
    prompt_tokens: np.ndarray | None

    @property
    def has_captions(self) -> bool:
        return len(self.tokens) > 0

    @property
    def paths(self) -> list[Path]:
        return self.split.image_paths


def load_bench_val(manifest_path: Path, preprocess: dict[str, Any], tokenizer: Callable, prompts: ClassPrompts,
                   console: Console | None = None) -> BenchVal:
    """Decode and preprocess the val split once (unreadable images are skipped and counted), tokenize its texts."""
    manifest = load_manifest(manifest_path)
    images, ok = decode_split(manifest, preprocess, console)
    split = ValSplit.from_manifest(manifest, ok, prompts)
    return BenchVal(split, images, _tokens(tokenizer, split.captions),
                    _tokens(tokenizer, split.prompt_texts) if split.class_prompts else None)


def _tokens(tokenizer: Callable, texts: list[str]) -> np.ndarray:
    if not texts:
        return np.zeros((0, 1), np.int64)
    return np.concatenate([np.asarray(tokenizer(texts[i:i + 512])) for i in range(0, len(texts), 512)]).astype(
        np.int64)


@dataclass
class References:
    """fp32 embeddings of each tower, for scoring an artifact of the other one."""
    image: np.ndarray | None = None          # (N, D)
    text: np.ndarray | None = None           # (T, D)
    class_text: Any = None                   # (C, D)
    source: str = ""


def reference_texts(val: BenchVal, embed: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray | None, Any]:
    """A text tower's caption and class-text embeddings of the split (``embed``: tokens -> embeddings)."""
    text = embed(val.tokens) if val.has_captions else None
    class_text = class_embeddings(embed(val.prompt_tokens), val.split.class_prompts) \
        if val.prompt_tokens is not None else None
    return text, class_text


def image_accuracy(val: BenchVal, image: np.ndarray, ref: References, what: str) -> dict[str, float]:
    return score(val.split, image, ref.text, ref.class_text, what)


def text_accuracy(val: BenchVal, embed: Callable[[np.ndarray], np.ndarray], ref: References,
                  what: str) -> dict[str, float]:
    if ref.image is None:
        return {}
    text, class_text = reference_texts(val, embed)
    return score(val.split, ref.image, text, class_text, what)
