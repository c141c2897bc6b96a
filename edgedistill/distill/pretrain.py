"""Train a small open_clip CLIP from scratch on a local image-caption manifest, to serve as an offline teacher.

Machines without internet (CI, air-gapped labs) cannot download pretrained CLIP weights; a CLIP trained here on a
procedural dataset (e.g. 64x64 "scenes" of coloured shapes) is a teacher whose accuracy means something. The
result is saved in open_clip's own format, so the rest of the toolkit loads it as an ordinary local teacher::

    teacher:
      model: <folder>/edgeclip-small.json     # open_clip model config (plain model_configs/ form)
      pretrained: <folder>/edgeclip-small.pt  # state_dict, loads with torch.load(weights_only=True)

Results are cached by settings: ``<root>/<preset-or-custom>-<key16>/`` where the key hashes the config, the training
manifest's content and the open_clip version. A folder is trained under a temporary sibling name and renamed when
complete, so a crash or Ctrl-C never leaves a folder under the final name; an intact folder is reused.

Data: every captioned training image is decoded once into a (N, 3, S, S) uint8 tensor with open_clip's own eval
geometry (resize the shortest side + centre crop, taken from ``create_model_and_transforms``), and normalised on
the fly with that transform's mean/std, so training sees exactly what the toolkit's teacher preprocess produces.
Each step draws a seeded batch of distinct images (epoch-wise permutations) and one random caption per image.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import open_clip
import torch
from open_clip.loss import ClipLoss
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, model_validator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torchvision import transforms as T

import edgedistill.core.atomic as atomic
from edgedistill.data.images import BadImages, open_image, why_unreadable
from edgedistill.data.manifest import Manifest, load_manifest
from edgedistill.core.errors import UserError
from edgedistill.evaluation.metrics import retrieval_metrics
from edgedistill.core.hashing import sha256_file, sha256_json
from edgedistill.core.locations import default_cache_root
from edgedistill.distill.teachers import quiet_open_clip, register_open_clip_config, resolve_device
from edgedistill.core.terminal import warn

PRETRAIN_VERSION = 1       # bump when a change here changes what a given config trains to
VOCAB_SIZE = 49408         # open_clip's default BPE tokenizer
MAX_BAD_FRACTION = 0.05    # unreadable images tolerated (skipped with a warning) before stopping
EVAL_BATCH = 256
LOSS_WINDOW = 10           # steps averaged for the reported start / end training loss


class PretrainConfig(BaseModel):
    """Architecture and schedule of a CLIP trained from scratch (fp32, fixed step count)."""

    model_config = ConfigDict(extra="forbid")

    image_size: PositiveInt = Field(64, description="input size (square); images are resized + centre-cropped")
    patch_size: PositiveInt = Field(8, description="ViT patch size (must divide image_size)")
    vision_width: PositiveInt = 128
    vision_layers: PositiveInt = 3
    vision_heads: PositiveInt = Field(2, description="ViT attention heads (must divide vision_width)")
    text_width: PositiveInt = 128
    text_layers: PositiveInt = 2
    text_heads: PositiveInt = Field(2, description="text attention heads (must divide text_width)")
    context_length: PositiveInt = Field(32, description="tokens per caption (longer captions are cut)")
    embed_dim: PositiveInt = 128
    steps: PositiveInt = Field(450, description="optimizer steps (a fixed count, never a time budget)")
    batch_size: PositiveInt = Field(128, description="images per step (fewer if the dataset is smaller)")
    lr: PositiveFloat = Field(1e-3, description="peak AdamW learning rate")
    weight_decay: float = Field(0.1, ge=0.0, description="AdamW weight decay (not on biases, norms, logit scale)")
    warmup_steps: int = Field(50, ge=0, description="linear warm-up (capped at a fifth of steps), then cosine")
    seed: int = 0

    @model_validator(mode="after")
    def _shapes_fit(self) -> "PretrainConfig":
        for width, heads, what in ((self.vision_width, self.vision_heads, "vision"),
                                   (self.text_width, self.text_heads, "text")):
            if width % heads:
                raise ValueError(f"{what}_heads ({heads}) must divide {what}_width ({width})")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size ({self.patch_size}) must divide image_size ({self.image_size})")
        return self

    def open_clip_config(self) -> dict[str, Any]:
        """The open_clip model config (the plain form of open_clip's ``model_configs/*.json``)."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {"image_size": self.image_size, "layers": self.vision_layers, "width": self.vision_width,
                           "patch_size": self.patch_size, "head_width": self.vision_width // self.vision_heads},
            "text_cfg": {"context_length": self.context_length, "vocab_size": VOCAB_SIZE, "width": self.text_width,
                         "heads": self.text_heads, "layers": self.text_layers},
        }


