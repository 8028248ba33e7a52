"""Long-term context (paper §3.3-3.4): the shared OCR module, the category attention of RFCE and the
global category representations of GCC."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation

from ssltm_kernels import gcc_assign, soft_region_pool

from .heads import SegHead


class ObjectContext(nn.Module):
    """The shared OCR module (OCRNet's soft object regions): ``(B, C, h, w)`` features -> coarse class
    scores ``(B, K, h, w)`` (``phi_aux``) and category representations ``(B, K, D)``.

    ``phi_aux`` is conv + BN + ReLU + 1x1 classifier; its conv is 1x1 by default as in OCRNet's HRNet
    model (its input, ``F_q^st``, has already been mixed spatially by the FPN and the STT).

    The pixel features are mapped to ``D`` channels by a ``pixel_kernel_size`` conv + BN + ReLU (OCRNet's
    ``conv3x3_ocr`` is 3x3), then pooled per class with weights ``softmax`` over the positions of the class's
    coarse scores (``ssltm_kernels.soft_region_pool``, OCRNet's ``SpatialGather`` with scale 1).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        dim: int,
        aux_channels: int,
        dropout: float,
        aux_kernel_size: int = 1,
        pixel_kernel_size: int = 3,
    ) -> None:
        super().__init__()
        self.aux_head = SegHead(in_channels, aux_channels, num_classes, dropout, aux_kernel_size)
        self.pixels = Conv2dNormActivation(in_channels, dim, pixel_kernel_size)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, h, w)`` -> ``(aux_logits (B, K, h, w), categories (B, K, D))``."""
        aux_logits = self.aux_head(feats)
        return aux_logits, soft_region_pool(aux_logits, self.pixels(feats))


class CategoryAttention(nn.Module):
    """Multi-head attention of the pixels of ``F_q^st`` over category representations (Eq. 4):
    ``(B, C, h, w)`` queries, ``(B, M, D)`` keys = values -> ``F_q^lt`` ``(B, D, h, w)``.

    Standard projections (q: C -> D, k, v, out: D -> D; k without bias) around
    ``F.scaled_dot_product_attention`` with ``D / head_dim`` heads.
    """

    def __init__(self, query_channels: int, dim: int, head_dim: int = 32) -> None:
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"context_dim {dim} must be a multiple of the head dim {head_dim}")
        self.heads = dim // head_dim
        self.q = nn.Linear(query_channels, dim)
        # no key bias: it adds q.b to every score of a query, which the softmax cancels (its gradient is 0)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, pixels: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, h, w = pixels.shape
        q = self.q(pixels.flatten(2).transpose(1, 2))  # (B, h*w, D)
        heads = lambda x: x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, L, head_dim)
        out = F.scaled_dot_product_attention(heads(q), heads(self.k(context)), heads(self.v(context)))
        out = self.proj(out.transpose(1, 2).flatten(2))  # (B, h*w, D)
        return out.transpose(1, 2).unflatten(2, (h, w))


class GlobalCategoryContext(nn.Module):
    """GCC's global category representations ``G`` ``(T, K, D)``: ``T`` learnable cluster centres per class.

    ``context()`` gives ``G`` flattened to ``(T*K, D)`` for the attention; ``loss(categories, valid)`` is
    Eq. 8-9 through ``ssltm_kernels.gcc_assign`` (nearest centre per present class, MSE with
    stop-gradient on the categories, so it trains ``G`` only). In eval mode ``G`` is used detached: it is
    fixed at inference (paper §3.4) and receives no gradient there.
    """

    def __init__(self, num_clusters: int, num_classes: int, dim: int, init_std: float = 0.02) -> None:
        super().__init__()
        if num_clusters < 1:
            raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
        # The paper does not say how G starts; small random centres (as transformer embeddings) are
        # distinct, so the argmin is well defined, and the MSE pulls them to the classes' features.
        self.centers = nn.Parameter(torch.empty(num_clusters, num_classes, dim))
        nn.init.trunc_normal_(self.centers, std=init_std)

    def _centers(self) -> torch.Tensor:
        return self.centers if self.training else self.centers.detach()

    def context(self) -> torch.Tensor:
        """``(T*K, D)``."""
        return self._centers().flatten(0, 1)

    def loss(self, categories: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Eq. 9: ``(B, K, D)`` category representations, ``(B, K)`` bool present classes -> scalar."""
        return gcc_assign(categories.to(self.centers.dtype), self._centers(), valid)[2]
