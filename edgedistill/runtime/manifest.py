"""``export.json``: what an export produced — one entry per artifact, with its hash, size, parity and accuracy.

Anything that later runs an artifact (bench, a device) checks its sha256 against this manifest first: an
engine or graph is never used on trust.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
from pathlib import Path
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

import edgedistill.core.atomic as atomic
from edgedistill.core.documents import Document, read_document
from edgedistill.core.errors import UserError
from edgedistill.core.hashing import sha256_file
from edgedistill.runtime.formats import FORMATS

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


class Artifact(Document):
    """One ``artifacts`` entry: what bench and a device need before they trust the file."""
    name: str
    encoder: Literal["image", "text"]
    format: str
    precision: str
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_mb: float | None = None

    @model_validator(mode="after")
    def _a_precision_its_format_holds(self) -> "Artifact":
        fmt = FORMATS.get(self.format)
        if fmt is not None and self.precision not in fmt.precisions:
            raise ValueError(f"a {self.format} artifact holds {', '.join(fmt.precisions)}, not {self.precision}")
        return self

    @field_validator("path")
    @classmethod
    def _inside_the_export(cls, v: str) -> str:
        p = PurePosixPath(v)
        if p.is_absolute() or ".." in p.parts or not v:
            raise ValueError("must be a path inside the export folder")
        return v


class ExportManifest(Document):
    version: int
    artifacts: list[Artifact]
    preprocess: dict[str, Any]
    embed_dim: int | None = None
    tokenizer: dict[str, Any] | None = None
    batch_profile: list[int] | None = None
    val: dict[str, Any] | None = None
    run_dir: str | None = None
    probe: dict[str, Any] | None = None


def read_manifest(export_dir: Path) -> dict[str, Any]:
    """``export.json`` of ``export_dir``, checked against its schema; one-line UserError naming a bad field."""
    path = Path(export_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{export_dir} has no {MANIFEST}; give the out folder of `edgedistill export`")
    doc = read_document(path, ExportManifest, "export manifest", "export again")
    return doc.model_dump(mode="json")


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
