"""``export.json``: what an export produced — one entry per artifact, with its hash, size, parity and accuracy.

Anything that later runs an artifact (bench, a device) checks its sha256 against this manifest first: an
engine or graph is never used on trust.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
from pathlib import Path
from typing import Any

from edgedistill import atomic
from edgedistill.errors import UserError
from edgedistill.teachers import sha256_file

MANIFEST = "export.json"
MANIFEST_VERSION = 1
TOOLS = ("edgedistill", "torch", "open_clip_torch", "timm", "onnx", "onnxruntime", "onnxruntime-gpu",
         "onnxscript", "onnxslim", "tensorrt", "torch_tensorrt")


def tool_versions() -> dict[str, str]:
    """Installed versions of the tools that shape an artifact (absent ones left out)."""
    out = {}
    for name in TOOLS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def artifact_entry(out_dir: Path, path: Path, *, name: str, encoder: str, fmt: str, precision: str,
                   **fields: Any) -> dict[str, Any]:
    """One ``artifacts`` entry for the file ``path`` inside ``out_dir`` (path stored relative to it)."""
    return {"name": name, "encoder": encoder, "format": fmt, "precision": precision,
            "path": str(Path(path).relative_to(out_dir)), "sha256": sha256_file(path),
            "size_mb": round(Path(path).stat().st_size / 2**20, 3), **fields}


def write_manifest(out_dir: Path, header: dict[str, Any], artifacts: list[dict[str, Any]]) -> Path:
    """Write ``out_dir/export.json`` atomically (last, so it only ever lists complete artifacts)."""
    doc = {"version": MANIFEST_VERSION, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           **header, "tools": tool_versions(), "artifacts": artifacts}
    path = Path(out_dir) / MANIFEST
    atomic.write_json(path, doc)
    return path


def read_manifest(export_dir: Path) -> dict[str, Any]:
    """``export.json`` of ``export_dir``; UserError when it is missing or not an export manifest."""
    path = Path(export_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{export_dir} has no {MANIFEST}; give the out folder of `edgedistill export`")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); export again") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("artifacts"), list):
        raise UserError(f"{path} is not an edgedistill export manifest (no artifacts list); export again")
    return doc


def verify_artifact(export_dir: Path, entry: dict[str, Any]) -> Path:
    """The artifact's path after checking it exists and its sha256 matches the manifest (UserError if not)."""
    path = Path(export_dir) / entry["path"]
    if not path.is_file():
        raise UserError(f"artifact {entry.get('name', entry['path'])} is missing ({path}); export again")
    digest = sha256_file(path)
    if digest != entry.get("sha256"):
        raise UserError(f"artifact {entry.get('name', entry['path'])} ({path}) does not match the sha256 in "
                        f"{MANIFEST} (changed or corrupt); export again")
    return path
