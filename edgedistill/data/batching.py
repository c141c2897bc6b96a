"""Images as torch datasets: a transform over ``data.images.open_image``, batches of the readable ones."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from edgedistill.data.images import open_image, why_unreadable


class ImageDataset(torch.utils.data.Dataset):
    """Images by index through a transform; item = (index, tensor (3, H, W) or None, reason or None)."""

    def __init__(self, paths: Sequence[Path], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, self.transform(open_image(self.paths[index])), None
        except Exception as e:  # a bad file must not stop the run; BadImages decides when too many are bad
            return index, None, why_unreadable(e)


def collate_images(items: list[tuple[int, torch.Tensor | None, str | None]]
                   ) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[int, str]]]:
    """Batch the readable images: (indices (B,), images (B, 3, H, W) or None, [(index, reason) of bad ones])."""
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, why) for i, x, why in items if x is None]
    indices = torch.tensor([i for i, _ in good], dtype=torch.long)
    images = torch.stack([x for _, x in good]) if good else None
    return indices, images, bad
