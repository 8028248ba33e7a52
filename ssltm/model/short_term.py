"""Short-term temporal modules: what turns the clip's per-frame features into the query frame's ``F_q^st``.

SSLTM's STT is one; the systems the paper compares in Table 5 (NetWarp, Spatial-Temporal OCR, CFFM, ...) are
others. A module sees each clip frame's fused stride-4 feature, the query first, and returns the query's
short-term feature; SSLTM's heads (RFCE, GCC, ``phi_seg``) stack on whatever it returns.

:data:`SHORT_TERM` names the modules :func:`build_short_term` builds (``SSLTM(short_term=...)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .neck import fuse_levels

SHORT_TERM = ("none", "stt", "netwarp", "st_ocr", "sparse_tt", "cffm")
NUM_LEVELS = 4  # FPN levels per frame, strides 4, 8, 16, 32: the fused feature is NUM_LEVELS * fpn_dim wide


def check_positive_ints(**values: Any) -> None:
    """Raise a ValueError naming the first argument that is not a positive int (a bool is not one)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


class ShortTermModule(nn.Module):
    """The interface of a short-term module.

    Subclasses set ``out_channels`` (the width of the feature ``forward`` returns), ``needs_images`` (the
    clip's input frames are passed as ``images``), ``needs_flow`` (the optical flow from the query to each
    adjacent frame is passed as ``flow``) and ``loss_terms`` (the fixed names of :meth:`losses`' terms).

    ``forward(feats, images=None, flow=None, state=None)``:

    - ``feats``: ``(B, T, C, h, w)``, each clip frame's fused stride-4 feature, the query first;
    - ``images``: ``(B, T, 3, H, W)``, the clip's ImageNet-normalised frames (when ``needs_images``);
    - ``flow``: ``(B, T-1, 2, H, W)`` float32, pixels, x then y, from the query to each adjacent frame (the
      content at ``p`` in the query is at ``p + flow(p)`` in the adjacent frame; when ``needs_flow``);
    - ``state``: a dict a streaming predictor keeps per video (cleared between videos), or None: a module
      with a memory over a video reads and writes it at inference; ``forward`` itself stays stateless.

    returns ``(B, out_channels, h, w)``. :meth:`losses` returns the module's own loss terms for the query
    ``labels (B, H, W)`` after a training forward, named as in ``loss_terms`` and already weighted.

    The model reaches a module through two steps, which a module working on the FPN levels themselves
    (STT) overrides instead of ``forward``: :meth:`project`, per frame (what a streaming predictor caches),
    and :meth:`query_feature`, per clip. By default ``project`` keeps the levels as they are (channels-last)
    and ``query_feature`` fuses each frame's levels (``fuse_levels``: upsampled to stride 4 and concatenated,
    ``NUM_LEVELS * fpn_dim`` channels, the image baseline's fused feature) and calls ``forward``.
    """

    out_channels: int
    needs_images: bool = False
    needs_flow: bool = False
    uses_adjacent: bool = True  # False: the module reads the query frame alone (the adjacent ones are not encoded)
    loss_terms: tuple[str, ...] = ()

    def forward(
        self,
        feats: torch.Tensor,
        images: torch.Tensor | None = None,
        flow: torch.Tensor | None = None,
        state: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def losses(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def project(self, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One frame's FPN levels ``[(N, C, h_i, w_i)]`` -> what the model caches per frame, channels-last
        ``[(N, h_i, w_i, d_i)]`` (here the levels themselves)."""
        return [x.permute(0, 2, 3, 1) for x in levels]

    def query_feature(
        self,
        clip: Sequence[torch.Tensor],
        images: torch.Tensor | None = None,
        flow: torch.Tensor | None = None,
        state: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """The clip's projected levels ``[(B, T, h_i, w_i, d_i)]`` (query first) -> ``F_q^st (B, out_channels,
        h_0, w_0)``: each frame's levels fused, then ``forward``."""
        b, t = clip[0].shape[:2]
        feats = fuse_levels([x.flatten(0, 1) for x in clip]).unflatten(0, (b, t))
        return self(feats, images, flow, state)


class QueryOnly(ShortTermModule):
    """``none``: no short-term modelling; ``F_q^st`` is the query frame's fused feature (the image baseline,
    UperNet's fusion input). No parameters; the adjacent frames are not encoded."""

    uses_adjacent = False

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.out_channels = in_channels

    def forward(self, feats, images=None, flow=None, state=None) -> torch.Tensor:
        return feats[:, 0]

    def query_feature(self, clip, images=None, flow=None, state=None) -> torch.Tensor:
        return fuse_levels([x[:, 0] for x in clip])  # the query's alone, whatever else the clip holds


def resolve_short_term(short_term: str | None, use_stt: bool | None) -> str:
    """The module name from ``short_term`` and the older switch ``use_stt``: with ``short_term`` None, ``"stt"``
    unless ``use_stt`` is False (then ``"none"``); given both, ``use_stt`` must say whether the module is STT.

    Raises:
        ValueError: an unknown name (listing :data:`SHORT_TERM`), or ``use_stt`` contradicting ``short_term``.
    """
    if short_term is None:
        return "none" if use_stt is False else "stt"
    if short_term not in SHORT_TERM:
        raise ValueError(f"short_term must be one of {SHORT_TERM}, got {short_term!r}")
    if use_stt is not None and use_stt != (short_term == "stt"):
        raise ValueError(f"use_stt={use_stt} contradicts short_term={short_term!r} (leave use_stt unset)")
    return short_term


def build_short_term(name: str, fpn_dim: int, num_classes: int, **args: Any) -> ShortTermModule:
    """The short-term module ``name`` (one of :data:`SHORT_TERM`) for FPN levels ``fpn_dim`` wide (the fused
    per-frame feature: ``NUM_LEVELS * fpn_dim`` channels) and ``num_classes`` classes; ``args`` go to its
    constructor:

    - ``none``: :class:`QueryOnly` (no arguments);
    - ``stt``: :class:`~ssltm.model.stt.ShortTermTransformer` (``dims``, ``depths``, ``head_dim``,
      ``window_size``, ``mlp_ratio``, ``shifted_windows``, ``checkpointing``) on the levels themselves;
    - ``netwarp``: :class:`~ssltm.model.netwarp.NetWarp` (``stride``, ``flowcnn``) on the fused feature;
    - ``st_ocr``: :class:`~ssltm.model.st_ocr.SpatialTemporalOCR` (``channels``, ``key_channels``,
      ``dropout``, ``aux_weight``, ``memory``) on the fused feature;
    - ``sparse_tt``: :class:`~ssltm.model.sparse_tt.SparseTemporalTransformer` (``offsets``, ``r``, ``tr``,
      ``s``, ``e``, ``eps``, ``heads``, ``stride``) on the fused feature.
    - ``cffm``: :class:`~ssltm.model.cffm.CFFM` (``dim``, ``depth``, ``heads``, ``dropout``, ``frame_weight``) on
      the fused feature of the query and exactly three adjacent frames.

    Raises:
        ValueError: an unknown name (listing the choices). TypeError: an argument the module does not take.
    """
    fused = NUM_LEVELS * fpn_dim
    if name == "none":
        return QueryOnly(fused, **args)
    if name == "stt":
        from .stt import ShortTermTransformer

        return ShortTermTransformer(fpn_dim, **args)
    if name == "netwarp":
        from .netwarp import NetWarp

        return NetWarp(fused, **args)
    if name == "st_ocr":
        from .st_ocr import SpatialTemporalOCR

        return SpatialTemporalOCR(fused, num_classes, **args)
    if name == "sparse_tt":
        from .sparse_tt import SparseTemporalTransformer

        return SparseTemporalTransformer(fused, **args)
    if name == "cffm":
        from .cffm import CFFM

        return CFFM(fused, num_classes, **args)
    raise ValueError(f"short_term must be one of {SHORT_TERM}, got {name!r}")