# Seconds per step measured on a 2-core CPU (fp32, 2 threads, batch 128, 64 px; idle machine):
#   tiny  ~0.10 s: CI and tests; 150 steps on 5k scenes pairs take ~18 s in all (i2t R@1 7% of 1000 held out).
#   small ~0.39 s: the demo; 450 steps on 20k scenes ~3.1 minutes in all, held-out i2t R@1 44%, t2i R@1 41%
#         (the feasibility run reached 66.6% after 810 steps).
#   medium ~0.5 s: the demo's teacher, small with a 160-wide vision tower (0.99M parameters, a 3.8 MB fp32
#         ONNX image graph: 1.4x the 2.7 MB of the demo's MobileNetV3-Small 0.5x student, 5x its batch-1 CPU
#         latency); 400 steps on 20k scenes ~3.7 minutes in all, held-out i2t R@1 39%.
#   base  ~0.80-0.92 s: the quality benchmark's teacher, 1260 steps ~17-19 minutes (85.0% i2t R@1 on scenes in
#         the feasibility run).
PRESETS: dict[str, PretrainConfig] = {
    "tiny": PretrainConfig(vision_width=64, vision_layers=2, vision_heads=2, text_width=64, text_layers=1,
                           text_heads=2, embed_dim=64, steps=150, warmup_steps=15, lr=2e-3),
    "small": PretrainConfig(vision_width=128, vision_layers=3, vision_heads=2, text_width=128, text_layers=2,
                            text_heads=2, embed_dim=128, steps=450, warmup_steps=50),
    "medium": PretrainConfig(vision_width=160, vision_layers=3, vision_heads=2, text_width=128, text_layers=2,
                             text_heads=2, embed_dim=128, steps=400, warmup_steps=50),
    "base": PretrainConfig(vision_width=192, vision_layers=4, vision_heads=3, text_width=128, text_layers=3,
                           text_heads=2, embed_dim=128, steps=1260, warmup_steps=100),
}


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def pretrain_config(preset: str = "small", **overrides: Any) -> PretrainConfig:
    """A preset with ``overrides`` applied (e.g. ``steps=200``); one-line UserError on a bad name or value."""
    if preset not in PRESETS:
        raise UserError(f"unknown pretrain preset '{preset}'; use one of {', '.join(PRESETS)}")
    try:
        return PretrainConfig.model_validate({**PRESETS[preset].model_dump(), **overrides})
    except ValidationError as e:
        raise UserError(f"bad pretrain setting ({_validation_message(e)}); fix the value or use a preset") from None


def preset_name(cfg: PretrainConfig) -> str:
    """The preset ``cfg`` equals, or 'custom'."""
    return next((name for name, p in PRESETS.items() if p == cfg), "custom")


def pretrain_key(cfg: PretrainConfig, train_manifest_sha256: str) -> str:
    """sha256 of what decides the weights: the config, the training data's content and the open_clip version."""
    fields = {"version": PRETRAIN_VERSION, "config": cfg.model_dump(mode="json"),
              "train_manifest_sha256": train_manifest_sha256, "open_clip": open_clip.__version__}
    return sha256_json(fields)


