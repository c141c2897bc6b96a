"""The val data a bench measures accuracy on, staged once as arrays, and the metrics of one artifact.

Every artifact is scored against fp32 references for the other tower: an image artifact's embeddings are
ranked against the fp32 text graph's caption and class-prompt embeddings, a text artifact's against the fp32
image graph's image embeddings, so each row shows what its own precision and backend cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from rich.console import Console

from edgedistill.data.images import open_image
from edgedistill.data.manifest import load_manifest
from edgedistill.errors import UserError
from edgedistill.metrics import NonFiniteEmbeddings, retrieval_metrics, zero_shot_accuracy

DEFAULT_PROMPT = "a photo of a {label}."


def image_transform(preprocess: dict[str, Any]) -> Any:
    """open_clip's eval transform for an export.json ``preprocess`` description."""
    return open_clip.image_transform(preprocess["size"], is_train=False, mean=preprocess.get("mean"),
                                     std=preprocess.get("std"), resize_mode=preprocess.get("resize_mode"),
                                     interpolation=preprocess.get("interpolation"))


@dataclass
class ValSet:
    """(N, 3, H, W) float32 images, (T, L) int64 caption tokens, and class prompts when the split has labels."""
    manifest: Path
    paths: list[Path]                 # (N,) image files (``--e2e`` decodes them while timed)
    images: np.ndarray
    tokens: np.ndarray
    text_to_image: torch.Tensor       # (T,) long
    labels: torch.Tensor | None       # (N,) long, -1 = unlabelled
    class_tokens: np.ndarray | None   # (C, L) int64
    unreadable: int

    @property
    def has_captions(self) -> bool:
        return len(self.tokens) > 0


def load_valset(manifest_path: Path, preprocess: dict[str, Any], tokenizer: Any, prompt: str,
                limit: int | None = None, console: Console | None = None) -> ValSet:
    """Decode and preprocess the val split once (unreadable images are skipped and counted)."""
    manifest = load_manifest(manifest_path)
    entries = manifest.entries[:limit] if limit else manifest.entries
    transform = image_transform(preprocess)
    images, paths, tokens_text, t2i, labels = [], [], [], [], []
    unreadable = 0
    for entry in entries:
        try:
            img = transform(open_image(entry.image))
        except (OSError, ValueError, UserError):
            unreadable += 1
            continue
        k = len(images)
        images.append(img.numpy())
        paths.append(entry.image)
        tokens_text += list(entry.captions)
        t2i += [k] * len(entry.captions)
        labels.append(entry.label)
    if not images:
        raise UserError(f"{manifest_path}: no readable val image to measure accuracy on")
    if unreadable and console is not None:
        console.print(f"[yellow]val: {unreadable} unreadable image(s) skipped[/]")
    names = sorted({label for label in labels if label is not None})
    index = {n: i for i, n in enumerate(names)}
    tok = (lambda texts: np.concatenate([tokenizer(texts[i:i + 512]).numpy() for i in range(0, len(texts), 512)])
           .astype(np.int64))
    return ValSet(manifest=Path(manifest_path), paths=paths, images=np.stack(images).astype(np.float32),
                  tokens=tok(tokens_text) if tokens_text else np.zeros((0, 1), np.int64),
                  text_to_image=torch.as_tensor(t2i, dtype=torch.long),
                  labels=torch.tensor([index.get(x, -1) if x is not None else -1 for x in labels]) if names else None,
                  class_tokens=tok([prompt.format(label=n) for n in names]) if names else None,
                  unreadable=unreadable)


def metrics(val: ValSet, image: np.ndarray, text: np.ndarray | None, class_text: np.ndarray | None
            ) -> dict[str, float]:
    """Retrieval R@1/5/10 + RSUM (when there are captions) and zero-shot top-1 (when there are labels)."""
    out: dict[str, float] = {}
    img = torch.from_numpy(np.asarray(image, dtype=np.float32))
    try:
        if val.has_captions and text is not None:
            out.update(retrieval_metrics(img, torch.from_numpy(np.asarray(text, np.float32)), val.text_to_image))
        if val.labels is not None and class_text is not None:
            out.update(zero_shot_accuracy(img, torch.from_numpy(np.asarray(class_text, np.float32)), val.labels))
    except NonFiniteEmbeddings as e:  # a broken artifact is a failed row, never a perfect score
        raise UserError(f"the artifact's {e} on the val split; export again") from e
    return {k: round(float(v), 4) for k, v in out.items()}
