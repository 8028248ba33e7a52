"""Output paths: checked for writability before the work starts, and folders that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def check_output_file(path: str | Path, arg: str) -> Path:
    """Raise a ValueError naming ``arg`` unless a file can be written at ``path`` (its folders may not exist yet)."""
    return _check_writable(Path(path), arg, folder=False)


def check_output_folder(path: str | Path, arg: str) -> Path:
    """Raise a ValueError naming ``arg`` unless ``path`` is a folder, or one can be made there, to write in."""
    return _check_writable(Path(path), arg, folder=True)


def _check_writable(path: Path, arg: str, folder: bool) -> Path:
    if path.exists() and path.is_dir() != folder:
        raise ValueError(f"{arg}: {path} is {'a file, not a folder' if folder else 'a folder, not a file'}")
    existing = path if path.is_dir() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{arg}: cannot create {path}: {existing} is a file, not a folder")
    try:  # writing a file tells what permissions alone do not (a read-only file system, a full quota)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ValueError(f"{arg}: cannot write to {path}: {existing}: {err.strerror}") from None
    if path.is_file() and not os.access(path, os.W_OK):
        raise ValueError(f"{arg}: cannot write to {path}: the file is read-only")
    return path


@contextlib.contextmanager
def staged_folder(target: str | Path) -> Iterator[Path]:
    """A fresh folder beside ``target`` to write into; when the block succeeds it is renamed to ``target``
    (replacing what was there), when it fails (an error, Ctrl-C) it is removed: ``target`` is never half written.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run of the same process id
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.{os.getpid()}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old)
    else:
        os.replace(staging, target)
