"""NetWarp (Gadde et al., ICCV 2017): the previous frame's feature warped onto the query by a learned
transformation of the optical flow, then combined with the query's feature channel by channel."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssltm.flow import resize_flow, warp

from .short_term import ShortTermModule, check_positive_ints


class NetWarp(ShortTermModule):
    """``w0 * z_q + w1 * warp(z_adj, Λ(F))`` on the fused stride-``stride`` features of the query and its one
    adjacent (previous) frame.

    ``F`` is the query -> adjacent flow resized to the feature map by :func:`ssltm.flow.resize_flow`, i.e.
    divided by the stride (feature pixels). FlowCNN refines it from the frames: the images max-pooled by the
    stride (``ceil_mode``, the features' ``ceil(H / stride)`` size), ``I_w`` = the pooled adjacent image
    warped by ``F``; ``cat[F, I_q, I_w]`` -> conv3x3 8 -> 16, ReLU, 16 -> 32, ReLU, 32 -> 2; that output
    concatenated with ``F`` -> conv1x1 4 -> 2 = ``Λ(F)``. The 1x1 conv starts at N(0, 0.001) weights and a
    zero bias (the official model's initialisation), so ``Λ(F)`` starts near 0: the adjacent feature is
    first combined unwarped and the transformation is learned; the 3x3 convs keep PyTorch's default
    initialisation. ``w0``, ``w1`` are per-channel ``(1, C, 1, 1)``, 0.5 each at initialisation. With
    ``flowcnn=False``, ``Λ(F) = F`` and the module has only ``w0``, ``w1``.

    The flow is an input: no gradient flows into it (it is detached).
    """

    needs_images = True
    needs_flow = True

    def __init__(self, channels: int, stride: int = 4, flowcnn: bool = True) -> None:
        super().__init__()
        check_positive_ints(channels=channels, stride=stride)
        if not isinstance(flowcnn, bool):
            raise ValueError(f"flowcnn must be a bool, got {flowcnn!r}")
        self.out_channels = channels
        self.stride = stride
        self.w0 = nn.Parameter(torch.full((1, channels, 1, 1), 0.5))
        self.w1 = nn.Parameter(torch.full((1, channels, 1, 1), 0.5))
        if flowcnn:
            self.flowcnn = nn.Sequential(
                nn.Conv2d(8, 16, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(16, 32, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(32, 2, 3, padding=1),
            )
            self.flow_transform = nn.Conv2d(4, 2, 1)
            nn.init.normal_(self.flow_transform.weight, std=0.001)
            nn.init.zeros_(self.flow_transform.bias)
        else:
            self.flowcnn = None
            self.flow_transform = None

    def transformed_flow(self, images: torch.Tensor, flow: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``Λ(F)`` ``(B, 2, h, w)`` in feature pixels from the clip's ``images (B, 2, 3, H, W)`` and the
        query -> adjacent ``flow (B, 1, 2, H, W)``, at the feature size ``(h, w)``."""
        f = resize_flow(flow[:, 0].detach().float(), size)
        if self.flowcnn is None:
            return f
        pooled = F.max_pool2d(images.flatten(0, 1).float(), self.stride, self.stride, ceil_mode=True)
        if tuple(pooled.shape[-2:]) != tuple(size):
            raise ValueError(
                f"images {tuple(images.shape)} max-pooled by the stride {self.stride} give {tuple(pooled.shape[-2:])}, "
                f"not the features' size {tuple(size)} (ceil(H / {self.stride}), ceil(W / {self.stride}))"
            )
        pooled = pooled.unflatten(0, images.shape[:2])
        query, adjacent = pooled[:, 0], warp(pooled[:, 1], f)
        refined = self.flowcnn(torch.cat([f, query, adjacent], dim=1))
        return self.flow_transform(torch.cat([refined, f], dim=1))

    def forward(
        self,
        feats: torch.Tensor,
        images: torch.Tensor | None = None,
        flow: torch.Tensor | None = None,
        state: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        if feats.dim() != 5 or feats.shape[1] != 2 or feats.shape[2] != self.out_channels:
            raise ValueError(
                f"feats must be (B, 2, {self.out_channels}, h, w) (the query, then the previous frame), "
                f"got shape {tuple(feats.shape)}"
            )
        b, _, _, h, w = feats.shape
        if not isinstance(images, torch.Tensor) or images.dim() != 5 or images.shape[:3] != (b, 2, 3):
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else images
            raise ValueError(f"images must be the clip's frames (B, 2, 3, H, W) = ({b}, 2, 3, H, W), got {got}")
        size = tuple(images.shape[-2:])
        expected = (b, 1, 2, *size)
        if (
            not isinstance(flow, torch.Tensor)
            or tuple(flow.shape) != expected
            or flow.dtype != torch.float32
            or flow.device != feats.device
        ):
            got = flow if not isinstance(flow, torch.Tensor) else f"{tuple(flow.shape)} {flow.dtype} on {flow.device}"
            raise ValueError(f"flow must be float32 {expected} (B, T-1, 2, H, W) on {feats.device}, got {got}")
        adjacent = warp(feats[:, 1], self.transformed_flow(images, flow, (h, w)))
        return (self.w0 * feats[:, 0] + self.w1 * adjacent).to(feats.dtype)
