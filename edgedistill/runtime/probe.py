"""The probe set an export carries: a few images and captions with the fp32 student's embeddings of them, so a
device can check each artifact's accuracy *on that device* before it trusts it (docs/runtime.md#choosing).

Images are stored as the eval geometry's uint8 pixels (N, H, W, 3), before normalisation: 4x smaller than the
float32 inputs and normalised here exactly as ``Preprocess`` does. Captions as their token ids (M, L) int64.
References are float32 (N, D) / (M, D), L2-normalised. The files are listed in export.json (``probe``) with their
sha256, and read without pickle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

import edgedistill.core.atomic as atomic
from edgedistill.core.errors import UserError
from edgedistill.core.hashing import sha256_file
from edgedistill.core.terminal import safe
from edgedistill.runtime.manifest import bundle_file, read_array
from edgedistill.runtime.preprocess import ImageInput, Preprocess, load_image, resize_and_crop, to_array

FOLDER = "probe"
FILES = {"pixels": "images_uint8.npy", "image_ref": "image_fp32.npy", "tokens": "tokens.npy",
         "text_ref": "text_fp32.npy"}
BYTES_BUDGET = 512 * 1024   # the probe images' share of an export
MIN_IMAGES, MAX_IMAGES = 8, 32


def probe_image_count(size: tuple[int, int]) -> int:
    """How many probe images an export keeps at model input ``size`` (H, W): as many as fit the budget, 8-32."""
    return int(np.clip(BYTES_BUDGET // (size[0] * size[1] * 3), MIN_IMAGES, MAX_IMAGES))


def geometry_pixels(source: ImageInput, preprocess: Preprocess) -> np.ndarray:
    """One image -> uint8 (H, W, 3): the eval transform's resize and crop, before normalisation."""
    img = resize_and_crop(load_image(source, preprocess.convert_first), preprocess.config)
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)


def normalise(pixels: np.ndarray, preprocess: Preprocess) -> np.ndarray:
    """uint8 (N, H, W, 3) from ``geometry_pixels`` -> float32 (N, 3, H, W), exactly as ``Preprocess`` gives."""
    return np.stack([to_array(Image.fromarray(p), preprocess.config) for p in pixels]).astype(np.float32)


@dataclass
class Probe:
    """Inputs of each tower and the fp32 reference embeddings (L2-normalised); ``source`` says whose."""
    pixels: np.ndarray                  # float32 (N, 3, H, W), normalised
    image_ref: np.ndarray | None        # float32 (N, D); None until a reference runner fills it (user probes)
    tokens: np.ndarray | None = None    # int64 (M, L)
    text_ref: np.ndarray | None = None  # float32 (M, D)
    source: str = "export"


def unit(x: np.ndarray) -> np.ndarray:
    """Rows L2-normalised (a non-finite row stays non-finite, and is caught by whoever checks it)."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def write_probe(out_dir: Path, pixels: np.ndarray, image_ref: np.ndarray, tokens: np.ndarray | None,
                text_ref: np.ndarray | None) -> dict[str, Any]:
    """Save the probe under ``out_dir/probe`` (each file atomically) -> export.json's ``probe`` entry."""
    folder = Path(out_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"pixels": np.ascontiguousarray(pixels, dtype=np.uint8), "image_ref": unit(image_ref)}
    if tokens is not None and text_ref is not None:
        arrays.update(tokens=np.ascontiguousarray(tokens, dtype=np.int64), text_ref=unit(text_ref))
    files = {}
    for key, array in arrays.items():
        path = folder / FILES[key]
        with atomic.atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, array, allow_pickle=False)
        files[key] = {"path": f"{FOLDER}/{FILES[key]}", "sha256": sha256_file(path)}
    return {"images": int(len(pixels)), "captions": int(len(tokens)) if "tokens" in arrays else 0, "files": files}


# what each probe file holds: (dtype kinds, dimensions)
SHAPES = {"pixels": ("u", 4), "image_ref": ("f", 2), "tokens": ("iu", 2), "text_ref": ("f", 2)}


def read_probe(export_dir: Path, entry: dict[str, Any] | None, preprocess: Preprocess,
               embed_dim: int | None = None) -> Probe | None:
    """The export's probe (files inside the export, checked against their sha256, then their dtype and shape:
    pixels uint8 (N, H, W, 3) at the preprocess size, references (N, D) / (M, D) with D ``embed_dim``, tokens
    (M, L)), or None for an export made without one."""
    if not entry:
        return None
    arrays = {}
    for key, spec in (entry.get("files") or {}).items():
        if key not in FILES or spec.get("path") != f"{FOLDER}/{FILES[key]}":
            raise UserError(f"{export_dir}/export.json: probe file {key!r} is not one this edgedistill writes; "
                            f"export again")
        path = bundle_file(export_dir, spec["path"], "probe file")
        if not path.is_file() or sha256_file(path) != spec.get("sha256"):
            raise UserError(f"{safe(path)}: the probe file is missing or does not match the sha256 in export.json; "
                            f"export again")
        arrays[key] = read_array(path, "probe file", *SHAPES[key])
    if "pixels" not in arrays or "image_ref" not in arrays:
        return None
    _check_shapes(Path(export_dir) / FOLDER, arrays, preprocess.config.size, embed_dim)
    return Probe(normalise(arrays["pixels"], preprocess), arrays["image_ref"].astype(np.float32),
                 arrays.get("tokens"), None if "text_ref" not in arrays else arrays["text_ref"].astype(np.float32))


def _check_shapes(folder: Path, arrays: dict[str, np.ndarray], size: tuple[int, int], embed_dim: int | None) -> None:
    pixels, image_ref = arrays["pixels"], arrays["image_ref"]
    tokens, text_ref = arrays.get("tokens"), arrays.get("text_ref")
    d = embed_dim or image_ref.shape[1]
    problems = []
    if pixels.dtype != np.uint8 or pixels.shape[1:] != (*size, 3):
        problems.append(f"pixels are {pixels.dtype} {pixels.shape}, not uint8 (N, {size[0]}, {size[1]}, 3)")
    if image_ref.shape != (len(pixels), d):
        problems.append(f"image references are {image_ref.shape}, not ({len(pixels)}, {d})")
    if (tokens is None) != (text_ref is None):
        problems.append("tokens and text references come as a pair")
    elif tokens is not None and text_ref is not None and text_ref.shape != (len(tokens), d):
        problems.append(f"text references are {text_ref.shape}, not ({len(tokens)}, {d})")
    if problems:
        raise UserError(f"probe {safe(folder)}: {'; '.join(problems)}; export again")


def user_probe(images: Sequence[ImageInput], preprocess: Preprocess) -> Probe:
    """A probe of the caller's own images (photos of their domain); the fp32 artifact gives the reference."""
    if not images:
        raise UserError("probe= holds no images; give a few photos of the kind the device will see")
    return Probe(preprocess.batch(list(images)), None, source="user")
