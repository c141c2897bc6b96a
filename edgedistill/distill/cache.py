"""The teacher feature cache: the teacher's image and text embeddings of a manifest, computed once.

One directory per (teacher identity, preprocessing, manifest content)::

    <root>/<model>__<manifest>__<key16>/
        meta.json          key fields, counts, array shapes and sha256, bad images   (written last)
        image_emb.npy      (N, D) float16, L2-normalised teacher image embeddings      (memory-mapped)
        image_ok.npy       (N,) bool, False where the image could not be read
        text_emb.npy       (T, D) float16, every caption in manifest order
        text_offsets.npy   (N + 1,) int64, captions of image i are rows offsets[i]:offsets[i + 1]

It is built in ``<name>.partial/`` chunk by chunk; ``progress.json`` (rewritten atomically after each chunk is
flushed) says how far it got, so a killed build continues where it stopped, with the same chunk and batch
boundaries, hence the same numbers. Only a finished build is renamed to its final name, so a directory that
looks complete is complete. On load the key, counts, shapes and file hashes are checked; a mismatch rebuilds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

import edgedistill.core.atomic as atomic
import edgedistill.distill.distributed as distributed
from edgedistill.data.batching import ImageDataset, collate_images
from edgedistill.data.images import BadImages
from edgedistill.data.manifest import Manifest, load_manifest
from edgedistill.core.errors import UserError
from edgedistill.distill.recipe import Recipe
from edgedistill.distill.memory import keep_freed_memory
from edgedistill.core.hashing import sha256_file, sha256_json
from edgedistill.distill.teachers import Teacher
from edgedistill.core.terminal import make_console, warn

CACHE_VERSION = 1
ARRAYS = ("image_emb", "image_ok", "text_emb", "text_offsets")


def cache_key(teacher: Teacher, manifest: Manifest) -> tuple[str, dict[str, Any]]:
    """(sha256 key, the fields it hashes): teacher identity, preprocessing, manifest content and counts."""
    fields = {
        "version": CACHE_VERSION,
        "teacher": teacher.identity,
        "preprocess": teacher.preprocess_cfg,
        "manifest_sha256": manifest.content_hash(),
        "n_images": len(manifest),
        "n_texts": manifest.n_captions,
    }
    return sha256_json(fields), fields


def cache_dir(root: Path, teacher: Teacher, manifest: Manifest) -> Path:
    key, _ = cache_key(teacher, manifest)
    slug = lambda s: re.sub(r"[^A-Za-z0-9_.-]+", "-", s)[:48]  # noqa: E731
    return Path(root) / f"{slug(teacher.source.model_name)}__{slug(manifest.path.stem)}__{key[:16]}"


class CacheMismatch(Exception):
    """A finished cache directory that does not match what it should hold (the reason is the message)."""


@dataclass
class FeatureCache:
    """Memory-mapped teacher features of one manifest (read-only)."""

    path: Path
    meta: dict[str, Any]
    image_emb: np.ndarray     # (N, D) float16
    image_ok: np.ndarray      # (N,) bool
    text_emb: np.ndarray      # (T, D) float16
    text_offsets: np.ndarray  # (N + 1,) int64

    @property
    def n_images(self) -> int:
        return int(self.image_emb.shape[0])

    @property
    def n_texts(self) -> int:
        return int(self.text_emb.shape[0])

    @property
    def dim(self) -> int:
        return int(self.image_emb.shape[1])

    @property
    def bad_images(self) -> list[tuple[int, str, str]]:
        return [tuple(b) for b in self.meta.get("bad_images", [])]  # type: ignore[misc]

    def image_features(self, indices: np.ndarray | torch.Tensor | list[int]) -> torch.Tensor:
        """Teacher image embeddings of the given images -> (B, D) float32."""
        idx = np.asarray(indices, dtype=np.int64)
        return torch.from_numpy(np.ascontiguousarray(self.image_emb[idx], dtype=np.float32))

    def caption_rows(self, index: int) -> range:
        """Rows of ``text_emb`` holding the captions of image ``index``."""
        return range(int(self.text_offsets[index]), int(self.text_offsets[index + 1]))

    def text_features(self, rows: np.ndarray | torch.Tensor | list[int]) -> torch.Tensor:
        """Teacher text embeddings of the given caption rows -> (B, D) float32."""
        idx = np.asarray(rows, dtype=np.int64)
        return torch.from_numpy(np.ascontiguousarray(self.text_emb[idx], dtype=np.float32))


def _sha256_arrays(folder: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for name in ARRAYS:
        arr = np.load(folder / f"{name}.npy", mmap_mode="r")
        out[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "sha256": sha256_file(folder / f"{name}.npy")}
        del arr
    return out


def read_meta(path: Path) -> dict[str, Any]:
    """The meta.json of a finished cache folder (or a store kept beside one): FileNotFoundError when there is no
    folder, CacheMismatch when its meta.json is missing or unreadable (the last file a build writes)."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        if path.exists():
            raise CacheMismatch("meta.json is missing")
        raise FileNotFoundError(path)
    try:
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheMismatch(f"meta.json is unreadable ({e})") from None


