"""open_clip's eval image transform in PIL + numpy: the pixels the student saw, without torch.

It repeats ``open_clip.image_transform(size, is_train=False, ...)`` (open_clip 3.x, torchvision transforms on PIL
images) step by step with the same PIL calls, so the output equals torchvision's bit for bit:

- ``shortest`` (the default), square target: torchvision ``Resize(S)``: the short side becomes S and the long side
  ``int(S * long / short)`` (truncated); a non-square target: open_clip's ``ResizeKeepRatio``, each side
  ``round(side / ratio)``, always bicubic (open_clip passes no interpolation there). Then ``CenterCrop``.
- ``longest``: ``ResizeKeepRatio`` on the long side, then centre crop or pad with ``fill_color``.
- ``squash``: resize to exactly (H, W).
- Resizing is ``PIL.Image.resize`` (what torchvision calls for PIL images; PIL always antialiases) in the image's
  mode at that point: PIL premultiplies alpha for RGBA and LA, and resizes palette and 1-bit images by nearest.
- Centre crop: an image smaller than the crop is padded first (left/top get the smaller half), then cut at
  ``int(round((in - out) / 2))`` (Python's round: halves to even).
- ``convert("RGB")``, then /255 and ``(x - mean) / std`` in float32, as ``ToTensor`` and ``Normalize`` compute.
- EXIF orientation is not applied: neither open_clip's transform nor edgedistill's image reader applies it.
- 16-bit images (``I;16``) are clipped to 0-255 by PIL's RGB conversion, not scaled, as in open_clip.

Where the RGB conversion happens is the one choice (``convert_first``). edgedistill decodes every training, cache,
eval and export image with ``Image.open(...).convert("RGB")`` and then applies the transform, so by default the
runtime does the same (the student's own pixels). ``convert_first=False`` is open_clip's transform applied to the
image as given (``preprocess(Image.open(path))``): resize and crop in the image's own mode, RGB after the crop.
The two differ only for images that are not RGB (palette, RGBA, LA, CMYK, 16-bit): see docs/runtime.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edgedistill.core.errors import UserError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's defaults when a config names none
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("shortest", "longest", "squash")
# open_clip accepts these three; 'random' only matters in training, at eval time it is bicubic.
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
            "random": Image.Resampling.BICUBIC}

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


@dataclass(frozen=True)
class PreprocessConfig:
    """The eval transform's settings, as export.json's ``preprocess`` records them."""

    size: tuple[int, int]  # (H, W) of the network input
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0  # padding value of 'longest' (open_clip's PreprocessCfg.fill_color)

    @classmethod
    def from_dict(cls, desc: Mapping[str, Any]) -> PreprocessConfig:
        """Read and check a preprocess description (``size``, ``mean``, ``std``, ``interpolation``,
        ``resize_mode``, optional ``fill_color``); a value open_clip would refuse is a UserError."""
        if not isinstance(desc, Mapping):
            raise UserError(f"preprocess description must be a mapping, not {type(desc).__name__}; re-export")
        interpolation = desc.get("interpolation") or "bicubic"
        if interpolation not in RESAMPLE:
            raise UserError(f"preprocess.interpolation {interpolation!r} is not one of {sorted(RESAMPLE)}; "
                            "fix export.json or re-export")
        resize_mode = desc.get("resize_mode") or "shortest"
        if resize_mode not in RESIZE_MODES:
            raise UserError(f"preprocess.resize_mode {resize_mode!r} is not one of {list(RESIZE_MODES)}; "
                            "fix export.json or re-export")
        fill = desc.get("fill_color", 0) or 0
        if not isinstance(fill, int) or isinstance(fill, bool):
            raise UserError(f"preprocess.fill_color must be an integer, not {fill!r}; fix export.json")
        return cls(size=_size(desc.get("size")), mean=_triple("mean", desc.get("mean"), OPENAI_MEAN),
                   std=_triple("std", desc.get("std"), OPENAI_STD), interpolation=interpolation,
                   resize_mode=resize_mode, fill_color=fill)


def image_side(preprocess: Mapping[str, Any]) -> int:
    """The square input side of an open_clip preprocess description (``size``: an int or [height, width]); the
    width for a non-square size."""
    return _size(preprocess["size"])[1]


def _size(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)) and len(value) in (1, 2):
        value = tuple(value) * (3 - len(value))  # one entry means a square, as open_clip reads it
    elif isinstance(value, int):
        value = (value, value)
    if (not isinstance(value, tuple) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise UserError(f"preprocess.size must be a positive integer or [height, width], not {value!r}; "
                        "fix export.json or re-export")
    return value


def _triple(key: str, value: Any, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if value is None:
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,) * 3  # open_clip repeats a single number over the channels
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in value)):
        raise UserError(f"preprocess.{key} must be three finite numbers, not {value!r}; fix export.json")
    if key == "std" and any(v == 0 for v in value):
        raise UserError(f"preprocess.std has a zero ({list(value)}); fix export.json")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


# -- geometry: open_clip's resize and crop, on PIL images in their own mode --------------------------------------
def _resize(img: Image.Image, width: int, height: int, resample: int) -> Image.Image:
    # torchvision returns the image untouched when it already has the size
    return img if img.size == (width, height) else img.resize((width, height), resample)


def _resize_short_side(img: Image.Image, size: int, resample: int) -> Image.Image:
    """torchvision ``Resize(size)``: the short side to ``size``, the long side truncated to an integer."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return _resize(img, new_w, new_h, resample)


