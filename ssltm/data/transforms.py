"""Clip transforms: the same geometry for every frame of a clip, its reference and its label.

A clip reaches the transform as one dict ``{"frames": tv_tensors.Video (1+n, 3, H, W) uint8,
"reference": tv_tensors.Image (3, H, W) uint8, "label": tv_tensors.Mask (H, W) uint8}``;
torchvision's v2 transforms draw their random parameters once per call and apply them to every
tv_tensor in it (masks resized with nearest neighbour), which is what keeps frames and label aligned.
Random draws use torch's global RNG (see ``ClipDataset`` for per-sample seeding).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255


class RandomScale(v2.Transform):
    """Resize by a ratio drawn uniformly from ``ratio_range``, relative to the input's own size.

    This is the paper's "random scale" (VSPW's mmsegmentation protocol: ratio 0.5-2.0 of the 480p
    frame). Images and videos are resized bilinearly with antialiasing, masks by nearest neighbour.
    """

    def __init__(self, ratio_range: tuple[float, float] = (0.5, 2.0)):
        super().__init__()
        low, high = ratio_range
        if not 0 < low <= high:
            raise ValueError(f"ratio_range must satisfy 0 < low <= high, got {ratio_range!r}")
        self.ratio_range = (float(low), float(high))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        low, high = self.ratio_range
        ratio = low + (high - low) * float(torch.rand(()))
        return {"size": [max(1, round(height * ratio)), max(1, round(width * ratio))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, params["size"], antialias=True)


def _to_float_normalized() -> list[v2.Transform]:
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Video: torch.float32, "others": None}, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        v2.ToDtype({tv_tensors.Mask: torch.int64, "others": None}),
    ]


def train_transform(
    crop_size: int | Sequence[int],
    scale_range: tuple[float, float] = (0.5, 2.0),
    hflip: float = 0.5,
) -> v2.Compose:
    """Random scale, random crop, horizontal flip, then ImageNet normalisation.

    Args:
        crop_size: output ``(H, W)`` (an int for a square). Where the scaled clip is smaller, it is
            padded (image 0 before normalisation, i.e. black, as torchvision's segmentation
            references do; label 255 so the padding is ignored) — cropping and flipping the uint8
            clip before converting it keeps the float work at the crop's size.
        scale_range: ratio range of :class:`RandomScale`.
        hflip: probability of a horizontal flip.

    Returns a transform from the uint8 clip dict to ``frames`` float32 ``(1+n, 3, h, w)``,
    ``reference`` float32 ``(3, h, w)``, ``label`` int64 ``(h, w)``.
    """
    size = [crop_size, crop_size] if isinstance(crop_size, int) else list(crop_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"crop_size must be a positive int or (H, W), got {crop_size!r}")
    if not 0.0 <= hflip <= 1.0:
        raise ValueError(f"hflip must be a probability in [0, 1], got {hflip!r}")
    fill = {tv_tensors.Image: 0, tv_tensors.Video: 0, tv_tensors.Mask: IGNORE_INDEX}
    return v2.Compose(
        [
            RandomScale(scale_range),
            v2.RandomCrop(size, pad_if_needed=True, fill=fill),
            v2.RandomHorizontalFlip(hflip),
            *_to_float_normalized(),
        ]
    )


def eval_transform(size: int | Sequence[int] | None = None) -> v2.Compose:
    """ImageNet normalisation, optionally after resizing to ``size`` (v2.Resize semantics: an int sets
    the shorter side; the label is resized too, by nearest neighbour). Output as :func:`train_transform`."""
    resize = [] if size is None else [v2.Resize(size, antialias=True)]
    return v2.Compose([*resize, *_to_float_normalized()])
