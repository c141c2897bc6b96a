"""``edgedistill.load``: one call opens a distilled student in any exported form and embeds images and text.

    encoder = edgedistill.load("runs/clip_to_mobilenet/export")       # the fastest artifact this machine runs
    emb = encoder.encode_image(["a.jpg", "b.png"])                      # (2, D) float32, L2-normalised
    probs = encoder.zero_shot(["a.jpg"], ["cat", "dog"])                # (1, 2) class probabilities

``path`` is an export folder (``export.json``), one artifact file of it, a run folder (its ``export/`` when there
is one, else the student as trained) or a ``student/`` folder. From an export, each tower runs the artifact and
backend that bench measured fastest on this device (``EXPORT/bench/bench.json``, batch 1, when it was measured on
this processor); without a measurement, the first backend of ``formats.BACKENDS`` that can run here and the
fastest precision of the device (``PRECISION_ORDER``). ``backend`` and ``precision`` narrow the choice (a text tower
with no artifact at ``precision`` falls back to the device order, noted in ``info.notes``); a choice that nothing
satisfies is one clear error. What was picked is in ``encoder.info``. Images are preprocessed and
text tokenised without torch (``runtime``), so an ONNX export runs with numpy, pillow, tokenizers and a runtime.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgedistill.bench.backends import Runner, candidates
from edgedistill.bench.devices import cpu_model
from edgedistill.documents import BenchReport, read_document
from edgedistill.errors import UserError
from edgedistill.export import artifacts
from edgedistill.formats import BACKENDS, DEVICES
from edgedistill.jetson import detect_jetson
from edgedistill.runtime.preprocess import ImageInput, Preprocess
from edgedistill.runtime.tokenizer import load_tokenizer
from edgedistill.valsplit import DEFAULT_PROMPT

# Precisions from fastest to slowest where nothing was measured: INT8 QDQ runs 2.3x faster than fp32 on
# onnxruntime CPU (benchmarks/README.md), fp16 is slower than fp32 there; on GPUs INT8 and fp16 use tensor cores.
PRECISION_ORDER = {"cpu": ("int8", "fp32", "fp16"), "cuda": ("int8", "fp16", "fp32"),
                   "jetson": ("int8", "fp16", "fp32")}
LOGIT_SCALE = 100.0  # CLIP's: zero-shot probabilities are softmax(100 * cosine)


@dataclass(frozen=True)
class Choice:
    """One tower's pick: the artifact (export.json entry), its export folder, and the backend that runs it."""
    artifact: dict[str, Any]
    export_dir: Path
    backend: str

    @property
    def path(self) -> Path:
        return self.export_dir / self.artifact["path"]

    def describe(self) -> dict[str, Any]:
        return {"artifact": self.artifact.get("name"), "path": str(self.path), "backend": self.backend,
                "precision": self.artifact.get("precision"), "format": self.artifact.get("format")}


@dataclass
class EncoderInfo:
    """What ``load`` picked: per tower the artifact, backend and precision; the device; how it was chosen."""
    source: str
    device: str
    image: dict[str, Any]
    text: dict[str, Any] | None
    chosen_by: str                  # "bench.json" | "rule" | "request"
    model: str | None = None        # the student's identity (its weights' sha256): what an index is checked against
    notes: list[str] = field(default_factory=list)


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


# ---------------------------------------------------------------------------------------------------- load

def load(path: str | Path, device: str = "auto", backend: str = "auto", precision: str | None = None,
         threads: int | None = None, spin: bool | None = None) -> Encoder:
    """Open ``path`` (see the module docstring) on ``device`` (auto, cpu, cuda, jetson) -> Encoder.

    ``spin``: whether onnxruntime's pool threads spin between calls (None: onnxruntime's default, on). Off suits a
    process that does other work on the same cores, such as decoding the next images.
    """
    device = resolve_device(device)
    _check_request(backend, precision, device)
    export_dir, pinned = _export_of(Path(path))
    if export_dir is None:
        return _load_student(_student_folder(Path(path)), device, threads, str(path))
    doc = artifacts.read_manifest(export_dir)
    measured = bench_ranking(export_dir, device)
    image = _choose(doc, export_dir, "image", device, backend, precision, pinned, measured)
    text = _choose(doc, export_dir, "text", device, backend, precision, pinned, measured, required=False)
    # The precision asked for is the image tower's: exports hold the text tower in fp32 only, and a request for
    # int8 must not quietly leave the encoder without text.
    text_fallback = text is None and precision is not None
    if text_fallback:
        text = _choose(doc, export_dir, "text", device, backend, None, pinned, measured, required=False)
    chosen_by = "request" if pinned is not None or backend != "auto" or precision else \
        ("bench.json" if measured else "rule")
    info = EncoderInfo(str(path), device, image.describe(), text.describe() if text else None, chosen_by,
                       doc.get("student_weights_sha256") or image.artifact.get("sha256"))
    if text_fallback and text is not None:
        info.notes.append(f"no {precision} text encoder in this export: text runs at {text.artifact.get('precision')}")
    return Encoder(_open(image, device, threads, spin), _open_text(text, doc, export_dir, device, threads, spin),
                   Preprocess(doc["preprocess"]), _tokenizer(export_dir, doc, info), int(doc["embed_dim"]), info)


