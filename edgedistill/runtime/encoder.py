"""``Encoder``: a loaded student (what ``edgedistill.load`` returns) — images and text in, L2-normalised embeddings
out, zero-shot probabilities — over one runner per tower; ``EncoderInfo`` says what was loaded and why."""

from __future__ import annotations

import string
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
    """A loaded student: ``encode_image``, ``encode_pixels``, ``encode_text``, ``zero_shot``, ``zero_shot_pixels``;
    ``preprocess``, ``tokenize``, ``embed_dim`` and ``info`` are public."""

    def __init__(self, image: Runner, text: Runner | TextTable | None, preprocess: Preprocess,
                 tokenize: Callable[[Sequence[str]], Any] | None, embed_dim: int, info: EncoderInfo) -> None:
        self._image, self._text = image, text
        self.preprocess, self.tokenize, self.embed_dim, self.info = preprocess, tokenize, embed_dim, info
        self._class_cache: tuple[tuple[str, tuple[str, ...]], np.ndarray] | None = None  # zero-shot class texts

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
                  prompt: str = DEFAULT_PROMPT) -> ZeroShot:
        """(N, C) class probabilities: softmax over the labels of 100 x cosine(image, prompt.format(label=...)),
        as a ``ZeroShot`` array that also carries ``labels`` and ``top_labels``."""
        classes = self._classes(labels, prompt)  # a bad prompt is told before any image is read
        return ZeroShot(_softmax(LOGIT_SCALE * self.encode_image(images) @ classes.T), labels)

    def zero_shot_pixels(self, pixels: np.ndarray, labels: Sequence[str], prompt: str = DEFAULT_PROMPT,
                         batch_size: int = 32) -> ZeroShot:
        """``zero_shot`` of already preprocessed images (N, 3, H, W) float32 (``encoder.preprocess``, or
        ``runtime.decode.decoded_batches``); the class texts are encoded once for a run of batches."""
        classes = self._classes(labels, prompt)
        if len(pixels) == 0:
            return ZeroShot(np.zeros((0, len(classes)), np.float32), labels)
        return ZeroShot(_softmax(LOGIT_SCALE * self.encode_pixels(pixels, batch_size) @ classes.T), labels)

    def _classes(self, labels: Sequence[str], prompt: str) -> np.ndarray:
        """(C, D) embeddings of the prompt filled with each label; the last set is kept for the next batch."""
        check_prompt(prompt)
        if isinstance(labels, str) or not len(labels) or not all(isinstance(x, str) for x in labels):
            raise UserError("zero-shot needs a list of label strings (at least one)")
        key = (prompt, tuple(labels))
        if self._class_cache is None or self._class_cache[0] != key:
            self._class_cache = (key, self.encode_text([prompt.format(label=x) for x in labels]))
        return self._class_cache[1]


class ZeroShot(np.ndarray):
    """Zero-shot probabilities (N, C) float32, an ordinary array for every use, that also names its columns:
    ``labels`` (C names), ``top_labels`` (the most probable label of each image) and ``top(k)``.

    A view that keeps the columns (rows, arithmetic) keeps ``labels``; one that changes them (column slices,
    reductions) is a plain array or has ``labels`` None."""

    labels: list[str] | None

    def __new__(cls, probs: np.ndarray, labels: Sequence[str]) -> ZeroShot:
        out = np.asarray(probs, dtype=np.float32).view(cls)
        if out.ndim != 2 or out.shape[1] != len(labels):
            raise ValueError(f"probabilities of shape {out.shape} do not have one column per label ({len(labels)})")
        out.labels = list(labels)
        return out

    def __array_finalize__(self, obj: Any) -> None:
        labels = getattr(obj, "labels", None)
        self.labels = labels if labels is not None and self.ndim in (1, 2) and self.shape[-1] == len(labels) \
            else None

    def __array_wrap__(self, arr: np.ndarray, context: Any = None, return_scalar: bool = False) -> Any:
        if self.labels is None or arr.ndim not in (1, 2) or arr.shape[-1] != len(self.labels):
            plain = arr.view(np.ndarray)  # a reduction over the labels: numbers, no longer one per label
            return plain[()] if return_scalar and plain.ndim == 0 else plain
        return super().__array_wrap__(arr, context, return_scalar)

    def __reduce__(self) -> tuple[Any, ...]:  # pickled with its labels (multiprocessing, caches)
        rebuild, args, state = super().__reduce__()[:3]
        return rebuild, args, (state, self.labels)

    def __setstate__(self, state: tuple[Any, Any]) -> None:
        base, self.labels = state
        super().__setstate__(base)

    def top(self, k: int = 1) -> list[list[tuple[str, float]]]:
        """Per image, its ``k`` most probable (label, probability), most probable first (ties: label order)."""
        labels = self._names()
        probs = self.view(np.ndarray)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :max(k, 0)]
        return [[(labels[j], float(p[j])) for j in row] for p, row in zip(probs, order)]

    @property
    def top_labels(self) -> list[str]:
        """The most probable label of each image."""
        return [row[0][0] for row in self.top(1)]

    def _names(self) -> list[str]:
        if self.labels is None or self.ndim != 2 or self.shape[1] != len(self.labels):
            raise ValueError(f"this array {self.shape} is not zero-shot probabilities (N images, C labels) any more; "
                             f"take top labels from the result of zero_shot itself")
        return self.labels


def check_prompt(prompt: str) -> None:
    """A zero-shot prompt is a template whose one field is ``{label}`` (literal braces doubled: ``{{``); anything
    else is a one-line UserError naming the prompt, before a model runs."""
    def bad(why: str) -> UserError:
        return UserError(f"the prompt {prompt!r} {why}; write it like {DEFAULT_PROMPT!r} ({{{{ and }}}} for "
                         f"literal braces)")

    if not isinstance(prompt, str):
        raise UserError(f"the prompt must be a string, not {type(prompt).__name__}")
    try:
        names = _fields(prompt)
    except ValueError as e:  # a stray brace: "Single '{' encountered in format string"
        raise bad(f"is not a template ({e})") from None
    other = next((name for name in names if name != "label"), None)
    if other is not None:
        raise bad(f"has the field {{{other}}}; {{label}} is the only one")
    if not names:
        raise bad("needs a {label} placeholder")
    try:
        prompt.format(label="label")
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:  # a format spec or conversion
        raise bad(f"does not format ({e})") from None


def _fields(template: str) -> list[str]:
    """The field names of a format string, those nested in a format spec too (``{label:{w}}``)."""
    parsed = [(name, spec) for _, name, spec, _ in string.Formatter().parse(template) if name is not None]
    return [n for name, spec in parsed for n in (name, *_fields(spec or ""))]


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(axis=1, keepdims=True)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


