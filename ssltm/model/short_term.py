"""Short-term temporal modules: what turns the clip's per-frame features into the query frame's ``F_q^st``.

SSLTM's STT is one; the systems the paper compares in Table 5 (NetWarp, Spatial-Temporal OCR, CFFM, ...) are
others. A module sees each clip frame's fused stride-4 feature, the query first, and returns the query's
short-term feature; SSLTM's heads (RFCE, GCC, ``phi_seg``) stack on whatever it returns.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


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
    """

    out_channels: int
    needs_images: bool = False
    needs_flow: bool = False
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
