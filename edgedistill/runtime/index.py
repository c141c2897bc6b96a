"""An embedding index: every image of a folder, manifest or set of webdataset shards embedded by a student, then
searched by text or by image (``edgedistill embed`` / ``edgedistill search``).

    INDEX/index.json      the model (student identity, artifact, backend), the source, counts, unreadable images
    INDEX/embeddings.npy  (N, D) float32, L2-normalised, one row per readable image
    INDEX/items.jsonl     one line per row: the image path, its captions and label when the source has them

It is built in chunks of ``CHUNK`` images in ``INDEX/.chunks/`` (each chunk written atomically), so an
interrupted build continues where it stopped; ``index.json`` is written last. Decoding runs in threads ahead of
inference (PIL releases the GIL while it decodes and resizes), so the two overlap. Search is exact (numpy), or
FAISS's exact inner-product index when faiss is installed and the index is large.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import edgedistill.core.atomic as atomic
import edgedistill.core.gates as gates
from edgedistill.runtime.encoder import Encoder
from edgedistill.runtime.formats import BACKENDS
from edgedistill.runtime.loader import load
from edgedistill.data.images import BadImages, open_image, why_unreadable
from edgedistill.data.manifest import load_manifest
from edgedistill.data.records import Manifest
from edgedistill.core.documents import Document, read_document
from edgedistill.core.errors import UserError
from edgedistill.core.hashing import sha256_json
from edgedistill.core.terminal import make_console

INDEX_VERSION = 1
CHUNK = 1024               # images per resumable chunk
FAISS_FROM = 200_000       # rows from which FAISS (when installed) searches instead of numpy
INDEX_JSON, EMBEDDINGS, ITEMS, CHUNKS = "index.json", "embeddings.npy", "items.jsonl", ".chunks"


class IndexModel(Document):
    identity: str                  # the student's weights sha256 (or its image artifact's when unknown)
    source: str                    # what was loaded (export folder, artifact, student folder)
    image: dict[str, Any]          # artifact, backend, precision
    embed_dim: int


class IndexDoc(Document):
    version: int
    model: IndexModel
    source: dict[str, Any]
    count: int
    dim: int
    bad_images: list[list[str]] = []


@dataclass
class Index:
    folder: Path
    doc: IndexDoc
    embeddings: np.ndarray         # (N, D) float32 (memory-mapped)
    items: list[dict[str, Any]]

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


# ------------------------------------------------------------------------------------------------ building

def read_source(source: str | Path, folder_labels: bool = False) -> Manifest:
    """A folder of images (recursive), a manifest (.jsonl, .csv) or webdataset shards, as a manifest."""
    return load_manifest(source, folder_labels=folder_labels)


def check_options(batch: int, max_bad_fraction: float) -> None:
    if batch < 1:
        raise UserError(f"--batch {batch} must be 1 or more")
    if not (gates.at_least(max_bad_fraction, 0.0) and gates.at_most(max_bad_fraction, 1.0)):  # NaN fails too
        raise UserError(f"--max-bad-fraction {max_bad_fraction} must be a number from 0 to 1")


def build_index(source: str | Path, encoder: Encoder, out: Path, batch: int = 64, max_bad_fraction: float = 0.05,
                console: Console | None = None, manifest: Manifest | None = None) -> IndexDoc:
    """Embed every image of ``source`` with ``encoder`` into the index folder ``out`` (resuming a build that was
    interrupted with the same model and source); returns what index.json says. ``manifest``: ``source`` already
    read (``read_source``)."""
    console = console or make_console(stderr=True, soft_wrap=True)
    check_options(batch, max_bad_fraction)
    manifest = manifest if manifest is not None else read_source(source)
    out = atomic.writable_dir(out, "--out")
    key = sha256_json({"model": encoder.info.model, "image": encoder.info.image, "source": manifest.content_hash()})
    with atomic.exclusive_dir(out, "--out"):
        chunks = _chunk_folder(out, key)
        bad = BadImages(len(manifest), max_bad_fraction, "embed", console, known=_known_bad(chunks))
        _embed_chunks(manifest, encoder, chunks, batch, bad, console)
        doc = _assemble(out, chunks, manifest, encoder, str(source), bad)
    console.print(bad.summary(), highlight=False)
    return doc


def _chunk_folder(out: Path, key: str) -> Path:
    """``out/.chunks`` for this build: kept when it was made for the same model and source, else started over."""
    chunks = out / CHUNKS
    marker = chunks / "key.txt"
    if chunks.is_dir() and (not marker.is_file() or marker.read_text().strip() != key):
        shutil.rmtree(chunks)
    chunks.mkdir(exist_ok=True)
    atomic.write_text(marker, key)
    return chunks


def _known_bad(chunks: Path) -> list[tuple[int, str, str]]:
    bad: list[tuple[int, str, str]] = []
    for f in sorted(chunks.glob("chunk-*.json")):
        bad += [tuple(b) for b in json.loads(f.read_text())["bad"]]  # type: ignore[misc]
    return bad


def _embed_chunks(manifest: Manifest, encoder: Encoder, chunks: Path, batch: int, bad: BadImages,
                  console: Console) -> None:
    todo = [c for c in range(0, len(manifest), CHUNK) if not (chunks / f"chunk-{c // CHUNK:06d}.json").is_file()]
    done = len(manifest) - sum(min(CHUNK, len(manifest) - c) for c in todo)
    columns = [TextColumn("[bold]embed[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("embed", total=len(manifest), completed=done, rate="")
        started, seen = time.perf_counter(), [0]

        def tick(n: int) -> None:
            seen[0] += n
            bar.update(task, advance=n, rate=f"{seen[0] / max(time.perf_counter() - started, 1e-9):.1f} images/s")

        for c in todo:
            rows = list(range(c, min(c + CHUNK, len(manifest))))
            emb, ok_rows, failed = _embed_rows(manifest, rows, encoder, batch, tick)
            for i, why in failed:
                bad.add(i, manifest.entries[i].image, why)
            _write_chunk(chunks, c // CHUNK, emb, ok_rows, [[i, str(manifest.entries[i].image), w] for i, w in failed])


def _embed_rows(manifest: Manifest, rows: list[int], encoder: Encoder, batch: int,
                tick: Any) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """One chunk: decode ahead in threads, embed batch by batch -> (embeddings, their rows, unreadable rows)."""
    embs, ok_rows, failed = [], [], []
    for batch_rows, pixels, bad_rows in decoded_batches(manifest, rows, encoder, batch):
        failed += bad_rows
        if batch_rows:
            embs.append(encoder.encode_pixels(pixels, batch))
            ok_rows += batch_rows
        tick(len(batch_rows) + len(bad_rows))
    emb = np.concatenate(embs) if embs else np.zeros((0, encoder.embed_dim), np.float32)
    return emb, ok_rows, failed


def decoded_batches(manifest: Manifest, rows: Sequence[int], encoder: Encoder, batch: int,
                    ahead: int = 2) -> Iterator[tuple[list[int], np.ndarray, list[tuple[int, str]]]]:
    """(rows, (B, 3, H, W) pixels, [(row, why unreadable)]) per batch, decoded by a thread pool ``ahead`` batches
    in advance of the consumer, so decoding overlaps inference."""
    def decode(i: int) -> np.ndarray | str:
        try:
            return encoder.preprocess.image(open_image(manifest.entries[i].image))
        except Exception as e:  # noqa: BLE001 - an unreadable image is counted, not fatal
            return why_unreadable(e)

    groups = [list(rows[s:s + batch]) for s in range(0, len(rows), batch)]
    ready: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def produce() -> None:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for group in groups:
                results = list(pool.map(decode, group))
                while not stop.is_set():
                    try:
                        ready.put((group, results), timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        ready.put(None)

    threading.Thread(target=produce, name="embed-decode", daemon=True).start()
    try:
        while (item := ready.get()) is not None:
            group, results = item
            good = [(i, r) for i, r in zip(group, results) if not isinstance(r, str)]
            pixels = np.stack([r for _, r in good]) if good else np.zeros((0,), np.float32)
            yield [i for i, _ in good], pixels, [(i, r) for i, r in zip(group, results) if isinstance(r, str)]
    finally:
        stop.set()


def _write_chunk(chunks: Path, k: int, emb: np.ndarray, rows: list[int], bad: list[list[Any]]) -> None:
    with atomic.atomic_path(chunks / f"chunk-{k:06d}.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, emb.astype(np.float32))
    atomic.write_json(chunks / f"chunk-{k:06d}.json", {"rows": rows, "bad": bad})  # last: the chunk is done


def _assemble(out: Path, chunks: Path, manifest: Manifest, encoder: Encoder, source: str, bad: BadImages) -> IndexDoc:
    parts = sorted(chunks.glob("chunk-*.json"))
    rows = [r for f in parts for r in json.loads(f.read_text())["rows"]]
    emb = np.concatenate([np.load(f.with_suffix(".npy")) for f in parts]) if parts else \
        np.zeros((0, encoder.embed_dim), np.float32)
    if not rows:
        raise UserError(f"{source}: none of its {len(manifest)} images could be read; nothing to index")
    with atomic.atomic_path(out / EMBEDDINGS) as tmp, open(tmp, "wb") as f:
        np.save(f, emb)
    atomic.write_text(out / ITEMS, "".join(json.dumps(_item(manifest, r)) + "\n" for r in rows))
    info = encoder.info
    doc = {"version": INDEX_VERSION,
           "model": {"identity": info.model, "source": info.source, "image": info.image,
                     "embed_dim": encoder.embed_dim},
           "source": {"path": source, "images": len(manifest)}, "count": len(rows), "dim": int(emb.shape[1]),
           "bad_images": [[p, w] for _, p, w in bad.items],
           "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    atomic.write_json(out / INDEX_JSON, doc)
    shutil.rmtree(chunks, ignore_errors=True)
    return IndexDoc.model_validate(doc)


def _item(manifest: Manifest, row: int) -> dict[str, Any]:
    e = manifest.entries[row]
    item: dict[str, Any] = {"path": str(e.image)}
    if e.captions:
        item["captions"] = list(e.captions)
    if e.label is not None:
        item["label"] = e.label
    return item


# ------------------------------------------------------------------------------------------------ reading

def open_index(folder: str | Path) -> Index:
    """A finished index; one-line UserError when it is missing, unfinished or damaged."""
    folder = Path(folder)
    if not (folder / INDEX_JSON).is_file():
        unfinished = " (its build was interrupted: run the same embed command again)" if (folder / CHUNKS).is_dir() \
            else ""
        raise UserError(f"{folder} is not an index{unfinished}; make one with: edgedistill embed SOURCE --model "
                        f"EXPORT --out {folder}")
    doc = read_document(folder / INDEX_JSON, IndexDoc, "index", "embed again")
    try:
        emb = np.load(folder / EMBEDDINGS, mmap_mode="r")
        items = [json.loads(line) for line in (folder / ITEMS).read_text(encoding="utf-8").splitlines()]
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"index {folder} is damaged ({type(e).__name__}: {e}); embed again") from None
    if emb.shape != (doc.count, doc.dim) or len(items) != doc.count:
        raise UserError(f"index {folder} is damaged ({EMBEDDINGS} is {emb.shape}, {ITEMS} has {len(items)} lines, "
                        f"{INDEX_JSON} says {doc.count} x {doc.dim}); embed again")
    if not np.isfinite(emb).all():  # a NaN row would rank as a hit with score nan
        raise UserError(f"index {folder} is damaged ({EMBEDDINGS} holds NaN or infinite values); embed again")
    return Index(folder, doc, emb, items)


def check_same_model(index: Index, encoder: Encoder) -> None:
    """An index is searched only with the student that made it (other students embed into other spaces)."""
    if index.doc.model.identity != encoder.info.model or index.doc.dim != encoder.embed_dim:
        raise UserError(f"index {index.folder} was made by another model ({index.doc.model.source}); search it with "
                        f"that model (leave --model out) or embed again with this one")


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
