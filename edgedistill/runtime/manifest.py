"""``export.json``: what an export produced — one entry per artifact, with its hash, size, parity and accuracy.

Anything that later runs an artifact (bench, a device) checks its sha256 against this manifest first: an
engine or graph is never used on trust.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
from pathlib import Path
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import AfterValidator, ConfigDict, Field, model_validator

import edgedistill.core.atomic as atomic
from edgedistill.core.documents import Document, read_document
from edgedistill.core.errors import UserError
from edgedistill.core.hashing import sha256_file
from edgedistill.core.terminal import safe
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


class DamagedBundle(UserError):
    """A file of the export is wrong (outside it, changed, or not what it should hold): an error to fix, never a
    candidate that quietly fails to measure."""


# A relative path with no "..": where a bundle file may be listed (docs/runtime.md#what-load-trusts).
def _bundle_path(v: str) -> str:
    p = PurePosixPath(v)
    if not v or p.is_absolute() or ".." in p.parts or "\\" in v or "\x00" in v:
        raise ValueError("must be a path inside the export folder (relative, no '..')")
    return v


BundlePath = Annotated[str, AfterValidator(_bundle_path)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Count = Annotated[int, Field(ge=0)]
Size = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Bundled(Document):
    """A part of export.json: strict, so a string where a number belongs is refused, not converted."""
    model_config = ConfigDict(extra="allow", strict=True)


Percent = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]


class Scores(Bundled):
    """An artifact's val scores (percent): what bench reports and the choice compare against."""
    i2t_r1: Percent | None = None
    i2t_r5: Percent | None = None
    i2t_r10: Percent | None = None
    t2i_r1: Percent | None = None
    t2i_r5: Percent | None = None
    t2i_r10: Percent | None = None
    rsum: Annotated[float, Field(ge=0, le=600, allow_inf_nan=False)] | None = None
    zs_top1: Percent | None = None
    zs_mean_class: Percent | None = None


class Artifact(Bundled):
    """One ``artifacts`` entry: what bench and a device need before they trust the file."""
    name: str
    encoder: Literal["image", "text"]
    format: str
    precision: str
    path: BundlePath
    sha256: Sha256
    size_mb: Size | None = None
    prompts: BundlePath | None = None        # a text table (format npy): its prompts file, one a line
    prompts_sha256: Sha256 | None = None
    count: Count | None = None
    val: Scores | None = None
    val_pytorch_fp32: Scores | None = None
    val_r1_drop: Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)] | None = None

    @model_validator(mode="after")
    def _a_precision_its_format_holds(self) -> "Artifact":
        fmt = FORMATS.get(self.format)
        if fmt is not None and self.precision not in fmt.precisions:
            raise ValueError(f"a {self.format} artifact holds {', '.join(fmt.precisions)}, not {self.precision}")
        return self


class TokenizerEntry(Bundled):
    """``tokenizer``: the folder of runtime.tokenizer's files and each file's sha256 (``open_clip`` only says where
    the export found it, and is never read)."""
    folder: BundlePath = "tokenizer"
    files: dict[Annotated[str, Field(pattern=r"^[^/\\]+$")], Sha256] = {}
    context_length: Annotated[int, Field(ge=2)] | None = None


class ProbeFile(Bundled):
    path: BundlePath
    sha256: Sha256


class ProbeEntry(Bundled):
    images: Count = 0
    captions: Count = 0
    files: dict[str, ProbeFile] = {}


class ExportManifest(Bundled):
    version: int
    artifacts: list[Artifact]
    preprocess: dict[str, Any]
    embed_dim: Annotated[int, Field(ge=1)]
    tokenizer: TokenizerEntry | None = None
    batch_profile: list[Annotated[int, Field(ge=1)]] | None = None
    val: dict[str, Any] | None = None
    run_dir: str | None = None
    probe: ProbeEntry | None = None


def read_manifest(export_dir: Path) -> dict[str, Any]:
    """``export.json`` of ``export_dir``, checked against its schema; one-line UserError naming a bad field."""
    path = Path(export_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{export_dir} has no {MANIFEST}; give the out folder of `edgedistill export`")
    doc = read_document(path, ExportManifest, "export manifest", "export again")
    return doc.model_dump(mode="json")


def bundle_file(export_dir: Path, relative: str, what: str) -> Path:
    """``export_dir / relative`` once it is known to stay inside the export folder, symlinks resolved; UserError
    naming ``what`` (the export.json field) otherwise."""
    _bundle_path_or_error(export_dir, relative, what)
    path = Path(export_dir) / relative
    root = Path(export_dir).resolve()
    if not path.resolve().is_relative_to(root):
        raise DamagedBundle(f"{Path(export_dir) / MANIFEST}: {what} {safe(relative)} leads outside the export "
                            f"folder (a symbolic link to {safe(path.resolve())}); a bundle holds its own files: "
                            f"export again")
    return path


def _bundle_path_or_error(export_dir: Path, relative: Any, what: str) -> None:
    try:
        _bundle_path(relative if isinstance(relative, str) else "")
    except ValueError:
        raise DamagedBundle(f"{Path(export_dir) / MANIFEST}: {what} {safe(relative)!s:.80} is not a path inside "
                            f"the export folder (relative, no '..'); export again") from None


def verify_file(export_dir: Path, relative: str, sha256: str | None, what: str) -> Path:
    """The bundle file's path after checking it is inside the export, exists and matches ``sha256`` (UserError
    naming ``what`` if not; a file with no recorded sha256 cannot be trusted either)."""
    path = bundle_file(export_dir, relative, what)
    if not path.is_file():
        raise DamagedBundle(f"{what} {safe(path)} is missing; export again")
    if not sha256:
        raise DamagedBundle(f"{Path(export_dir) / MANIFEST} records no sha256 for {what} {safe(relative)}, so "
                            f"it cannot be checked; export again")
    if sha256_file(path) != sha256:
        raise DamagedBundle(f"{what} {safe(path)} does not match the sha256 in {MANIFEST} (changed or "
                            f"corrupt); export again")
    return path


def verify_artifact(export_dir: Path, entry: dict[str, Any]) -> Path:
    """The artifact's path after checking it exists and its sha256 matches the manifest (UserError if not)."""
    return verify_file(export_dir, entry.get("path"), entry.get("sha256"),  # type: ignore[arg-type]
                       f"artifact {entry.get('name', entry.get('path'))}")


def read_array(path: Path, what: str, kinds: str, ndim: int) -> np.ndarray:
    """A ``.npy`` bundle file without pickle, checked to hold a numeric array of ``ndim`` dimensions whose dtype
    kind is one of ``kinds`` ("f" float, "i" signed int, "u" unsigned int), finite where float; UserError else."""
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # object arrays, damaged headers, truncated data
        reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise DamagedBundle(f"{what} {safe(path)} is not a plain numpy array ({reason}); export again") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in kinds or array.ndim != ndim:
        raise DamagedBundle(f"{what} {safe(path)} holds a {getattr(array, 'ndim', '?')}-D "
                            f"{getattr(array, 'dtype', '?')} array; it should be {ndim}-D of kind {kinds!r}: "
                            f"export again")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise DamagedBundle(f"{what} {safe(path)} holds NaN or infinite values; export again")
    return array
