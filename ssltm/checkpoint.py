"""Checkpoints: written atomically, loaded with checks, and the random number generator states they carry.

A checkpoint is a dict (ARCHITECTURE.md §3.4): ``model``, ``optimizer``, ``scheduler``, ``scaler``,
``iteration``, ``rng`` (one entry per process), ``config`` (plain dict), ``meta`` (classes, palette,
versions) and ``train_state`` (elapsed time, best validation result). Only tensors and plain Python
values, so that ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

REQUIRED_KEYS = ("model", "config", "meta")
TRAINING_KEYS = ("optimizer", "scheduler", "scaler", "iteration", "rng")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically: a kill at any moment leaves either the old file or the new one.

    The bytes go to a temporary file in the same folder, which is flushed to disk and then renamed over
    ``path`` (``os.replace`` is atomic on POSIX and Windows).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def link_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Make ``dst`` (e.g. ``latest.pt``) the same file as ``src``, atomically, without copying where the
    file system allows a hard link."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:  # no hard links here (some network or FAT file systems): copy instead
            with open(src, "rb") as a, open(tmp, "wb") as b:
                while chunk := a.read(1 << 24):
                    b.write(chunk)
                b.flush()
                os.fsync(b.fileno())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(dst.parent)
    return dst


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not possible on every platform, and harmless to skip there.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, training: bool = False) -> dict[str, Any]:
    """Read a checkpoint onto the CPU.

    Args:
        training: also require the keys that resuming needs (optimizer, scheduler, scaler, iteration, rng).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a checkpoint of this package (unreadable, or keys missing).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err
    required = REQUIRED_KEYS + (TRAINING_KEYS if training else ())
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path} is not an ssltm checkpoint{' to resume from' if training else ''}: missing {missing}")
    return state


def load_weights(model: torch.nn.Module, ckpt: dict[str, Any], path: str | Path) -> None:
    """Load ``ckpt["model"]`` into ``model``. Keys and shapes are compared first, so a mismatch (another model
    configuration or version) is a ValueError naming the checkpoint and the first mismatched key (with both
    shapes), and the model is left untouched (``load_state_dict`` would copy the fitting tensors first)."""
    mismatch = state_dict_mismatch(model.state_dict(), ckpt["model"])
    if mismatch:
        raise ValueError(f"checkpoint {path} does not fit the model its config builds: {mismatch}")
    model.load_state_dict(ckpt["model"])


def state_dict_mismatch(expected: dict[str, Any], given: dict[str, Any]) -> str | None:
    """The first difference between a model's ``state_dict`` and a saved one, in the model's key order
    (then the saved one's), or None when every key and shape agrees."""
    for key, value in expected.items():
        if key not in given:
            return f"key {key!r} {tuple(value.shape)} is missing from the checkpoint"
        if tuple(given[key].shape) != tuple(value.shape):
            return (f"key {key!r} has shape {tuple(given[key].shape)} in the checkpoint but {tuple(value.shape)} "
                    "in the model")
    unexpected = [key for key in given if key not in expected]
    return f"key {unexpected[0]!r} of the checkpoint is not in the model" if unexpected else None


def rng_state() -> dict[str, Any]:
    """The states of every random number generator a training step may draw from."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {**np_state, "state": {k: _to_torch(v) for k, v in np_state["state"].items()}},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state({**np_state, "state": {k: _to_numpy(v) for k, v in np_state["state"].items()}})
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _to_torch(value: Any) -> Any:
    return torch.from_numpy(value.astype(np.int64)) if isinstance(value, np.ndarray) else value


def _to_numpy(value: Any) -> Any:
    return value.numpy().astype(np.uint32) if isinstance(value, torch.Tensor) else value
