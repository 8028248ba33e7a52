"""Your own videos as folders of frames with masks for some of them (``data.dataset: folder``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .base import (
    SplitClipDataset,
    VideoFiles,
    config_root,
    natural_order,
    read_label_png,
    read_split_file,
    require_dir,
)
from .transforms import IGNORE_INDEX

CLASS_FILE = "classes.json"
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
_CLASS_KEYS = ("names", "palette", "ignore", "mapping")


class VideoFolder(SplitClipDataset):
    """Videos stored as folders of frames, any subset of them labelled; one sample per labelled frame.

    Layout::

        ROOT/classes.json              {"names": [...], "palette": [[r, g, b], ...], "ignore": 255,
                                        "mapping": {"<raw mask value>": <class id>, ...}}
        ROOT/<split>.txt               one video name a line
        ROOT/<video>/frames/*.jpg|png  the frames, in the natural order of their names (f_2 before f_10)
        ROOT/<video>/masks/*.png       one-channel or palette PNGs, each named as its frame (same stem)

    ``classes.json``: ``names`` (required) the class names, class id ``k`` being ``names[k]``; ``palette``
    (optional) one RGB colour per class; ``ignore`` (optional, default 255) the raw mask value of pixels
    to ignore; ``mapping`` (optional, default raw ``k`` is class ``k``) the raw mask values that are
    classes. A raw value neither in ``mapping`` nor ``ignore`` stops the run, naming the mask and the value
    (checked as each mask is read).

    Frames without a mask are no samples but still serve as adjacent and reference frames of the
    labelled ones, and are the queries of :class:`~ssltm.data.UnlabeledClips` (a video without any mask too).
    Errors name the path: a missing ``classes.json`` or split file, a listed video
    without ``frames/`` or with no frames, a mask whose name matches no frame.

    Args:
        root: the dataset's folder ``ROOT``.
        split: a split name, read from ``ROOT/<split>.txt``.
        reference: as in :class:`~ssltm.data.SplitClipDataset` (``"farthest"`` on ``"val"`` and ``"test"``).
        offsets, causal, transform, seed, strong_reference: see :class:`~ssltm.data.ClipDataset`.
        labels: ``False`` reads no masks and makes every frame a query (a split to predict).
    """

    @classmethod
    def metainfo(cls, cfg: Any) -> dict[str, Sequence]:
        classes = read_classes(config_root(cfg))
        return {"classes": classes.names, "palette": classes.palette}

    def _scan(self) -> None:
        require_dir(self.root, "folder dataset root")
        classes = read_classes(self.root)
        self.num_classes = len(classes.names)
        self.label_lut, self.known = classes.lut, classes.known
        split_file = self.root / f"{self.split}.txt"
        for name in read_split_file(split_file, "split file"):
            video = _scan_video(self.root / name, name, split_file, self.labels)
            v = len(self.videos)
            self.videos.append(video)
            frames = range(len(video.images)) if not self.labels else sorted(video.labels)
            self.queries.extend((v, t) for t in frames)
        if not self.queries:
            raise FileNotFoundError(
                f"no video of {split_file} has a mask (ROOT/<video>/masks/<frame>.png); a split without labels "
                "can be predicted with ssltm eval --predict-only"
            )

    def read_label(self, video: int, index: int) -> np.ndarray:
        path = self.videos[video].labels[index]
        raw = read_label_png(path)
        unknown = ~self.known[raw]
        if unknown.any():
            values = np.unique(raw[unknown])
            raise MaskValueError(
                f"mask {path} has value(s) {values[:8].tolist()} that {self.root / CLASS_FILE} does not know: "
                "neither in its mapping nor its ignore value"
            )
        return self.label_lut[raw]


class MaskValueError(ValueError):
    """A mask value that ``classes.json`` does not know. The message stays one line when a DataLoader worker's
    error is raised again in the main process (torch passes the worker's whole traceback as the message)."""

    def __init__(self, message: str):
        if "\nOriginal Traceback" in message:
            message = message.rstrip().splitlines()[-1].partition(": ")[2]
        super().__init__(message)


@dataclass(frozen=True)
class Classes:
    """The content of ``classes.json``: class names, palette (or None), and the tables from raw mask values
    (``lut``: uint8 ``(256,)`` to class ids / 255; ``known``: bool ``(256,)``, the values in the mapping or
    ignored)."""

    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...] | None
    lut: np.ndarray
    known: np.ndarray


def read_classes(root: Path) -> Classes:
    """``ROOT/classes.json``, checked; every error names the file and the key."""
    path = root / CLASS_FILE
    if not path.is_file():
        raise FileNotFoundError(f'folder dataset: no {CLASS_FILE} at {path} (it needs at least {{"names": [...]}})')
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path} must hold a JSON object with the key 'names', got {type(content).__name__}")
    unknown = sorted(set(content) - set(_CLASS_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; known keys: {', '.join(_CLASS_KEYS)}")
    names = content.get("names")
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)):
        raise ValueError(f"{path}: 'names' must be a non-empty list of class names (strings), got {names!r}")
    if len(set(names)) != len(names) or len(names) >= IGNORE_INDEX:
        raise ValueError(f"{path}: 'names' must be distinct and fewer than {IGNORE_INDEX}, got {len(names)} names")
    k = len(names)
    palette = content.get("palette")
    if palette is not None:
        ok = isinstance(palette, list) and len(palette) == k
        ok = ok and all(
            isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
            for c in palette
        )
        if not ok:
            raise ValueError(f"{path}: 'palette' must list one [r, g, b] (ints 0..255) per class, {k} in all")
        palette = tuple(tuple(c) for c in palette)
    ignore = content.get("ignore", IGNORE_INDEX)
    if isinstance(ignore, bool) or not isinstance(ignore, int) or not 0 <= ignore <= 255:
        raise ValueError(f"{path}: 'ignore' must be a mask value in 0..255, got {ignore!r}")
    mapping = _mapping(content.get("mapping"), k, path)
    if ignore in mapping:
        raise ValueError(
            f"{path}: the ignore value {ignore} is also the raw value of class {mapping[ignore]} "
            "(give a 'mapping' without it)"
        )
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    known = np.zeros(256, dtype=bool)
    for raw, cls in mapping.items():
        lut[raw], known[raw] = cls, True
    known[ignore] = True
    return Classes(tuple(names), palette, lut, known)


def _mapping(mapping: Any, k: int, path: Path) -> dict[int, int]:
    if mapping is None:
        return {c: c for c in range(k)}
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"{path}: 'mapping' must be an object {{\"<raw value>\": <class id>, ...}}, got {mapping!r}")
    out = {}
    for raw, cls in mapping.items():
        if not (raw.isdigit() and int(raw) <= 255):
            raise ValueError(f"{path}: 'mapping' key {raw!r} is not a mask value in 0..255")
        if isinstance(cls, bool) or not isinstance(cls, int) or not 0 <= cls < k:
            raise ValueError(f"{path}: 'mapping' sends {raw} to {cls!r}, not a class id in 0..{k - 1}")
        out[int(raw)] = cls
    return out


def _scan_video(folder: Path, name: str, split_file: Path, labels: bool) -> VideoFiles:
    require_dir(folder, f"video {name!r} listed in {split_file}")
    frame_dir = require_dir(folder / "frames", f"frames of video {name!r}")
    images = sorted(
        (p for p in frame_dir.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=lambda p: natural_order(p.name)
    )
    if not images:
        raise FileNotFoundError(f"video {name!r} has no frames: no {', '.join(FRAME_SUFFIXES)} files in {frame_dir}")
    index = {p.stem: t for t, p in enumerate(images)}
    if len(index) != len(images):
        twins = sorted({p.stem for p in images if sum(q.stem == p.stem for q in images) > 1})
        raise ValueError(
            f"{frame_dir}: several frames named {twins[0]!r} (with different suffixes); a mask could not tell"
        )
    found = {}
    mask_dir = folder / "masks"
    if labels and mask_dir.is_dir():
        for mask in sorted(mask_dir.glob("*.png")):
            if mask.stem not in index:
                raise FileNotFoundError(f"mask {mask} matches no frame: expected {frame_dir / mask.stem}.jpg or .png")
            found[index[mask.stem]] = mask
    return VideoFiles(name, tuple(p.stem for p in images), tuple(images), found)
