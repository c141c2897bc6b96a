"""An embedding index: every image of a folder, manifest or set of webdataset shards embedded by a student, then
searched by text or by image (``edgedistill embed`` / ``edgedistill search``; docs/runtime.md#the-embedding-index).

    INDEX/index.json                the commit point: model, decode settings, source, counts, unreadable images,
                                    and the two data files below by name, sha256 and size
    INDEX/embeddings-<sha12>.npy    (N, D) float32, L2-normalised, one row per readable image
    INDEX/items-<sha12>.jsonl       one line per row: the image path, its captions and label when the source has
                                    them, and the file's size, mtime and sha256 (what the next embed compares)

The data files are named by their content, so a new version never overwrites the files the current index.json
names: a rebuild writes its files beside them, then replaces index.json atomically (the single commit point), then
removes the files no longer named. A reader, or a build killed at any moment, sees the old index or the new one.
Version 1 indexes (embeddings.npy, items.jsonl, no hashes) are still read; embedding into one embeds every image.

Re-embedding into an index embeds only what changed (same size and mtime: reused; otherwise the content hash
decides) and drops what is gone. The images to embed go in chunks of ``CHUNK`` to ``INDEX/.chunks/`` (each chunk
written atomically and checked when read back), so an interrupted build continues where it stopped. Decoding is
``runtime.decode``'s; search is exact (numpy), or FAISS's exact inner-product index when installed and large.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import edgedistill.core.atomic as atomic
import edgedistill.core.gates as gates
from edgedistill.runtime.decode import DECODE_MODES, decoded_batches
from edgedistill.runtime.encoder import Encoder
from edgedistill.runtime.formats import BACKENDS
from edgedistill.runtime.loader import load
from edgedistill.data.images import BadImages
from edgedistill.data.manifest import load_manifest
from edgedistill.data.records import Manifest
from edgedistill.data.shards import ShardMember, is_shard_spec
from edgedistill.core.documents import Document, read_document
from edgedistill.core.errors import UserError
from edgedistill.core.hashing import sha256_bytes, sha256_file, sha256_json
from edgedistill.core.terminal import make_console, safe, warn

INDEX_VERSION = 2
CHUNK = 1024               # images per resumable chunk
FAISS_FROM = 200_000       # rows from which FAISS (when installed) searches instead of numpy
INDEX_JSON, CHUNKS = "index.json", ".chunks"
V1_FILES = {"embeddings": "embeddings.npy", "items": "items.jsonl"}   # version 1: fixed names, no sizes
DATA_FILES = {"embeddings": ("embeddings-", ".npy"), "items": ("items-", ".jsonl")}
V1_DECODE = {"mode": "exact", "exif": False}  # what version 1 did: a full decode, no EXIF rotation


class IndexModel(Document):
    identity: str                  # the student's weights sha256 (or its image artifact's when unknown)
    source: str                    # what was loaded (export folder, artifact, student folder), absolute
    image: dict[str, Any]          # artifact, backend, precision
    embed_dim: int


class DataFile(Document):
    name: str
    sha256: str
    size: int


class IndexDoc(Document):
    version: int
    model: IndexModel
    source: dict[str, Any]
    count: int
    dim: int
    decode: dict[str, Any] = V1_DECODE          # {"mode": reduced|exact, "exif": bool}
    files: dict[str, DataFile] = {}             # "embeddings", "items" (version 2)
    update: dict[str, int] = {}                 # what the embed that wrote it did: embedded, reused, dropped
    bad_images: list[list[str]] = []


@dataclass
class Index:
    folder: Path
    doc: IndexDoc
    embeddings: np.ndarray         # (N, D) float32 (memory-mapped)
    items: list[dict[str, Any]]    # item paths absolute (made so on reading)

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The ``k`` rows of highest cosine to ``query`` (D,) -> [(row, score)], best first (exact search)."""
        k = max(1, min(k, len(self.items)))
        if len(self.items) >= FAISS_FROM and _faiss() is not None:
            return _faiss_search(self.embeddings, query, k)
        scores = self.embeddings @ query.astype(np.float32)
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(i), float(scores[i])) for i in top]


def _faiss() -> Any:
    try:
        import faiss  # deferred: optional (pip install faiss-cpu), only for large indexes
    except ImportError:
        return None
    return faiss


