"""Dataset manifests: which images, with which captions (and optionally a class label).

JSON Lines, one image a line::

    {"image": "relative/or/absolute.jpg", "captions": ["...", "..."], "label": "optional class name"}

Several captions per image are kept (retrieval Recall@K depends on them); an image may have none (it still
feeds every term that needs only images and teacher features). Extra keys are allowed (width, url, ...), but a
key that looks like a misspelt known key is an error. CSV with ``image,caption`` columns (and optionally
``label``) is read too; rows with the same image are grouped into one entry.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
from pathlib import Path
from typing import Any, Iterable


from edgedistill.data.records import Entry, Manifest
from edgedistill.data.shards import is_shard_spec, load_shards
from edgedistill.core.errors import UserError
from edgedistill.core.locations import default_cache_root

__all__ = ["Entry", "IMAGE_SUFFIXES", "Manifest", "load_folder", "load_manifest"]

KNOWN_KEYS = ("image", "captions", "label")
SUFFIXES = (".jsonl", ".csv")


def load_manifest(path: str | Path, image_root: str | Path | None = None,
                  index_dir: str | Path | None = None, folder_labels: bool = False) -> Manifest:
    """Read a .jsonl or .csv manifest; relative image paths resolve against ``image_root`` or the manifest's folder.

    Webdataset tar shards (``shards/{00000..00099}.tar``) are read too (see ``edgedistill.data.shards``); their
    index is kept in ``index_dir`` (default: ``shards/`` in the default cache root). A folder is read as its image
    files, recursively, without captions (``folder_labels``: the first subfolder is the label, ImageFolder's
    layout). Raises UserError for a missing or empty manifest, an unknown format, or a bad line (with its line
    number).
    """
    if is_shard_spec(path):
        if index_dir is None:
            index_dir = default_cache_root() / "shards"
        return load_shards(path, Path(index_dir))
    path = Path(path)
    if path.is_dir():
        return load_folder(path, folder_labels)
    if not path.is_file():
        raise UserError(f"{path} not found: neither a folder of images nor a manifest file; check the path "
                        f"(in a recipe: data.train / data.val)")
    # absolute, so the content hash (cache and teacher keys) does not depend on how the path was spelt
    root = (Path(image_root) if image_root is not None else path.parent).absolute()
    if path.suffix.lower() == ".jsonl":
        raw = _read_jsonl(path)
    elif path.suffix.lower() == ".csv":
        raw = _read_csv(path)
    else:
        raise UserError(f"manifest {path}: unknown format '{path.suffix}'; use JSON Lines (.jsonl) or CSV (.csv)")
    if not raw:
        raise UserError(f"manifest {path} has no images; each line needs at least an \"image\" path")
    seen: dict[str, int] = {}
    entries = []
    for line, image, captions, label in raw:
        if image in seen:
            raise UserError(f"manifest {path} line {line}: image '{image}' is already on line {seen[image]}; "
                            f"put all of an image's captions on one line")
        seen[image] = line
        p = Path(image).expanduser()
        entries.append(Entry(image=p if p.is_absolute() else root / p, captions=tuple(captions), label=label))
    return Manifest(path=path, entries=entries)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def load_folder(folder: Path, folder_labels: bool = False) -> Manifest:
    """The image files under ``folder`` (recursive, in sorted order; hidden files and folders skipped) as a manifest
    without captions; with ``folder_labels`` each image's label is its first subfolder (images directly in
    ``folder`` have none)."""
    root = folder.absolute()
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise UserError(f"folder {folder} holds no images ({', '.join(s[1:] for s in IMAGE_SUFFIXES)}); give a "
                        f"folder of images, a manifest (.jsonl, .csv) or webdataset shards")
    entries = [Entry(image=f, label=(f.relative_to(root).parts[0] if folder_labels and len(f.relative_to(root).parts)
                                     > 1 else None)) for f in files]
    return Manifest(path=folder, entries=entries)


Row = tuple[int, str, list[str], "str | None"]


def _bad(path: Path, line: int, why: str) -> UserError:
    return UserError(f"manifest {path} line {line}: {why}")


def _check_captions(path: Path, line: int, captions: Any) -> list[str]:
    if captions is None:
        return []
    if isinstance(captions, str):
        raise _bad(path, line, "\"captions\" must be a list of strings, e.g. [\"a dog on a beach\"]")
    if not isinstance(captions, list):
        raise _bad(path, line, f"\"captions\" must be a list of strings, not {type(captions).__name__}")
    out = []
    for i, c in enumerate(captions, 1):
        if not isinstance(c, str) or not c.strip():
            raise _bad(path, line, f"caption {i} is {'empty' if isinstance(c, str) else type(c).__name__}; "
                                   f"captions are non-empty strings")
        out.append(c.strip())
    return out


def _check_label(path: Path, line: int, label: Any) -> str | None:
    if label is None:
        return None
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise _bad(path, line, f"\"label\" must be a class name (string), not {type(label).__name__}")
    return str(label)


def _read_text(path: Path) -> str:
    """The manifest's text; a byte that is not UTF-8 is an error naming its line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad(path, data[:e.start].count(b"\n") + 1, f"not UTF-8 text (byte {data[e.start]:#04x}); save the "
                                                           f"manifest as UTF-8") from None


