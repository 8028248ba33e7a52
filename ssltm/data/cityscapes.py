"""Cityscapes video clips: each fine-labelled frame with the 30-frame snippet it was taken from."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .base import SplitClipDataset, VideoFiles, index_lut, require_dir

CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip
NUM_CLASSES = len(CLASSES)
# The labelled frame is the 20th of its snippet: 19 frames before it and 10 after.
FRAMES_BEFORE, FRAMES_AFTER = 19, 10
_LABEL = re.compile(r"(?P<city>.+)_(?P<seq>\d+)_(?P<frame>\d+)_gtFine_labelTrainIds\.png")


class CityscapesSequence(SplitClipDataset):
    """Cityscapes clips: one sample per fine label, the labelled frame being the query.

    Layout (``leftImg8bit_sequence`` and ``gtFine`` packages; train ids made by cityscapesscripts'
    ``createTrainIdLabelImgs``)::

        <root>/leftImg8bit_sequence/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
        <root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png

    A video is the labelled frame's snippet, frames ``frame-19 .. frame+10`` of its sequence (a
    sequence id can hold several snippets, so snippets are named by their labelled frame:
    ``"<city>_<seq>_<frame>"``, also the query's frame id). All 30 must exist.

    Args:
        root: the folder holding ``leftImg8bit_sequence/`` and ``gtFine/``.
        split: a split folder name, e.g. ``"train"`` or ``"val"``.
        reference: ``"random"`` or ``"farthest"`` (see :class:`~ssltm.data.ClipSampler`); by default the
            paper's protocol: ``"farthest"`` on ``"val"`` and ``"test"``, ``"random"`` on other splits.
        offsets, causal, transform, seed, strong_reference: see :class:`~ssltm.data.ClipDataset`.

    Labels: train ids 0..18 as they are, everything else (255) ignored. The snippets are found through their
    labels, so every split needs them (``labels=False`` is refused).
    """

    METAINFO = {"classes": CLASSES, "palette": PALETTE}
    num_classes = NUM_CLASSES
    label_lut = index_lut({k: k for k in range(NUM_CLASSES)})

    @classmethod
    def unlabeled_frames(cls, cfg: Any) -> bool:
        """The 29 other frames of every snippet."""
        return True

    def _scan(self) -> None:
        split = self.split
        if not self.labels:
            raise ValueError(
                "Cityscapes snippets are found through their fine labels: a split without labels cannot be read"
            )
        require_dir(self.root, "Cityscapes root")
        frames_dir = require_dir(self.root / "leftImg8bit_sequence" / split, f"Cityscapes {split!r} sequence frames")
        labels_dir = require_dir(self.root / "gtFine" / split, f"Cityscapes {split!r} fine labels")
        cities = sorted(p for p in labels_dir.iterdir() if p.is_dir())
        for city_labels in cities:
            city_frames = require_dir(frames_dir / city_labels.name, f"sequence frames of city {city_labels.name!r}")
            available = {p.name for p in city_frames.iterdir()}
            for label in sorted(city_labels.glob("*_gtFine_labelTrainIds.png")):
                self._add_snippet(label, city_frames, available)
        if not self.videos:
            raise FileNotFoundError(
                f"no *_gtFine_labelTrainIds.png in the city folders of {labels_dir} "
                "(make them with cityscapesscripts' createTrainIdLabelImgs)"
            )

    def _add_snippet(self, label: Path, city_frames: Path, available: set[str]) -> None:
        match = _LABEL.fullmatch(label.name)
        if match is None:
            raise ValueError(f"label {label}: expected a name <city>_<seq>_<frame>_gtFine_labelTrainIds.png")
        city, seq, frame = match["city"], match["seq"], match["frame"]
        number, width = int(frame), len(frame)
        if number < FRAMES_BEFORE:
            raise ValueError(f"label {label}: frame {number} cannot be the 20th of a snippet (fewer than 19 before it)")
        numbers = range(number - FRAMES_BEFORE, number + FRAMES_AFTER + 1)
        names = [f"{city}_{seq}_{n:0{width}d}_leftImg8bit.png" for n in numbers]
        missing = [n for n in names if n not in available]
        if missing:
            raise FileNotFoundError(
                f"snippet of label {label} is incomplete: {len(missing)} of its 30 frames are missing from "
                f"{city_frames}, e.g. {missing[0]}"
            )
        frame_ids = tuple(n.removesuffix("_leftImg8bit.png") for n in names)
        video = VideoFiles(
            name=f"{city}_{seq}_{frame}",
            frame_ids=frame_ids,
            images=tuple(city_frames / n for n in names),
            labels={FRAMES_BEFORE: label},
        )
        self.queries.append((len(self.videos), FRAMES_BEFORE))
        self.videos.append(video)
