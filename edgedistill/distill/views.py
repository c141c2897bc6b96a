"""Reinforced teacher targets: the teacher's embeddings of K stored augmented views of every training image.

The student trains on an augmented view of an image; a teacher target computed on the clean image is a target for
a different picture (Beyer et al., CVPR 2022, call that a "fixed teacher"). MobileCLIP (CVPR 2024) stores, per
image, several augmentations (their parameters) with the teacher's embedding of each, so that training matches
the view without running the teacher. This module builds and reads that store
(docs/distill.md#consistent-teacher-targets)::

    <root>/<clean cache folder name>__views<K>-<key12>/
        view_emb.npy      (N, K, D) float16, L2-normalised teacher embedding of view k of image i
        view_params.npy   (N, K, 5) float32, the view (``data.transforms.View.as_row``); NaN where unreadable
        meta.json         key fields, shapes and sha256 of both arrays                  (written last)

View k of image i is drawn from ``seed_of(views_seed, i, k)``, independent of the training seed, so every seed of
a benchmark shares one store; training draws which of the K views image i shows in an epoch from
``(seed, epoch, i)``, and renders the stored box for the student, so resume and DDP replay it exactly. Built in
``<name>.partial/`` chunk by chunk with ``progress.json`` (a killed build resumes); renamed when complete.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from rich.console import Console

import edgedistill.core.atomic as atomic
import edgedistill.distill.distributed as distributed
from edgedistill.core.errors import UserError
from edgedistill.core.hashing import seed_of, sha256_file, sha256_json
from edgedistill.data.images import open_image, why_unreadable
from edgedistill.data.manifest import Manifest
from edgedistill.data.transforms import Render, render_view, seeded_view
from edgedistill.distill.cache import CacheMismatch, FeatureCache, lock_cache_dir, read_meta
from edgedistill.distill.recipe import Recipe
from edgedistill.distill.teachers import Teacher
from edgedistill.runtime.preprocess import image_side

VIEWS_VERSION = 1
ARRAYS = ("view_emb", "view_params")


@dataclass(frozen=True)
class ViewSettings:
    """What a store of views is: how many per image, how they are drawn."""
    count: int                    # K
    scale: tuple[float, float]    # random resized crop area range
    hflip: bool
    seed: int                     # views_seed: view k of image i comes from seed_of(seed, i, k)


@dataclass
class ReinforcedViews:
    """A finished store of teacher embeddings of K views per image (read-only, memory-mapped)."""
    path: Path
    meta: dict[str, Any]
    view_emb: np.ndarray      # (N, K, D) float16
    view_params: np.ndarray   # (N, K, 5) float32

    @property
    def count(self) -> int:
        return int(self.view_emb.shape[1])

    def features(self, indices: np.ndarray | torch.Tensor, views: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Teacher embeddings of view ``views[b]`` of image ``indices[b]`` -> (B, D) float32."""
        i, k = np.asarray(indices, dtype=np.int64), np.asarray(views, dtype=np.int64)
        return torch.from_numpy(np.ascontiguousarray(self.view_emb[i, k], dtype=np.float32))


def render_of(preprocess_cfg: Mapping[str, Any]) -> Render:
    """How a model with this open_clip ``preprocess_cfg`` sees a view (size, mean, std, interpolation)."""
    return Render(image_side(preprocess_cfg), tuple(preprocess_cfg["mean"]), tuple(preprocess_cfg["std"]),
                  str(preprocess_cfg.get("interpolation") or "bicubic"))


def views_key(clean: FeatureCache, teacher: Teacher, settings: ViewSettings) -> tuple[str, dict[str, Any]]:
    fields = {"version": VIEWS_VERSION, "clean_cache_key": clean.meta["key"], "teacher": teacher.identity,
              "render": render_of(teacher.preprocess_cfg).__dict__, "count": settings.count,
              "scale": list(settings.scale), "hflip": settings.hflip, "views_seed": settings.seed}
    return sha256_json(fields), fields


def views_dir(clean: FeatureCache, key: str, count: int) -> Path:
    return clean.path.with_name(f"{clean.path.name}__views{count}-{key[:12]}")


