"""Segmentation heads and losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation


class SegHead(nn.Sequential):
    """``(B, in_channels, h, w)`` -> class scores ``(B, num_classes, h, w)``: ``kernel_size`` conv + BN + ReLU,
    dropout, 1x1 classifier (mmsegmentation's decode-head layout; used for ``phi_seg`` and ``phi_aux``)."""

    def __init__(
        self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1, kernel_size: int = 3
    ) -> None:
        super().__init__(
            Conv2dNormActivation(in_channels, channels, kernel_size),
            nn.Dropout2d(dropout),
            nn.Conv2d(channels, num_classes, 1),
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The map before the classifier: ``(B, channels, h, w)`` after the conv + BN + ReLU."""
        return self[0](x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """:meth:`features`' map -> class scores: dropout, then the 1x1 classifier."""
        return self[2](self[1](features))


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean pixel cross entropy over the pixels not equal to ``ignore_index``; 0 (with a zero gradient) when
    every pixel is ignored, where ``F.cross_entropy``'s mean would be 0/0."""
    total = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp(min=1)


def present_classes(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """``(B, H, W)`` integer labels -> ``(B, K)`` bool: class ``k`` occurs in image ``b``. Pixels equal to
    ``ignore_index`` (and any value outside ``[0, K)``) mark no class."""
    flat = labels.flatten(1)
    index = torch.where((flat >= 0) & (flat < num_classes) & (flat != ignore_index), flat, num_classes)
    present = torch.zeros(flat.shape[0], num_classes + 1, dtype=torch.bool, device=labels.device)
    return present.scatter_(1, index, True)[:, :num_classes]