@dataclass
class PretrainResult:
    """Where the teacher is and how good it is.

    ``seconds`` is this call's wall time (small when ``reused``); the training time is ``info['train_seconds']``.
    ``metrics``: held-out retrieval (``i2t_r1`` ... ``rsum``, percent; absent without val data) and the mean
    training loss over the first / last steps (``train_loss_start`` / ``train_loss_end``).
    """

    config_json: Path
    checkpoint: Path
    metrics: dict[str, float]
    reused: bool
    seconds: float
    folder: Path = Path()
    info: dict[str, Any] = field(default_factory=dict, repr=False)  # the contents of pretrain.json

    def teacher_config(self) -> dict[str, str]:
        """The recipe's ``teacher`` section for this model."""
        return {"model": str(self.config_json), "pretrained": str(self.checkpoint)}


# ----------------------------------------------------------------------------------------------- data


@dataclass
class PairData:
    """Captioned images ready for training or evaluation.

    images (N, 3, S, S) uint8 after open_clip's resize + centre crop; tokens (U, L) long, the distinct captions
    tokenised; caption_tokens (T,) long, the row in ``tokens`` of each caption; offsets (N + 1,) long, the captions
    of image i are ``offsets[i]:offsets[i + 1]`` (every image has at least one).
    """

    images: torch.Tensor
    tokens: torch.Tensor
    caption_tokens: torch.Tensor
    offsets: torch.Tensor
    skipped: int = 0  # unreadable images left out

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def text_to_image(self) -> torch.Tensor:
        """(T,) long: the image of each caption."""
        counts = self.offsets[1:] - self.offsets[:-1]
        return torch.repeat_interleave(torch.arange(len(self)), counts)


