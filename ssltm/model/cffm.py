"""CFFM (Coarse-to-Fine Feature Mining, Sun et al., CVPR 2022) as a short-term module.

The clip's fused stride-4 features are embedded (1x1 conv to ``dim``) and resized to stride 8; the frames are
ordered as CFFM orders them, farthest first and the query last (``[t-9, t-6, t-3, t]``). A layer of
:class:`CFFMBlock` updates the query: each of its 7x7 windows attends 289 keys, its own 49 tokens, 132 rolled
neighbours, and pooled tokens of the query and of every reference frame, the farther a frame the finer its
pooling (:func:`cffm_keys`, checked against the coordinate loops of :func:`cffm_keys_reference`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .heads import cross_entropy
from .neck import resize
from .short_term import ShortTermModule, check_positive_ints

WINDOW = 7
EXPAND = 3
FOCAL_WINDOW = 5
ROLLS = ((-EXPAND, -EXPAND), (-EXPAND, EXPAND), (EXPAND, -EXPAND), (EXPAND, EXPAND))
# Per reference frame, farthest first: focal_l (pooled tokens per window side) and the unfolded kernel.
FOCAL_L_CLIPS = (1, 2, 3)
FOCAL_KERNEL_CLIPS = (7, 5, 3)
NUM_FRAMES = 1 + len(FOCAL_L_CLIPS)
MASKED = -100.0  # the logit offset of an unfold position outside the pooled map


def _segments() -> list[tuple[int, int, int]]:
    """``(pool, kernel, stride)`` of each pooled segment in key order: the query's own pooled windows, then the
    reference frames farthest first (``pool`` pixels per pooled token, after resizing)."""
    query = (WINDOW, FOCAL_WINDOW, 1)
    return [query, *((WINDOW // lv, k, lv) for lv, k in zip(FOCAL_L_CLIPS, FOCAL_KERNEL_CLIPS, strict=True))]


SEGMENTS = _segments()
NUM_NEIGHBOURS = 4 * WINDOW**2 - 4 * (WINDOW - EXPAND) ** 2
NUM_KEYS = WINDOW**2 + NUM_NEIGHBOURS + sum(k * k for _, k, _ in SEGMENTS)


def _rolled_positions() -> list[int]:
    """Indices into the four rolled windows (concatenated, 196 positions) that lie outside the window itself
    (plain ints: the module may first be imported under a meta-device context)."""
    inside = lambda i, s: 0 <= i - s < WINDOW  # noqa: E731
    positions = [(sy, sx, i, j) for sy, sx in ROLLS for i in range(WINDOW) for j in range(WINDOW)]
    return [n for n, (sy, sx, i, j) in enumerate(positions) if not (inside(i, sy) and inside(j, sx))]


_ROLLED = _rolled_positions()


def windows(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, C)`` with H, W multiples of 7 -> ``(B, nW, 49, C)``, windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // WINDOW, WINDOW, w // WINDOW, WINDOW, c).transpose(2, 3)
    return x.reshape(b, -1, WINDOW * WINDOW, c)


def cffm_keys(x: torch.Tensor, pooled: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The key (or value) tokens of every query window, by rolls and unfolds.

    Args:
        x: ``(B, H, W, C)``, the query frame's tokens, H and W multiples of 7 (``nWh = H / 7``, ``nWw = W / 7``).
        pooled: the four pooled maps ``(B, h_i, w_i, C)`` in :data:`SEGMENTS` order: the query's
            ``(nWh, nWw)``, then t-9's ``(nWh, nWw)``, t-6's ``(2 nWh, 2 nWw)`` and t-3's ``(3 nWh, 3 nWw)``.

    Returns:
        ``(B, nW, 289, C)`` tokens and the ``(nW, 289)`` additive mask: ``-100`` on unfold positions outside a
        pooled map, 0 elsewhere.
    """
    b, h, w, c = x.shape
    own = windows(x)
    rolled = torch.cat([windows(torch.roll(x, shifts, dims=(1, 2))) for shifts in ROLLS], dim=2)
    keys = [own, rolled[:, :, torch.tensor(_ROLLED, device=x.device)]]
    masks = [x.new_zeros(own.shape[1], own.shape[2] + NUM_NEIGHBOURS)]
    for p, (_, kernel, stride) in zip(pooled, SEGMENTS, strict=True):
        args = dict(kernel_size=kernel, padding=kernel // 2, stride=stride)
        tokens = F.unfold(p.permute(0, 3, 1, 2), **args).view(b, c, kernel * kernel, -1)
        keys.append(tokens.permute(0, 3, 2, 1))
        valid = F.unfold(p.new_ones(1, 1, *p.shape[1:3]), **args)[0].transpose(0, 1)
        masks.append(torch.where(valid > 0, 0.0, MASKED))
    return torch.cat(keys, dim=2), torch.cat(masks, dim=1)


def cffm_keys_reference(x: torch.Tensor, frames: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cffm_keys` from explicit coordinates, window by window, in float64 (slow; for tests).

    The rolled neighbours of the window at ``(y0, x0)`` are, for each roll ``(sy, sx)`` in :data:`ROLLS` and
    each window position ``(i, j)`` with ``(i - sy, j - sx)`` outside the window, the token at
    ``((y0 + i - sy) mod H, (x0 + j - sx) mod W)``; a pooled segment with kernel ``k`` and stride ``s`` gives
    the ``k x k`` pooled tokens around ``(s wy, s wx)``, masked where they fall outside the pooled map.
    """
    x = x.double()
    frames = [f.double() for f in frames]
    b, h, w, c = x.shape
    nwh, nww = h // WINDOW, w // WINDOW
    keys = x.new_zeros(b, nwh * nww, NUM_KEYS, c)
    mask = x.new_zeros(nwh * nww, NUM_KEYS)
    for wy in range(nwh):
        for wx in range(nww):
            n, y0, x0 = wy * nww + wx, wy * WINDOW, wx * WINDOW
            tokens, masked = [], []
            for i in range(WINDOW):
                for j in range(WINDOW):
                    tokens.append(x[:, y0 + i, x0 + j])
            for sy, sx in ROLLS:
                for i in range(WINDOW):
                    for j in range(WINDOW):
                        ri, rj = i - sy, j - sx
                        if 0 <= ri < WINDOW and 0 <= rj < WINDOW:
                            continue
                        tokens.append(x[:, (y0 + ri) % h, (x0 + rj) % w])
            for p, (_, kernel, stride) in zip(frames, SEGMENTS, strict=True):
                for di in range(kernel):
                    for dj in range(kernel):
                        gy, gx = wy * stride - kernel // 2 + di, wx * stride - kernel // 2 + dj
                        if 0 <= gy < p.shape[1] and 0 <= gx < p.shape[2]:
                            tokens.append(p[:, gy, gx])
                        else:
                            masked.append(len(tokens))
                            tokens.append(x.new_zeros(b, c))
            keys[:, n] = torch.stack(tokens, dim=1)
            mask[n, masked] = MASKED
    return keys, mask


def _relative_index(kernel: int) -> torch.Tensor:
    """``(49, kernel^2)`` indices into a ``(7 + kernel - 1)^2`` table of a window position's offset to a
    ``kernel x kernel`` grid of tokens (Swin's table for ``kernel = 7``)."""
    q = torch.stack(torch.meshgrid(torch.arange(WINDOW), torch.arange(WINDOW), indexing="ij")).flatten(1)
    k = torch.stack(torch.meshgrid(torch.arange(kernel), torch.arange(kernel), indexing="ij")).flatten(1)
    rel = q[:, :, None] - k[:, None, :] + kernel - 1
    return rel[0] * (WINDOW + kernel - 1) + rel[1]


class CFFMBlock(nn.Module):
    """One CFFM block on ``(B, 4, H, W, dim)`` frames (farthest first, the query last): the query frame gets
    ``x += proj(attention)`` and ``x += MLP(LN(x))``; the reference frames are returned as they are."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.norm1 = nn.LayerNorm(dim)
        self.pools = nn.ModuleList(nn.Linear(s * s, 1) for s, _, _ in SEGMENTS)
        for pool in self.pools:
            nn.init.constant_(pool.weight, 1.0 / pool.in_features)
            nn.init.zeros_(pool.bias)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.window_table = nn.Parameter(torch.empty(heads, (2 * WINDOW - 1) ** 2))
        self.neighbour_bias = nn.Parameter(torch.empty(1, heads, WINDOW * WINDOW, NUM_NEIGHBOURS))
        self.segment_tables = nn.ParameterList(
            nn.Parameter(torch.empty(heads, (WINDOW + k - 1) ** 2)) for _, k, _ in SEGMENTS
        )
        for table in (self.window_table, self.neighbour_bias, *self.segment_tables):
            nn.init.trunc_normal_(table, std=0.02)
        self.register_buffer("window_index", _relative_index(WINDOW), persistent=False)
        for n, (_, kernel, _) in enumerate(SEGMENTS):
            self.register_buffer(f"segment_index_{n}", _relative_index(kernel), persistent=False)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def pooled(self, frames: torch.Tensor) -> list[torch.Tensor]:
        """Padded normalised frames ``(B, 4, H, W, C)`` -> the four pooled maps of :func:`cffm_keys`: the query
        and t-9 pooled 7x7 as they are, t-6 and t-3 resized (bilinear) to ``6 H / 7`` per side first, pooled
        3x3 and 2x2 (``Linear(s^2 -> 1)``)."""
        b, _, h, w, c = frames.shape
        nwh, nww = h // WINDOW, w // WINDOW
        maps = []
        for n, (pool, layer) in enumerate(zip(SEGMENTS, self.pools, strict=True)):
            size, _, per_window = pool
            x = frames[:, -1] if n == 0 else frames[:, n - 1]
            gh, gw = nwh * per_window, nww * per_window
            if (gh * size, gw * size) != (h, w):
                x = resize(x.permute(0, 3, 1, 2), (gh * size, gw * size)).permute(0, 2, 3, 1)
            x = x.reshape(b, gh, size, gw, size, c).permute(0, 1, 3, 5, 2, 4).reshape(b, gh, gw, c, size * size)
            maps.append(layer(x).squeeze(-1))
        return maps

    def position_bias(self) -> torch.Tensor:
        """``(heads, 49, 289)``: Swin's table inside the window, the learned neighbour table, one relative table
        per pooled segment."""
        parts = [self.window_table[:, self.window_index], self.neighbour_bias[0]]
        for n, table in enumerate(self.segment_tables):
            parts.append(table[:, getattr(self, f"segment_index_{n}")])
        return torch.cat(parts, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h, w, c = x.shape
        if t != NUM_FRAMES:
            raise ValueError(f"CFFMBlock takes {NUM_FRAMES} frames (B, 4, H, W, C), got shape {tuple(x.shape)}")
        pad_h, pad_w = -h % WINDOW, -w % WINDOW
        frames = F.pad(self.norm1(x), (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = h + pad_h, w + pad_w
        q, k, v = self.qkv(frames[:, -1]).chunk(3, dim=-1)
        pooled = [self.qkv(p).chunk(3, dim=-1)[1:] for p in self.pooled(frames)]
        keys, mask = cffm_keys(k, [kp for kp, _ in pooled])
        values, _ = cffm_keys(v, [vp for _, vp in pooled])
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(-3, -2)  # noqa: E731  (B, nW, heads, N, d)
        attn = (split(windows(q)) * self.scale) @ split(keys).transpose(-2, -1)
        attn = (attn + self.position_bias() + mask[:, None, None]).softmax(dim=-1)
        out = (attn @ split(values)).transpose(-3, -2).flatten(-2)  # (B, nW, 49, C)
        out = out.view(b, hp // WINDOW, wp // WINDOW, WINDOW, WINDOW, c).transpose(2, 3).reshape(b, hp, wp, c)
        query = x[:, -1] + self.proj(out[:, :h, :w])
        query = query + self.mlp(self.norm2(query))
        return torch.cat([x[:, :-1], query[:, None]], dim=1)


class CFFM(ShortTermModule):
    """CFFM on the clip's fused features: ``(B, 4, in_channels, h, w)`` (the query first, then the frames at
    the three offsets) -> ``(B, 2 dim, h, w)``, ``cat(x_q, enhanced x_q)`` upsampled back to stride 4.

    Loss ``cffm_frame``: ``frame_weight`` times the cross entropy of a per-frame classifier (dropout + 1x1,
    CFFM's ``linear_pred``) on the query's ``dim``-channel stride-8 feature, from the last training forward.
    """

    loss_terms = ("cffm_frame",)

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        dim: int = 256,
        depth: int = 2,
        heads: int = 8,
        dropout: float = 0.1,
        frame_weight: float = 0.5,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        check_positive_ints(in_channels=in_channels, num_classes=num_classes, dim=dim, depth=depth, heads=heads)
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if not frame_weight >= 0:
            raise ValueError(f"frame_weight must be >= 0, got {frame_weight!r}")
        self.in_channels, self.out_channels = in_channels, 2 * dim
        self.frame_weight, self.ignore_index = float(frame_weight), ignore_index
        self.embed = nn.Conv2d(in_channels, dim, 1)
        self.blocks = nn.ModuleList(CFFMBlock(dim, heads) for _ in range(depth))
        self.frame_head = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(dim, num_classes, 1))
        self._frame_logits: torch.Tensor | None = None

    def frames(self, feats: torch.Tensor) -> torch.Tensor:
        """``(B, 4, in_channels, h, w)`` (query first) -> ``(B, 4, dim, int(h/2), int(w/2))`` embedded frames
        in CFFM's order, farthest first and the query last."""
        if feats.dim() != 5 or feats.shape[1] != NUM_FRAMES or feats.shape[2] != self.in_channels:
            raise ValueError(
                f"feats must be (B, {NUM_FRAMES}, {self.in_channels}, h, w) (the query, then 3 adjacent frames), "
                f"got shape {tuple(feats.shape)}"
            )
        h, w = feats.shape[-2:]
        x = resize(self.embed(feats.flatten(0, 1)), (int(h / 2), int(w / 2)))
        return x.unflatten(0, feats.shape[:2]).flip(1)

    def forward(
        self,
        feats: torch.Tensor,
        images: torch.Tensor | None = None,
        flow: torch.Tensor | None = None,
        state: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        x = self.frames(feats)
        if self.training:
            self._frame_logits = self.frame_head(x[:, -1])
        y = x.permute(0, 1, 3, 4, 2)
        for block in self.blocks:
            y = block(y)
        out = torch.cat([x[:, -1], y[:, -1].permute(0, 3, 1, 2)], dim=1)
        return resize(out, feats.shape[-2:])

    def losses(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._frame_logits is None:
            raise RuntimeError("CFFM.losses needs a training forward first")
        logits = resize(self._frame_logits, labels.shape[-2:])
        return {"cffm_frame": self.frame_weight * cross_entropy(logits, labels.long(), self.ignore_index)}