def open_cache(path: Path, key: str, manifest: Manifest, verify_hashes: bool = True) -> FeatureCache:
    """Open a finished cache directory, checking key, counts, shapes and (by default) file hashes.

    Raises FileNotFoundError when there is no finished cache at ``path``, CacheMismatch when it does not match.
    """
    meta = read_meta(path)
    if meta.get("version") != CACHE_VERSION:
        raise CacheMismatch(f"it was written by cache format {meta.get('version')}, this is {CACHE_VERSION}")
    if meta.get("key") != key:
        raise CacheMismatch("its key differs from the teacher, preprocessing and manifest of this run")
    if meta.get("n_images") != len(manifest) or meta.get("n_texts") != manifest.n_captions:
        raise CacheMismatch(f"it holds {meta.get('n_images')} images / {meta.get('n_texts')} captions, the manifest "
                            f"{len(manifest)} / {manifest.n_captions}")
    arrays = {}
    for name in ARRAYS:
        expected = meta.get("arrays", {}).get(name, {})
        file = path / f"{name}.npy"
        try:
            arr = np.load(file, mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file
            raise CacheMismatch(f"{name}.npy is unreadable ({type(e).__name__}: {e})") from None
        if list(arr.shape) != expected.get("shape") or str(arr.dtype) != expected.get("dtype"):
            raise CacheMismatch(f"{name}.npy has shape {list(arr.shape)} {arr.dtype}, meta.json says "
                                f"{expected.get('shape')} {expected.get('dtype')}")
        if verify_hashes and sha256_file(file) != expected.get("sha256"):
            raise CacheMismatch(f"{name}.npy does not match its sha256 in meta.json (corrupt or changed)")
        arrays[name] = arr
    if not np.array_equal(np.asarray(arrays["text_offsets"]), manifest.caption_offsets):
        raise CacheMismatch("its caption offsets differ from the manifest's")
    return FeatureCache(path=path, meta=meta, **arrays)


READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[bool]:
    """One builder per cache directory across processes (the lock file is harmless when left behind).

    Yields False, without a lock, where the cache root cannot be written (read-only storage): a finished cache
    there can still be read, and nothing can be built.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path.with_name(path.name + ".lock"), "a")
    except OSError as e:
        if e.errno not in READ_ONLY_ERRNOS:
            raise
        yield False
        return
    with f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


lock_cache_dir = _lock  # for the stores kept beside a cache (distill/views.py)


def _read_only_cache(final: Path, key: str, manifest: Manifest, what: str) -> FeatureCache:
    """The finished cache at ``final`` on storage this process cannot write; UserError when there is none."""
    try:
        return open_cache(final, key, manifest)
    except (FileNotFoundError, CacheMismatch) as e:
        why = "there is none for this run" if isinstance(e, FileNotFoundError) else f"it does not match ({e})"
        raise UserError(f"{what}: the teacher feature cache folder {final.parent} is read-only and {why}; set "
                        f"cache.dir to a writable folder") from None


def _progress_bar(console: Console) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=False)


def _reserve_disk(path: Path) -> None:
    """Allocate a sparse file's blocks now: a full disk is then an ENOSPC error here, not a SIGBUS mid-build."""
    if hasattr(os, "posix_fallocate"):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            # file systems without fallocate (EOPNOTSUPP, EINVAL): writes find out instead
        finally:
            os.close(fd)


class _Builder:
    """Fills a ``.partial`` directory chunk by chunk, persisting progress after each flushed chunk.

    With ``world`` > 1 it builds one rank's share of a sharded build: the chunks ``k`` with ``k % world == rank``
    (images and captions alike), their rows packed in chunk order into ``<final>.partial/shard-R-of-W/``; rank 0
    assembles the shards (``_assemble``). The batches are those of a single-process build, so the numbers are too.
    """

    def __init__(self, teacher: Teacher, manifest: Manifest, final: Path, key: str, fields: dict[str, Any],
                 batch_size: int, workers: int, chunk_size: int, max_bad_fraction: float, console: Console,
                 what: str, rank: int = 0, world: int = 1) -> None:
        self.teacher, self.manifest, self.final, self.key, self.fields = teacher, manifest, final, key, fields
        self.batch_size, self.workers, self.chunk_size = batch_size, workers, chunk_size
        self.console, self.what = console, what
        self.rank, self.world = rank, world
        self.partial = final.with_name(final.name + ".partial")
        if world > 1:
            self.partial = self.partial / _shard_name(rank, world)
        self.progress_file = self.partial / "progress.json"
        self.n_rows = _own_rows(len(manifest), chunk_size, rank, world)              # image rows of this builder
        self.t_rows = _own_rows(manifest.n_captions, chunk_size, rank, world)        # caption rows
        self.state = self._resume_or_start()
        self.bad = BadImages(len(manifest), max_bad_fraction, what, console,
                             known=[tuple(b) for b in self.state["bad_images"]])  # type: ignore[misc]
        self.forward_batches = 0  # teacher forward passes run by this builder (0 on a full resume)
        self.seconds = {"images": 0.0, "texts": 0.0}  # wall time of each phase in this process

    def _resume_or_start(self) -> dict[str, Any]:
        n, t, d = self.n_rows, self.t_rows, self.teacher.embed_dim
        if self.progress_file.is_file():
            try:
                state = json.loads(self.progress_file.read_text(encoding="utf-8"))
                if state.get("key") == self.key and state.get("chunk_size") == self.chunk_size \
                        and state.get("batch_size") == self.batch_size and self._arrays_fit(n, t, d):
                    self.console.print(f"{self.what}: resuming the cache build at image {state['images_done']} "
                                       f"of {n}, caption {state['texts_done']} of {t}", highlight=False)
                    return state
            except (OSError, json.JSONDecodeError, KeyError):
                pass
            self.console.print(f"{self.what}: the unfinished cache build in {self.partial} does not fit this "
                               f"run; starting over", highlight=False)
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        for name, shape, dtype in (("image_emb", (n, d), np.float16), ("image_ok", (n,), np.bool_),
                                   ("text_emb", (t, d), np.float16)):
            arr = np.lib.format.open_memmap(self.partial / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
            arr.flush()
            del arr
            _reserve_disk(self.partial / f"{name}.npy")
        if self.world == 1:
            np.save(self.partial / "text_offsets.npy", self.manifest.caption_offsets)
        state = {"key": self.key, "chunk_size": self.chunk_size, "batch_size": self.batch_size,
                 "images_done": 0, "texts_done": 0, "bad_images": []}
        atomic.write_json(self.progress_file, state)
        return state

    def _arrays_fit(self, n: int, t: int, d: int) -> bool:
        """Whether the partial arrays exist with the shapes this build needs (a crash can leave them short)."""
        expected = {"image_emb": (n, d), "image_ok": (n,), "text_emb": (t, d)}
        if self.world == 1:
            expected["text_offsets"] = (len(self.manifest) + 1,)
        try:
            return all(np.load(self.partial / f"{k}.npy", mmap_mode="r").shape == v for k, v in expected.items())
        except (OSError, ValueError, EOFError):
            return False

    def _save_progress(self, **done: int) -> None:
        self.state.update(done, bad_images=[list(b) for b in self.bad.items])
        atomic.write_json(self.progress_file, self.state)

    def _batches(self, start: int, total: int) -> Iterator[list[int]]:
        """Batches (global indices) that never cross a chunk boundary, of this builder's chunks, from its row
        ``start`` (always a chunk boundary) on; ``total`` is the global count (images or captions)."""
        for c in _own_chunks(total, self.chunk_size, self.rank, self.world):
            end = min(c + self.chunk_size, total)
            if self._row(end - 1) < start:
                continue
            for b in range(c, end, self.batch_size):
                yield list(range(b, min(b + self.batch_size, end)))

    def _row(self, index: int) -> int:
        """Row in this builder's arrays of global index ``index`` (the index itself with one process)."""
        k = index // self.chunk_size
        return (k // self.world) * self.chunk_size + index - k * self.chunk_size

    def _rate(self, done: int, started: float) -> str:
        return f"{done / max(time.perf_counter() - started, 1e-9):.1f}/s"

    def run(self) -> None:
        n, t = len(self.manifest), self.manifest.n_captions
        with _progress_bar(self.console) as bar:
            self._images(bar, n)
            self._texts(bar, t)
        if self.world == 1:
            self._finish()

    def _images(self, bar: Progress, n: int) -> None:
        start = self.state["images_done"]
        task = bar.add_task(f"{self.what}: teacher image features", total=self.n_rows, completed=start, rate="")
        if start >= self.n_rows:
            return
        emb = np.load(self.partial / "image_emb.npy", mmap_mode="r+")
        ok = np.load(self.partial / "image_ok.npy", mmap_mode="r+")
        dataset = ImageDataset([e.image for e in self.manifest.entries], self.teacher.preprocess)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=self._batches(start, n), num_workers=self.workers, collate_fn=collate_images,
            pin_memory=self.teacher.device.type == "cuda", persistent_workers=False)
        started, done = time.perf_counter(), 0
        for indices, images, failures in loader:
            rows = np.asarray([self._row(i) for i in indices.tolist()], dtype=np.int64)
            if images is not None:
                emb[rows] = self.teacher.embed_images(images).cpu().numpy().astype(np.float16)
                ok[rows] = True
                self.forward_batches += 1
            for i, why in failures:
                ok[self._row(i)] = False
                self.bad.add(i, self.manifest.entries[i].image, why)
            last = max(int(rows.max(initial=-1)), max((self._row(i) for i, _ in failures), default=-1))
            done += len(rows) + len(failures)
            bar.update(task, completed=last + 1, rate=self._rate(done, started))
            if (last + 1) % self.chunk_size == 0 or last + 1 == self.n_rows:
                emb.flush()
                ok.flush()
                self._save_progress(images_done=last + 1)
        self.seconds["images"] = time.perf_counter() - started
        del emb, ok

    def _texts(self, bar: Progress, t: int) -> None:
        start = self.state["texts_done"]
        task = bar.add_task(f"{self.what}: teacher text features", total=self.t_rows, completed=start, rate="")
        if start >= self.t_rows:
            return
        emb = np.load(self.partial / "text_emb.npy", mmap_mode="r+")
        captions = self.manifest.all_captions()
        started, done = time.perf_counter(), 0
        for batch in self._batches(start, t):
            first, last = self._row(batch[0]), self._row(batch[-1])
            emb[first:last + 1] = self.teacher.embed_texts(captions[batch[0]:batch[-1] + 1]).cpu().numpy()
            self.forward_batches += 1
            done += len(batch)
            bar.update(task, completed=last + 1, rate=self._rate(done, started))
            if (last + 1) % self.chunk_size == 0 or last + 1 == self.t_rows:
                emb.flush()
                self._save_progress(texts_done=last + 1)
        self.seconds["texts"] = time.perf_counter() - started
        del emb

    def _finish(self) -> None:
        _finalize(self.partial, self.final, self.key, self.fields, self.teacher, self.bad.items, self.seconds)


def _own_chunks(total: int, chunk_size: int, rank: int, world: int) -> range:
    """First global index of each chunk that ``rank`` of ``world`` builds (chunks dealt out in turn)."""
    return range(rank * chunk_size, total, world * chunk_size)


def _own_rows(total: int, chunk_size: int, rank: int, world: int) -> int:
    return sum(min(c + chunk_size, total) - c for c in _own_chunks(total, chunk_size, rank, world))


def _shard_name(rank: int, world: int) -> str:
    return f"shard-{rank}-of-{world}"


def _finalize(partial: Path, final: Path, key: str, fields: dict[str, Any], teacher: Teacher,
              bad: list[tuple[int, str, str]], seconds: dict[str, float], world: int = 1) -> None:
    """Hash the finished arrays in ``partial``, write meta.json last, and rename the folder to ``final``."""
    meta = {"version": CACHE_VERSION, "key": key, **fields,
            "dim": teacher.embed_dim, "bad_images": [list(b) for b in bad],
            "arrays": _sha256_arrays(partial), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "builder": {"device": str(teacher.device), "torch": torch.__version__, "processes": world,
                        "seconds": {k: round(v, 3) for k, v in seconds.items()}}}
    atomic.write_json(partial / "meta.json", meta)
    (partial / "progress.json").unlink(missing_ok=True)
    atomic.replace_dir(partial, final)  # over a stale, mismatching cache the caller decided to replace


def _assemble(teacher: Teacher, manifest: Manifest, final: Path, key: str, fields: dict[str, Any],
              chunk_size: int, world: int, max_bad_fraction: float, console: Console,
              what: str, seconds: dict[str, float]) -> list[tuple[int, str, str]]:
    """Rank 0 of a sharded build: the ranks' shards -> the arrays of one cache, hashed and renamed atomically.

    Returns the unreadable images of all ranks."""
    partial = final.with_name(final.name + ".partial")
    n, t, d = len(manifest), manifest.n_captions, teacher.embed_dim
    shards = [partial / _shard_name(r, world) for r in range(world)]
    bad: list[tuple[int, str, str]] = []
    for r, folder in enumerate(shards):
        try:
            state = json.loads((folder / "progress.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            raise UserError(f"{what}: rank 0 cannot read the cache part of rank {r} in {folder}: with several "
                            f"machines, cache.dir must be a folder they all share") from None
        if state.get("key") != key or state.get("images_done") != _own_rows(n, chunk_size, r, world) \
                or state.get("texts_done") != _own_rows(t, chunk_size, r, world):
            raise UserError(f"{what}: the cache part of rank {r} in {folder} is unfinished; run again to resume it")
        bad += [tuple(b) for b in state["bad_images"]]  # type: ignore[misc]
    bad.sort()
    BadImages(n, max_bad_fraction, what, console, known=bad).check()
    with console.status(f"{what}: assembling the cache from {world} parts"):
        out = {name: np.lib.format.open_memmap(partial / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
               for name, dtype, shape in (("image_emb", np.float16, (n, d)), ("image_ok", np.bool_, (n,)),
                                          ("text_emb", np.float16, (t, d)))}
        for names, total in ((("image_emb", "image_ok"), n), (("text_emb",), t)):
            parts = [{name: np.load(f / f"{name}.npy", mmap_mode="r") for name in names} for f in shards]
            for k, c in enumerate(range(0, total, chunk_size)):
                end, row = min(c + chunk_size, total), (k // world) * chunk_size
                for name in names:
                    out[name][c:end] = parts[k % world][name][row:row + end - c]
            del parts
        for arr in out.values():
            arr.flush()
        del out
        np.save(partial / "text_offsets.npy", manifest.caption_offsets)
        for folder in shards:
            shutil.rmtree(folder)
        _finalize(partial, final, key, fields, teacher, bad, seconds, world)
    return bad


@dataclass
class CacheResult:
    cache: FeatureCache
    hit: bool                # True: nothing was computed
    forward_batches: int     # teacher forward passes run for this call
    seconds: float           # wall time of this call
    phase_seconds: dict[str, float] = field(default_factory=dict)  # images / texts, when built


def build_or_load(teacher: Teacher, manifest: Manifest, root: Path, *, batch_size: int = 64, workers: int = 2,
                  chunk_size: int = 1024, max_bad_fraction: float = 0.05, what: str = "cache",
                  console: Console | None = None, rebuild: bool = False) -> CacheResult:
    """Return the verified cache of ``manifest`` under ``root``, building (or resuming) it when needed."""
    console = console or make_console(stderr=True, soft_wrap=True)
    if teacher.device.type == "cpu":
        keep_freed_memory()
    try:
        return _build_or_load(teacher, manifest, Path(root), batch_size, workers, chunk_size, max_bad_fraction,
                              what, console, rebuild)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"{what}: no space left writing the teacher feature cache under {root}; free space "
                            f"or set cache.dir to a larger disk (the build resumes where it stopped)") from e
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise UserError(f"{what}: cannot write the teacher feature cache under {root} ({e.strerror}); "
                            f"set cache.dir to a writable folder") from e
        raise


def _open_existing(final: Path, key: str, manifest: Manifest, rebuild: bool, console: Console,
                   what: str) -> FeatureCache | None:
    """The verified finished cache at ``final``, or None after clearing whatever must be rebuilt."""
    if rebuild and final.exists():
        console.print(f"{what}: --rebuild: removing {final}", highlight=False)
        shutil.rmtree(final)
    try:
        cache = open_cache(final, key, manifest)
        if cache.bad_images:
            console.print(BadImages(len(manifest), 1.0, what, console, known=cache.bad_images).summary()
                          + " (recorded when the cache was built)", highlight=False)
        return cache
    except FileNotFoundError:
        return None
    except CacheMismatch as e:
        warn(console, f"{what}: cache {final} does not match ({e}); rebuilding it")
        shutil.rmtree(final)
        return None


def _build_or_load(teacher: Teacher, manifest: Manifest, root: Path, batch_size: int, workers: int,
                   chunk_size: int, max_bad_fraction: float, what: str, console: Console,
                   rebuild: bool) -> CacheResult:
    started = time.perf_counter()
    key, fields = cache_key(teacher, manifest)
    final = cache_dir(root, teacher, manifest)
    ctx = distributed.current()
    if ctx.enabled:
        return _build_or_load_sharded(teacher, manifest, final, key, fields, batch_size, workers, chunk_size,
                                      max_bad_fraction, what, console, rebuild, ctx, started)
    with _lock(final) as writable:
        if not writable:
            return CacheResult(_read_only_cache(final, key, manifest, what), True, 0, time.perf_counter() - started)
        cache = _open_existing(final, key, manifest, rebuild, console, what)
        if cache is not None:
            return CacheResult(cache, True, 0, time.perf_counter() - started)
        builder = _Builder(teacher, manifest, final, key, fields, batch_size, workers, chunk_size,
                           max_bad_fraction, console, what)
        builder.run()
        console.print(builder.bad.summary(), highlight=False)
        cache = open_cache(final, key, manifest, verify_hashes=False)  # _finish hashed these very files
        return CacheResult(cache, False, builder.forward_batches, time.perf_counter() - started, builder.seconds)


def _build_or_load_sharded(teacher: Teacher, manifest: Manifest, final: Path, key: str, fields: dict[str, Any],
                           batch_size: int, workers: int, chunk_size: int, max_bad_fraction: float, what: str,
                           console: Console, rebuild: bool, ctx: distributed.Context,
                           started: float) -> CacheResult:
    """The build of a distributed run: every rank embeds its chunks, rank 0 assembles and renames.

    Rank 0 alone checks the existing cache (hashes once, not once per rank) and holds the builder lock for the
    whole build; the others follow its word. ``cache.dir`` must be a folder every machine of the run sees.
    """
    with contextlib.ExitStack() as stack:
        word = "build"
        if ctx.is_main:
            if not stack.enter_context(_lock(final)):
                _read_only_cache(final, key, manifest, what)
                word = "hit"
            elif _open_existing(final, key, manifest, rebuild, console, what) is not None:
                word = "hit"
            else:
                partial = final.with_name(final.name + ".partial")
                parts = {_shard_name(r, ctx.world_size) for r in range(ctx.world_size)}
                if partial.exists() and any(p.name not in parts for p in partial.iterdir()):
                    console.print(f"{what}: the unfinished cache build in {partial} was made by another number of "
                                  f"processes; starting over", highlight=False)
                    shutil.rmtree(partial)
                partial.mkdir(parents=True, exist_ok=True)
        word = distributed.broadcast_object(word)
        forward_batches, seconds = 0, {}
        if word == "build":
            builder = _Builder(teacher, manifest, final, key, fields, batch_size, workers, chunk_size,
                               max_bad_fraction, console, what, rank=ctx.rank, world=ctx.world_size)
            builder.run()
            forward_batches, seconds = builder.forward_batches, builder.seconds
            distributed.barrier()
            if ctx.is_main:
                bad = _assemble(teacher, manifest, final, key, fields, chunk_size, ctx.world_size,
                                max_bad_fraction, console, what, seconds)
                console.print(BadImages(len(manifest), 1.0, what, console, known=bad).summary(), highlight=False)
        distributed.barrier()
    try:
        cache = open_cache(final, key, manifest, verify_hashes=False)  # rank 0 verified or hashed it
    except FileNotFoundError:
        raise UserError(f"{what}: rank {ctx.rank} cannot see the teacher feature cache {final} that rank 0 "
                        f"{'built' if word == 'build' else 'found'}: with several machines, set cache.dir to a "
                        f"folder they all share") from None
    return CacheResult(cache, word == "hit", forward_batches, time.perf_counter() - started, seconds)


def class_text_features(teacher: Teacher, prompts: list[list[str]], root: Path | None = None) -> torch.Tensor:
    """The teacher's class texts: for each class the normalised mean of its prompts' embeddings -> (C, D) float32.

    With a ``root`` (the feature cache root) they are kept next to the feature cache
    (``<root>/class_text/<model>__<key16>.npz``), keyed by the teacher's identity and the prompt texts, so each set
    of class prompts is embedded once; a file whose key does not match is recomputed. Without one (a run with the
    teacher online) nothing is written.
    """
    key = sha256_json({"version": CACHE_VERSION, "teacher": teacher.identity, "prompts": prompts})
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", teacher.source.model_name)[:48]
    path = Path(root) / "class_text" / f"{slug}__{key[:16]}.npz" if root is not None else None
    if path is not None and path.is_file():
        try:
            with np.load(path) as z:
                if str(z["key"]) == key and z["emb"].shape == (len(prompts), teacher.embed_dim):
                    return torch.from_numpy(z["emb"].astype(np.float32))
        except (OSError, ValueError, KeyError):
            pass
    flat = [p for group in prompts for p in group]
    emb = torch.cat([teacher.embed_texts(flat[i:i + 256]).float().cpu() for i in range(0, len(flat), 256)]) \
        if flat else torch.zeros(0, teacher.embed_dim)
    out, start = [], 0
    for group in prompts:
        if not group:
            raise ValueError("every class needs at least one prompt")
        out.append(torch.nn.functional.normalize(emb[start:start + len(group)].mean(0), dim=-1))
        start += len(group)
    result = torch.stack(out) if out else torch.zeros(0, teacher.embed_dim)
    if path is None:
        return result
    try:
        with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, emb=result.numpy(), key=np.array(key))
    except OSError:
        pass  # a read-only cache folder: the texts are cheap to embed again
    return result


def load_split_manifests(recipe: Recipe) -> dict[str, Manifest]:
    """The recipe's manifests by split name ('train', and 'val' / 'ood_val' when given)."""
    splits = {"train": recipe.data.train, "val": recipe.data.val, "ood_val": recipe.data.ood_val}
    index_dir = recipe.cache.root / "shards"  # indexes of webdataset shards
    return {name: load_manifest(path, recipe.data.image_root, index_dir, recipe.data.folder_labels)
            for name, path in splits.items() if path is not None}


def caches_for_recipe(recipe: Recipe, teacher: Teacher, manifests: dict[str, Manifest],
                      console: Console | None = None, rebuild: bool = False) -> dict[str, CacheResult]:
    """Build or load the teacher feature cache of every split, with the recipe's data and cache settings."""
    root = recipe.cache.root
    return {name: build_or_load(teacher, manifest, root, batch_size=recipe.data.batch_size,
                                workers=recipe.data.workers, chunk_size=recipe.cache.chunk_size,
                                max_bad_fraction=recipe.data.max_bad_fraction, what=name, console=console,
                                rebuild=rebuild)
            for name, manifest in manifests.items()}
