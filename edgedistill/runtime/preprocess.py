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
- EXIF orientation is not applied by default: neither open_clip's transform nor edgedistill's image reader
  applies it. ``exif=True`` turns the image upright first (``ImageOps.exif_transpose``; phones store portrait
  photos sideways), as ``edgedistill embed`` does.
- 16-bit images (``I;16``) are clipped to 0-255 by PIL's RGB conversion, not scaled, as in open_clip.

Where the RGB conversion happens is the one choice (``convert_first``). edgedistill decodes every training, cache,
eval and export image with ``Image.open(...).convert("RGB")`` and then applies the transform, so by default the
runtime does the same (the student's own pixels). ``convert_first=False`` is open_clip's transform applied to the
image as given (``preprocess(Image.open(path))``): resize and crop in the image's own mode, RGB after the crop.
The two differ only for images that are not RGB (palette, RGBA, LA, CMYK, 16-bit): see docs/runtime.md.

``decode="exact"`` (the default) is all of the above. ``decode="reduced"`` lets libjpeg decode a large JPEG at 1/2,
1/4 or 1/8 scale (``Image.draft``) while it stays at least ``DRAFT_MARGIN`` times what the resize makes of it, then
resizes as above: much faster for photos, pixels close to but not equal to open_clip's
(docs/runtime.md#decoding-photos).
"""

from __future__ import annotations

import io
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edgedistill.core.errors import UserError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's defaults when a config names none
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("shortest", "longest", "squash")
# open_clip accepts these three; 'random' only matters in training, at eval time it is bicubic.
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
            "random": Image.Resampling.BICUBIC}

DECODE_MODES = ("reduced", "exact")  # reduced: large JPEGs drafted at 1/2-1/8 scale; exact: open_clip's pixels
# reduced decode keeps the drafted image >= this many times the resize's output per side, so PIL's antialiased
# resize, not libjpeg's DCT scaling, makes the pixels (minimum cosine to exact: docs/runtime.md#decoding-photos)
DRAFT_MARGIN = 2.0
ORIENTATION = 0x0112  # the EXIF tag; 5-8 store the image transposed (portrait photos lying on their side)

# a file path; the bytes of an image file, a binary file object, or anything with read_bytes() (a tar-shard member,
# edgedistill.data.shards.ShardMember); a PIL image; a uint8 RGB array (H, W, 3)
ImageInput = Union[str, os.PathLike, bytes, BinaryIO, Image.Image, np.ndarray]


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


def _resized_size(size: tuple[int, int], config: PreprocessConfig) -> tuple[int, int]:
    """(width, height) that open_clip's resize step makes of an image of ``size`` (width, height)."""
    w, h = size
    if config.resize_mode == "squash":
        return config.size[1], config.size[0]
    if config.resize_mode == "longest":
        return _keep_ratio(w, h, config.size, 1.0)
    if config.size[0] == config.size[1]:  # torchvision Resize(S): short side S, the long side truncated
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = config.size[0], int(config.size[0] * long / short)
        return (new_short, new_long) if w <= h else (new_long, new_short)
    return _keep_ratio(w, h, config.size, 0.0)


def _keep_ratio(w: int, h: int, size: tuple[int, int], longest: float) -> tuple[int, int]:
    """open_clip's ``ResizeKeepRatio`` (eval: no random scale): longest=1 fits the long side, 0 the short."""
    ratio_h, ratio_w = h / size[0], w / size[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return round(w / ratio), round(h / ratio)


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


def resize_and_crop(img: Image.Image, config: PreprocessConfig,
                    size_of: tuple[int, int] | None = None) -> Image.Image:
    """open_clip's eval geometry for ``config``: a PIL image of ``config.size``, in the mode it came in.
    ``size_of``: the (width, height) ``img`` stands for when it was decoded at reduced scale; the resize makes of
    it what it would make of the full image."""
    resample = RESAMPLE[config.interpolation]
    if config.resize_mode == "shortest" and config.size[0] != config.size[1]:
        resample = Image.Resampling.BICUBIC  # open_clip builds ResizeKeepRatio(size) here without interpolation
    img = _resize(img, *_resized_size(size_of or img.size, config), resample)
    if config.resize_mode == "squash":
        return img
    # torchvision's CenterCrop pads with 0; open_clip's CenterCropOrPad ('longest') with fill_color
    return _center_crop(img, config.size, config.fill_color if config.resize_mode == "longest" else 0)


# -- pixels -------------------------------------------------------------------------------------------------------
def to_array(img: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """An RGB-convertible PIL image -> normalised float32 (3, H, W), as ToTensor + Normalize compute it."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    return normalise(np.asarray(rgb, dtype=np.uint8)[None], config)[0]


def normalise(crops: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """uint8 RGB (N, H, W, 3) -> float32 (N, 3, H, W): /255, then (x - mean) / std, as ToTensor + Normalize."""
    x = crops.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
    mean = np.asarray(config.mean, dtype=np.float32)[None, :, None, None]
    std = np.asarray(config.std, dtype=np.float32)[None, :, None, None]
    return (x - mean) / std


def load_image(source: ImageInput, convert_first: bool = True, exif: bool = False) -> Image.Image:
    """A file (path, bytes, file object, tar-shard member), PIL image or uint8 array (H, W, 3) -> a decoded PIL
    image (RGB when ``convert_first``; upright when ``exif``).

    An unreadable file or a wrong array is a UserError that names it.
    """
    with user_errors(source):
        return read_image(source, convert_first, exif)[0]


def read_image(source: ImageInput, convert_first: bool = True, exif: bool = False,
               draft: PreprocessConfig | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """``load_image`` that lets a file's read error through as PIL raised it (``edgedistill.data.images
    .why_unreadable`` words it) -> (image, the upright (width, height) it stands for). ``draft``: decode a JPEG at
    the smallest DCT scale that stays ``DRAFT_MARGIN`` times above what this config's resize makes of it."""
    if isinstance(source, Image.Image):
        if source.width < 1 or source.height < 1:
            raise UserError(f"an image of {source.width}x{source.height} pixels holds nothing to embed")
        img = _upright(source, exif)
        img = img.convert("RGB") if convert_first and img.mode != "RGB" else img
        return img, img.size
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3:
            raise UserError(f"an image array must be uint8 (H, W, 3) RGB, not {source.dtype} {source.shape}; "
                            "convert it first (e.g. np.asarray(pil_image.convert('RGB')))")
        if source.shape[0] < 1 or source.shape[1] < 1:
            raise UserError(f"an image array of shape {source.shape} holds no pixels to embed")
        img = Image.fromarray(np.ascontiguousarray(source))
        return img, img.size
    with Image.open(_file(source)) as im:
        upright = _upright_size(im, exif)
        if draft is not None and im.format == "JPEG":
            w, h = _resized_size(upright, draft)
            w, h = (h, w) if upright != im.size else (w, h)  # the file stores it transposed
            im.draft(im.mode, (math.ceil(w * DRAFT_MARGIN), math.ceil(h * DRAFT_MARGIN)))
        im.load()
        img = _upright(im, exif)
        if convert_first:
            return img.convert("RGB"), upright  # a copy even when RGB: it outlives the file
        return (im.copy() if img is im else img), upright


def _file(source: Any) -> Any:
    """What Image.open reads: a path or a binary file object."""
    if isinstance(source, (str, os.PathLike)):
        return Path(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(source)
    if hasattr(source, "read_bytes"):  # a tar-shard member (edgedistill.data.shards.ShardMember)
        return io.BytesIO(source.read_bytes())
    if hasattr(source, "read"):
        return source
    raise UserError(f"cannot read an image from a {type(source).__name__}; give a file path, image bytes, "
                    "a PIL image or a uint8 array (H, W, 3)")


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(ORIENTATION, 1))
    except (ValueError, TypeError, SyntaxError):  # a damaged EXIF block: leave the image as stored
        return 1


def _upright_size(im: Image.Image, exif: bool) -> tuple[int, int]:
    return (im.height, im.width) if exif and _orientation(im) in (5, 6, 7, 8) else im.size


def _upright(im: Image.Image, exif: bool) -> Image.Image:
    """``im`` turned as its EXIF orientation says (when ``exif``), else ``im`` itself (no copy)."""
    if not exif or _orientation(im) in (0, 1):
        return im
    return ImageOps.exif_transpose(im)


def _name(source: Any) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "image bytes"
    return str(getattr(source, "name", source)) if hasattr(source, "read") else str(source)


@contextmanager
def user_errors(source: Any) -> Iterator[None]:
    """A file that cannot be read becomes a UserError naming it, one line."""
    path = _name(source)
    try:
        yield
    except FileNotFoundError:
        raise UserError(f"{path}: image file not found; check the path") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not an image file; give the image files inside it") from None
    except UnidentifiedImageError:
        raise UserError(f"{path} is not an image file PIL can read; remove it or convert it") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: unreadable image ({reason}); replace or remove the file") from None


def check_decode(decode: str) -> None:
    if decode not in DECODE_MODES:
        raise UserError(f"decode {decode!r} is not one of {list(DECODE_MODES)}")


class Preprocess:
    """The eval transform as a callable: one image -> float32 (3, H, W); a list or tuple of images, or a uint8
    array (N, H, W, 3) -> float32 (N, 3, H, W). Images are files (paths, bytes, file objects, tar-shard members),
    PIL images or uint8 arrays (H, W, 3). ``decode="reduced"`` decodes large JPEGs at reduced scale, ``exif=True``
    turns images upright; the defaults are open_clip's pixels exactly."""

    def __init__(self, config: PreprocessConfig | Mapping[str, Any], convert_first: bool = True) -> None:
        self.config = config if isinstance(config, PreprocessConfig) else PreprocessConfig.from_dict(config)
        self.convert_first = convert_first

    @property
    def input_size(self) -> tuple[int, int, int]:
        """(3, H, W) of one preprocessed image."""
        return (3, *self.config.size)

    def image(self, source: ImageInput, decode: str = "exact", exif: bool = False) -> np.ndarray:
        """One image -> float32 (3, H, W)."""
        return self.normalise(self.crop(source, decode, exif)[None])[0]

    def crop(self, source: ImageInput, decode: str = "exact", exif: bool = False) -> np.ndarray:
        """One image -> the model's pixels before normalisation: uint8 RGB (H, W, 3); a UserError names an
        unreadable file."""
        with user_errors(source):
            return self.read_crop(source, decode, exif)

    def read_crop(self, source: ImageInput, decode: str = "exact", exif: bool = False) -> np.ndarray:
        """``crop`` that lets a file's read error through as PIL raised it (decode workers report it)."""
        check_decode(decode)
        img, upright = read_image(source, self.convert_first, exif, self.config if decode == "reduced" else None)
        img = resize_and_crop(img, self.config, upright)
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)

    def normalise(self, crops: np.ndarray) -> np.ndarray:
        """uint8 RGB (N, H, W, 3) crops -> float32 (N, 3, H, W) model input."""
        return normalise(crops, self.config)

    def __call__(self, images: ImageInput | Sequence[ImageInput], decode: str = "exact",
                 exif: bool = False) -> np.ndarray:
        if isinstance(images, np.ndarray) and images.ndim == 4:
            return self.batch(list(images), decode, exif)
        if isinstance(images, (list, tuple)):
            return self.batch(images, decode, exif)
        return self.image(images, decode, exif)

    def batch(self, images: Sequence[ImageInput], decode: str = "exact", exif: bool = False) -> np.ndarray:
        """Images -> float32 (N, 3, H, W); an empty sequence gives (0, 3, H, W)."""
        crops = np.empty((len(images), *self.config.size, 3), dtype=np.uint8)
        for i, source in enumerate(images):
            crops[i] = self.crop(source, decode, exif)
        return self.normalise(crops)
