"""``Encoder``: a loaded student (what ``edgedistill.load`` returns) — images and text in, L2-normalised embeddings
out, zero-shot probabilities — over one runner per tower; ``EncoderInfo`` says what was loaded and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from edgedistill.core.errors import UserError
from edgedistill.runtime.backends import Runner
from edgedistill.runtime.preprocess import ImageInput, Preprocess

DEFAULT_PROMPT = "a photo of a {label}."  # CLIP's zero-shot template (eval.prompt's default)
LOGIT_SCALE = 100.0  # CLIP's: zero-shot probabilities are softmax(100 * cosine)


@dataclass
class EncoderInfo:
    """What ``load`` picked: per tower the artifact, backend and precision; the device; how it was chosen."""
    source: str
    device: str
    image: dict[str, Any]
    text: dict[str, Any] | None
    chosen_by: str                  # "measured" | "measured (cached)" | "bench.json" | "rule" | "request"
    model: str | None = None        # the student's identity (its weights' sha256): what an index is checked against
    notes: list[str] = field(default_factory=list)
    # per tower, every candidate measured here: minimum cosine to fp32 on the probe, p50 ms by batch, why not
    measurements: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


class TextTable:
    """A text "tower" made of precomputed embeddings of a fixed vocabulary (an export's text_embeddings.npy)."""

    def __init__(self, embeddings: np.ndarray, prompts: list[str]) -> None:
        self.embeddings, self.index = embeddings, {p: i for i, p in enumerate(prompts)}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in texts if t not in self.index]
        if missing:
            raise UserError(f"this export has no text encoder, only the embeddings of {len(self.index)} fixed prompts "
                            f"(text_prompts.txt), and {missing[0]!r} is not one of them; export a text encoder or "
                            f"add the prompt with --text-embeddings")
        return self.embeddings[[self.index[t] for t in texts]]


class Encoder:
    """A loaded student: ``encode_image``, ``encode_text``, ``zero_shot``; ``preprocess``, ``tokenize``,
    ``embed_dim`` and ``info`` are public."""

    def __init__(self, image: Runner, text: Runner | TextTable | None, preprocess: Preprocess,
                 tokenize: Callable[[Sequence[str]], Any] | None, embed_dim: int, info: EncoderInfo) -> None:
        self._image, self._text = image, text
        self.preprocess, self.tokenize, self.embed_dim, self.info = preprocess, tokenize, embed_dim, info

    def encode_image(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 32) -> np.ndarray:
        """File paths, PIL images or uint8 (H, W, 3) arrays, one or many -> (N, D) float32, L2-normalised."""
        many = list(images) if isinstance(images, (list, tuple)) or (isinstance(images, np.ndarray) and
                                                                    images.ndim == 4) else [images]
        if not many:
            return np.zeros((0, self.embed_dim), np.float32)
        out = []
        for i in range(0, len(many), batch_size):
            out.append(self._image.embed(self.preprocess.batch(many[i:i + batch_size]), batch_size))
        return _unit(np.concatenate(out))

    def encode_pixels(self, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Already preprocessed images (N, 3, H, W) float32 (``encoder.preprocess``) -> (N, D), L2-normalised."""
        return _unit(self._image.embed(np.ascontiguousarray(pixels, dtype=np.float32), batch_size))

    def encode_text(self, texts: str | Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Strings, one or many -> (N, D) float32, L2-normalised."""
        if not isinstance(texts, str) and not isinstance(texts, (list, tuple)) and \
                not (isinstance(texts, np.ndarray) and texts.ndim == 1):
            raise UserError(f"texts must be a string or a list of strings, not {type(texts).__name__}")
        many = [texts] if isinstance(texts, str) else list(texts)
        if self._text is None:
            raise UserError(f"{self.info.source} has no text encoder (nor precomputed text embeddings); export the "
                            f"text encoder too, or use --text-embeddings for a fixed vocabulary")
        if not many:
            return np.zeros((0, self.embed_dim), np.float32)
        if isinstance(self._text, TextTable):
            return _unit(self._text.encode(many))
        if self.tokenize is None:
            raise UserError(f"{self.info.source} has no tokenizer for its text encoder; export again")
        tokens = np.asarray(self.tokenize(many), dtype=np.int64)
        return _unit(self._text.embed(tokens, batch_size))

    def zero_shot(self, images: ImageInput | Sequence[ImageInput], labels: Sequence[str],
                  prompt: str = DEFAULT_PROMPT) -> np.ndarray:
        """(N, C) class probabilities: softmax over the labels of 100 x cosine(image, prompt.format(label=...))."""
        if "{label}" not in prompt:
            raise UserError(f"the prompt {prompt!r} needs a {{label}} placeholder")
        if not labels:
            raise UserError("zero-shot needs at least one label")
        logits = LOGIT_SCALE * self.encode_image(images) @ self.encode_text([prompt.format(label=x) for x in
                                                                            labels]).T
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


