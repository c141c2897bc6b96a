"""What a loaded dataset is: its entries (an image, its captions, an optional label) in manifest order, whatever
file format they were read from (JSON Lines, CSV, webdataset shards)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Entry:
    """One image: its resolved path, its captions (possibly none) and an optional class label."""

    image: Path
    captions: tuple[str, ...] = ()
    label: str | None = None


@dataclass
class Manifest:
    """A loaded manifest; read-only after loading (caption offsets and the content hash are memoized)."""

    path: Path
    entries: list[Entry]
    _offsets: np.ndarray | None = field(default=None, repr=False)
    _hash: str | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def n_captions(self) -> int:
        return int(self.caption_offsets[-1])

    @property
    def caption_offsets(self) -> np.ndarray:
        """(N + 1,) int64: the captions of entry ``i`` are rows ``offsets[i]:offsets[i + 1]`` of all_captions."""
        if self._offsets is None:
            counts = [len(e.captions) for e in self.entries]
            self._offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        return self._offsets

    def all_captions(self) -> list[str]:
        """Every caption, entry by entry, in manifest order."""
        return [c for e in self.entries for c in e.captions]

    def content_hash(self) -> str:
        """sha256 of what the teacher sees: resolved image paths and captions (labels excluded)."""
        if self._hash is None:
            h = hashlib.sha256(b"edgedistill-manifest-v1\n")
            for e in self.entries:
                h.update(json.dumps([str(e.image), list(e.captions)], ensure_ascii=False).encode("utf-8"))
                h.update(b"\n")
            self._hash = h.hexdigest()
        return self._hash
