"""VSPW (Miao et al., CVPR 2021), 480p release: 124 classes, and its single-frame variant VSPW-SF."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .base import MODES, SplitClipDataset, Transform, VideoFiles, config_root, index_lut, read_split_file, require_dir

SPLITS = ("train", "val", "test")
NUM_CLASSES = 124
# VSPW ships its class names as {"others": 0, "wall": 1, ...}: raw id k is class k - 1.
CLASS_FILE = "label_num_dic_final.json"


class VSPW(SplitClipDataset):
    """VSPW clips; one sample per query (a labelled frame).

    Layout (the official release)::

        VSPW_480p/{train,val,test}.txt          one video name a line
        VSPW_480p/data/<video>/origin/*.jpg     frames, in file-name order
        VSPW_480p/data/<video>/mask/*.png       labels, same stems as their frames

    Args:
        root: the ``VSPW_480p`` folder, or a folder that contains it.
        split: ``"train"``, ``"val"`` or ``"test"``.
        mode: ``"full"``: every labelled frame is a query; ``"sf"`` (VSPW-SF, paper §4.1.1): only
            the first frame of each training video is. Validation and test frames are all labelled
            in both versions, so ``mode`` changes only the train split.
        reference: ``"random"`` or ``"farthest"`` (see :class:`~ssltm.data.ClipSampler`); by default the
            paper's protocol: ``"farthest"`` on ``"val"`` and ``"test"``, ``"random"`` on other splits.
        offsets, causal, transform, seed, strong_reference, strong_frames: see :class:`~ssltm.data.ClipDataset`.
        labels: ``False`` reads no masks and makes every frame a query (predicting the test split).

    Class names: from ``label_num_dic_final.json`` of the release, ``class_<k>`` without it.
    Labels: raw 0 ("others") and 255 become 255 (ignore), raw ``k`` in 1..124 becomes ``k - 1``;
    other raw values are not VSPW classes and become 255 rather than crash the loss. Unlabelled
    frames still serve as adjacent and reference frames; in ``"sf"``, every training frame after the first is
    one (:class:`~ssltm.data.UnlabeledClips`), masks or not.
    """

    num_classes = NUM_CLASSES
    label_lut = index_lut({k: k - 1 for k in range(1, NUM_CLASSES + 1)})

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        mode: str = "full",
        offsets: Sequence[int] = (3, 6, 9),
        causal: bool = False,
        reference: str | None = None,
        transform: Transform | None = None,
        seed: int | None = None,
        labels: bool = True,
        strong_reference: bool = False,
        strong_frames: bool = False,
    ):
        self.mode = mode
        super().__init__(
            root, split, offsets, causal, reference, transform, seed, labels, strong_reference, strong_frames
        )

    @classmethod
    def unlabeled_frames(cls, cfg: Any) -> bool:
        """VSPW-SF's training videos have frames beyond their first; in ``"full"`` every frame is a query."""
        return cfg.data.mode == "sf"

    @classmethod
    def metainfo(cls, cfg: Any) -> dict[str, Sequence]:
        root = config_root(cfg)
        names = [f"class_{k}" for k in range(NUM_CLASSES)]
        for candidate in (root / "VSPW_480p" / CLASS_FILE, root / CLASS_FILE):
            if candidate.is_file():
                for name, raw in json.loads(candidate.read_text()).items():
                    if 1 <= int(raw) <= NUM_CLASSES:
                        names[int(raw) - 1] = name
                break
        return {"classes": tuple(names)}

    @classmethod
    def from_config(cls, cfg: Any, split: str, labels: bool = True, **common: Any) -> VSPW:
        return cls(config_root(cfg), split, mode=cfg.data.mode, seed=cfg.train.seed, labels=labels, **common)

    def _scan(self) -> None:
        split, mode = self.split, self.mode
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.root = _find_release(self.root, split)
        data = require_dir(self.root / "data", "VSPW data folder")
        for name in read_split_file(self.root / f"{split}.txt", "VSPW split file"):
            video = _scan_video(data / name, name, self.labels)
            v = len(self.videos)
            self.videos.append(video)
            if not self.labels:
                self.queries.extend((v, t) for t in range(len(video.images)))
            elif mode == "sf" and split == "train":
                if 0 not in video.labels:
                    raise FileNotFoundError(
                        f"VSPW-SF needs the first frame's label: no {data / name / 'mask' / video.frame_ids[0]}.png"
                    )
                self.queries.append((v, 0))
            else:
                self.queries.extend((v, t) for t in sorted(video.labels))


def _find_release(root: Path, split: str) -> Path:
    for candidate in (root / "VSPW_480p", root):
        if (candidate / f"{split}.txt").is_file() and (candidate / "data").is_dir():
            return candidate
    require_dir(root, "VSPW root")
    raise FileNotFoundError(
        f"no VSPW release at {root}: expected {root / 'VSPW_480p' / f'{split}.txt'} and {root / 'VSPW_480p' / 'data'}/ "
        f"(or {root / f'{split}.txt'} and {root / 'data'}/ with root = the VSPW_480p folder)"
    )


def _scan_video(folder: Path, name: str, labels: bool) -> VideoFiles:
    origin = require_dir(folder / "origin", f"frames of VSPW video {name!r}")
    images = sorted(p for p in origin.iterdir() if p.suffix.lower() == ".jpg")
    if not images:
        raise FileNotFoundError(f"VSPW video {name!r} has no frames: no *.jpg in {origin}")
    if not labels:
        return VideoFiles(name, tuple(p.stem for p in images), tuple(images), {})
    index = {p.stem: t for t, p in enumerate(images)}
    mask_dir = folder / "mask"
    masks = sorted(mask_dir.glob("*.png")) if mask_dir.is_dir() else []
    if not masks:
        raise FileNotFoundError(
            f"VSPW video {name!r} has no labels: no *.png in {mask_dir} "
            "(VSPW's test split ships without them: predict it with ssltm eval --predict-only)"
        )
    found = {}
    for mask in masks:
        if mask.stem not in index:
            raise FileNotFoundError(f"label {mask} has no frame: expected {origin / mask.stem}.jpg")
        found[index[mask.stem]] = mask
    return VideoFiles(name, tuple(p.stem for p in images), tuple(images), found)