def _read_jsonl(path: Path) -> list[Row]:
    rows: list[Row] = []
    lines: Iterable[str] = _read_text(path).splitlines()
    for n, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise _bad(path, n, f"not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise _bad(path, n, "each line must be a JSON object like {\"image\": \"a.jpg\", \"captions\": [...]}")
        for key in obj:
            if key not in KNOWN_KEYS:
                close = difflib.get_close_matches(key, KNOWN_KEYS, n=1, cutoff=0.75)
                if close and close[0] not in obj:
                    raise _bad(path, n, f"unknown key '{key}'; did you mean '{close[0]}'?")
        image = obj.get("image")
        if not isinstance(image, str) or not image.strip():
            raise _bad(path, n, "missing \"image\" (a path to the image file)")
        rows.append((n, image.strip(), _check_captions(path, n, obj.get("captions")),
                     _check_label(path, n, obj.get("label"))))
    return rows


def _read_csv(path: Path) -> list[Row]:
    with io.StringIO(_read_text(path), newline="") as f:
        try:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            if "image" not in header or "caption" not in header:
                raise UserError(f"manifest {path}: a CSV manifest needs a header with 'image' and 'caption' "
                                f"columns (found: {', '.join(header) or 'none'})")
            grouped: dict[str, list[Any]] = {}
            for row in reader:
                n = reader.line_num
                extra, missing = row.pop(None, None) or [], [k for k, v in row.items() if v is None]
                if extra or missing:  # csv fills a short row with None and puts a long row's rest under None
                    raise _bad(path, n, f"{len(header) - len(missing) + len(extra)} fields where the header names "
                                        f"{len(header)} ({', '.join(header)}); leave a field empty with a comma "
                                        f"(img.jpg,) rather than out")
                image = (row.get("image") or "").strip()
                if not image:
                    raise _bad(path, n, "empty 'image' column")
                caption = (row.get("caption") or "").strip()
                label = (row.get("label") or "").strip() or None
                if image not in grouped:
                    grouped[image] = [n, image, [], label]
                g = grouped[image]
                if caption:
                    g[2].append(caption)
                if label is not None and g[3] is not None and label != g[3]:
                    raise _bad(path, n, f"image '{image}' has label '{label}' here but '{g[3]}' on line {g[0]}")
                g[3] = g[3] or label
        except csv.Error as e:
            raise _bad(path, reader.line_num, f"bad CSV ({e})") from None
    return [tuple(g) for g in grouped.values()]  # type: ignore[misc]
