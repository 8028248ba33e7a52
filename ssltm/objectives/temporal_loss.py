"""ETC's pixel-wise temporal loss (Liu et al., "Efficient Semantic Video Segmentation with Per-frame Inference",
ECCV 2020, Eq. 4), the ``temporal_loss`` objective of SSLTM's Table 5."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from ..build import build_flow_provider
from ..config import ConfigError, short_term
from ..flow import warp
from .base import Objective


def occlusion_mask(query: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """``M = exp(-|sum_c (I_q - warp(I_a))|)``: ``(B, 3, H, W)`` images -> ``(B, 1, H, W)``, 1 where the warped
    adjacent frame matches the query frame."""
    return torch.exp(-(query - warped).sum(1, keepdim=True).abs())


def temporal_loss(
    query_logits: torch.Tensor,
    adjacent_logits: torch.Tensor,
    query_image: torch.Tensor,
    adjacent_image: torch.Tensor,
    flow: torch.Tensor,
    weight: float,
) -> torch.Tensor:
    """``weight * mean_{B,K,H,W} (M * o_q - M * warp(o_a, F))^2`` with ``M`` of :func:`occlusion_mask`.

    Args:
        query_logits, adjacent_logits: ``(B, K, H, W)`` scores of the two frames at the images' size.
        query_image, adjacent_image: ``(B, 3, H, W)`` the frames as the model saw them (normalised).
        flow: ``(B, 2, H, W)`` float32 query -> adjacent flow (no gradient reaches it).
    """
    flow = flow.detach()
    mask = occlusion_mask(query_image.float(), warp(adjacent_image.float(), flow))
    residual = mask * query_logits.float() - mask * warp(adjacent_logits.float(), flow)
    return weight * residual.square().mean()


class TemporalLoss(Objective):
    """ETC's temporal term between the query frame and its one adjacent frame (``data.offsets: [d]``), both
    segmented by the per-frame model in one pass (``all_frames``); the flow is ``batch["flow"]``
    (``data.flow_in_loader``) or the ``model.flow`` provider's. Inference stays single-frame.

    ``train.temporal_loss.weight``: lambda (0.1, ETC's)."""

    name = "temporal_loss"
    terms = ("temporal",)
    needs = frozenset({"flow"})
    model_outputs = {"all_frames": True}

    def __init__(self, cfg: DictConfig, model: nn.Module) -> None:
        super().__init__(cfg, model)
        self.weight = float(cfg.train.temporal_loss.weight)
        if model.flow_provider is None:
            model.set_flow_provider(build_flow_provider(cfg))

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        name = short_term(cfg)
        if name != "none":
            raise ConfigError(
                f"train.objectives 'temporal_loss' trains a per-frame model: model.short_term must be 'none', "
                f"got {name!r}"
            )
        if len(cfg.data.offsets) != 1:
            raise ConfigError(
                f"train.objectives 'temporal_loss' pairs the query with one adjacent frame: data.offsets must hold "
                f"one offset, got {list(cfg.data.offsets)}"
            )
        if cfg.train.temporal_loss.weight < 0:
            raise ConfigError(f"train.temporal_loss.weight must be >= 0, got {cfg.train.temporal_loss.weight}")

    def forward(self, model: nn.Module, batch: dict[str, Any], out: dict[str, Any], step: int) -> dict[str, Any]:
        frames = batch["frames"]
        flow = batch.get("flow")
        flow = model.optical_flow(frames[:, 0], frames[:, 1]) if flow is None else flow[:, 0]
        logits = out["frame_logits"]
        loss = temporal_loss(logits[:, 0], logits[:, 1], frames[:, 0], frames[:, 1], flow, self.weight)
        return {"temporal": loss}
