"""Where the tool keeps what it computes once and reuses: the cache root (teacher features, class texts, shard
indexes, calibration ranges, pretrained teachers, TensorRT timing caches)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_root() -> Path:
    """$EDGEDISTILL_CACHE, else $XDG_CACHE_HOME/edgedistill, else ~/.cache/edgedistill."""
    if os.environ.get("EDGEDISTILL_CACHE"):
        return Path(os.environ["EDGEDISTILL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgedistill"


def cache_root(configured: str | os.PathLike | None) -> Path:
    """A recipe's ``cache.dir`` when set, else the default root."""
    return Path(configured) if configured is not None else default_cache_root()