def open_views(path: Path, key: str, n_images: int) -> ReinforcedViews:
    """A finished store at ``path``, its key, shapes and hashes checked (FileNotFoundError, CacheMismatch)."""
    meta = read_meta(path)
    if meta.get("key") != key:
        raise CacheMismatch("its key differs from this run's teacher, images and view settings")
    arrays = {}
    for name in ARRAYS:
        expected, file = meta.get("arrays", {}).get(name, {}), path / f"{name}.npy"
        try:
            arr = np.load(file, mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:
            raise CacheMismatch(f"{name}.npy is unreadable ({type(e).__name__}: {e})") from None
        if list(arr.shape) != expected.get("shape") or arr.shape[0] != n_images \
                or sha256_file(file) != expected.get("sha256"):
            raise CacheMismatch(f"{name}.npy does not match meta.json (shape or sha256: corrupt or changed)")
        arrays[name] = arr
    return ReinforcedViews(path=path, meta=meta, **arrays)


class _ViewImages(torch.utils.data.Dataset):
    """Image i -> (i, its K views rendered for the teacher (K, 3, S, S), their rows (K, 5), reason or None)."""

    def __init__(self, manifest: Manifest, render: Render, settings: ViewSettings) -> None:
        self.paths, self.render, self.settings = [e.image for e in manifest.entries], render, settings

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, np.ndarray | None, str | None]:
        s = self.settings
        try:
            image = open_image(self.paths[i])
            views = [seeded_view(image, seed_of(s.seed, i, k), s.scale, s.hflip) for k in range(s.count)]
            return i, torch.stack([render_view(image, v, self.render) for v in views]), \
                np.stack([v.as_row() for v in views]), None
        except Exception as e:  # noqa: BLE001 - the clean cache already counted and judged unreadable images
            return i, None, None, why_unreadable(e)


def _collate(items: list) -> list:
    return items


