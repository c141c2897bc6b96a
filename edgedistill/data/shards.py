"""Webdataset tar shards (the layout img2dataset writes) as a training or val split.

``data.train: "shards/{00000..00099}.tar"`` names uncompressed tar shards by a brace pattern (webdataset's
notation; ``::`` joins several patterns). Members are grouped into samples by key, webdataset's rule
(``00042.jpg``, ``00042.txt``, ``00042.json`` are the sample ``00042``): one image (jpg, jpeg, png or webp), its
captions from ``txt`` and/or ``json`` (``caption`` or ``captions``; img2dataset writes both, kept once), and an
optional label (``json`` ``label``, or a ``cls`` member). A sample without an image is skipped.

Decision: the shards are indexed once and read by offset, not streamed through a shuffle buffer. The first use
scans each shard's tar headers (no image is decoded) and stores, per sample, the byte offset and size of its
image, its captions and label, in ``<cache root>/shards/<name>__<key>.jsonl``, keyed by the shard list and the
shards' sizes. The split is then a ``Manifest`` like a JSON Lines one whose images are ``ShardMember``s, so
everything built on manifests works unchanged: the teacher feature cache (keyed by the same shard list and
sizes), shuffling over the whole dataset with a seeded permutation per epoch, exact resume, and the deterministic
split of each global batch over the ranks of a distributed run — a shuffle buffer gives none of those. The cost:
each image read is a seek, so the shards must sit on a file system (local disk, NFS, Lustre); ``pipe:`` and
object-store URLs are refused. The cache build reads the shards in order, chunk after chunk: a sequential stream.
Shards rewritten in place with the same sizes keep the old index and cache: delete the index and use
``edgedistill cache --rebuild``.
"""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from braceexpand import braceexpand

import edgedistill.core.atomic as atomic
from edgedistill.data.records import Entry, Manifest
from edgedistill.core.errors import UserError
from edgedistill.core.hashing import sha256_json

INDEX_VERSION = 1
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # first found wins


@dataclass(frozen=True)
class ShardMember:
    """An image stored in a tar shard: where its bytes are. Picklable, so data loader workers can read it."""
    shard: str
    name: str
    offset: int   # byte offset of the member's data in the shard
    size: int

    def __str__(self) -> str:
        return f"{self.shard}/{self.name}"

    def read_bytes(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"shard truncated: {len(data)} of {self.size} bytes")
        return data


def is_shard_spec(path: str | Path) -> bool:
    """Whether a data.train / data.val value names tar shards rather than a manifest file."""
    text = str(path)
    return bool(re.search(r"\.(tar|tar\.gz|tgz)(::|$)", text) or ("{" in text and ".tar" in text))


def shard_paths(spec: str | Path) -> list[Path]:
    """The shard files a pattern names, in order; a UserError for object-store URLs, compressed or missing shards."""
    text = str(spec)
    if re.match(r"^([A-Za-z][A-Za-z0-9+.-]*://|pipe:)", text):
        raise UserError(f"{text}: shards are read by offset, so they must be files on a mounted file system "
                        f"(local disk, NFS, Lustre), not URLs; copy or mount them")
    paths = [Path(p).expanduser() for part in text.split("::") for p in braceexpand(part)]
    for p in paths:
        if p.name.endswith((".tar.gz", ".tgz")):
            raise UserError(f"shard {p} is compressed; use uncompressed .tar shards (img2dataset's default), which "
                            f"can be read by offset")
        if not p.is_file():
            raise UserError(f"shard {p} not found ({len(paths)} shards in {text}); check data.train / data.val")
    return paths


def split_key(name: str) -> tuple[str | None, str | None]:
    """webdataset's sample key and member suffix of a tar member name: ``dir/00042.seg.jpg`` -> ``dir/00042``,
    ``seg.jpg`` (the key ends at the first dot of the file name); (None, None) for a name without one."""
    match = _KEY.match(name)
    return (match.group(1), match.group(2)) if match else (None, None)


_KEY = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


def index_key(paths: list[Path]) -> str:
    """sha256 of the shard list and each shard's size: what the index and the teacher feature cache are keyed by."""
    listing = [[str(p.resolve()), p.stat().st_size] for p in paths]
    return sha256_json([INDEX_VERSION, listing])


def _text(tf: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    f = tf.extractfile(member)
    return f.read().decode("utf-8", errors="replace") if f is not None else ""


def _scan(shard: Path) -> list[list[Any]]:
    """One shard's samples: [member name, offset, size, captions, label], in tar order."""
    samples: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(shard, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = split_key(m.name)
                if key is None or Path(m.name).name.startswith("."):
                    continue
                s = samples.setdefault(key, {"captions": [], "label": None})
                ext = ext.lower()
                if ext in IMAGE_EXTS and "image" not in s:
                    s["image"] = (m.name, m.offset_data, m.size)
                elif ext == "txt":
                    s["captions"].insert(0, _text(tf, m).strip())
                elif ext == "cls":
                    s["label"] = s["label"] or _text(tf, m).strip() or None
                elif ext == "json":
                    try:
                        meta = json.loads(_text(tf, m))
                    except json.JSONDecodeError:
                        continue
                    if isinstance(meta, dict):
                        caps = meta.get("captions")
                        caps = caps if isinstance(caps, list) else [meta.get("caption")]
                        s["captions"] += [c.strip() for c in caps if isinstance(c, str)]
                        if meta.get("label") is not None and not isinstance(meta["label"], (dict, list)):
                            s["label"] = str(meta["label"])
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"shard {shard} is not a readable tar file ({e}); check or rewrite it") from None
    out = []
    for s in samples.values():
        if "image" in s:
            captions = list(dict.fromkeys(c for c in s["captions"] if c))  # img2dataset: txt == json caption
            out.append([*s["image"], captions, s["label"]])
    return out


def load_shards(spec: str | Path, index_dir: Path) -> Manifest:
    """The shards ``spec`` names as a Manifest, from the stored index or by indexing them now."""
    paths = shard_paths(spec)
    key = index_key(paths)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(str(spec)).name)[:48]
    index = Path(index_dir) / f"{slug}__{key[:16]}.jsonl"
    rows = _read_index(index, key)
    if rows is None:
        rows = []
        for i, shard in enumerate(paths):
            rows += [[i, *sample] for sample in _scan(shard)]
        header = {"version": INDEX_VERSION, "key": key, "shards": [str(p) for p in paths], "samples": len(rows)}
        atomic.write_text(index, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [header, *rows]))
    if not rows:
        raise UserError(f"{spec}: no samples with an image ({'/'.join(IMAGE_EXTS)}) in {len(paths)} shards")
    entries = [Entry(image=ShardMember(str(paths[i]), name, offset, size), captions=tuple(captions), label=label)
               for i, name, offset, size, captions, label in rows]
    return Manifest(path=Path(str(spec)), entries=entries, _hash=f"shards:{key}")


def _read_index(index: Path, key: str) -> list[list[Any]] | None:
    """The samples of a stored index with this key, or None (missing, another key, or cut short)."""
    try:
        lines = index.read_text(encoding="utf-8").splitlines()
        header = json.loads(lines[0])
        if header.get("key") != key or header.get("samples") != len(lines) - 1:
            return None
        return [json.loads(line) for line in lines[1:]]
    except (OSError, IndexError, json.JSONDecodeError, AttributeError):
        return None
