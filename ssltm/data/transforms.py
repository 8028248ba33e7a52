"""Clip transforms: the same geometry for every frame of a clip, its reference and its label.

A clip reaches the transform as one dict ``{"frames": tv_tensors.Video (1+n, 3, H, W) uint8,
"reference": tv_tensors.Image (3, H, W) uint8, "label": tv_tensors.Mask (H, W) uint8}``;
torchvision's v2 transforms draw their random parameters once per call and apply them to every
tv_tensor in it (masks resized with nearest neighbour), which is what keeps frames and label aligned.
Random draws use torch's global RNG (see ``ClipDataset`` for per-sample seeding).

:func:`photometric_distortion` is the colour noise of the strong views (``"reference_strong"``): it works on
uint8 RGB pixels and draws from a ``torch.Generator`` of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
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


# mmsegmentation's PhotoMetricDistortion defaults (the strong view of IFR and Mean Teacher's noise).
BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18  # OpenCV's 8-bit hue scale, 0..179


@dataclass(frozen=True)
class Photometric:
    """One draw of :func:`photometric_distortion`: each step's value, None for a step not taken."""

    brightness: float | None = None  # added
    contrast: float | None = None  # multiplied
    contrast_first: bool = True  # contrast right after brightness, else last
    saturation: float | None = None  # HSV S multiplied
    hue: int | None = None  # added to HSV H (0..179), modulo 180

    @classmethod
    def draw(
        cls,
        generator: torch.Generator | None = None,
        p: float = 0.5,
        brightness_delta: float = BRIGHTNESS_DELTA,
        contrast_range: tuple[float, float] = CONTRAST_RANGE,
        saturation_range: tuple[float, float] = SATURATION_RANGE,
        hue_delta: int = HUE_DELTA,
    ) -> Photometric:
        """mmseg's random choices: each step with probability ``p``, brightness ``U(-delta, delta)``, contrast and
        saturation ``U(*range)``, hue an integer in ``[-hue_delta, hue_delta)`` (numpy's ``randint(-18, 18)``, as
        mmseg draws it), contrast first or last with probability 1/2. A fixed number of draws from ``generator``
        (torch's global RNG if None)."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
        if isinstance(hue_delta, bool) or not isinstance(hue_delta, int) or not 0 <= hue_delta <= 90:
            raise ValueError(f"hue_delta must be an int in 0..90, got {hue_delta!r}")
        take = (torch.rand(4, generator=generator) < p).tolist()
        contrast_first = bool(torch.rand((), generator=generator) < 0.5)
        u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        hue = min(int(u[3] * 2 * hue_delta), max(2 * hue_delta - 1, 0)) - hue_delta
        return cls(
            brightness=(2 * u[0] - 1) * brightness_delta if take[0] else None,
            contrast=contrast_range[0] + (contrast_range[1] - contrast_range[0]) * u[1] if take[1] else None,
            contrast_first=contrast_first,
            saturation=saturation_range[0] + (saturation_range[1] - saturation_range[0]) * u[2] if take[2] else None,
            hue=hue if take[3] else None,
        )

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """These steps on uint8 RGB ``images`` ``(H, W, 3)`` or a stack ``(..., H, W, 3)`` (the same on every
        image); returns a new array of the same shape."""
        if images.dtype != np.uint8 or images.ndim < 3 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 RGB (..., H, W, 3), got {images.dtype} {tuple(images.shape)}")
        shape = images.shape
        # One 2-D image for OpenCV: the conversions are per pixel, so stacked frames can share a call.
        img = np.ascontiguousarray(images).reshape(-1, shape[-2], 3)
        if self.brightness is not None:
            img = _affine_uint8(img, 1.0, self.brightness)
        if self.contrast is not None and self.contrast_first:
            img = _affine_uint8(img, self.contrast, 0.0)
        if self.saturation is not None:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            hsv[..., 1] = _affine_uint8(hsv[..., 1], self.saturation, 0.0)
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if self.hue is not None:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            hsv[..., 0] = (hsv[..., 0].astype(np.int16) + self.hue) % 180
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if self.contrast is not None and not self.contrast_first:
            img = _affine_uint8(img, self.contrast, 0.0)
        return (img.copy() if np.shares_memory(img, images) else img).reshape(shape)


def photometric_distortion(images: np.ndarray, generator: torch.Generator | None = None, **kwargs: Any) -> np.ndarray:
    """mmsegmentation's ``PhotoMetricDistortion`` (as IFR trains with it) on uint8 RGB ``images``, before
    normalisation: brightness, contrast (here or last), saturation, hue, each with probability 1/2
    (:meth:`Photometric.draw`, whose settings ``kwargs`` are). Every step clips to 0..255 and truncates to uint8,
    as mmseg's does; the HSV conversions are OpenCV's 8-bit ones (mmseg converts BGR, these RGB: the same hue and
    saturation).

    ``images``: ``(H, W, 3)``, or a stack ``(..., H, W, 3)`` such as all frames of a clip: one draw serves the
    whole stack, so every frame gets the same distortion (Mean Teacher's student noise: one call per clip).
    """
    return Photometric.draw(generator, **kwargs)(images)


def _affine_uint8(values: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """``values * alpha + beta`` in float32, clipped to 0..255 and truncated to uint8 (mmseg's ``convert``)."""
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)
