"""OCRNet's object-context block: pixels attend their image's (or clip's) object region representations."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation

from .short_term import check_positive_ints


def _conv1x1_bn_relu(in_channels: int, out_channels: int) -> Conv2dNormActivation:
    return Conv2dNormActivation(in_channels, out_channels, 1)


class ObjectAttention(nn.Module):
    """OCRNet's object attention (``ObjectAttentionBlock``, scale 1): ``(B, C, h, w)`` pixels and ``(B, K, C)``
    region representations (``soft_region_pool``'s layout) -> the object context ``(B, C, h, w)``.

    Queries ``f_pixel(pixels)`` and keys ``f_object(regions)`` are two 1x1 conv + BN + ReLU layers each
    (``C -> key_channels -> key_channels``), values ``f_down(regions)`` one (``C -> key_channels``); the
    attention is ``softmax over K of key_channels^-1/2 q.k``, and ``f_up`` (1x1 conv + BN + ReLU,
    ``key_channels -> C``) maps the attended values back. The region layers see the ``K`` regions as a
    ``(B, C, K, 1)`` map, as OCRNet's, so their BN normalises over the ``B*K`` region vectors.
    """

    def __init__(self, in_channels: int = 512, key_channels: int = 256) -> None:
        super().__init__()
        check_positive_ints(in_channels=in_channels, key_channels=key_channels)
        self.in_channels = in_channels
        self.key_channels = key_channels
        self.f_pixel = nn.Sequential(
            _conv1x1_bn_relu(in_channels, key_channels), _conv1x1_bn_relu(key_channels, key_channels)
        )
        self.f_object = nn.Sequential(
            _conv1x1_bn_relu(in_channels, key_channels), _conv1x1_bn_relu(key_channels, key_channels)
        )
        self.f_down = _conv1x1_bn_relu(in_channels, key_channels)
        self.f_up = _conv1x1_bn_relu(key_channels, in_channels)

    def forward(self, pixels: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        c = self.in_channels
        if pixels.dim() != 4 or pixels.shape[1] != c:
            raise ValueError(f"pixels must be (B, {c}, h, w), got shape {tuple(pixels.shape)}")
        b, _, h, w = pixels.shape
        if regions.dim() != 3 or regions.shape[0] != b or regions.shape[2] != c:
            raise ValueError(f"regions must be (B, K, C) = ({b}, K, {c}), got shape {tuple(regions.shape)}")
        proxy = regions.transpose(1, 2).unsqueeze(-1)  # (B, C, K, 1)
        query = self.f_pixel(pixels).flatten(2).transpose(1, 2)  # (B, h*w, key)
        key = self.f_object(proxy).flatten(2)  # (B, key, K)
        value = self.f_down(proxy).flatten(2).transpose(1, 2)  # (B, K, key)
        attention = torch.softmax(torch.bmm(query, key) * self.key_channels**-0.5, dim=-1)  # (B, h*w, K)
        context = torch.bmm(attention, value).transpose(1, 2).unflatten(2, (h, w))  # (B, key, h, w)
        return self.f_up(context)
