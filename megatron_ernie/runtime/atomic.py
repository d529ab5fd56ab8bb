"""Directories that appear complete or not at all: write under a temporary name, then rename."""
from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from megatron_ernie.errors import OutputExistsError

TMP_MARK = ".tmp-"


def temp_sibling(target: Path) -> Path:
    """A hidden name next to `target` (same filesystem, so the final rename is atomic)."""
    return target.parent / f".{target.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _fsync_dir(path: Path) -> None:
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


def publish(tmp: Path, target: Path, overwrite: bool = False) -> None:
    """Move a finished temporary directory to `target` (replacing it only when `overwrite`)."""
    if target.exists():
        if not overwrite:
            raise OutputExistsError(f"{target} already exists")
        old = temp_sibling(target)
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
    _fsync_dir(target.parent)


def check_target(target: str | Path, overwrite: bool = False) -> None:
    """Fail early (before any work) when `target` exists and may not be replaced (OutputExistsError,
    a FileExistsError)."""
    if Path(target).exists() and not overwrite:
        raise OutputExistsError(f"{target} already exists (choose another output or allow overwriting)")


@contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it becomes `target`, on any failure it is removed.

    An interrupted process leaves only a hidden `.<name>.tmp-*` directory: nothing that looks
    like a complete result, and `target` (if it existed) untouched.
    """
    target = Path(target)
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_dir(tmp)
        publish(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(target: str | Path, encoding: str = "utf-8"):
    """Yield a text file open for writing; on success it replaces `target` (fsynced), on any
    failure it is removed and `target` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
    try:
        with open(tmp, "x", encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
