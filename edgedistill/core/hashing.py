"""Content hashes and derived seeds, written once: files, JSON-able values, and seeds from several integers.

Caches, artifacts and runs are keyed by these hashes, so the encodings below are part of every key on disk:
change them only with a version bump of the things they key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in chunks (files of any size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex sha256 of a JSON-able value in a canonical form (sorted keys; tuples and other sequences as lists)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=list).encode("utf-8")).hexdigest()


def seed_of(*parts: int) -> int:
    """A 32-bit seed derived from integers (e.g. run seed, epoch, index): the same parts, the same seed, on every
    machine and in any order of calls."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