class Normalizer:
    """uint8 images (B, 3, S, S) -> float32 normalised exactly like open_clip's ToTensor + Normalize."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # The same operations, in the same order, as torchvision's to_tensor + normalize: bit-identical results.
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        return images.float().div(255).sub_(mean).div_(std)


def split_preprocess(preprocess: Callable) -> tuple[Callable[[Image.Image], Image.Image], Normalizer]:
    """Split open_clip's eval transform into its PIL geometry (resize, crop, mode) and its tensor normalisation.

    Taking both halves from the transform itself (not from constants) keeps training identical to what the
    toolkit's teacher preprocess feeds the model later.
    """
    steps = list(getattr(preprocess, "transforms", []))
    cut = next((i for i, t in enumerate(steps) if isinstance(t, T.ToTensor)), None)
    tail = steps[cut + 1:] if cut is not None else []
    if cut is None or len(tail) != 1 or not isinstance(tail[0], T.Normalize):
        raise RuntimeError(f"unexpected open_clip preprocess (expected ... ToTensor, Normalize): {preprocess}")
    return T.Compose(steps[:cut]), Normalizer(tail[0].mean, tail[0].std)


def _decode(path: Path, geometry: Callable[[Image.Image], Image.Image], size: int) -> np.ndarray:
    """(3, size, size) uint8 for one image file (raises if unreadable)."""
    array = np.asarray(geometry(open_image(path)).convert("RGB"), dtype=np.uint8)
    if array.shape != (size, size, 3):
        raise ValueError(f"preprocessed to {array.shape[:2]}, expected {size}x{size}")
    return array.transpose(2, 0, 1)


def load_pairs(manifest: Manifest, geometry: Callable[[Image.Image], Image.Image], size: int,
               tokenizer: Callable[[list[str]], torch.Tensor], what: str, console: Console | None = None
               ) -> PairData:
    """Decode every captioned, readable image of ``manifest`` once and tokenise its captions (see PairData).

    Images without captions are skipped (nothing to contrast them with); unreadable ones are skipped with a
    warning, and more than 5% of them stop the run (UserError).
    """
    entries = [e for e in manifest.entries if e.captions]
    if not entries:
        raise UserError(f"{what} manifest {manifest.path} has no captioned images; CLIP training needs "
                        f"\"captions\" on at least two images")
    images = np.empty((len(entries), 3, size, size), dtype=np.uint8)
    ok = np.zeros(len(entries), dtype=bool)
    bad = BadImages(len(entries), MAX_BAD_FRACTION, what, console)

    def work(i: int) -> tuple[int, str | None]:
        try:
            images[i] = _decode(entries[i].image, geometry, size)
            return i, None
        except Exception as e:  # one bad file must not stop the run; BadImages decides when too many are bad
            return i, why_unreadable(e)

    # JPEG decoding and resizing release the GIL: threads use every core without pickling images around.
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        for i, why in pool.map(work, range(len(entries))):
            if why is None:
                ok[i] = True
            else:
                bad.add(i, entries[i].image, why)
    keep = np.flatnonzero(ok)
    entries = [entries[i] for i in keep]
    if len(entries) < 2:
        raise UserError(f"{what} manifest {manifest.path} has fewer than two readable captioned images; "
                        f"CLIP training needs at least two")
    captions = [c for e in entries for c in e.captions]
    distinct = list(dict.fromkeys(captions))  # tokenise each distinct caption once
    row = {c: i for i, c in enumerate(distinct)}
    counts = torch.tensor([len(e.captions) for e in entries], dtype=torch.long)
    kept = images if len(keep) == len(ok) else images[keep]  # no second copy when every image was readable
    return PairData(images=torch.from_numpy(kept), tokens=tokenizer(distinct).long(),
                    caption_tokens=torch.tensor([row[c] for c in captions], dtype=torch.long),
                    offsets=torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]),
                    skipped=int(len(ok) - len(keep)))


class BatchSampler:
    """Seeded batches of distinct image indices (epoch-wise permutations, short tail dropped) + one caption each."""

    def __init__(self, data: PairData, batch_size: int, seed: int) -> None:
        self.data = data
        self.n = len(data)
        self.batch_size = min(batch_size, self.n)
        self.generator = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(self.n, generator=self.generator)
        self.pos = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (B,) long, caption rows into data.tokens (B,) long)."""
        if self.pos + self.batch_size > self.n:
            self.perm = torch.randperm(self.n, generator=self.generator)
            self.pos = 0
        images = self.perm[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        start, count = self.data.offsets[images], self.data.offsets[images + 1] - self.data.offsets[images]
        pick = start + (torch.rand(len(images), generator=self.generator) * count).long().clamp_(max=count - 1)
        return images, self.data.caption_tokens[pick]


# ----------------------------------------------------------------------------------------------- model


def build_model(name: str, model_cfg: dict[str, Any]) -> tuple[torch.nn.Module, Callable, Callable]:
    """(model, eval preprocess, tokenizer) for ``model_cfg`` registered as ``name``, built the way load_teacher does."""
    if open_clip.get_model_config(name) != model_cfg:
        register_open_clip_config(name, model_cfg)
    with quiet_open_clip():
        model, _, preprocess = open_clip.create_model_and_transforms(name)
    return model, preprocess, open_clip.get_tokenizer(name)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # No decay on biases, norm weights, class/positional vectors and the logit scale (the usual CLIP practice).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over ``min(warmup, steps // 5)`` steps, then cosine decay to zero at ``steps``."""
    warmup = min(warmup, steps // 5)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min((step - warmup) / max(steps - warmup, 1), 1.0)))


def train_clip(model: torch.nn.Module, data: PairData, normalize: Normalizer, cfg: PretrainConfig,
               device: torch.device, console: Console | None = None) -> list[float]:
    """Train ``model`` in place with the CLIP contrastive loss for ``cfg.steps`` steps; returns the loss per step."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sampler = BatchSampler(data, cfg.batch_size, cfg.seed + 1)
    clip_loss = ClipLoss()
    losses: list[float] = []
    columns = [TextColumn("pretrain"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    bar = Progress(*columns, console=console, transient=False) if console is not None else None
    with bar if bar is not None else contextlib.nullcontext():
        task = bar.add_task("pretrain", total=cfg.steps, info="") if bar is not None else None
        start = time.perf_counter()
        for step in range(cfg.steps):
            image_rows, token_rows = sampler.next()
            images = normalize(data.images[image_rows].to(device, non_blocking=True))  # move uint8: 4x less
            tokens = data.tokens[token_rows].to(device, non_blocking=True)
            image_features = model.encode_image(images, normalize=True)
            text_features = model.encode_text(tokens, normalize=True)
            loss = clip_loss(image_features, text_features, model.logit_scale.exp())
            value = float(loss.item())
            if not math.isfinite(value):
                raise UserError(f"the CLIP loss became {value} at step {step + 1}; lower lr (now {cfg.lr:g})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            with torch.no_grad():  # as open_clip's training: a temperature below 1/100 destabilises the loss
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(value)
            if bar is not None:
                rate = (step + 1) * len(image_rows) / max(time.perf_counter() - start, 1e-9)
                bar.update(task, advance=1, info=f"loss {value:.3f}  {rate:.0f} img/s")
    return losses


@torch.no_grad()
def embed_pairs(model: torch.nn.Module, data: PairData, normalize: Normalizer, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(image embeddings (N, D), caption embeddings (T, D)), float32, L2-normalised, in eval mode."""
    model.to(device).eval()
    images = torch.cat([model.encode_image(normalize(data.images[s:s + EVAL_BATCH].to(device)), normalize=True)
                        for s in range(0, len(data), EVAL_BATCH)])
    tokens = data.tokens[data.caption_tokens]
    texts = torch.cat([model.encode_text(tokens[s:s + EVAL_BATCH].to(device), normalize=True)
                       for s in range(0, len(tokens), EVAL_BATCH)])
    return images.float().cpu(), texts.float().cpu()


def evaluate(model: torch.nn.Module, data: PairData, normalize: Normalizer, device: torch.device
             ) -> dict[str, float]:
    """Held-out Recall@1/5/10 image->text and text->image (percent) and rsum."""
    image_emb, text_emb = embed_pairs(model, data, normalize, device)
    return retrieval_metrics(image_emb, text_emb, data.text_to_image)


# ----------------------------------------------------------------------------------------------- cache


def _read_intact(folder: Path, key: str) -> dict[str, Any] | None:
    """pretrain.json of a finished folder for ``key`` whose files are all there and unchanged, else None."""
    try:
        info = json.loads((folder / "pretrain.json").read_text(encoding="utf-8"))
        files = info["files"]
        if info.get("key") != key:
            return None
        config, checkpoint = folder / files["config"], folder / files["checkpoint"]
        if sha256_file(config) != files["config_sha256"] or sha256_file(checkpoint) != files["checkpoint_sha256"]:
            return None
        return info
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _manifest_or_error(path: Path, what: str) -> Manifest:
    if not Path(path).is_file():
        raise UserError(f"{what} manifest {path} not found; give the path to a .jsonl manifest "
                        f"(image + captions per line)")
    return load_manifest(path)


def pretrain_teacher(train: Path, val: Path | None, cfg: PretrainConfig, root: Path | None = None,
                     console: Console | None = None, *, device: str = "cpu") -> PretrainResult:
    """Train (or reuse) an open_clip CLIP on ``train`` and evaluate it on ``val``; see the module docstring.

    The folder ``<root>/<preset-or-custom>-<key16>`` (root: ``<cache root>/teachers``) holds ``<name>.json``,
    ``<name>.pt`` and ``pretrain.json``. When it already exists intact, nothing is trained (``reused=True``); if
    ``val`` differs from the one it was evaluated on, the saved model is evaluated on ``val`` (not saved).
    Raises UserError for a missing manifest, no captioned images or a bad config.
    """
    t0 = time.perf_counter()
    cfg, train_manifest, val_manifest = _checked_inputs(train, val, cfg)
    root = Path(root) if root is not None else default_cache_root() / "teachers"
    label = preset_name(cfg)
    key = pretrain_key(cfg, train_manifest.content_hash())
    folder = root / f"{label}-{key[:16]}"
    dev = resolve_device(device)
    info = _read_intact(folder, key)
    if info is not None:
        metrics = dict(info["metrics"])
        if val_manifest is not None and (info.get("val") or {}).get("manifest_sha256") != val_manifest.content_hash():
            metrics = {**_evaluate_saved(folder, info, val_manifest, dev, console), **_loss_metrics(info)}
        if console is not None:
            console.print(f"reusing pretrained teacher {folder}", highlight=False)
        return PretrainResult(folder / info["files"]["config"], folder / info["files"]["checkpoint"], metrics,
                              reused=True, seconds=time.perf_counter() - t0, folder=folder, info=info)
    if folder.exists() and console is not None:
        warn(console, f"{folder} is incomplete or changed; training it again")
    with atomic.staging_dir(folder) as tmp:
        info = _train_into(tmp, cfg, key, label, (Path(train), train_manifest),
                           None if val is None or val_manifest is None else (Path(val), val_manifest), dev, console)
        _publish(tmp, folder, key)
    final = _read_intact(folder, key) or info  # another process may have published the same key first
    if console is not None:
        shown = ", ".join(f"{k} {v:.1f}" for k, v in final["metrics"].items() if k.endswith("_r1"))
        console.print(f"saved pretrained teacher {folder} ({info['train_seconds']:.0f} s"
                      f"{'; ' + shown if shown else ''})", highlight=False)
    name = final["name"]
    return PretrainResult(folder / f"{name}.json", folder / f"{name}.pt", dict(final["metrics"]), reused=False,
                          seconds=time.perf_counter() - t0, folder=folder, info=final)


def _checked_inputs(train: Path, val: Path | None, cfg: PretrainConfig
                    ) -> tuple[PretrainConfig, Manifest, Manifest | None]:
    """The config validated again (``model_copy(update=...)`` skips validation) and both manifests, captioned."""
    try:
        cfg = PretrainConfig.model_validate(cfg.model_dump())
    except ValidationError as e:
        raise UserError(f"bad pretrain setting ({_validation_message(e)}); fix the value or use a preset") from None
    train_manifest = _manifest_or_error(Path(train), "train")
    val_manifest = _manifest_or_error(Path(val), "val") if val is not None else None
    if not any(e.captions for e in train_manifest.entries):
        raise UserError(f"train manifest {train} has no captioned images; CLIP training needs \"captions\" "
                        f"on its images")
    if val_manifest is not None and not any(e.captions for e in val_manifest.entries):
        raise UserError(f"val manifest {val} has no captioned images; add captions or pass no val manifest")
    return cfg, train_manifest, val_manifest


def _split_info(path: Path, manifest: Manifest, data: PairData) -> dict[str, Any]:
    return {"manifest": str(path), "manifest_sha256": manifest.content_hash(), "images": len(data),
            "captions": len(data.caption_tokens), "skipped_images": data.skipped}


def _train_into(tmp: Path, cfg: PretrainConfig, key: str, label: str, train: tuple[Path, Manifest],
                val: tuple[Path, Manifest] | None, dev: torch.device, console: Console | None
                ) -> dict[str, Any]:
    """Build, train, evaluate and save the model into the staging folder ``tmp``; returns its pretrain.json."""
    name, model_cfg = f"edgeclip-{label}", cfg.open_clip_config()
    with torch.random.fork_rng(devices=[]):  # seeded here without disturbing the caller's RNG
        torch.manual_seed(cfg.seed)
        model, preprocess, tokenizer = build_model(f"{name}-{key[:10]}", model_cfg)
    geometry, normalize = split_preprocess(preprocess)
    train_data = load_pairs(train[1], geometry, cfg.image_size, tokenizer, "train", console)
    val_data = load_pairs(val[1], geometry, cfg.image_size, tokenizer, "val", console) if val is not None else None
    if console is not None:
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        console.print(f"pretraining CLIP '{label}' ({n_params:.1f}M parameters) on {len(train_data)} images, "
                      f"{len(train_data.caption_tokens)} captions: {cfg.steps} steps of "
                      f"{min(cfg.batch_size, len(train_data))}", highlight=False)
    t_train = time.perf_counter()
    losses = train_clip(model, train_data, normalize, cfg, dev, console)
    train_seconds = time.perf_counter() - t_train
    metrics = evaluate(model, val_data, normalize, dev) if val_data is not None else {}
    return _save(tmp, name, model, model_cfg, cfg, key, label, losses, train_seconds, metrics,
                 _split_info(*train, train_data),
                 None if val is None or val_data is None else _split_info(*val, val_data),
                 str(dev))


def _loss_metrics(info: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in info["metrics"].items() if k.startswith("train_loss")}


def _save(tmp: Path, name: str, model: torch.nn.Module, model_cfg: dict[str, Any], cfg: PretrainConfig, key: str,
          label: str, losses: list[float], train_seconds: float, metrics: dict[str, float],
          train: dict[str, Any], val: dict[str, Any] | None, device: str) -> dict[str, Any]:
    """Write the model config, the state_dict and (last) pretrain.json into ``tmp``; returns pretrain.json."""
    config_path, checkpoint_path = tmp / f"{name}.json", tmp / f"{name}.pt"
    atomic.write_json(config_path, model_cfg)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic.atomic_path(checkpoint_path) as part:
        torch.save(state, part)
    metrics = {**metrics,
               "train_loss_start": float(np.mean(losses[:LOSS_WINDOW])),
               "train_loss_end": float(np.mean(losses[-LOSS_WINDOW:]))}
    info = {"version": PRETRAIN_VERSION, "key": key, "preset": label, "name": name,
            "config": cfg.model_dump(mode="json"), "model_config": model_cfg,
            "open_clip": open_clip.__version__, "torch": torch.__version__, "device": device,
            "steps": cfg.steps, "train_seconds": round(train_seconds, 3), "metrics": metrics,
            "train": train, "val": val, "losses": [round(v, 5) for v in losses],
            "files": {"config": config_path.name, "config_sha256": sha256_file(config_path),
                      "checkpoint": checkpoint_path.name, "checkpoint_sha256": sha256_file(checkpoint_path)}}
    atomic.write_json(tmp / "pretrain.json", info)
    return info


def _publish(tmp: Path, folder: Path, key: str) -> None:
    """Move the finished ``tmp`` to ``folder``; an intact folder that appeared meanwhile wins, a broken one goes."""
    if atomic.publish_dir(tmp, folder) or _read_intact(folder, key) is not None:
        return  # ours, or an intact copy another process published first
    atomic.replace_dir(tmp, folder)


def _evaluate_saved(folder: Path, info: dict[str, Any], val: Manifest, device: torch.device,
                    console: Console | None) -> dict[str, float]:
    """Held-out metrics of a saved model on another val manifest."""
    model, preprocess, tokenizer = build_model(f"{info['name']}-{info['key'][:10]}", info["model_config"])
    model.load_state_dict(torch.load(folder / info["files"]["checkpoint"], map_location="cpu", weights_only=True))
    geometry, normalize = split_preprocess(preprocess)
    data = load_pairs(val, geometry, int(info["config"]["image_size"]), tokenizer, "val", console)
    return evaluate(model, data, normalize, device)


__all__ = ["PRESETS", "PairData", "PretrainConfig", "PretrainResult", "build_model", "evaluate", "load_pairs",
           "pretrain_config", "pretrain_key", "pretrain_teacher", "preset_name", "split_preprocess", "train_clip"]