def _faiss_search(embeddings: np.ndarray, query: np.ndarray, k: int) -> list[tuple[int, float]]:
    faiss = _faiss()
    index = faiss.IndexFlatIP(embeddings.shape[1])  # exact inner product: the cosine of unit vectors
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    scores, rows = index.search(query[None, :].astype(np.float32), k)
    return [(int(r), float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0]


# ------------------------------------------------------------------------------------------------ paths

def _recorded(path: str, folder: Path) -> str:
    """An absolute path as index.json / items record it: relative when inside the index folder (the folder can
    move with what it holds), else absolute."""
    try:
        return Path(path).relative_to(folder.resolve()).as_posix()
    except ValueError:
        return path


def _absolute(recorded: str, folder: Path) -> str:
    return recorded if Path(recorded).is_absolute() else str(folder.resolve() / recorded)


class _Keys:
    """Each image's absolute path with its folders resolved (a symlinked file keeps its own name): the key an
    item is known by from one embed to the next. Folders are resolved once each."""

    def __init__(self) -> None:
        self._folders: dict[Path, Path] = {}

    def __call__(self, image: Path | ShardMember) -> str:
        if isinstance(image, ShardMember):
            return f"{self._folder_of(Path(image.shard))}/{image.name}"
        return self._folder_of(Path(image))

    def _folder_of(self, path: Path) -> str:
        parent = self._folders.get(path.parent)
        if parent is None:
            parent = self._folders[path.parent] = path.parent.resolve()
        return str(parent / path.name)


def _source_path(source: str | Path) -> str:
    if is_shard_spec(source):  # a brace pattern (a::b joins several): each part absolute
        return "::".join(str(Path(p).expanduser().resolve()) for p in str(source).split("::"))
    return str(Path(source).expanduser().resolve())


# ------------------------------------------------------------------------------------------------ files

@dataclass(frozen=True)
class Seen:
    """What an image file was when it was embedded: size, mtime and the sha256 of its bytes."""
    size: int
    mtime_ns: int
    sha256: str | None = None

    def same_stamp(self, other: Seen | None) -> bool:
        return other is not None and (self.size, self.mtime_ns) == (other.size, other.mtime_ns)


def _stamp(image: Path | ShardMember) -> Seen | None:
    """Size and mtime now (a shard member: its size and the shard's mtime); None when it cannot be read."""
    try:
        if isinstance(image, ShardMember):
            return Seen(image.size, os.stat(image.shard).st_mtime_ns)
        st = os.stat(image)
        return Seen(st.st_size, st.st_mtime_ns)
    except OSError:
        return None


def _content_hash(image: Path | ShardMember) -> str | None:
    try:
        return sha256_bytes(image.read_bytes()) if isinstance(image, ShardMember) else sha256_file(image)
    except OSError:
        return None  # unreadable: decoding will say why


def _hashes(images: Sequence[Path | ShardMember]) -> list[str | None]:
    """sha256 of many files, read in threads (hashlib releases the GIL on large buffers)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(_content_hash, images))


# ------------------------------------------------------------------------------------------------ building

def read_source(source: str | Path, folder_labels: bool = False) -> Manifest:
    """A folder of images (recursive), a manifest (.jsonl, .csv) or webdataset shards, as a manifest."""
    return load_manifest(source, folder_labels=folder_labels)


def check_options(batch: int, max_bad_fraction: float, decode: str = "reduced") -> None:
    if batch < 1:
        raise UserError(f"--batch {batch} must be 1 or more")
    if not (gates.at_least(max_bad_fraction, 0.0) and gates.at_most(max_bad_fraction, 1.0)):  # NaN fails too
        raise UserError(f"--max-bad-fraction {max_bad_fraction} must be a number from 0 to 1")
    if decode not in DECODE_MODES:
        raise UserError(f"--decode {decode!r} is not a decode mode; use one of: {', '.join(DECODE_MODES)}")


@dataclass
class _Rows:
    """Where each manifest entry's embedding comes from: ``parts[p][row]`` for ``where[i] = (p, row)``; part 0 is
    the previous index, the others are chunks of this build."""
    parts: list[np.ndarray]
    where: dict[int, tuple[int, int]] = field(default_factory=dict)
    seen: dict[int, Seen] = field(default_factory=dict)
    reused: int = 0


def build_index(source: str | Path, encoder: Encoder, out: Path, batch: int = 64, max_bad_fraction: float = 0.05,
                console: Console | None = None, manifest: Manifest | None = None, *, decode: str = "reduced",
                exif: bool = True, rebuild: bool = False) -> IndexDoc:
    """Embed the images of ``source`` with ``encoder`` into the index folder ``out``: only those new or changed
    since the index there was made (all with ``rebuild``), continuing a build that was interrupted; returns what
    the new index.json says. ``manifest``: ``source`` already read (``read_source``). An index there made by
    another model or with other decode settings is refused unless ``rebuild``."""
    console = console or make_console(stderr=True, soft_wrap=True)
    check_options(batch, max_bad_fraction, decode)
    manifest = manifest if manifest is not None else read_source(source)
    out = atomic.writable_dir(out, "--out")
    settings = {"mode": decode, "exif": bool(exif)}
    with atomic.exclusive_dir(out, "--out"):
        old = None if rebuild else _previous(out, encoder, settings, console)
        keys = _Keys()
        names = [keys(e.image) for e in manifest.entries]
        chunks = _chunk_folder(out, sha256_json({"model": _identity(encoder), "decode": settings}))
        rows = _Rows([old.embeddings if old is not None else np.zeros((0, encoder.embed_dim), np.float32)])
        known_bad = _resume(chunks, manifest, names, rows, encoder.embed_dim, console)
        todo = _reuse(manifest, names, old, rows, set(known_bad))
        bad = BadImages(len(manifest), max_bad_fraction, "embed", console, knob="--max-bad-fraction",
                        known=[(i, str(manifest.entries[i].image), why) for i, why in known_bad.items()])
        _embed_chunks(manifest, names, todo, encoder, chunks, rows, batch, bad, settings, console)
        dropped = len(set(_old_keys(old)) - set(names))
        doc = _commit(out, manifest, names, rows, encoder, source, settings, bad, dropped)
    console.print(bad.summary(), highlight=False)
    return doc


def _identity(encoder: Encoder) -> dict[str, Any]:
    """What makes two embeddings of one image comparable: the student, its width and the precision it ran at."""
    return {"identity": encoder.info.model, "dim": encoder.embed_dim, "precision": encoder.info.image.get("precision")}


def _describe(model: str, precision: Any, settings: dict[str, Any]) -> str:
    return f"{safe(model)} ({precision}, decode {settings['mode']}, exif {'on' if settings['exif'] else 'off'})"


def _previous(out: Path, encoder: Encoder, settings: dict[str, Any], console: Console) -> Index | None:
    """The index already in ``out`` whose rows this build may reuse; None when there is none (or its rows
    cannot be reused: version 1, damaged data). Another model or other settings: a one-line refusal."""
    if not (out / INDEX_JSON).is_file():
        return None
    doc = read_document(out / INDEX_JSON, IndexDoc, "index", "add --rebuild to embed every image again into it")
    was = {"identity": doc.model.identity, "dim": doc.dim, "precision": doc.model.image.get("precision")}
    now = _identity(encoder)
    same_decode = doc.decode == settings or doc.version < 2  # version 1 is embedded again anyway
    if was != now or not same_decode:
        hint = f", or pass --precision {was['precision']}" if {**was, "precision": None} == \
            {**now, "precision": None} and same_decode else ""
        raise UserError(f"index {safe(out)} was made by {_describe(doc.model.source, was['precision'], doc.decode)}"
                        f", not {_describe(encoder.info.source, now['precision'], settings)}; add --rebuild to "
                        f"embed every image again into it, or give another --out{hint}")
    if doc.version < 2:
        warn(console, f"index {out} is version 1 (no file hashes): every image is embedded again")
        return None
    try:
        return _open_data(out, doc)
    except (UserError, FileNotFoundError) as e:
        why = e if isinstance(e, UserError) else f"index {out} is damaged ({Path(str(e.filename)).name} is missing)"
        warn(console, f"{why}: every image is embedded again")
        return None


def recorded_precision(out: Path) -> str | None:
    """The precision the index in ``out`` was embedded at (None: no readable index there). Embedding into it again
    loads that precision, so a choice that measures differently today does not refuse the update."""
    try:
        doc = read_document(out / INDEX_JSON, IndexDoc, "index", "embed again")
    except (UserError, OSError):
        return None
    precision = doc.model.image.get("precision")
    return precision if isinstance(precision, str) else None


def _old_keys(old: Index | None) -> list[str]:
    return [it["path"] for it in old.items] if old is not None else []


def _reuse(manifest: Manifest, names: list[str], old: Index | None, rows: _Rows, bad: set[int]) -> list[int]:
    """Take every unchanged image's row from the previous index (same size and mtime, or else the same sha256);
    the entries left to embed, in manifest order."""
    previous = {it["path"]: (r, it) for r, it in enumerate(old.items)} if old is not None else {}
    todo, confirm = [], []
    for i, name in enumerate(names):
        if i in rows.where or i in bad:
            continue
        hit = previous.get(name)
        now = _stamp(manifest.entries[i].image)
        if hit is None or now is None:
            todo.append(i)
            continue
        r, item = hit
        was = Seen(item.get("size", -1), item.get("mtime_ns", -1), item.get("sha256"))
        if was.same_stamp(now):
            rows.where[i], rows.seen[i] = (0, r), was
        elif was.sha256 is not None:
            confirm.append((i, r, now, was.sha256))  # touched or rewritten: the bytes decide
        else:
            todo.append(i)
    hashes = _hashes([manifest.entries[i].image for i, *_ in confirm])
    for (i, r, now, want), got in zip(confirm, hashes):
        if got == want:
            rows.where[i], rows.seen[i] = (0, r), Seen(now.size, now.mtime_ns, got)
        else:
            todo.append(i)
    rows.reused = len(rows.where)
    return sorted(todo)


def _chunk_folder(out: Path, key: str) -> Path:
    """``out/.chunks`` for this build: kept when it was made for the same model and settings, else started over."""
    chunks = out / CHUNKS
    marker = chunks / "key.txt"
    if chunks.is_dir() and (not marker.is_file() or marker.read_text().strip() != key):
        shutil.rmtree(chunks)
    chunks.mkdir(exist_ok=True)
    atomic.write_text(marker, key)
    return chunks


def _resume(chunks: Path, manifest: Manifest, names: list[str], rows: _Rows, dim: int,
            console: Console) -> dict[int, str]:
    """Take the rows an interrupted build already embedded (for files unchanged since) from its chunks; a chunk
    that fails its checks is removed and its images embedded again. Returns the known unreadable entries."""
    position = {name: i for i, name in enumerate(names)}
    bad: dict[int, str] = {}
    for f in sorted(chunks.glob("chunk-*.json")):
        try:
            emb, embedded, unreadable = _read_chunk(f, dim)
        except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
            warn(console, f"discarded damaged chunk {f.name} ({type(e).__name__}: {e}); its images are embedded "
                          f"again")
            f.unlink(missing_ok=True)
            f.with_suffix(".npy").unlink(missing_ok=True)
            continue
        rows.parts.append(emb)
        for r, (name, size, mtime, sha) in enumerate(embedded):
            i = position.get(name)
            if i is not None and Seen(size, mtime).same_stamp(_stamp(manifest.entries[i].image)):
                rows.where[i], rows.seen[i] = (len(rows.parts) - 1, r), Seen(size, mtime, sha)
        for name, size, mtime, why in unreadable:
            i = position.get(name)
            if i is not None and Seen(size, mtime).same_stamp(_stamp(manifest.entries[i].image)):
                bad[i] = why
    return bad


def _read_chunk(f: Path, dim: int) -> tuple[np.ndarray, list[list[Any]], list[list[Any]]]:
    """A chunk's embeddings and records, checked: its .npy has the size and sha256 its .json records, the shape
    of its rows, finite values. Raises ValueError (or an OS error) otherwise."""
    doc = json.loads(f.read_text(encoding="utf-8"))
    npy = f.with_suffix(".npy")
    data = npy.read_bytes()
    if len(data) != doc["npy"]["size"] or sha256_bytes(data) != doc["npy"]["sha256"]:
        raise ValueError(f"{npy.name} is not the file its record names")
    emb = np.load(npy)
    embedded, unreadable = doc["items"], doc["bad"]
    if emb.dtype != np.float32 or emb.shape != (len(embedded), dim) or not np.isfinite(emb).all():
        raise ValueError(f"{npy.name} holds {emb.dtype} {emb.shape}, not {len(embedded)} finite rows of {dim}")
    if not all(isinstance(e, list) and len(e) == 4 and isinstance(e[0], str) for e in embedded + unreadable):
        raise ValueError("a record is not [path, size, mtime, sha256 or reason]")
    return emb, embedded, unreadable


def _embed_chunks(manifest: Manifest, names: list[str], todo: list[int], encoder: Encoder, chunks: Path,
                  rows: _Rows, batch: int, bad: BadImages, settings: dict[str, Any], console: Console) -> None:
    columns = [TextColumn("[bold]embed[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TimeRemainingColumn()]
    numbers = [int(f.stem.split("-")[1]) for f in chunks.glob("chunk-*.json")]
    first = max(numbers, default=-1) + 1
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("embed", total=len(todo), rate="")
        started, done = time.perf_counter(), [0]

        def tick(n: int) -> None:
            done[0] += n
            bar.update(task, advance=n, rate=f"{done[0] / max(time.perf_counter() - started, 1e-9):.1f} images/s")

        for k, s in enumerate(range(0, len(todo), CHUNK)):
            part = todo[s:s + CHUNK]
            images = [manifest.entries[i].image for i in part]
            stamps = [_stamp(im) for im in images]   # before the bytes are hashed and decoded: a later change shows
            hashes = _hashes(images)
            emb, ok, failed = _embed_images(images, encoder, batch, settings, tick)
            for p, why in failed:
                bad.add(part[p], images[p], why)
            records = [[names[part[p]], *_stamp_fields(stamps[p]), hashes[p]] for p in ok]
            unreadable = [[names[part[p]], *_stamp_fields(stamps[p]), why] for p, why in failed]
            _write_chunk(chunks, first + k, emb, records, unreadable)
            rows.parts.append(emb)
            for r, p in enumerate(ok):
                st = stamps[p] or Seen(-1, -1)
                rows.where[part[p]], rows.seen[part[p]] = (len(rows.parts) - 1, r), Seen(st.size, st.mtime_ns,
                                                                                          hashes[p])


def _stamp_fields(stamp: Seen | None) -> list[int]:
    return [stamp.size, stamp.mtime_ns] if stamp is not None else [-1, -1]  # -1: never equal to a real stamp


def _embed_images(images: list[Path | ShardMember], encoder: Encoder, batch: int, settings: dict[str, Any],
                  tick: Callable[[int], None]) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """Decode (ahead, in ``runtime.decode``) and embed ``images`` -> (embeddings, their positions, [(position,
    why unreadable)]). A non-finite embedding stops the build (UserError naming the image): nothing is kept."""
    embs, ok, failed = [], [], []
    for positions, pixels, unreadable in decoded_batches(images, encoder.preprocess, batch, decode=settings["mode"],
                                                          exif=settings["exif"]):
        failed += unreadable
        if positions:
            emb = encoder.encode_pixels(pixels, batch)
            finite = np.isfinite(emb).all(axis=1)
            if not finite.all():
                first = positions[int(np.argmin(finite))]
                raise UserError(f"the model gave NaN or infinite values for {safe(images[first])}; nothing was "
                                f"written to the index (check the export with edgedistill bench, or remove the "
                                f"image)")
            embs.append(emb)
            ok += positions
        tick(len(positions) + len(unreadable))
    emb = np.concatenate(embs) if embs else np.zeros((0, encoder.embed_dim), np.float32)
    return emb.astype(np.float32), ok, failed


def _write_chunk(chunks: Path, k: int, emb: np.ndarray, records: list[list[Any]], bad: list[list[Any]]) -> None:
    npy = chunks / f"chunk-{k:06d}.npy"
    with atomic.atomic_path(npy) as tmp, open(tmp, "wb") as f:
        np.save(f, emb.astype(np.float32))
    data = npy.read_bytes()
    atomic.write_json(chunks / f"chunk-{k:06d}.json",  # last: the chunk is done
                      {"items": records, "bad": bad, "npy": {"size": len(data), "sha256": sha256_bytes(data)}})


# ------------------------------------------------------------------------------------------------ committing

def _commit(out: Path, manifest: Manifest, names: list[str], rows: _Rows, encoder: Encoder, source: str | Path,
            settings: dict[str, Any], bad: BadImages, dropped: int) -> IndexDoc:
    """Write the data files under new names, then index.json (the commit), then remove what it no longer names."""
    order = [i for i in range(len(manifest)) if i in rows.where]
    if not order:
        raise UserError(f"{safe(source)}: none of its {len(manifest)} images could be read; nothing to index")
    part_of, row_of = np.array([[*rows.where[i]] for i in order]).T
    emb = np.empty((len(order), encoder.embed_dim), np.float32)
    for p in np.unique(part_of):
        mine = np.nonzero(part_of == p)[0]
        emb[mine] = rows.parts[p][row_of[mine]]
    items = "".join(json.dumps(_item(manifest, names, rows, out, i), ensure_ascii=False) + "\n" for i in order)
    files = {"embeddings": _write_named(out, "embeddings", lambda f: np.save(f, emb)),
             "items": _write_named(out, "items", lambda f: f.write(items.encode("utf-8")))}
    info = encoder.info
    image = {**info.image, **({"path": _recorded(str(Path(info.image["path"]).resolve()), out)}
                              if info.image.get("path") else {})}
    doc = {"version": INDEX_VERSION,
           "model": {"identity": info.model, "source": _recorded(_source_path(info.source), out), "image": image,
                     "embed_dim": encoder.embed_dim},
           "decode": settings,
           "source": {"path": _recorded(_source_path(source), out), "images": len(manifest)},
           "count": len(order), "dim": int(emb.shape[1]), "files": files,
           "update": {"embedded": int((part_of != 0).sum()), "reused": int((part_of == 0).sum()),
                      "dropped": dropped},
           "bad_images": [[p, w] for _, p, w in bad.items],
           "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    _publish(out, doc)
    _remove_unnamed(out, {f["name"] for f in files.values()})
    shutil.rmtree(out / CHUNKS, ignore_errors=True)
    return _resolved_doc(IndexDoc.model_validate(doc), out)


def _item(manifest: Manifest, names: list[str], rows: _Rows, out: Path, i: int) -> dict[str, Any]:
    e, seen = manifest.entries[i], rows.seen[i]
    item: dict[str, Any] = {"path": _recorded(names[i], out)}
    if e.captions:
        item["captions"] = list(e.captions)
    if e.label is not None:
        item["label"] = e.label
    item.update(size=seen.size, mtime_ns=seen.mtime_ns, sha256=seen.sha256)
    return item


def _write_named(out: Path, what: str, write: Callable[[Any], Any]) -> dict[str, Any]:
    """A data file named by its content (``embeddings-<sha12>.npy``): written under a temporary name (removed by
    the next run's ``exclusive_dir`` if this one is killed), synced, then renamed. Its name, sha256 and size."""
    prefix, suffix = DATA_FILES[what]
    fd, tmp_name = tempfile.mkstemp(prefix=f".{prefix}", suffix=".tmp", dir=out)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        sha = sha256_file(tmp)
        name = f"{prefix}{sha[:12]}{suffix}"
        size = tmp.stat().st_size
        os.replace(tmp, out / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"name": name, "sha256": sha, "size": size}


def _publish(out: Path, doc: dict[str, Any]) -> None:
    """The commit point: index.json replaced atomically (after the data files it names are on disk)."""
    atomic.fsync_dir(out)
    atomic.write_json(out / INDEX_JSON, doc)


def _remove_unnamed(out: Path, keep: set[str]) -> None:
    """Data files of earlier versions (and version 1's fixed names) once index.json no longer names them."""
    for prefix, suffix in DATA_FILES.values():
        for f in out.glob(f"{prefix}*{suffix}"):
            if f.name not in keep:
                f.unlink(missing_ok=True)
    for name in V1_FILES.values():
        (out / name).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ reading

def open_index(folder: str | Path) -> Index:
    """A finished index; one-line UserError when it is missing, unfinished or damaged. Only the sizes of the
    files are checked against index.json (not their hashes): searching stays cheap."""
    folder = Path(folder)
    if not (folder / INDEX_JSON).is_file():
        unfinished = " (its build was interrupted: run the same embed command again)" if (folder / CHUNKS).is_dir() \
            else ""
        raise UserError(f"{safe(folder)} is not an index{unfinished}; make one with: edgedistill embed SOURCE "
                        f"--model EXPORT --out {safe(folder)}")
    for attempt in range(3):
        before = _bytes(folder / INDEX_JSON)
        doc = read_document(folder / INDEX_JSON, IndexDoc, "index", "embed again")
        try:
            return _open_data(folder, doc)
        except FileNotFoundError as e:
            missing = Path(str(e.filename)).name
            if attempt == 2 or _bytes(folder / INDEX_JSON) == before:  # not a commit that raced this read
                break
    raise UserError(f"index {safe(folder)} is damaged ({safe(missing)}, which {INDEX_JSON} names, is missing); "
                    f"embed again")


def _bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _open_data(folder: Path, doc: IndexDoc) -> Index:
    """The data files ``doc`` names, checked (FileNotFoundError when one is missing, UserError when damaged)."""
    names = V1_FILES if doc.version < 2 else {k: f.name for k, f in doc.files.items()}
    if set(names) != set(DATA_FILES) or any(Path(n).name != n for n in names.values()):
        raise UserError(f"index {safe(folder)} is damaged (index.json does not name its two data files); "
                        f"embed again")

    def damaged(why: str) -> UserError:
        return UserError(f"index {safe(folder)} is damaged ({why}); embed again")

    for what, f in doc.files.items():
        size = (folder / f.name).stat().st_size  # FileNotFoundError: see open_index
        if size != f.size:
            raise damaged(f"{safe(f.name)} has {size} bytes, {INDEX_JSON} says {f.size}")
    try:
        emb = np.load(folder / names["embeddings"], mmap_mode="r")
        lines = (folder / names["items"]).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise damaged(f"{type(e).__name__}: {e}") from None
    items = [_read_item(line, n + 1, names["items"], damaged) for n, line in enumerate(lines)]
    if emb.shape != (doc.count, doc.dim) or len(items) != doc.count:
        raise damaged(f"{names['embeddings']} is {emb.shape}, {names['items']} has {len(items)} lines, "
                      f"{INDEX_JSON} says {doc.count} x {doc.dim}")
    if not np.isfinite(emb).all():  # a NaN row would rank as a hit with score nan
        raise damaged(f"{names['embeddings']} holds NaN or infinite values")
    for item in items:
        item["path"] = _absolute(item["path"], folder)
    return Index(folder, _resolved_doc(doc, folder), emb, items)


def _read_item(line: str, number: int, name: str, damaged: Callable[[str], UserError]) -> dict[str, Any]:
    try:
        item = json.loads(line)
    except ValueError:
        item = None
    if not isinstance(item, dict) or not isinstance(item.get("path"), str):
        raise damaged(f"{name} line {number} is not a JSON object with a string path")
    return item


def _resolved_doc(doc: IndexDoc, folder: Path) -> IndexDoc:
    """``doc`` with the model's path absolute (recorded relative when inside the index folder)."""
    doc.model.source = _absolute(doc.model.source, folder)
    return doc


def check_same_model(index: Index, encoder: Encoder) -> None:
    """An index is searched only with the student that made it (other students embed into other spaces)."""
    if index.doc.model.identity != encoder.info.model or index.doc.dim != encoder.embed_dim:
        raise UserError(f"index {safe(index.folder)} was made by another model ({safe(index.doc.model.source)}); "
                        f"search it with that model (leave --model out) or embed again with this one")


def load_like_index(idx: Index, device: str = "auto") -> Encoder:
    """The model that built ``idx`` with the image artifact and backend it used, where that backend runs here (an
    image query is then embedded exactly as the rows were); else whatever ``load`` chooses."""
    image = idx.doc.model.image
    backend = BACKENDS.get(str(image.get("backend")))
    if backend is not None and backend.missing() is None:
        try:
            return load(idx.doc.model.source, device=device, backend=backend.name, precision=image.get("precision"))
        except UserError:
            pass  # not runnable here after all (another device kind): choose afresh
    return load(idx.doc.model.source, device=device)
