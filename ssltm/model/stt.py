"""Spatial-Temporal Transformer (paper §3.2, Fig. 3, supplementary §1): short-term temporal modelling of
the query frame and its adjacent frames, one parallel block per stride."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ssltm_kernels import MixFFN, WindowAttention3D

from .checkpointing import checkpointing_now, recomputed
from .neck import fuse_levels
from .short_term import ShortTermModule


class STTUnit(nn.Module):
    """``x + W-MSA(LN(x))``, then ``x + MixFFN(LN(x))`` on a ``(B, T, H, W, C)`` volume.

    The 3D window attention is ``ssltm_kernels.WindowAttention3D`` (volume path: padding, optional
    cyclic shift and window partition happen inside the op); the Mix-FFN is fc1 -> depthwise 3x3 (per
    frame) -> GELU -> fc2. ``qkv_bias=True`` as Video Swin.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Sequence[int],
        mlp_ratio: float = 4.0,
        shift_size: Sequence[int] = (0, 0, 0),
    ) -> None:
        super().__init__()
        self.shift_size = tuple(shift_size)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention3D(dim, tuple(window_size), num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, H, W, C)`` -> ``(B, T, H, W, C)``."""
        x = x + self.attn(self.norm1(x), shift_size=self.shift_size)
        return x + self.mlp(self.norm2(x))


class STTBlock(nn.Sequential):
    """``depth`` STT units at one stride; with ``shifted_windows`` every second unit shifts its windows by
    half a window (Video Swin's alternation)."""

    def __init__(
        self, dim: int, depth: int, head_dim: int, window_size: Sequence[int], mlp_ratio: float, shifted_windows: bool
    ) -> None:
        if dim % head_dim:
            raise ValueError(f"STT dim {dim} must be a multiple of the head dim {head_dim}")
        half = tuple(w // 2 for w in window_size)
        super().__init__(
            *(
                STTUnit(dim, dim // head_dim, window_size, mlp_ratio, half if shifted_windows and i % 2 else (0, 0, 0))
                for i in range(depth)
            )
        )


class ShortTermTransformer(ShortTermModule):
    """Per-stride projections and STT blocks; ``neck.fuse_levels`` of the query frame's outputs is ``F_q^st``.

    The ``stt`` short-term module: it works on each frame's four FPN levels rather than on their fused
    feature, so it overrides :meth:`project` and :meth:`query_feature` (not ``ShortTermModule.forward``:
    its own ``forward`` maps the clip's projected levels to the query frame's STT outputs).

    ``project`` maps each FPN level ``(N, in_dim, h, w)`` to channels-last ``(N, h, w, dims[i])`` (a
    linear layer, i.e. a 1x1 conv: the paper gives FPN 256 channels and the STT blocks 32..256 but not
    the map between them; a bias-carrying linear map is the cheapest that fits, and every unit starts
    with a LayerNorm, so no norm is added here). It runs once per frame, which is what a streaming
    predictor caches. ``forward`` runs the STT blocks over the stacked query + adjacent frames and keeps
    the query frame (index 0). ``depths[i] = 0`` leaves a stride without STT units. ``checkpointing``: in
    training, each block recomputes its activations in the backward instead of keeping them
    (:mod:`ssltm.model.checkpointing`).
    """

    def __init__(
        self,
        in_dim: int = 256,
        dims: Sequence[int] = (32, 64, 128, 256),
        depths: Sequence[int] = (1, 1, 1, 1),
        head_dim: int = 32,
        window_size: Sequence[int] = (4, 7, 7),
        mlp_ratio: float = 4.0,
        shifted_windows: bool = False,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if len(dims) != len(depths):
            raise ValueError(f"stt_dims {tuple(dims)} and stt_depths {tuple(depths)} must have one entry per stride")
        self.dims = tuple(dims)
        self.checkpointing = checkpointing
        self.out_channels = sum(self.dims)
        self.proj = nn.ModuleList(nn.Linear(in_dim, d) for d in dims)
        self.blocks = nn.ModuleList(
            STTBlock(d, n, head_dim, window_size, mlp_ratio, shifted_windows) for d, n in zip(dims, depths, strict=True)
        )

    def project(self, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[(N, in_dim, h_i, w_i)]`` -> ``[(N, h_i, w_i, dims[i])]``."""
        return [proj(x.permute(0, 2, 3, 1)) for proj, x in zip(self.proj, levels, strict=True)]

    def query_feature(self, clip, images=None, flow=None, state=None) -> torch.Tensor:
        """``F_q^st (B, sum(dims), h_0, w_0)``: the query frame's STT outputs, fused."""
        return fuse_levels(self(clip))

    def forward(self, clip: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[(B, T, h_i, w_i, dims[i])]`` (query frame first) -> the query frame's ``[(B, h_i, w_i, dims[i])]``."""
        checkpointed = self.checkpointing and checkpointing_now(self)
        return [
            (recomputed(block, x) if checkpointed else block(x))[:, 0]
            for block, x in zip(self.blocks, clip, strict=True)
        ]