def resolve_device(device: str) -> str:
    """auto -> jetson on a Jetson, cuda where a GPU backend sees a GPU, else cpu; a named GPU must be there."""
    if device not in ("auto", *DEVICES):
        raise UserError(f"device {device!r} is not one of auto, {', '.join(DEVICES)}")
    if device == "auto":
        return "jetson" if detect_jetson() is not None else "cuda" if _gpu_visible() else "cpu"
    if device in ("cuda", "jetson") and not _gpu_visible():
        raise UserError(f"device {device}: no CUDA GPU is visible here (neither torch nor onnxruntime sees one); use "
                        f"device='cpu' or 'auto'")
    return device


def _gpu_visible() -> bool:
    try:
        import torch  # deferred: optional on a device
        return bool(torch.cuda.is_available())
    except ImportError:
        return BACKENDS["onnxruntime-cuda"].missing() is None


def _check_request(backend: str, precision: str | None, device: str) -> None:
    if backend != "auto":
        if backend not in BACKENDS:
            raise UserError(f"unknown backend {backend!r}; choose auto or one of {', '.join(BACKENDS)}")
        b = BACKENDS[backend]
        if device not in b.devices:
            raise UserError(f"backend {backend} does not run on {device} (it runs on {', '.join(b.devices)})")
        missing = b.missing()
        if missing:
            raise UserError(f"backend {backend} cannot run here: {missing}")
    if precision is not None and precision not in ("fp32", "fp16", "int8"):
        raise UserError(f"unknown precision {precision!r}; choose fp32, fp16 or int8")


def _export_of(path: Path) -> tuple[Path | None, Path | None]:
    """(export folder, pinned artifact file or None); (None, None) for a student to run in PyTorch."""
    if path.is_file():
        folder = path.parent
        if not (folder / artifacts.MANIFEST).is_file():
            raise UserError(f"{path}: an artifact is loaded with the export.json beside it (preprocessing, "
                            f"tokenizer, sha256); none in {folder}")
        return folder, None if path.name == artifacts.MANIFEST else path
    if (path / artifacts.MANIFEST).is_file():
        return path, None
    if (path / "recipe.yaml").is_file() and (path / "export" / artifacts.MANIFEST).is_file():
        return path / "export", None
    if path.is_dir() and ((path / "student").is_dir() or (path / "open_clip_config.json").is_file()):
        return None, None
    raise UserError(f"{path} is none of: an export folder (export.json), an artifact file, a run folder or a "
                    f"student/ folder; give one of those")


def bench_ranking(export_dir: Path, device: str) -> dict[tuple[str, str], float]:
    """Batch-1 p50 (ms) by (artifact, backend) from ``EXPORT/bench/bench.json`` when it was measured on this
    processor and device; {} otherwise (a measurement from another machine says nothing about this one)."""
    path = export_dir / "bench" / "bench.json"
    if not path.is_file():
        return {}
    try:
        report = read_document(path, BenchReport, "bench report", "bench again")
    except UserError:
        return {}
    info = report.model_dump().get("device_info") or {}
    if info.get("device") != device or info.get("cpu") != cpu_model():
        return {}
    return {(r["artifact"], r["backend"]): float(r["p50_ms"]) for r in report.rows
            if r.get("status") == "ok" and r.get("batch") == 1 and r.get("p50_ms") is not None}


