"""Output paths: checked for writability before the work starts, and folders that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from . import distributed as dist


def check_output_file(path: str | Path, arg: str) -> Path:
    """Raise a ValueError naming ``arg`` unless a file can be written at ``path`` (its folders may not exist yet)."""
    return _check_writable(Path(path), arg, folder=False)


def check_output_folder(path: str | Path, arg: str) -> Path:
    """Raise a ValueError naming ``arg`` unless ``path`` is a folder, or one can be made there, to write in."""
    return _check_writable(Path(path), arg, folder=True)


def check_replaceable_folder(
    path: str | Path, arg: str, is_output: Callable[[Path], bool], earlier: str = "an earlier run's output"
) -> Path:
    """:func:`check_output_folder`, and a ValueError naming ``arg`` if the folder holds an entry that
    ``is_output`` does not take for ``earlier`` output (the error's words): the folder is replaced whole
    (:func:`staged_folder`), so anything else in it would be lost."""
    path = check_output_folder(path, arg)
    if path.is_dir():
        others = sorted(p.name for p in path.iterdir() if not is_output(p))
        if others:
            raise ValueError(
                f"{arg}: {path} holds other files than {earlier} ({', '.join(others[:3])}"
                f"{', ...' if len(others) > 3 else ''}); give a new or empty folder"
            )
    return path


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
def staged_folder(target: str | Path, shared: bool = False) -> Iterator[Path]:
    """A fresh folder beside ``target`` to write into; when the block succeeds it is renamed to ``target``
    (replacing what was there), when it fails (an error, Ctrl-C) it is removed: ``target`` is never half written.

    ``shared=True``, under ``torchrun``: every process enters the block with the same folder (the first process
    makes it), and the first process renames it once all have left the block.
    """
    target = Path(target)
    main = not shared or not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    if main:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed run of the same process id
        staging.mkdir()
    if shared:
        staging = dist.broadcast_object(staging)
    try:
        yield staging
    except BaseException:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if shared:
        dist.barrier()
    if not main:
        return
    if target.exists():
        old = target.with_name(f".{target.name}.{os.getpid()}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old)
    else:
        os.replace(staging, target)
