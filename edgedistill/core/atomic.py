"""Atomic file writes: write to a temporary name in the same folder, fsync, then rename over the target.

A crash at any point leaves either the old file or the new one, never a half-written file under the real name.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from edgedistill.core.errors import UserError


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``, on error removed.

    The caller writes the complete file to the yielded path (any library, any mode).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staging_dir(target: str | os.PathLike) -> Iterator[Path]:
    """An empty temporary folder beside ``target`` (the same file system, so it can be renamed onto it), to be
    filled and then moved into place with ``replace_dir`` or ``publish_dir``; removed on the way out if it is
    still there (an error, or nothing published)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def replace_dir(complete: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the complete folder ``complete`` to ``target``. An existing ``target`` is renamed aside first and
    deleted after, so ``target`` is at every moment the old folder or the new one, never a mix."""
    complete, target = Path(complete), Path(target)
    _sync_tree(complete)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent)) / target.name
        os.replace(target, old)
    os.replace(complete, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)


def publish_dir(complete: str | os.PathLike, target: str | os.PathLike) -> bool:
    """Move the complete folder ``complete`` to ``target`` unless ``target`` exists (another process published
    first); True when this one was published."""
    complete, target = Path(complete), Path(target)
    _sync_tree(complete)
    try:
        os.rename(complete, target)  # fails when target is a non-empty folder
    except OSError:
        if target.exists():
            return False
        raise
    fsync_dir(target.parent)
    return True


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Create the folder ``path`` (with its parents) and prove a file can be written in it, before any work that
    would be lost if the results could not be saved. One-line UserError naming ``what`` (e.g. "--out") when the
    path is a file, sits under a file, or is not writable (permissions, read-only or full file system)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what} {folder} is a file, not a folder; give a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{what} {folder} cannot be a folder: a part of that path is a file") from None
    except OSError as e:
        raise UserError(f"{what} {folder} cannot be written ({e.strerror or e}); choose a folder you can write "
                        f"to") from None
    return folder


def writable_file(path: str | os.PathLike, what: str) -> Path:
    """Check before the work that the file ``path`` can be written: not a folder, in a folder that can be written
    (created if missing). One-line UserError naming ``what`` (e.g. "--png") otherwise."""
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{what} {target} is a folder; give a file path")
    writable_dir(target.parent, what)
    return target


TEMPORARY_PATTERNS = (".*.tmp", ".*.unverified.*")  # what atomic_path and the export's staging leave when killed


@contextlib.contextmanager
def exclusive_dir(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold ``folder`` for one writer and clear the temporaries a killed writer left there.

    The lock is on the folder itself (flock on its descriptor: nothing is left behind); a second writer gets a
    one-line UserError instead of racing the first. Only this tool's temporary names are removed
    (``TEMPORARY_PATTERNS``), never a user's files.
    """
    folder = Path(folder)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another edgedistill command is writing into {what} {folder}; wait for it to finish "
                            f"or choose another folder") from None
        for pattern in TEMPORARY_PATTERNS:
            for stale in folder.glob(pattern):
                if stale.is_file():
                    stale.unlink(missing_ok=True)
        yield folder
    finally:
        os.close(fd)  # releases the lock
