"""Where the tool keeps things: the cache root (teacher features, class texts, shard indexes, calibration ranges,
pretrained teachers, TensorRT timing caches) and the runs a command finds by itself."""

from __future__ import annotations

import os
from pathlib import Path

from edgedistill.core.errors import UserError


def default_cache_root() -> Path:
    """$EDGEDISTILL_CACHE, else $XDG_CACHE_HOME/edgedistill, else ~/.cache/edgedistill."""
    if os.environ.get("EDGEDISTILL_CACHE"):
        return Path(os.environ["EDGEDISTILL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgedistill"


def cache_root(configured: str | os.PathLike | None) -> Path:
    """A recipe's ``cache.dir`` when set, else the default root."""
    return Path(configured) if configured is not None else default_cache_root()


def latest_run(root: Path) -> Path:
    """The most recently finished run under ``root`` (a folder with student/ and recipe.yaml)."""
    runs = [p for p in Path(root).glob("*") if (p / "student").is_dir() and (p / "recipe.yaml").is_file()] \
        if Path(root).is_dir() else []
    if not runs:
        raise UserError(f"no finished run under {root}/ (a folder with student/ and recipe.yaml); "
                        "give the run directory: edgedistill export RUN_DIR")
    return max(runs, key=lambda p: (p / "student").stat().st_mtime)
