"""The scenes dataset on disk: written by several processes, whole or absent, reused when the settings match.

Layout (``write_scenes``)::

    <out>/scenes.json                      settings, held-out combos, counts (a reuse check compares settings)
    <out>/train.jsonl, val.jsonl, hard.jsonl, ood.jsonl   ordinary manifests (image, captions, label)
    <out>/hard_twins.json, ood_twins.json  [{"a": line, "b": line, "edit": type}], twins on lines 2k and 2k + 1
    <out>/images/<split>/00000.jpg         JPEG, quality 95, no chroma subsampling (colours of small objects)

Evaluation scenes are drawn in the parent process, in order (unique keys depend on the earlier draws); only
rendering and JPEG encoding go to the workers, in chunks. Every image's bytes depend on its seed alone, so the
number of workers changes nothing.
"""

from __future__ import annotations

import json
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from edgedistill.core.atomic import atomic_path, publish_dir, staging_dir, writable_dir, write_json
from edgedistill.data.scenes.captioning import caption_rng, captions
from edgedistill.data.scenes.model import HELD_OUT, SPLITS, VERSION, Scene, iid_scenes, label, make_scene
from edgedistill.data.scenes.drawing import render
from edgedistill.data.scenes.twins import twin_scenes
from edgedistill.core.errors import UserError

JPEG_OPTIONS = {"quality": 95, "subsampling": 0}
_CHUNK = 128  # images per worker task


def manifest_line(image: str, caps: list[str], lab: str) -> str:
    """One JSON Lines manifest entry, newline included."""
    return json.dumps({"image": image, "captions": caps, "label": lab}, ensure_ascii=False) + "\n"


def write_lines(path: Path, lines: Sequence[str]) -> None:
    """``lines`` as the file ``path``, written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)


def index_width(n: int) -> int:
    """Digits of the image file names of a split of ``n`` images (at least 5)."""
    return max(5, len(str(max(n - 1, 0))))


# ---------------------------------------------------------------------------------------------------- settings


def _settings(n: int, seed: int, size: int, n_val: int, n_hard: int, n_ood: int, captioned: int | None) -> dict:
    return {"version": VERSION, "n": n, "seed": seed, "size": size, "n_val": n_val, "n_hard": n_hard,
            "n_ood": n_ood, "captioned": captioned, "held_out": [f"{c} {s}" for c, s in HELD_OUT]}


def _validate(n: int, seed: int, size: int, n_val: int, n_hard: int, n_ood: int, captioned: int | None,
              workers: int) -> None:
    def whole(x: Any) -> bool:
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    if not whole(n) or n < 1:
        raise UserError(f"scenes: n must be a whole number >= 1, got {n!r}")
    if not whole(size) or not 32 <= size <= 512:
        raise UserError(f"scenes: size must be a whole number of pixels from 32 to 512, got {size!r}")
    for name, value in (("seed", seed), ("n_val", n_val), ("n_hard", n_hard), ("n_ood", n_ood), ("workers", workers)):
        if not whole(value) or value < 0:
            raise UserError(f"scenes: {name} must be a whole number >= 0, got {value!r}")
    if captioned is not None and (not whole(captioned) or not 0 <= captioned <= n):
        raise UserError(f"scenes: captioned must be a whole number from 0 to n={n}, got {captioned!r}")


def _reuse(out: Path, settings: dict) -> dict:
    info_path = out / "scenes.json"
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{out} exists and is not a scenes dataset (no readable scenes.json); "
                        f"choose another --out or delete it") from None
    differ = [f"{k}={info.get(k)!r} there, {v!r} asked" for k, v in settings.items() if info.get(k) != v]
    if differ:
        raise UserError(f"{out} holds scenes made with other settings ({'; '.join(differ)}); "
                        f"choose another --out or delete it")
    return {**info, "reused": True}


# ---------------------------------------------------------------------------------------------------- manifests


def _twin_records(pairs: list, split: str, width: int) -> tuple[list[str], list[dict]]:
    lines, twins = [], []
    for k, (base, twin, edit, s) in enumerate(pairs):
        for j, scene in enumerate((base, twin)):
            # One caption stream per pair: twins get the same phrasing and object order where the edit allows,
            # so their captions differ only by the edit.
            caps = captions(scene, caption_rng(s))
            lines.append(manifest_line(f"images/{split}/{2 * k + j:0{width}d}.jpg", caps, label(scene)))
        twins.append({"a": 2 * k, "b": 2 * k + 1, "edit": edit})
    return lines, twins


def _evaluation_splits(root: Path, st: dict) -> dict[str, list[Scene]]:
    """Draw the val, hard and ood scenes, write their manifests (and twin files) and return the scenes of each
    split in image order, for rendering."""
    seed = st["seed"]
    evals: dict[str, list[Scene]] = {}
    if st["n_val"]:
        val = iid_scenes(seed, st["n_val"])
        w = index_width(len(val))
        write_lines(root / "val.jsonl", [manifest_line(f"images/val/{i:0{w}d}.jpg", captions(sc, caption_rng(s)),
                                                       label(sc)) for i, (sc, s) in enumerate(val)])
        evals["val"] = [sc for sc, _ in val]
    for split, n_pairs in (("hard", st["n_hard"]), ("ood", st["n_ood"])):
        if n_pairs:
            pairs = twin_scenes(seed, n_pairs, ood=split == "ood")
            lines, twins = _twin_records(pairs, split, index_width(2 * n_pairs))
            write_lines(root / f"{split}.jsonl", lines)
            write_json(root / f"{split}_twins.json", twins)
            evals[split] = [sc for base, twin, _, _ in pairs for sc in (base, twin)]
    return evals


# ---------------------------------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class _Chunk:
    """Images ``start`` to ``stop`` of one split, a worker's task. Evaluation chunks carry their scenes; train
    chunks make theirs from their seeds and also return their manifest lines."""

    root: str
    split: str
    size: int
    start: int
    stop: int
    width: int
    scenes: tuple[Scene, ...] = ()  # evaluation splits
    seed: int = 0  # train
    captioned: int | None = None  # train: only images before this index keep captions


def _work(chunk: _Chunk) -> list[str]:
    """Render and save one chunk (in a worker or in-process); train chunks also return their manifest lines."""
    folder = Path(chunk.root) / "images" / chunk.split
    if chunk.split != "train":
        for i, scene in enumerate(chunk.scenes, chunk.start):
            render(scene, chunk.size).save(folder / f"{i:0{chunk.width}d}.jpg", **JPEG_OPTIONS)
        return []
    lines = []
    for i in range(chunk.start, chunk.stop):
        s = (chunk.seed, SPLITS["train"], i)
        scene = make_scene(s)
        name = f"{i:0{chunk.width}d}.jpg"
        render(scene, chunk.size).save(folder / name, **JPEG_OPTIONS)
        caps = captions(scene, caption_rng(s)) if chunk.captioned is None or i < chunk.captioned else []
        lines.append(manifest_line(f"images/{chunk.split}/{name}", caps, label(scene)))
    return lines


def _chunks(root: Path, st: dict, evals: dict[str, list[Scene]]) -> list[_Chunk]:
    """Every split's images in chunks of ``_CHUNK``, train last (its manifest is written as its chunks finish)."""
    size, n = st["size"], st["n"]
    chunks = []
    for split, scenes in evals.items():
        (root / "images" / split).mkdir(parents=True)
        w = index_width(len(scenes))
        chunks += [_Chunk(str(root), split, size, a, min(a + _CHUNK, len(scenes)), w, tuple(scenes[a:a + _CHUNK]))
                   for a in range(0, len(scenes), _CHUNK)]
    (root / "images" / "train").mkdir(parents=True)
    chunks += [_Chunk(str(root), "train", size, a, min(a + _CHUNK, n), index_width(n), seed=st["seed"],
                      captioned=st["captioned"]) for a in range(0, n, _CHUNK)]
    return chunks


