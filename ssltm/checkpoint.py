"""Checkpoints: written atomically, loaded with checks, and the random number generator states they carry.

A checkpoint is a dict: ``model``, ``optimizer``, ``scheduler``, ``scaler``,
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

from .config import config_differences

REQUIRED_KEYS = ("model", "config", "meta")
TRAINING_KEYS = ("optimizer", "scheduler", "scaler", "iteration", "rng")
MISMATCHES_SHOWN = 3  # mismatched keys a "does not fit" error names
# Config keys that decide a model's parameter shapes: the classes (through the dataset) and the model settings.
MODEL_SHAPING_KEYS = ("data.dataset", "data.synthetic.num_classes", "model.")
NOT_MODEL_SHAPING = ("model.pretrained", "model.checkpointing")


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
    """Read a checkpoint onto the CPU, with ``torch.load(weights_only=True)`` (a file that needs more is refused:
    loading it could run arbitrary code).

    Args:
        training: also require the keys that resuming needs (optimizer, scheduler, scaler, iteration, rng).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: ``not an ssltm checkpoint: PATH (why)``: unreadable, foreign, or keys missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}" + (" (a folder)" if path.is_dir() else ""))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"not an ssltm checkpoint: {path} ({_unreadable_reason(path, err)})") from None
    required = REQUIRED_KEYS + (TRAINING_KEYS if training else ())
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        what = "a dict" if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"not an ssltm checkpoint{' to resume from' if training else ''}: {path} ({what} without {missing})"
        )
    return state


def _unreadable_reason(path: Path, err: Exception) -> str:
    # torch's own messages run to many lines and suggest weights_only=False, an unsafe load: say it briefly.
    if path.stat().st_size == 0:
        return "an empty file"
    if "Weights only load failed" in str(err):
        return "it holds Python objects besides tensors and plain values, e.g. a whole pickled model"
    if "zip archive" in str(err):
        return "a truncated or damaged file: its zip archive cannot be read"
    return "not a file torch.save wrote"


def load_weights(
    model: torch.nn.Module, ckpt: dict[str, Any], path: str | Path, config: dict[str, Any] | None = None
) -> None:
    """Load ``ckpt["model"]`` into ``model``. Keys and shapes are compared first, so a mismatch (another model
    configuration or version) is a ValueError naming the checkpoint, the first mismatched keys (with both
    shapes) and, given the current ``config`` (a plain dict), the config keys that differ from the checkpoint's
    and shape the model; the model is left untouched (``load_state_dict`` would copy the fitting tensors first).
    """
    mismatches = state_dict_mismatches(model.state_dict(), ckpt["model"])
    if mismatches:
        shown = "; ".join(mismatches[:MISMATCHES_SHOWN])
        more = f" (and {len(mismatches) - MISMATCHES_SHOWN} more)" if len(mismatches) > MISMATCHES_SHOWN else ""
        hint = _model_config_hint(ckpt.get("config"), config)
        raise ValueError(f"checkpoint {path} does not fit the model its config builds: {shown}{more}{hint}")
    model.load_state_dict(ckpt["model"])


def _model_config_hint(saved: dict[str, Any] | None, current: dict[str, Any] | None) -> str:
    """A line naming the config keys that shape the model and differ between ``saved`` and ``current``."""
    if not isinstance(saved, dict) or current is None:
        return ""
    keys = [
        k
        for k in config_differences(saved, current)
        if k.startswith(MODEL_SHAPING_KEYS) and not k.startswith(NOT_MODEL_SHAPING)
    ]
    if not keys:
        return ""
    differ = ", ".join(f"{k} ({_lookup(saved, k)!r} in the checkpoint, {_lookup(current, k)!r} now)" for k in keys[:6])
    return f"\nconfig keys that differ from the checkpoint's: {differ}{' ...' if len(keys) > 6 else ''}"


def _lookup(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
    return cfg


def state_dict_mismatches(expected: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """Every difference between a model's ``state_dict`` and a saved one, in the model's key order (then the
    saved one's): missing keys, shapes that differ, keys the model does not have."""
    out = []
    for key, value in expected.items():
        if key not in given:
            out.append(f"key {key!r} {tuple(value.shape)} is missing from the checkpoint")
        elif tuple(given[key].shape) != tuple(value.shape):
            out.append(
                f"key {key!r} has shape {tuple(given[key].shape)} in the checkpoint but {tuple(value.shape)} "
                "in the model"
            )
    out += [f"key {key!r} of the checkpoint is not in the model" for key in given if key not in expected]
    return out


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
