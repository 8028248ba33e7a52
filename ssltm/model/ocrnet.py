"""OCRNet (Yuan et al., ECCV 2020) as openseg's ``SpatialOCRNet`` on a stride-8 trunk, the decoder of the VSPW
paper's video baselines, and the short-term modules it takes: none (OCRNet), ``st_ocr`` (TCB, the temporal
context block) and ``netwarp`` (NetWarp-OCR)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation

from ssltm_kernels import soft_region_pool

from .heads import SegHead
from .neck import resize
from .netwarp import NetWarp
from .ocr import ObjectAttention
from .short_term import ShortTermModule, check_positive_ints
from .st_ocr import MEMORIES, clip_regions

DECODERS = ("upernet", "ocrnet")
OCR_SHORT_TERM = ("none", "st_ocr", "netwarp")  # the short-term modules the ocrnet decoder takes


def stride8_levels(levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A trunk's C2..C5 ``[(N, C_i, h_i, w_i)]`` -> ``[C4, C5]`` at C3's size (stride 8): a dilated ResNet's are
    there already; a trunk striding to 32 (Swin) has them resized bilinearly (no parameters)."""
    size = levels[1].shape[-2:]
    return [resize(x, size) for x in levels[2:]]


class OCRNetHead(nn.Module):
    """OCRNet's head on stride-8 C4 and C5 (openseg's ``SpatialOCRNet``).

    - ``aux_head``: C4 -> conv3x3 ``channels`` + BN + ReLU, Dropout2d, 1x1 -> ``num_classes``: the soft object
      regions ``A`` (also the auxiliary prediction, trained with weight 0.4);
    - ``pixels``: C5 -> conv3x3 ``channels`` + BN + ReLU: the pixel features ``X``;
    - ``R = soft_region_pool(A, X)`` ``(N, K, channels)``: per class, the softmax-over-positions-weighted mean
      of the pixels;
    - ``attention``: :class:`~ssltm.model.ocr.ObjectAttention` (``key_channels``) of ``X`` over ``R``;
    - ``fuse``: ``cat(context, X)`` -> 1x1 ``channels`` + BN + ReLU: the OCR output (the model's ``features``);
    - :meth:`classify`: Dropout2d, then ``classifier``, 1x1 -> ``num_classes``.

    The steps are separate methods (:meth:`regions`, :meth:`context`) so that the video variants can pool the
    regions of several frames (TCB) or combine the OCR outputs of two (NetWarp-OCR) in between.
    """

    def __init__(
        self,
        c4_channels: int,
        c5_channels: int,
        num_classes: int,
        channels: int = 512,
        key_channels: int = 256,
        dropout: float = 0.05,
    ) -> None:
        super().__init__()
        check_positive_ints(
            c4_channels=c4_channels,
            c5_channels=c5_channels,
            num_classes=num_classes,
            channels=channels,
            key_channels=key_channels,
        )
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.channels = channels
        self.aux_head = SegHead(c4_channels, channels, num_classes, dropout, kernel_size=3)
        self.pixels = Conv2dNormActivation(c5_channels, channels, 3)
        self.attention = ObjectAttention(channels, key_channels)
        self.fuse = Conv2dNormActivation(2 * channels, channels, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def regions(self, c4: torch.Tensor, c5: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(N, C4, h, w)``, ``(N, C5, h, w)`` -> aux logits ``A (N, K, h, w)``, pixels ``X (N, channels, h, w)``
        and region representations ``R (N, K, channels)``."""
        aux_logits, pixels = self.aux_head(c4), self.pixels(c5)
        return aux_logits, pixels, soft_region_pool(aux_logits, pixels)

    def context(self, pixels: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """Pixels ``(N, channels, h, w)`` attending regions ``(N, K', channels)`` -> the OCR output ``(N,
        channels, h, w)``."""
        return self.fuse(torch.cat([self.attention(pixels, regions), pixels], dim=1))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """OCR outputs ``(N, channels, h, w)`` -> class scores ``(N, K, h, w)``: Dropout2d, the 1x1 classifier."""
        return self.classifier(self.dropout(features))

    def forward(self, c4: torch.Tensor, c5: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """OCRNet on each image: ``(N, C4, h, w)``, ``(N, C5, h, w)`` -> logits and aux logits ``(N, K, h, w)``."""
        aux_logits, pixels, regions = self.regions(c4, c5)
        return self.classify(self.context(pixels, regions)), aux_logits


class OCRShortTerm(ShortTermModule):
    """A short-term module of the ocrnet decoder: ``forward(head, clip, images, flow, state)`` with the
    :class:`OCRNetHead` ``head`` and the clip's stride-8 ``[C4, C5]``, each ``(B, T, C_i, h, w)`` (the query
    first), returns the query's OCR output ``(B, channels, h, w)`` (the classifier's input) and its aux logits
    ``(B, K, h, w)``. ``images`` and ``flow`` as :class:`ShortTermModule`'s. A module that reads the query alone
    (``uses_adjacent`` False) serves ``SSLTM.forward(all_frames=True)``: every frame a one-frame clip."""

    def forward(
        self,
        head: OCRNetHead,
        clip: Sequence[torch.Tensor],
        images: torch.Tensor | None = None,
        flow: torch.Tensor | None = None,
        state: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class OCRQueryOnly(OCRShortTerm):
    """``none``: OCRNet on the query frame alone (the adjacent frames are not encoded). No parameters."""

    uses_adjacent = False

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.out_channels = channels

    def forward(self, head, clip, images=None, flow=None, state=None):
        c4, c5 = clip
        aux_logits, pixels, regions = head.regions(c4[:, 0], c5[:, 0])
        return head.context(pixels, regions), aux_logits


class TemporalContextBlock(OCRShortTerm):
    """``st_ocr`` with the ocrnet decoder: TCB. The aux head and the pixel conv run on every clip frame, the
    gather averages the region representations of all of them (:func:`~ssltm.model.st_ocr.clip_regions`, with
    its ``memory``: ``"first_clip"`` adds the video's first clip at inference), and the query's pixels attend
    that mean. On a clip of identical frames it is OCRNet. No parameters: the layers are the head's."""

    def __init__(self, channels: int, memory: str = "none") -> None:
        super().__init__()
        if memory not in MEMORIES:
            raise ValueError(f"memory must be one of {', '.join(MEMORIES)}, got {memory!r}")
        self.out_channels = channels
        self.memory = memory

    def forward(self, head, clip, images=None, flow=None, state=None):
        c4, c5 = clip
        b, t = c5.shape[:2]
        aux_logits, pixels, regions = head.regions(c4.flatten(0, 1), c5.flatten(0, 1))
        regions = clip_regions(regions.unflatten(0, (b, t)), self.memory, state, self.training)
        query = lambda x: x.unflatten(0, (b, t))[:, 0]
        return head.context(query(pixels), regions), query(aux_logits)


class NetWarpOCR(OCRShortTerm):
    """``netwarp`` with the ocrnet decoder: NetWarp-OCR. The query and its one adjacent (previous) frame each go
    through OCRNet up to the OCR output; the adjacent frame's is warped onto the query and combined with it by
    a :class:`~ssltm.model.netwarp.NetWarp` (``ocr``: FlowCNN, per-channel ``w0``, ``w1``) before the classifier.
    ``c5=True`` also combines the query's C5 with the adjacent frame's, warped by a second NetWarp (``c5``,
    its own FlowCNN and weights), before the query's OCR. Both work at stride 8."""

    needs_images = True
    needs_flow = True

    def __init__(self, channels: int, c5_channels: int, flowcnn: bool = True, c5: bool = False) -> None:
        super().__init__()
        if not isinstance(c5, bool):
            raise ValueError(f"c5 must be a bool, got {c5!r}")
        self.out_channels = channels
        self.ocr = NetWarp(channels, stride=8, flowcnn=flowcnn)
        self.c5 = NetWarp(c5_channels, stride=8, flowcnn=flowcnn) if c5 else None

    def forward(self, head, clip, images=None, flow=None, state=None):
        c4, c5 = clip
        if c5.shape[1] != 2:
            raise ValueError(
                f"netwarp reads the query and one adjacent frame: C5 must be (B, 2, C, h, w), got {tuple(c5.shape)}"
            )
        if self.c5 is not None:
            c5 = torch.stack([self.c5(c5, images, flow), c5[:, 1]], dim=1)
        aux_logits, pixels, regions = head.regions(c4.flatten(0, 1), c5.flatten(0, 1))
        outputs = head.context(pixels, regions).unflatten(0, c5.shape[:2])
        return self.ocr(outputs, images, flow), aux_logits.unflatten(0, c5.shape[:2])[:, 0]


def build_ocr_short_term(name: str, channels: int, c5_channels: int, **args: Any) -> OCRShortTerm:
    """The ocrnet decoder's short-term module ``name`` (one of :data:`OCR_SHORT_TERM`) for an OCR output
    ``channels`` wide and C5 ``c5_channels`` wide; ``args`` go to its constructor: ``none`` none, ``st_ocr``
    ``memory``, ``netwarp`` ``flowcnn`` and ``c5``.

    Raises:
        ValueError: a name the decoder does not take. TypeError: an argument the module does not take.
    """
    if name == "none":
        return OCRQueryOnly(channels, **args)
    if name == "st_ocr":
        return TemporalContextBlock(channels, **args)
    if name == "netwarp":
        return NetWarpOCR(channels, c5_channels, **args)
    raise ValueError(f"short_term must be one of {OCR_SHORT_TERM} with decoder 'ocrnet', got {name!r}")