def _progress_bar(console: Console | None, total: int) -> Progress | None:
    if console is None:
        return None
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=console, transient=False)
    bar.add_task("scenes", total=total)
    return bar


def _render_all(root: Path, chunks: list[_Chunk], workers: int, bar: Progress | None) -> None:
    """Run every chunk (in ``workers`` processes, or in this one for 0) and write ``train.jsonl`` from the train
    chunks' lines, in order."""
    if bar is not None:
        bar.start()
    pool = multiprocessing.Pool(workers) if workers > 0 else None
    try:
        results: Iterable[list[str]] = pool.imap(_work, chunks) if pool is not None else map(_work, chunks)
        with atomic_path(root / "train.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
            for lines, chunk in zip(results, chunks):
                f.writelines(lines)  # train chunks come last and in order (imap keeps the order)
                if bar is not None:
                    bar.advance(bar.task_ids[0], chunk.stop - chunk.start)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.stop()


def _generate(root: Path, st: dict, workers: int, console: Console | None) -> dict[str, int]:
    counts = {"train": st["n"], "val": st["n_val"], "hard": 2 * st["n_hard"], "ood": 2 * st["n_ood"]}
    # The evaluation manifests are complete before any image is drawn.
    chunks = _chunks(root, st, _evaluation_splits(root, st))
    _render_all(root, chunks, workers, _progress_bar(console, sum(counts.values())))
    return counts


def write_scenes(out: str | Path, n: int, seed: int = 0, size: int = 64, n_val: int = 1000, n_hard: int = 500,
                 n_ood: int = 500, captioned: int | None = None, workers: int = 0,
                 progress: Console | None = None) -> dict:
    """Write a scenes dataset to ``out`` (layout in the module docstring) and return its scenes.json content.

    ``n`` training images, ``n_val`` iid val images, ``n_hard`` and ``n_ood`` twin *pairs* (2 images each); a
    count of 0 skips that split. ``captioned``: only the first ``captioned`` training images keep captions (the
    rest are written with ``"captions": []``). ``workers`` > 0 renders in that many processes (same bytes).
    ``progress``: a rich Console to show a progress bar on.

    Built in a sibling ``.<out>.tmp-*`` folder renamed to ``out`` when complete, so ``out`` is whole or absent. An
    existing ``out`` with the same settings is reused as is (the result has ``"reused": True``); with other
    settings it is a UserError.
    """
    _validate(n, seed, size, n_val, n_hard, n_ood, captioned, workers)
    st = _settings(int(n), int(seed), int(size), int(n_val), int(n_hard), int(n_ood),
                   None if captioned is None else int(captioned))
    out = Path(out)
    if out.exists():
        return _reuse(out, st)
    writable_dir(out.parent, "--out's parent folder")
    with staging_dir(out) as tmp:
        counts = _generate(tmp, st, workers, progress)
        manifests = {split: f"{split}.jsonl" for split, c in counts.items() if c}
        info = {**st, "counts": {**counts, "train_captioned": n if captioned is None else int(captioned)},
                "manifests": manifests,
                "twins": {s: f"{s}_twins.json" for s in ("hard", "ood") if counts[s]}}
        write_json(tmp / "scenes.json", info)
        if not publish_dir(tmp, out):
            return _reuse(out, st)  # another process finished first: its copy is as good as ours if settings match
    return {**info, "reused": False}
