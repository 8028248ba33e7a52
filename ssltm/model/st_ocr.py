"""Spatial-Temporal OCR (the temporal context block of the VSPW paper): the query's pixels attend object
region representations pooled over every frame of the clip."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation

from ssltm_kernels import soft_region_pool

from .heads import SegHead, cross_entropy
from .neck import resize
from .ocr import ObjectAttention
from .short_term import ShortTermModule, check_positive_ints

MEMORIES = ("none", "first_clip")
STATE_KEY = "st_ocr_first_clip_regions"  # the per-video state entry of memory "first_clip"


def clip_regions(
    regions: torch.Tensor, memory: str = "none", state: dict[str, Any] | None = None, training: bool = False
) -> torch.Tensor:
    """The clip's object region representations: ``R_f (B, T, K, C)``, one per frame, -> their mean ``(B, K, C)``.

    ``memory="first_clip"`` (inference with a ``state`` only): the first call of a video stores its ``R_f`` in
    ``state``; every later call averages them with its own (the mean over the first clip's frames and the
    current clip's). ``"none"``, in training, or without a ``state``: the clip's own mean.
    """
    if memory == "first_clip" and state is not None and not training:
        stored = state.get(STATE_KEY)
        if stored is None:
            state[STATE_KEY] = regions.detach()
        elif stored.shape[0] != regions.shape[0] or stored.shape[2:] != regions.shape[2:]:
            raise ValueError(
                f"state holds region representations of shape {tuple(stored.shape)}, which do not fit this "
                f"clip's {tuple(regions.shape)} (B, T, K, C): clear the state between videos"
            )
        else:
            regions = torch.cat([stored.to(regions.dtype), regions], dim=1)
    return regions.mean(dim=1)


class SpatialTemporalOCR(ShortTermModule):
    """OCR over a clip: ``(B, T, in_channels, h, w)`` fused features -> ``(B, channels, h, w)``.

    Per frame ``f``: coarse class scores ``A_f = phi_aux(z_f)`` (conv3x3 -> ``channels``, BN, ReLU,
    Dropout2d, 1x1 -> ``num_classes``), pixel features ``X_f`` (conv3x3 -> ``channels`` + BN + ReLU) and
    region representations ``R_f = soft_region_pool(A_f, X_f)`` ``(B, K, channels)``. ``R`` is the mean of
    the ``R_f``; the query's pixels ``X_q`` attend it with :class:`ObjectAttention`, and
    ``cat(context, X_q)`` -> 1x1 conv + BN + ReLU + Dropout2d gives the output.

    Loss ``st_ocr_aux``: ``aux_weight`` times the cross entropy of the query's ``A_q`` (upsampled to the
    labels) from the last training forward.

    ``memory="first_clip"`` (inference with a ``state`` only): the first call of a video stores its clip's
    ``R_f`` in ``state``; every later call averages them with its own, so ``R`` is the mean over the first
    clip's frames and the current clip's. ``"none"``: every clip on its own.
    """

    loss_terms = ("st_ocr_aux",)

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 512,
        key_channels: int = 256,
        dropout: float = 0.05,
        aux_weight: float = 0.4,
        memory: str = "none",
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        check_positive_ints(
            in_channels=in_channels, num_classes=num_classes, channels=channels, key_channels=key_channels
        )
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if not aux_weight >= 0:
            raise ValueError(f"aux_weight must be >= 0, got {aux_weight!r}")
        if memory not in MEMORIES:
            raise ValueError(f"memory must be one of {', '.join(MEMORIES)}, got {memory!r}")
        self.in_channels = in_channels
        self.out_channels = channels
        self.aux_weight = float(aux_weight)
        self.memory = memory
        self.ignore_index = ignore_index
        self.aux_head = SegHead(in_channels, channels, num_classes, dropout, kernel_size=3)
        self.pixels = Conv2dNormActivation(in_channels, channels, 3)
        self.attention = ObjectAttention(channels, key_channels)
        self.fuse = nn.Sequential(Conv2dNormActivation(2 * channels, channels, 1), nn.Dropout2d(dropout))
        self._aux_logits: torch.Tensor | None = None

    def regions(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``feats (B, T, in_channels, h, w)`` -> ``A (B, T, K, h, w)``, ``X (B, T, channels, h, w)`` and
        ``R_f (B, T, K, channels)``, every frame through the same layers."""
        frames = feats.flatten(0, 1)
        aux_logits, pixels = self.aux_head(frames), self.pixels(frames)
        regions = soft_region_pool(aux_logits, pixels)
        split = lambda x: x.unflatten(0, feats.shape[:2])
        return split(aux_logits), split(pixels), split(regions)

    def forward(
        self,
        feats: torch.Tensor,
        images: torch.Tensor | None = None,
        flow: torch.Tensor | None = None,
        state: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        if feats.dim() != 5 or feats.shape[2] != self.in_channels or feats.shape[1] == 0:
            raise ValueError(
                f"feats must be (B, T, {self.in_channels}, h, w) (the query first), got shape {tuple(feats.shape)}"
            )
        aux_logits, pixels, regions = self.regions(feats)
        if self.training:
            self._aux_logits = aux_logits[:, 0]
        context = self.attention(pixels[:, 0], clip_regions(regions, self.memory, state, self.training))
        return self.fuse(torch.cat([context, pixels[:, 0]], dim=1))

    def losses(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._aux_logits is None:
            raise RuntimeError("SpatialTemporalOCR.losses needs a training forward first")
        logits = resize(self._aux_logits, labels.shape[-2:])
        return {"st_ocr_aux": self.aux_weight * cross_entropy(logits, labels.long(), self.ignore_index)}
