"""CamVid (Brostow et al. 2009) in the SegNet packaging: 11 classes, labelled stills of 30 Hz video."""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

from .base import SplitClipDataset, VideoFiles, index_lut, require_dir

CLASSES = (
    "sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car", "pedestrian", "bicyclist",
)  # fmt: skip
PALETTE = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)  # fmt: skip
NUM_CLASSES = len(CLASSES)  # value 11 is "void"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_STEM = re.compile(r"([A-Za-z0-9]+)_f?(\d+)")
# A step between labelled frames this many times the sequence's median step is a gap (a cut in the
# recording): 0016E5 steps 30 with one 31/29 jitter and gaps of 270 and 1950 frames.
GAP_FACTOR = 1.5


class CamVid(SplitClipDataset):
    """CamVid clips; one sample per labelled frame. Only labelled stills exist, so a clip's adjacent
    frames are neighbouring labelled frames: ``offsets`` count labelled frames (about 1 s each).

    Layout::

        <root>/<split>/<SEQ>_<frame>.{png,jpg}     or <SEQ>_f<frame>
        <root>/<split>annot/<stem>.png             label, same stem

    Videos: the frames of each sequence ordered by frame number and split where a step exceeds
    ``GAP_FACTOR`` (1.5) times the sequence's median step. A sequence split in ``k > 1`` parts gives
    videos ``"<SEQ>-0" .. "<SEQ>-<k-1>"``, an unsplit one ``"<SEQ>"``. Frame ids are file stems.

    Args:
        root: the folder holding ``<split>/`` and ``<split>annot/``.
        split: ``"train"``, ``"val"`` or ``"test"`` (any folder name present).
        reference: ``"random"`` or ``"farthest"`` (see :class:`~ssltm.data.ClipSampler`); by default the
            paper's protocol: ``"farthest"`` on ``"val"`` and ``"test"``, ``"random"`` on other splits.
        offsets, causal, transform, seed, strong_reference: see :class:`~ssltm.data.ClipDataset`.
        labels: ``False`` reads no ``<split>annot/`` folder and makes every image a query.

    Labels: 0..10 as they are; 11 (void) and anything else becomes 255.
    """

    METAINFO = {"classes": CLASSES, "palette": PALETTE}
    num_classes = NUM_CLASSES
    label_lut = index_lut({k: k for k in range(NUM_CLASSES)})

    @classmethod
    def unlabeled_frames(cls, cfg: Any) -> bool:
        """False: only labelled stills exist."""
        return False

    def _scan(self) -> None:
        split = self.split
        require_dir(self.root, "CamVid root")
        image_dir = require_dir(self.root / split, f"CamVid {split!r} images")
        images = {p.stem: p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        if not images:
            raise FileNotFoundError(f"no CamVid images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
        labels = self._labels(images, image_dir) if self.labels else {}
        sequences: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for stem in images:
            match = _STEM.fullmatch(stem)
            if match is None:
                raise ValueError(f"image {images[stem]}: expected a name <SEQ>_<frame> or <SEQ>_f<frame>")
            sequences[match[1]].append((int(match[2]), stem))
        for seq in sorted(sequences):
            frames = sorted(sequences[seq])
            numbers = [n for n, _ in frames]
            if len(set(numbers)) != len(numbers):
                raise ValueError(f"CamVid sequence {seq!r} in {image_dir} has two files for one frame number")
            parts = split_at_gaps(numbers)
            for k, (start, stop) in enumerate(parts):
                stems = [stem for _, stem in frames[start:stop]]
                v = len(self.videos)
                self.videos.append(
                    VideoFiles(
                        name=seq if len(parts) == 1 else f"{seq}-{k}",
                        frame_ids=tuple(stems),
                        images=tuple(images[s] for s in stems),
                        labels={t: labels[s] for t, s in enumerate(stems) if s in labels},
                    )
                )
                self.queries.extend((v, t) for t in range(len(stems)))

    def _labels(self, images: dict[str, Path], image_dir: Path) -> dict[str, Path]:
        """The label of every image, by stem; an error naming the first image or label without its pair."""
        label_dir = require_dir(self.root / f"{self.split}annot", f"CamVid {self.split!r} labels")
        labels = {p.stem: p for p in label_dir.glob("*.png")}
        unmatched = sorted(labels.keys() - images.keys())
        if unmatched:
            stem = unmatched[0]
            raise FileNotFoundError(
                f"{len(unmatched)} CamVid labels have no image, e.g. {labels[stem]}: "
                f"expected {image_dir / stem}.png or .jpg"
            )
        unlabelled = sorted(images.keys() - labels.keys())
        if unlabelled:
            stem = unlabelled[0]
            raise FileNotFoundError(
                f"{len(unlabelled)} CamVid images have no label, e.g. {images[stem]}: expected {label_dir / stem}.png"
            )
        return labels


def split_at_gaps(numbers: Sequence[int], factor: float = GAP_FACTOR) -> list[tuple[int, int]]:
    """``[start, stop)`` index ranges of the runs of increasing frame ``numbers`` between gaps, a gap
    being a step larger than ``factor`` times the median step."""
    if len(numbers) < 2:
        return [(0, len(numbers))]
    steps = [b - a for a, b in pairwise(numbers)]
    limit = factor * statistics.median(steps)
    cuts = [i + 1 for i, step in enumerate(steps) if step > limit]
    bounds = [0, *cuts, len(numbers)]
    return list(pairwise(bounds))
