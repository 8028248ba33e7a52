"""UperNet's neck (Xiao et al., Unified Perceptual Parsing; paper §4.1.2: "ResNet + FPN as backbone, PPM as
the neck"), laid out as VSPW's reference UPerNet: a PPM on the coarsest level, an FPN, and the fusion input
of the four levels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of ``(N, C, h, w)`` to ``size`` (``align_corners=False``, as UperNet)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def fuse_levels(levels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Channels-last levels ``[(B, h_i, w_i, d_i)]`` -> ``(B, sum d_i, h_0, w_0)``: each level upsampled to the
    first's size and concatenated (the input of UperNet's fusion conv)."""
    size = levels[0].shape[1:3]
    return torch.cat([resize(x.permute(0, 3, 1, 2), size) for x in levels], dim=1)


class PyramidPooling(nn.Module):
    """PPM (PSPNet): ``(N, C, h, w)`` -> ``(N, C + len(scales) * channels, h, w)``, the input concatenated
    with its average-pooled (to ``s x s``), projected (1x1 conv + BN + ReLU) and upsampled copies."""

    def __init__(self, in_channels: int, channels: int, scales: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), Conv2dNormActivation(in_channels, channels, 1)) for s in scales
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, *(resize(stage(x), x.shape[-2:]) for stage in self.stages)], dim=1)


class FPNNeck(nn.Module):
    """UperNet's PPM + FPN: C2..C5 -> four ``(N, dim, h_i, w_i)`` maps, strides 4..32.

    C5 goes through the PPM (branches ``ppm_dim`` wide: 512 in UperNet) and a 3x3 conv to ``dim`` (the top
    of the pyramid); C2..C4 through 1x1 laterals that receive the upsampled coarser level (top-down path),
    then a 3x3 conv each. Every conv is conv + BN + ReLU, as VSPW's UPerNet. UperNet's fusion (the four
    levels upsampled and concatenated, ``fuse_levels``, then a 3x3 conv) is the segmentation head's job.
    """

    def __init__(
        self, in_channels: Sequence[int], dim: int = 256, pool_scales: Sequence[int] = (1, 2, 3, 6), ppm_dim: int = 512
    ) -> None:
        super().__init__()
        for name, value in (("fpn_dim", dim), ("ppm_dim", ppm_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not pool_scales or any(not isinstance(s, int) or s < 1 for s in pool_scales):
            raise ValueError(f"pool_scales must be positive integers, got {tuple(pool_scales)}")
        *fine, coarse = in_channels
        self.ppm = PyramidPooling(coarse, ppm_dim, pool_scales)
        self.bottleneck = Conv2dNormActivation(coarse + len(pool_scales) * ppm_dim, dim, 3)
        self.laterals = nn.ModuleList(Conv2dNormActivation(c, dim, 1) for c in fine)
        self.fpn_convs = nn.ModuleList(Conv2dNormActivation(dim, dim, 3) for _ in fine)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[C2, C3, C4, C5]`` -> ``[P2, P3, P4, P5]``, each ``(N, dim, h_i, w_i)`` at its input's size."""
        *fine, coarse = feats
        levels = [lateral(x) for lateral, x in zip(self.laterals, fine, strict=True)]
        levels.append(self.bottleneck(self.ppm(coarse)))
        for i in range(len(levels) - 1, 0, -1):
            levels[i - 1] = levels[i - 1] + resize(levels[i], levels[i - 1].shape[-2:])
        return [conv(x) for conv, x in zip(self.fpn_convs, levels, strict=False)] + [levels[-1]]
