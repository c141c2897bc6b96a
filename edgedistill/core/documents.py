"""JSON documents the tool writes and reads back later (export.json, summary.json, bench.json, a remote bench's
bundle): each is read through a pydantic model, so a damaged or hand-edited file is one line naming the bad field
and the fix, never a traceback deep inside the command that trusted it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from edgedistill.core.errors import UserError

M = TypeVar("M", bound=BaseModel)


class Document(BaseModel):
    """A document's checked fields; the fields it does not name are kept as they are (newer writers add some)."""
    model_config = ConfigDict(extra="allow")


def read_document(path: Path, model: type[M], what: str, fix: str) -> M:
    """``path`` parsed as JSON and validated by ``model``; UserError "<what> <path> ...; <fix>" otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found; {fix}")
    try:
        raw: Any = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{what} {path} cannot be read ({e.strerror or e}); {fix}") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not a UTF-8 text file; {fix}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno}); {fix}") from None
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(the document)"
        got = err.get("input")
        shown = f" (got {got!r:.60})" if not isinstance(got, (dict, list)) else ""
        raise UserError(f"{what} {path}: field '{where}': {err['msg']}{shown}; {fix}") from None


class RunSummary(Document):
    """``RUN/summary.json``, written by distill at the end of a run."""
    steps: int = 0
    teacher: dict[str, float] | None = None
    student: dict[str, float] | None = None
    retention: dict[str, float] | None = None


class BenchReport(Document):
    """``bench.json``: read back when a remote target sends its report home."""
    device_line: str
    conditions: dict[str, Any]
    rows: list[dict[str, Any]]
    failures: list[dict[str, Any]] = []


class BundleTeacher(Document):
    """``teacher/teacher.json`` of a remote-bench bundle: the teacher's scores and preprocessing."""
    name: str | None = None
    metrics: dict[str, float] | None = None
    preprocess: dict[str, Any] | None = None
    onnx: str | None = None


class BundleContext(Document):
    """``bench_context.json`` of a remote-bench bundle."""
    prompt: str | None = None
