"""The frozen open_clip teacher: where its weights come from, how it embeds, and who it is (for cache keys).

``teacher.model`` is an open_clip model name (``ViT-B-32``), a path to an open_clip model config JSON (the
plain form in open_clip's ``model_configs/`` or the hub form with ``model_cfg``/``preprocess_cfg``), or
``hf-hub:org/name``. ``teacher.pretrained`` is an open_clip pretrained tag (downloaded where there is
internet), a local checkpoint file (loaded with ``weights_only=True`` or safetensors, never by unpickling
arbitrary objects), ``hf-hub:org/name``, or null for random weights (seeded, for tests and benchmarks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
import os
import pickle
import socket
import tempfile
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import open_clip
import torch
from huggingface_hub import constants
from open_clip.transformer import text_global_pool
from PIL import Image

from edgedistill.core.errors import UserError
from edgedistill.core.hashing import sha256_file, sha256_json
from edgedistill.distill.recipe import TeacherConfig

HF_HUB = "hf-hub:"


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' on a machine without CUDA is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{device}' asked for, but this machine has no CUDA GPU visible to torch; "
                        f"use device=cpu or device=auto")
    return torch.device(device)


@contextlib.contextmanager
def quiet_open_clip() -> Iterator[None]:
    """open_clip logs routine notes ('initialized randomly') and failures; we report what matters ourselves.
    The caller's own ``logging.disable`` level is put back afterwards, not reset."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)


@dataclass(frozen=True)
class TeacherSource:
    """What to pass to open_clip, and what the weights are, resolved from the recipe without building a model."""

    model_name: str              # name for open_clip.create_model / get_tokenizer
    pretrained: str | None       # tag or file for open_clip, None for hf-hub or random weights
    config_sha256: str           # hash of the architecture config ('' for hf-hub: the hub holds it)
    weights: str                 # 'random(seed=0)', 'tag:<tag>:<source>', 'file:<sha256>', 'hf-hub:<id>'
                                 # (load_teacher adds '@sha256:<hash>' of the downloaded hub file)
    preprocess_overrides: dict[str, Any]  # preprocessing from a hub-form config JSON