def _choose(doc: dict[str, Any], export_dir: Path, encoder: str, device: str, backend: str, precision: str | None,
            pinned: Path | None, measured: dict[tuple[str, str], float], required: bool = True) -> Choice | None:
    """The artifact and backend for one tower (None for a text tower the export does not have)."""
    options = []
    for a in doc["artifacts"]:
        if a.get("encoder") != encoder or a.get("format") == "npy" or (precision and a.get("precision") != precision):
            continue
        if pinned is not None and encoder == _pinned_encoder(doc, export_dir, pinned) and \
                export_dir / a["path"] != pinned:
            continue
        for b in BACKENDS.values():
            if a.get("format") in b.formats and device in b.devices and backend in ("auto", b.name) \
                    and b.missing() is None:
                options.append(Choice(a, export_dir, b.name))
    if not options:
        if not required:
            return None
        raise UserError(f"nothing in {export_dir} runs the {encoder} encoder on {device}"
                        f"{' with ' + backend if backend != 'auto' else ''}{' at ' + precision if precision else ''};"
                        f" it holds {', '.join(sorted({a['name'] for a in doc['artifacts']}))}")
    order = list(BACKENDS)
    prec = PRECISION_ORDER[device]

    def rank(c: Choice) -> tuple:
        p50 = measured.get((str(c.artifact["name"]), c.backend))
        return (p50 is None, p50 or 0.0, order.index(c.backend), prec.index(c.artifact.get("precision", "fp32")))
    return min(options, key=rank)


def _pinned_encoder(doc: dict[str, Any], export_dir: Path, pinned: Path) -> str:
    for a in doc["artifacts"]:
        if export_dir / a["path"] == pinned:
            return str(a.get("encoder"))
    raise UserError(f"{pinned} is not listed in {export_dir / artifacts.MANIFEST}; give an artifact of that export")


def _open(choice: Choice, device: str, threads: int | None, spin: bool | None = None) -> Runner:
    path = artifacts.verify_artifact(choice.export_dir, choice.artifact)
    cand = next(c for c in candidates(choice.artifact, path, device, threads, spin=spin)
                if c.backend == choice.backend)
    if cand.make is None:
        raise UserError(f"{choice.artifact['name']} cannot run on {choice.backend}: {cand.reason}")
    return cand.make()


def _open_text(choice: Choice | None, doc: dict[str, Any], export_dir: Path, device: str,
               threads: int | None, spin: bool | None = None) -> Runner | TextTable | None:
    if choice is not None:
        return _open(choice, device, threads, spin)
    table = next((a for a in doc["artifacts"] if a.get("format") == "npy" and a.get("encoder") == "text"), None)
    if table is None:
        return None
    path = artifacts.verify_artifact(export_dir, table)
    prompts = (export_dir / str(table.get("prompts", "text_prompts.txt"))).read_text(encoding="utf-8").splitlines()
    return TextTable(np.load(path), prompts)


def _tokenizer(export_dir: Path, doc: dict[str, Any], info: EncoderInfo) -> Callable[[Sequence[str]], Any] | None:
    """The export's own tokenizer (no torch); for exports made before it was saved, open_clip's."""
    folder = export_dir / str((doc.get("tokenizer") or {}).get("folder") or "tokenizer")
    if (folder / "tokenizer.json").is_file():
        return load_tokenizer(folder)
    name = (doc.get("tokenizer") or {}).get("open_clip")
    try:
        import open_clip  # deferred: only exports without a saved tokenizer need it
    except ImportError:
        info.notes.append("no tokenizer: this export predates saved tokenizers and open_clip is not installed")
        return None
    return open_clip.get_tokenizer(name) if name else None


def _student_folder(path: Path) -> Path:
    return path / "student" if (path / "student").is_dir() else path


def _load_student(folder: Path, device: str, threads: int | None, source: str) -> Encoder:
    """The student as trained, on PyTorch (needs the training install)."""
    backend = "pytorch-cuda" if device in ("cuda", "jetson") else "pytorch-cpu"
    missing = BACKENDS[backend].missing()
    if missing:
        raise UserError(f"{folder} is a PyTorch student and {missing}; load its export instead (edgedistill export)")
    cfg = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))
    runners = {}
    for encoder in ("image", "text"):
        art = {"name": f"{encoder}_fp32_pytorch", "encoder": encoder, "format": "pytorch", "precision": "fp32"}
        cand = next(c for c in candidates(art, folder, device, threads) if c.backend == backend)
        runners[encoder] = cand.make()  # type: ignore[misc]
    import open_clip  # deferred: the PyTorch student's own tokenizer (torch is here anyway)

    info = EncoderInfo(source, device, {"artifact": "image_fp32_pytorch", "path": str(folder), "backend": backend,
                                        "precision": "fp32", "format": "pytorch"},
                       {"artifact": "text_fp32_pytorch", "path": str(folder), "backend": backend,
                        "precision": "fp32", "format": "pytorch"}, "request",
                       (cfg.get("edgedistill") or {}).get("weights_sha256"))
    return Encoder(runners["image"], runners["text"], Preprocess(cfg["preprocess_cfg"]),
                   open_clip.get_tokenizer(f"local-dir:{folder}"), int(cfg["model_cfg"]["embed_dim"]), info)
