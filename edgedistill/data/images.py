"""Reading images (files or tar-shard members) into RGB PIL images; unreadable images are skipped, counted and
reported. No torch: the device runtime reads images with this too (torch datasets over it: ``data.batching``)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from rich.console import Console

from edgedistill.data.shards import ShardMember
from edgedistill.core.errors import UserError
from edgedistill.core.terminal import make_console, safe, warn


def open_image(path: str | Path | ShardMember) -> Image.Image:
    """Decode an image file (or a member of a tar shard) fully into an RGB PIL image.

    Raises on missing, truncated or non-image files.
    """
    with Image.open(io.BytesIO(path.read_bytes()) if isinstance(path, ShardMember) else path) as im:
        im.load()
        return im.convert("RGB")


def why_unreadable(exc: BaseException) -> str:
    """A short reason for a failed image read, for warnings and the bad-image summary."""
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if isinstance(exc, UnreadableImage):
        return str(exc)
    if isinstance(exc, UnidentifiedImageError):
        return "not an image file"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"unreadable ({text})"


class BadImages:
    """Counts skipped images, warns about each, and stops the run past ``max_fraction`` of ``total``; the error
    names ``knob``, the setting the user raises (a recipe key, or a flag such as embed's ``--max-bad-fraction``)."""

    def __init__(self, total: int, max_fraction: float, what: str, console: Console | None = None,
                 known: Sequence[tuple[int, str, str]] = (), knob: str = "data.max_bad_fraction") -> None:
        self.total = total
        self.max_fraction = max_fraction
        self.what = what
        self.knob = knob
        self.console = console or make_console(stderr=True, soft_wrap=True)
        self.items: list[tuple[int, str, str]] = list(known)  # (index, path, reason)

    def add(self, index: int, path: str | Path, reason: str) -> None:
        self.items.append((index, str(path), reason))
        warn(self.console, f"skipped image {path}: {reason}")
        self.check()

    def check(self) -> None:
        if self.total and len(self.items) > self.max_fraction * self.total:
            first = self.items[0]
            raise UserError(
                f"{self.what}: {len(self.items)} of {self.total} images could not be read, more than "
                f"{self.max_fraction:.0%} (first: {safe(first[1])}: {safe(first[2])}); fix the images or the "
                f"manifest, or raise {self.knob}")

    def summary(self) -> str:
        if not self.items:
            return f"{self.what}: all {self.total} images read"
        share = len(self.items) / max(self.total, 1)
        names = ", ".join(safe(p) for _, p, _ in self.items[:3]) + (", ..." if len(self.items) > 3 else "")
        return f"{self.what}: skipped {len(self.items)} of {self.total} images ({share:.1%}): {names}"


class UnreadableImage(Exception):
    """An image that failed when it was first read; the message is the reason (``why_unreadable``)."""


def available_memory() -> int | None:
    """Bytes of memory the kernel can give without swapping (Linux's MemAvailable); None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class DecodedImages:
    """Every image decoded once and kept in memory as uint8 RGB pixels, so that a training step skips the file read
    and the decode (``data.in_memory``: small images on a CPU, where the decode costs as much as the crop).

    ``limit`` bytes (default: half the available memory, shared by ``processes`` that each hold a copy, as the
    ranks of a distributed run do) fails closed, early: after the first images the total is extrapolated, and the
    user is told to turn the option off rather than have the machine swap. An unreadable image keeps its reason
    and raises ``UnreadableImage`` at every read, as its file would.
    """

    PROBE = 64  # images decoded before the first extrapolation of the total

    def __init__(self, paths: Sequence[str | Path | ShardMember], limit: int | None = None,
                 processes: int = 1) -> None:
        if limit is None:
            available = available_memory()
            limit = available // (2 * processes) if available is not None else None
        self.pixels: list[np.ndarray | str] = []
        total = 0
        for i, path in enumerate(paths):
            try:
                pixels = np.asarray(open_image(path), dtype=np.uint8)
            except Exception as e:  # noqa: BLE001 - kept, and reported when the trainer reads the image
                self.pixels.append(why_unreadable(e))
                continue
            self.pixels.append(pixels)
            total += pixels.nbytes
            seen = i + 1
            too_much = total > limit if limit is not None else False
            if limit is not None and seen == self.PROBE:  # extrapolated early, so it fails before decoding all
                too_much = too_much or total / seen * len(paths) > 1.2 * limit
            if too_much:
                raise UserError(
                    f"data.in_memory: the {len(paths)} decoded training images need about "
                    f"{total / seen * len(paths) / 1e9:.1f} GB, more than the {limit / 1e9:.1f} GB allowed (half the "
                    f"available memory{f' shared by {processes} processes' if processes > 1 else ''}); "
                    "set data.in_memory: false")
        self.nbytes = total

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> Image.Image:
        pixels = self.pixels[index]
        if isinstance(pixels, str):
            raise UnreadableImage(pixels)
        return Image.fromarray(pixels)
