"""Sparse Temporal Transformer (Li et al., ACM MM 2021), reconstructed from the authors' slides: one attention
layer whose queries are the query frame's least self-similar pixels (the neighbouring similarity matrix) and
whose keys are windows around the query position in each clip frame, wider in farther frames."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .short_term import ShortTermModule


def key_radii(distances: Sequence[int], s: int = 1, e: int = 5, eps: int = 1) -> tuple[int, ...]:
    """The key window radius ``l_d = min(s + d * eps, e)`` of each frame at temporal distance ``d`` (0 for the
    query frame, the offset value for an adjacent frame); the frame gives the ``(2 l_d + 1)²`` window."""
    return tuple(min(s + d * eps, e) for d in distances)


def key_count(distances: Sequence[int], s: int = 1, e: int = 5, eps: int = 1) -> int:
    """Keys per query: ``sum((2 l_d + 1)²)`` over the frames at ``distances`` (see :func:`key_radii`)."""
    return sum((2 * r + 1) ** 2 for r in key_radii(distances, s, e, eps))


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


class SparseTemporalBlock(nn.Module):
    """The attention layer on ``(B, T, C, h, w)`` features (the query frame first) at its own resolution.

    Query selection: ``q = W_q LN(f)`` for every pixel of the query frame; with ``Q_n`` its ``(2r+1)² - 1``
    neighbours within radius ``r`` (the centre excluded, out-of-image ones masked), ``p_sim = softmax(Q_n·q)``
    and ``D = KL(p_u || p_sim) + mean(1 - cos(Q_n, q))``, ``p_u`` uniform over the valid neighbours. The
    ``floor(tr · h · w)`` pixels of each image with the largest ``D`` are selected; ``D`` gets no gradient.

    Key selection: frame ``j`` at temporal distance ``distances[j]`` gives the keys of the window of radius
    :func:`key_radii` around the query position, out-of-image keys masked.

    Block: pre-LN multi-head attention (``heads`` heads, scale ``head_dim^-½``) over the gathered keys, then a
    pre-LN GELU FFN (ratio 4): ``y = f + a + FFN(LN(f + a))`` with ``a = proj(attn)`` at selected pixels;
    every other pixel is returned as it is.
    """

    def __init__(
        self,
        channels: int,
        distances: Sequence[int],
        r: int = 5,
        tr: float = 0.5,
        s: int = 1,
        e: int = 5,
        eps: int = 1,
        heads: int = 8,
    ) -> None:
        super().__init__()
        _check_int("channels", channels, 1)
        _check_int("heads", heads, 1)
        if channels % heads:
            raise ValueError(f"channels {channels} must be divisible by heads {heads}")
        for name, value, low in (("r", r, 1), ("s", s, 0), ("e", e, 0), ("eps", eps, 0)):
            _check_int(name, value, low)
        if s > e:
            raise ValueError(f"s must be at most e, got s={s}, e={e}")
        if isinstance(tr, bool) or not isinstance(tr, (int, float)) or not 0 <= tr <= 1:
            raise ValueError(f"tr must be a fraction in [0, 1], got {tr!r}")
        self.channels, self.heads, self.r, self.tr = channels, heads, r, float(tr)
        self.radii = key_radii(distances, s, e, eps)
        self.norm = nn.LayerNorm(channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(channels, 2 * channels)
        self.proj = nn.Linear(channels, channels)
        self.ffn_norm = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels))

    @property
    def num_keys(self) -> int:
        return sum((2 * r + 1) ** 2 for r in self.radii)

    def queries(self, query: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` -> ``q = W_q LN(f)`` ``(B, C, h, w)``."""
        return self.q(self.norm(query.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)

    def dissimilarity(self, q: torch.Tensor) -> torch.Tensor:
        """``D (B, h, w)`` of the queries ``q (B, C, h, w)``, one neighbour offset at a time."""
        b, _, h, w = q.shape
        r = self.r
        padded = F.pad(q, (r, r, r, r))
        inside = F.pad(q.new_ones(1, 1, h, w), (r, r, r, r))
        norm = q.norm(dim=1).clamp_min(1e-8)
        dots, cosines, masks = [], [], []
        for dy in range(2 * r + 1):
            for dx in range(2 * r + 1):
                if dy == r and dx == r:
                    continue
                n = padded[:, :, dy : dy + h, dx : dx + w]
                dot = (n * q).sum(1)
                dots.append(dot)
                cosines.append(dot / (n.norm(dim=1).clamp_min(1e-8) * norm))
                masks.append(inside[:, 0, dy : dy + h, dx : dx + w].expand(b, h, w))
        dots, cosines, valid = torch.stack(dots), torch.stack(cosines), torch.stack(masks) > 0
        count = valid.sum(0)
        log_p = dots.masked_fill(~valid, float("-inf")).log_softmax(0)
        kl = -torch.log(count.to(q.dtype)) - log_p.masked_fill(~valid, 0).sum(0) / count
        cos = (1 - cosines).masked_fill(~valid, 0).sum(0) / count
        return kl + cos

    def select(self, q: torch.Tensor) -> torch.Tensor:
        """The selected pixels' flat indices ``(B, k)`` (``k = floor(tr · h · w)``), by ``D``, without gradient."""
        n = q.shape[-2] * q.shape[-1]
        k = math.floor(self.tr * n)
        with torch.no_grad():
            d = self.dissimilarity(q.detach().float()).flatten(1)
            return d.topk(k, dim=1).indices

    def key_offsets(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per key, its frame, ``dy`` and ``dx`` ``(n_keys,)``, frame by frame, rows then columns."""
        frames, dys, dxs = [], [], []
        for j, r in enumerate(self.radii):
            span = torch.arange(-r, r + 1, device=device)
            dy, dx = torch.meshgrid(span, span, indexing="ij")
            frames.append(torch.full((dy.numel(),), j, device=device))
            dys.append(dy.flatten())
            dxs.append(dx.flatten())
        return torch.cat(frames), torch.cat(dys), torch.cat(dxs)

    def gather(
        self, keys: torch.Tensor, values: torch.Tensor, selected: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each selected query's keys and values: ``keys``, ``values`` ``(B, T, h, w, C)`` and the flat query
        indices ``selected (B, k)`` -> ``(B, k, n_keys, C)`` each (:meth:`key_offsets` order) and the
        ``(B, k, n_keys)`` mask of keys inside the image (those outside read zero padding)."""
        b, _, h, w, c = keys.shape
        pad = max(self.radii)
        hp, wp = h + 2 * pad, w + 2 * pad
        keys = F.pad(keys, (0, 0, pad, pad, pad, pad)).flatten(1, 3)  # (B, T * hp * wp, C)
        values = F.pad(values, (0, 0, pad, pad, pad, pad)).flatten(1, 3)
        frame, dy, dx = self.key_offsets(keys.device)
        y, xs = selected // w, selected % w  # (B, k)
        ky, kx = y[..., None] + dy, xs[..., None] + dx  # (B, k, n_keys)
        valid = (ky >= 0) & (ky < h) & (kx >= 0) & (kx < w)
        index = ((frame * hp + ky + pad) * wp + kx + pad).flatten(1)[..., None].expand(-1, -1, c)
        shape = (b, selected.shape[1], -1, c)
        return keys.gather(1, index).view(shape), values.gather(1, index).view(shape), valid

    def forward(self, x: torch.Tensor, selected: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, T, C, h, w)`` -> the query frame's ``(B, C, h, w)``; ``selected (B, k)`` flat indices
        replaces the selection by ``D`` (tests)."""
        b, t, c, h, w = x.shape
        if t != len(self.radii):
            raise ValueError(f"x must hold {len(self.radii)} frames (the query first), got shape {tuple(x.shape)}")
        query = x[:, 0]
        q_all = self.queries(query)
        if selected is None:
            selected = self.select(q_all)
        flat = query.flatten(2)
        if selected.shape[1] == 0:
            return query
        keys, values = self.kv(self.norm(x.permute(0, 1, 3, 4, 2))).chunk(2, dim=-1)  # (B, T, h, w, C) each
        keys, values, valid = self.gather(keys, values, selected)
        k = selected.shape[1]
        keys = keys.view(b, k, -1, self.heads, c // self.heads)
        values = values.view(b, k, -1, self.heads, c // self.heads)
        q = q_all.flatten(2).gather(2, selected[:, None].expand(-1, c, -1)).transpose(1, 2)
        q = q.view(b, k, self.heads, c // self.heads)
        scores = torch.einsum("bqhd,bqnhd->bqhn", q, keys) * (c // self.heads) ** -0.5
        scores = scores.masked_fill(~valid[:, :, None], float("-inf"))
        attended = torch.einsum("bqhn,bqnhd->bqhd", scores.softmax(-1), values).reshape(b, k, c)
        own = flat.gather(2, selected[:, None].expand(-1, c, -1)).transpose(1, 2)  # (B, k, C)
        mid = own + self.proj(attended)
        out = mid + self.ffn(self.ffn_norm(mid))
        return flat.scatter(2, selected[:, None].expand(-1, c, -1), out.transpose(1, 2).to(flat.dtype)).view(b, c, h, w)


class SparseTemporalTransformer(ShortTermModule):
    """Sparse-TT on the fused features: ``(B, 1 + len(offsets), channels, h, w)`` (stride 4, the query first)
    -> ``(B, channels, h, w)``.

    The features are resized bilinearly (``align_corners=False``) to stride ``stride``
    (``(h · 4 // stride, w · 4 // stride)``), go through :class:`SparseTemporalBlock` with the query frame at
    distance 0 and each adjacent frame at its offset, and the block's change of the query frame is resized back
    to stride 4 and added to the query's feature: with nothing selected (``tr = 0``) the output is the query's
    feature itself. ``out_channels = channels``.
    """

    def __init__(
        self,
        channels: int,
        offsets: Sequence[int],
        r: int = 5,
        tr: float = 0.5,
        s: int = 1,
        e: int = 5,
        eps: int = 1,
        heads: int = 8,
        stride: int = 8,
    ) -> None:
        super().__init__()
        offsets = tuple(offsets)
        if not all(isinstance(o, int) and not isinstance(o, bool) and o > 0 for o in offsets):
            raise ValueError(f"offsets must be positive ints, got {offsets!r}")
        _check_int("stride", stride, 4)
        if stride % 4:
            raise ValueError(f"stride must be a multiple of 4 (the fused features' stride), got {stride}")
        self.out_channels = channels
        self.offsets, self.stride = offsets, stride
        self.block = SparseTemporalBlock(channels, (0, *offsets), r, tr, s, e, eps, heads)

    def forward(
        self,
        feats: torch.Tensor,
        images: torch.Tensor | None = None,
        flow: torch.Tensor | None = None,
        state: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        t = 1 + len(self.offsets)
        if feats.dim() != 5 or feats.shape[1] != t or feats.shape[2] != self.out_channels:
            raise ValueError(
                f"feats must be (B, {t}, {self.out_channels}, h, w) (the query, then the frames at offsets "
                f"{list(self.offsets)}), got shape {tuple(feats.shape)}"
            )
        h, w = feats.shape[-2:]
        size = (h * 4 // self.stride, w * 4 // self.stride)
        if min(size) < 2:
            raise ValueError(
                f"sparse_tt needs a feature map of at least 2x2 at stride {self.stride}: the stride-4 features "
                f"{h}x{w} give {size[0]}x{size[1]} (input frames at least {2 * self.stride}x{2 * self.stride})"
            )
        query = feats[:, 0]
        x = feats if size == (h, w) else F.interpolate(feats.flatten(0, 1), size, mode="bilinear").unflatten(0, (-1, t))
        if math.floor(self.block.tr * size[0] * size[1]) == 0:
            return query
        change = self.block(x) - x[:, 0]
        if size != (h, w):
            change = F.interpolate(change, (h, w), mode="bilinear")
        return query + change


def sparse_tt_reference(block: SparseTemporalBlock, x: torch.Tensor, selected: torch.Tensor | None = None):
    """Float64 brute force of :meth:`SparseTemporalBlock.forward`: ``D`` and the attention by explicit loops over
    the query pixels, their neighbours and their keys. ``selected (B, h, w)`` bool: the pixels to update; None:
    the ``floor(tr · h · w)`` pixels with the largest ``D`` (ties broken by the lower index).

    Returns ``(out (B, C, h, w), D (B, h, w))`` in float64."""
    x = x.double()
    p = {k: v.detach().double() for k, v in block.state_dict().items()}
    b, t, c, h, w = x.shape
    nh, dh = block.heads, c // block.heads

    def norm(v, prefix):
        return F.layer_norm(v, (c,), p[f"{prefix}.weight"], p[f"{prefix}.bias"], block.norm.eps)

    def lin(v, prefix):
        return v @ p[f"{prefix}.weight"].T + p[f"{prefix}.bias"]

    feats = x.permute(0, 1, 3, 4, 2)  # (B, T, h, w, C)
    q = lin(norm(feats[:, 0], "norm"), "q")
    kv = lin(norm(feats, "norm"), "kv")
    keys, values = kv[..., :c], kv[..., c:]
    d = torch.zeros(b, h, w, dtype=torch.float64)
    for i in range(b):
        for y in range(h):
            for xx in range(w):
                dots, cos = [], []
                for ny in range(y - block.r, y + block.r + 1):
                    for nx in range(xx - block.r, xx + block.r + 1):
                        if (ny, nx) != (y, xx) and 0 <= ny < h and 0 <= nx < w:
                            n, v = q[i, ny, nx], q[i, y, xx]
                            dots.append(n @ v)
                            cos.append(n @ v / (n.norm() * v.norm()))
                dots, cos = torch.stack(dots), torch.stack(cos)
                p_sim = dots.softmax(0)
                p_u = 1 / len(dots)
                d[i, y, xx] = (p_u * torch.log(p_u / p_sim)).sum() + (1 - cos).mean()
    if selected is None:
        k = math.floor(block.tr * h * w)
        selected = torch.zeros(b, h * w, dtype=torch.bool)
        for i in range(b):
            order = sorted(range(h * w), key=lambda j: (-d[i].flatten()[j].item(), j))
            selected[i, order[:k]] = True
        selected = selected.view(b, h, w)
    out = x[:, 0].clone()
    for i in range(b):
        for y in range(h):
            for xx in range(w):
                if not selected[i, y, xx]:
                    continue
                ks, vs = [], []
                for j, r in enumerate(block.radii):
                    for ky in range(y - r, y + r + 1):
                        for kx in range(xx - r, xx + r + 1):
                            if 0 <= ky < h and 0 <= kx < w:
                                ks.append(keys[i, j, ky, kx])
                                vs.append(values[i, j, ky, kx])
                ks, vs = torch.stack(ks).view(-1, nh, dh), torch.stack(vs).view(-1, nh, dh)
                qh = q[i, y, xx].view(nh, dh)
                attn = (torch.einsum("hd,nhd->hn", qh, ks) * dh**-0.5).softmax(-1)
                a = lin(torch.einsum("hn,nhd->hd", attn, vs).reshape(c), "proj")
                mid = feats[i, 0, y, xx] + a
                hidden = F.gelu(lin(norm(mid, "ffn_norm"), "ffn.0"))
                out[i, :, y, xx] = mid + lin(hidden, "ffn.2")
    return out, d