def _resize_keep_ratio(img: Image.Image, size: tuple[int, int], longest: float, resample: int) -> Image.Image:
    """open_clip's ``ResizeKeepRatio`` (eval: no random scale): longest=1 fits the long side, 0 the short."""
    w, h = img.size
    ratio_h, ratio_w = h / size[0], w / size[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return _resize(img, round(w / ratio), round(h / ratio), resample)


def _pad(img: Image.Image, ltrb: tuple[int, int, int, int], fill: int) -> Image.Image:
    """torchvision's constant pad of a PIL image: ImageOps.expand with ``fill`` on every band, palette kept."""
    bands = len(img.getbands())
    color = (fill,) * bands if bands > 1 else fill
    if img.mode == "P":
        palette = img.getpalette()
        out = ImageOps.expand(img, border=ltrb, fill=color)
        out.putpalette(palette)
        return out
    return ImageOps.expand(img, border=ltrb, fill=color)


def _center_crop(img: Image.Image, size: tuple[int, int], fill: int) -> Image.Image:
    """torchvision ``CenterCrop`` / open_clip ``CenterCropOrPad`` to ``size`` (H, W)."""
    crop_h, crop_w = size
    w, h = img.size
    if crop_w > w or crop_h > h:
        img = _pad(img, ((crop_w - w) // 2 if crop_w > w else 0, (crop_h - h) // 2 if crop_h > h else 0,
                         (crop_w - w + 1) // 2 if crop_w > w else 0, (crop_h - h + 1) // 2 if crop_h > h else 0),
                   fill)
        w, h = img.size
        if (w, h) == (crop_w, crop_h):
            return img
    top, left = int(round((h - crop_h) / 2.0)), int(round((w - crop_w) / 2.0))
    return img.crop((left, top, left + crop_w, top + crop_h))


def resize_and_crop(img: Image.Image, config: PreprocessConfig) -> Image.Image:
    """open_clip's eval geometry for ``config``: a PIL image of ``config.size``, in the mode it came in."""
    resample = RESAMPLE[config.interpolation]
    if config.resize_mode == "squash":
        return _resize(img, config.size[1], config.size[0], resample)
    if config.resize_mode == "longest":
        img = _resize_keep_ratio(img, config.size, 1.0, resample)
        return _center_crop(img, config.size, config.fill_color)
    if config.size[0] == config.size[1]:
        img = _resize_short_side(img, config.size[0], resample)
    else:  # open_clip builds ResizeKeepRatio(size) here without its interpolation: bicubic
        img = _resize_keep_ratio(img, config.size, 0.0, Image.Resampling.BICUBIC)
    return _center_crop(img, config.size, 0)  # torchvision's CenterCrop pads with 0, not fill_color


# -- pixels -------------------------------------------------------------------------------------------------------
def to_array(img: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """An RGB-convertible PIL image -> normalised float32 (3, H, W), as ToTensor + Normalize compute it."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    x = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.asarray(config.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(config.std, dtype=np.float32)[:, None, None]
    return (x - mean) / std


def load_image(source: ImageInput, convert_first: bool = True) -> Image.Image:
    """A file path, PIL image or uint8 array (H, W, 3) -> a decoded PIL image (RGB when ``convert_first``).

    An unreadable file or a wrong array is a UserError that names it.
    """
    if isinstance(source, Image.Image):
        if source.width < 1 or source.height < 1:
            raise UserError(f"an image of {source.width}x{source.height} pixels holds nothing to embed")
        return source.convert("RGB") if convert_first and source.mode != "RGB" else source
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3:
            raise UserError(f"an image array must be uint8 (H, W, 3) RGB, not {source.dtype} {source.shape}; "
                            "convert it first (e.g. np.asarray(pil_image.convert('RGB')))")
        if source.shape[0] < 1 or source.shape[1] < 1:
            raise UserError(f"an image array of shape {source.shape} holds no pixels to embed")
        return Image.fromarray(np.ascontiguousarray(source))
    if isinstance(source, (str, os.PathLike)):
        return _read(Path(source), convert_first)
    raise UserError(f"cannot read an image from a {type(source).__name__}; "
                    "give a file path, a PIL image or a uint8 array (H, W, 3)")


def _read(path: Path, convert_first: bool) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB") if convert_first else im.copy()
    except FileNotFoundError:
        raise UserError(f"{path}: image file not found; check the path") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not an image file; give the image files inside it") from None
    except UnidentifiedImageError:
        raise UserError(f"{path} is not an image file PIL can read; remove it or convert it") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: unreadable image ({reason}); replace or remove the file") from None


class Preprocess:
    """The eval transform as a callable: one image -> float32 (3, H, W); a list or tuple of images, or a uint8
    array (N, H, W, 3) -> float32 (N, 3, H, W). Images are file paths, PIL images or uint8 arrays (H, W, 3)."""

    def __init__(self, config: PreprocessConfig | Mapping[str, Any], convert_first: bool = True) -> None:
        self.config = config if isinstance(config, PreprocessConfig) else PreprocessConfig.from_dict(config)
        self.convert_first = convert_first

    @property
    def input_size(self) -> tuple[int, int, int]:
        """(3, H, W) of one preprocessed image."""
        return (3, *self.config.size)

    def image(self, source: ImageInput) -> np.ndarray:
        """One image -> float32 (3, H, W)."""
        img = load_image(source, self.convert_first)
        return to_array(resize_and_crop(img, self.config), self.config)

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        if isinstance(images, np.ndarray) and images.ndim == 4:
            return self.batch(list(images))
        if isinstance(images, (list, tuple)):
            return self.batch(images)
        return self.image(images)

    def batch(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Images -> float32 (N, 3, H, W); an empty sequence gives (0, 3, H, W)."""
        out = np.empty((len(images), *self.input_size), dtype=np.float32)
        for i, source in enumerate(images):
            out[i] = self.image(source)
        return out