class _Builder:
    """Fills ``<final>.partial`` in chunks of images; ``progress.json`` after each flushed chunk."""

    def __init__(self, teacher: Teacher, manifest: Manifest, clean: FeatureCache, final: Path, key: str,
                 fields: dict[str, Any], settings: ViewSettings, batch_size: int, workers: int,
                 chunk_size: int) -> None:
        self.teacher, self.manifest, self.clean, self.final = teacher, manifest, clean, final
        self.key, self.fields, self.settings = key, fields, settings
        self.images_per_batch = max(1, batch_size // settings.count)
        self.workers, self.chunk_size = workers, chunk_size
        self.partial = final.with_name(final.name + ".partial")
        self.progress_file = self.partial / "progress.json"

    def _start_or_resume(self) -> int:
        n, k, d = len(self.manifest), self.settings.count, self.teacher.embed_dim
        try:
            state = json.loads(self.progress_file.read_text(encoding="utf-8"))
            shapes = {name: np.load(self.partial / f"{name}.npy", mmap_mode="r").shape for name in ARRAYS}
            if state.get("key") == self.key and shapes == {"view_emb": (n, k, d), "view_params": (n, k, 5)}:
                return int(state["images_done"])
        except (OSError, ValueError, EOFError, KeyError, json.JSONDecodeError):
            pass
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        for name, shape, dtype in (("view_emb", (n, k, d), np.float16), ("view_params", (n, k, 5), np.float32)):
            arr = np.lib.format.open_memmap(self.partial / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
            arr[:] = 0 if name == "view_emb" else np.nan
            arr.flush()
            del arr
        atomic.write_json(self.progress_file, {"key": self.key, "images_done": 0})
        return 0

    def _batches(self, start: int) -> Iterator[list[int]]:
        """Readable images (by the clean cache) from ``start``, never across a chunk boundary."""
        n = len(self.manifest)
        for c in range(start, n, self.chunk_size):
            ok = [i for i in range(c, min(c + self.chunk_size, n)) if self.clean.image_ok[i]]
            for b in range(0, len(ok), self.images_per_batch):
                yield ok[b:b + self.images_per_batch]
            yield [-(min(c + self.chunk_size, n))]  # a chunk marker: everything below it is written

    def run(self, console: Console) -> float:
        started = time.perf_counter()
        start = self._start_or_resume()
        emb = np.load(self.partial / "view_emb.npy", mmap_mode="r+")
        params = np.load(self.partial / "view_params.npy", mmap_mode="r+")
        dataset = _ViewImages(self.manifest, render_of(self.teacher.preprocess_cfg), self.settings)
        loader = torch.utils.data.DataLoader(_Marked(dataset), batch_sampler=self._batches(start),
                                             num_workers=self.workers, collate_fn=_collate)
        with console.status(f"teacher embeddings of {self.settings.count} views per image") as status:
            for items in loader:
                if isinstance(items[0], int):  # the end of a chunk: all below it is written
                    emb.flush()
                    params.flush()
                    atomic.write_json(self.progress_file, {"key": self.key, "images_done": items[0]})
                    status.update(f"teacher embeddings of {self.settings.count} views per image: {items[0]} "
                                  f"of {len(self.manifest)} images")
                    continue
                good = [it for it in items if it[1] is not None]
                if good:
                    out = self.teacher.embed_images(torch.cat([it[1] for it in good])).cpu().numpy()
                    rows = np.asarray([it[0] for it in good])
                    emb[rows] = out.reshape(len(good), self.settings.count, -1).astype(np.float16)
                    params[rows] = np.stack([it[2] for it in good])
        del emb, params
        seconds = time.perf_counter() - started
        meta = {"key": self.key, **self.fields, "dim": self.teacher.embed_dim, "seconds": round(seconds, 1),
                "arrays": {name: {"shape": list(np.load(self.partial / f"{name}.npy", mmap_mode="r").shape),
                                  "sha256": sha256_file(self.partial / f"{name}.npy")} for name in ARRAYS},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic.write_json(self.partial / "meta.json", meta)
        self.progress_file.unlink(missing_ok=True)
        atomic.replace_dir(self.partial, self.final)
        return seconds


class _Marked(torch.utils.data.Dataset):
    """The view dataset, where a negative index -n is the end-of-chunk marker for images below n."""

    def __init__(self, inner: _ViewImages) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> Any:
        return -i if i < 0 else self.inner[i]


def build_or_load_views(teacher: Teacher, manifest: Manifest, clean: FeatureCache, settings: ViewSettings, *,
                        batch_size: int = 64, workers: int = 2, chunk_size: int = 1024,
                        console: Console) -> ReinforcedViews:
    """The store of K views of ``manifest``'s images beside its clean cache, built (or resumed) when needed.
    In a distributed run rank 0 builds it while the other ranks wait, then every rank opens it."""
    key, fields = views_key(clean, teacher, settings)
    final = views_dir(clean, key, settings.count)
    ctx = distributed.current()
    if ctx.is_main:
        with lock_cache_dir(final) as writable:
            try:
                return _open_or_none(final, key, len(manifest), console) or _build(
                    teacher, manifest, clean, final, key, fields, settings, batch_size, workers, chunk_size,
                    console, writable)
            finally:
                distributed.barrier()
    distributed.barrier()
    return open_views(final, key, len(manifest))


def views_for_recipe(recipe: Recipe, teacher: Teacher, train: Manifest, clean: FeatureCache,
                     console: Console) -> ReinforcedViews:
    """``build_or_load_views`` with the recipe's augmentation, view count and seed, and its cache build settings."""
    a, c = recipe.data.augment, recipe.cache
    return build_or_load_views(teacher, train, clean, ViewSettings(c.views, tuple(a.scale), a.hflip, c.views_seed),
                               batch_size=recipe.data.batch_size, workers=recipe.data.workers,
                               chunk_size=c.chunk_size, console=console)


def _open_or_none(final: Path, key: str, n: int, console: Console) -> ReinforcedViews | None:
    try:
        return open_views(final, key, n)
    except FileNotFoundError:
        return None
    except CacheMismatch as e:
        console.print(f"the view store {final} does not match ({e}); building it again", highlight=False)
        shutil.rmtree(final, ignore_errors=True)
        return None


def _build(teacher: Teacher, manifest: Manifest, clean: FeatureCache, final: Path, key: str,
           fields: dict[str, Any], settings: ViewSettings, batch_size: int, workers: int, chunk_size: int,
           console: Console, writable: bool) -> ReinforcedViews:
    if not writable:
        raise UserError(f"the teacher feature cache folder {final.parent} is read-only and holds no store of "
                        f"{settings.count} views for this run; set cache.dir to a writable folder")
    seconds = _Builder(teacher, manifest, clean, final, key, fields, settings, batch_size, workers,
                       chunk_size).run(console)
    console.print(f"teacher embeddings of {settings.count} views of {len(manifest)} images in {seconds:.0f} s",
                  highlight=False)
    return open_views(final, key, len(manifest))


__all__ = ["ReinforcedViews", "ViewSettings", "build_or_load_views", "open_views", "render_of", "views_dir",
           "views_for_recipe", "views_key"]