def _register_config_json(path: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Register a model config JSON with open_clip under a name unique to its content."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"teacher.model {path} is not a readable JSON file ({e})") from None
    preprocess: dict[str, Any] = {}
    if isinstance(cfg, dict) and "model_cfg" in cfg:  # the hub form: open_clip_config.json
        preprocess = cfg.get("preprocess_cfg") or {}
        cfg = cfg["model_cfg"]
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise UserError(f"teacher.model {path} is not an open_clip model config (it needs embed_dim, vision_cfg "
                        f"and text_cfg, like the files in open_clip's model_configs/)")
    # A name unique to the content, so a file called e.g. ViT-B-32.json never shadows the built-in config.
    name = f"{path.stem}-{sha256_json(cfg)[:10]}"
    if name not in open_clip.list_models():
        register_open_clip_config(name, cfg)
    return name, cfg, preprocess


def register_open_clip_config(name: str, cfg: dict[str, Any]) -> None:
    """Make ``open_clip.create_model(name)`` build ``cfg``.

    open_clip registers configs from files only (by file stem) and keeps the entry after the file is gone.
    """
    with tempfile.TemporaryDirectory(prefix="edgedistill-config-") as tmp:
        target = Path(tmp) / f"{name}.json"
        target.write_text(json.dumps(cfg), encoding="utf-8")
        open_clip.add_model_config(target)


def resolve_source(cfg: TeacherConfig, seed: int = 0) -> TeacherSource:
    """Check the recipe's teacher entries and say where the weights come from (one-line errors)."""
    model, pretrained = cfg.model, cfg.pretrained
    for value in (model, pretrained):
        if value and value.startswith(HF_HUB):
            return TeacherSource(value, None, "", value, {})
    preprocess: dict[str, Any] = {}
    model_path = Path(model).expanduser()
    if model.endswith(".json") or model_path.is_file():
        if not model_path.is_file():
            raise UserError(f"teacher.model {model} not found; give an open_clip model name (e.g. ViT-B-32) "
                            f"or the path to a model config JSON")
        name, model_cfg, preprocess = _register_config_json(model_path)
    else:
        name = model
        model_cfg = open_clip.get_model_config(name)
        if model_cfg is None:
            close = difflib.get_close_matches(name, open_clip.list_models(), n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else "see open_clip.list_models()"
            raise UserError(f"teacher.model '{name}' is not an open_clip model; {hint} "
                            f"(or give the path to a model config JSON)")
    config_sha = sha256_json(model_cfg)
    if pretrained is None:
        return TeacherSource(name, None, config_sha, f"random(seed={seed})", preprocess)
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if tag_cfg:
        source = tag_cfg.get("hf_hub") or tag_cfg.get("url") or ""
        return TeacherSource(name, pretrained, config_sha, f"tag:{pretrained}:{source}", preprocess)
    weights = Path(pretrained).expanduser()
    if weights.is_file():
        return TeacherSource(name, str(weights), config_sha, f"file:{sha256_file(weights)}", preprocess)
    tags = open_clip.list_pretrained_tags_by_model(name)
    known = f"known tags for {name}: {', '.join(tags)}" if tags else f"open_clip has no pretrained tags for {name}"
    raise UserError(f"teacher.pretrained '{pretrained}' is neither a pretrained tag nor an existing file "
                    f"({known}); give a tag or the path to a local checkpoint")


class Teacher:
    """A frozen open_clip model in eval mode: images and texts to L2-normalised embeddings, no gradients."""

    def __init__(self, model: torch.nn.Module, preprocess: Callable[[Image.Image], torch.Tensor],
                 tokenizer: Callable[[Sequence[str]], torch.Tensor], source: TeacherSource,
                 device: torch.device) -> None:
        self.model = model.eval().requires_grad_(False).to(device)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.source = source
        self.device = device
        self.preprocess_cfg: dict[str, Any] = json.loads(json.dumps(dict(model.visual.preprocess_cfg),
                                                                    default=list))
        self.embed_dim = int(open_clip.get_model_config(source.model_name)["embed_dim"])
        # Cut text padding (see _encode_text_trimmed): None = decide on first use by comparing with open_clip.
        self.trim_text: bool | None = None if self._text_is_causal_argmax() else False

    @property
    def identity(self) -> dict[str, Any]:
        """Who this teacher is: architecture hash and weights; with the preprocessing it keys the cache."""
        return {"model": self.source.model_name, "config_sha256": self.source.config_sha256,
                "weights": self.source.weights}

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed images -> (B, D) float32, L2-normalised."""
        with self._autocast():
            out = self.model.encode_image(images.to(self.device, non_blocking=True), normalize=True)
        return out.float()

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """N texts -> (N, D) float32, L2-normalised."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        with self._autocast():
            if self.trim_text is None:  # check once that cutting the padding changes nothing
                probe = tokens[:4]
                full = self.model.encode_text(probe, normalize=True).float()
                cut = self._encode_text_trimmed(probe).float()
                self.trim_text = bool(torch.nn.functional.cosine_similarity(full, cut).min() > 0.99999)
            if self.trim_text:
                out = self._encode_text_trimmed(tokens)
            else:
                out = self.model.encode_text(tokens, normalize=True)
        return out.float()

    def _text_is_causal_argmax(self) -> bool:
        m = self.model
        return isinstance(m, open_clip.model.CLIP) and getattr(m, "text_pool_type", None) == "argmax" \
            and getattr(m, "attn_mask", None) is not None

    def _encode_text_trimmed(self, tokens: torch.Tensor) -> torch.Tensor:
        """open_clip's CLIP.encode_text on (N, L) tokens cut after the batch's last end-of-text token -> (N, D).

        Exact for a causal text tower pooled at the end-of-text token (the highest id): no position before
        the cut attends to one after it. Captions are short, so this skips most of the 77-token context.
        """
        m = self.model
        length = int(tokens.argmax(dim=-1).max()) + 1
        tokens = tokens[:, :length]
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast) + m.positional_embedding[:length].to(cast)
        x = m.transformer(x, attn_mask=m.attn_mask[:length, :length])
        x = text_global_pool(m.ln_final(x), tokens, "argmax")
        x = m.text_projection(x) if isinstance(m.text_projection, torch.nn.Linear) else x @ m.text_projection
        return torch.nn.functional.normalize(x, dim=-1)


def _build_error(e: Exception, cfg: TeacherConfig, source: TeacherSource) -> UserError:
    """The one-line error for a teacher that open_clip could not build or load."""
    if isinstance(e, pickle.UnpicklingError):
        return UserError(f"teacher checkpoint {cfg.pretrained} holds objects other than tensors and is not loaded "
                         f"(that would run code); save its state_dict or use safetensors")
    first = " ".join(str(e).split()) or type(e).__name__
    first = first if len(first) <= 240 else first[:240] + "..."
    if source.weights.startswith(("tag:", HF_HUB)):
        return UserError(f"could not download open_clip weights for {source.model_name} "
                         f"'{cfg.pretrained or source.model_name}' ({first}); without internet, download the "
                         f"checkpoint elsewhere and set teacher.pretrained to its local path")
    if source.weights.startswith("file:") and not isinstance(e, _ConfigError):
        return UserError(f"teacher checkpoint {cfg.pretrained} does not load into {cfg.model} ({first}); "
                         f"check that teacher.model matches the checkpoint")
    return UserError(f"teacher.model {cfg.model}: open_clip cannot build this model ({first}); check the model "
                     f"config's values (widths, heads, layers, sizes)")


class _ConfigError(Exception):
    """open_clip failed to build the architecture itself (before any weights were read)."""


@contextlib.contextmanager
def _quiet_build() -> Iterator[None]:
    """open_clip's notes and torch's warnings about checkpoints (pickle protocol, meta copies) stay out of the way:
    what matters is reported as one line."""
    with quiet_open_clip(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _hub_host(source: TeacherSource) -> str | None:
    """The host the weights would be downloaded from (None when nothing is downloaded)."""
    if not source.weights.startswith(("tag:", HF_HUB)):
        return None
    url = source.weights.split(":", 2)[-1] if source.weights.startswith("tag:") else ""
    if url.startswith("http"):
        return urllib.parse.urlsplit(url).hostname
    return urllib.parse.urlsplit(constants.ENDPOINT).hostname


def _reachable(host: str, timeout: float = 5.0) -> bool:
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # the proxy resolves names; let the download find out
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_unless_reachable(source: TeacherSource) -> Iterator[None]:
    """Without a network the hub client retries for about a minute before it fails; when the download host cannot
    be reached, ask it for its local cache only, which answers at once (a cached checkpoint still loads)."""
    host = _hub_host(source)
    if host is None or _reachable(host):
        yield
        return
    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    except Exception as e:
        raise RuntimeError(f"{host} cannot be reached from this machine and the weights are not in the local "
                           f"cache") from e
    finally:
        constants.HF_HUB_OFFLINE = previous


def check_teacher(cfg: TeacherConfig, seed: int = 0) -> TeacherSource:
    """What ``load_teacher`` would hit first, without its cost: the architecture is built on the meta device (no
    memory, no weights) and a local checkpoint is loaded into it (shapes and keys checked, nothing kept)."""
    source = resolve_source(cfg, seed=seed)
    if source.weights.startswith(HF_HUB):
        return source  # the hub holds the config; nothing to build without downloading it
    try:
        with _quiet_build():
            model = _meta_model(source)
            if source.weights.startswith("file:"):
                open_clip.load_checkpoint(model, source.pretrained, weights_only=True)
    except Exception as e:
        raise _build_error(e, cfg, source) from e
    return source


def _meta_model(source: TeacherSource) -> torch.nn.Module:
    """The architecture on the meta device (shapes only, instant even for ViT-L); _ConfigError when it cannot be
    built, so a bad config is told apart from a checkpoint that does not fit it."""
    try:
        with torch.device("meta"):
            return open_clip.create_model(source.model_name, device="meta")
    except Exception as e:
        raise _ConfigError(str(e)) from e


def load_teacher(cfg: TeacherConfig, device: str | torch.device = "cpu", seed: int = 0) -> Teacher:
    """Build the frozen teacher from the recipe's ``teacher`` section (one-line UserError on any failure)."""
    source = resolve_source(cfg, seed=seed)
    device = resolve_device(device) if isinstance(device, str) else device
    pre = source.preprocess_overrides
    kwargs = dict(image_mean=pre.get("mean"), image_std=pre.get("std"),
                  image_interpolation=pre.get("interpolation"), image_resize_mode=pre.get("resize_mode"))
    try:
        if not source.weights.startswith(HF_HUB):
            with _quiet_build():
                _meta_model(source)
        with _quiet_build(), _offline_unless_reachable(source), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # random-weight teachers are reproducible, so their cache key holds
            model, _, preprocess = open_clip.create_model_and_transforms(
                source.model_name, pretrained=source.pretrained, weights_only=True, **kwargs)
    except Exception as e:
        raise _build_error(e, cfg, source) from e
    if source.weights.startswith(HF_HUB):
        # A hub repository can change under the same name: key the cache by the bytes that were loaded.
        weights_file = open_clip.pretrained.download_pretrained_from_hf(source.model_name[len(HF_HUB):])
        source = dataclasses.replace(source, weights=f"{source.weights}@sha256:{sha256_file(weights_file)}")
    tokenizer = open_clip.get_tokenizer(source.model_name)
    return Teacher(model, preprocess, tokenizer, source, device)
