"""Training views: a random resized crop (+ optional horizontal flip) as a replayable ``View``.

A view is drawn once from torch's CPU generator (the same draws torchvision's ``RandomResizedCrop`` and
``RandomHorizontalFlip`` make) and then rendered for each model at its own input size and normalisation, so the
student and a consistent teacher see the very same crop (docs/distill.md#consistent-teacher-targets). A view is
five numbers (``View.as_row``), which is what the reinforced feature cache stores per image and view.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect-ratio range


@dataclass(frozen=True)
class View:
    """A crop box in the source image's pixels and whether the crop is mirrored."""
    top: int
    left: int
    height: int
    width: int
    flip: bool

    def as_row(self) -> np.ndarray:
        """(5,) float32: top, left, height, width, flip (1.0 or 0.0)."""
        return np.array([self.top, self.left, self.height, self.width, float(self.flip)], dtype=np.float32)

    @classmethod
    def from_row(cls, row: np.ndarray) -> View:
        top, left, height, width, flip = (float(v) for v in row)
        if not (height >= 1 and width >= 1 and top >= 0 and left >= 0):  # NaN fails too
            raise ValueError(f"not a stored view: {list(row)}")
        return cls(int(top), int(left), int(height), int(width), flip >= 0.5)


@dataclass(frozen=True)
class Render:
    """How one model sees a view: square input side, normalisation, resampling filter."""
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"

    @cached_property
    def _mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        """(3, 1, 1) float32 mean and std, as torchvision's normalize builds them."""
        return (np.asarray(self.mean, dtype=np.float32).reshape(-1, 1, 1),
                np.asarray(self.std, dtype=np.float32).reshape(-1, 1, 1))


def draw_view(image: Image.Image, scale: tuple[float, float], hflip: bool) -> View:
    """A random view of ``image`` drawn from torch's CPU generator: the draws of ``RandomResizedCrop`` then
    ``RandomHorizontalFlip`` (so a seeded draw equals ``student_train_transform`` under the same seed)."""
    top, left, height, width = T.RandomResizedCrop.get_params(image, list(scale), list(RATIO))
    flip = bool(torch.rand(1) < 0.5) if hflip else False
    return View(int(top), int(left), int(height), int(width), flip)


def seeded_view(image: Image.Image, seed: int, scale: tuple[float, float], hflip: bool) -> View:
    """``draw_view`` with the CPU generator seeded by ``seed``; the global generator is left untouched."""
    with torch.random.fork_rng(devices=[]):
        # The CPU generator alone: torch.manual_seed would also queue a lazy CUDA seed (about 1 ms an image).
        torch.default_generator.manual_seed(seed)
        return draw_view(image, scale, hflip)


def render_view(image: Image.Image, view: View, render: Render) -> torch.Tensor:
    """The view of an RGB image as a normalised (3, size, size) float tensor.

    The same bytes as torchvision's ``resized_crop``, ``hflip``, ``to_tensor`` and ``normalize`` (tested against
    them), computed with PIL and numpy directly: this is the training loader's per-image hot path, and the
    torchvision calls cost three times as much on the small images of CPU runs.
    """
    box = (view.left, view.top, view.left + view.width, view.top + view.height)
    filter_ = TF.pil_modes_mapping[T.InterpolationMode(render.interpolation)]
    crop = image.crop(box).resize((render.size, render.size), filter_)
    if view.flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    mean, std = render._mean_std
    pixels = np.asarray(crop, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    pixels -= mean
    pixels /= std
    return torch.from_numpy(pixels)


def student_train_transform(size: int | Sequence[int], mean: Sequence[float], std: Sequence[float],
                            scale: tuple[float, float] = (0.5, 1.0), hflip: bool = True
                            ) -> Callable[[Image.Image], torch.Tensor]:
    """Random resized crop to ``size`` (+ flip), to a normalised (3, H, W) float tensor (torchvision's own
    transforms: the reference ``draw_view`` + ``render_view`` are tested against)."""
    steps: list[Callable] = [T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(mean=mean, std=std)]
    return T.Compose(steps)
