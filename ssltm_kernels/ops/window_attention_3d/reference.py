"""Geometry, input validation and the pure-PyTorch reference of the window attention (the ground truth)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ssltm_kernels._op import autocast_dtype

SHIFT_MASK_VALUE = -100.0  # Video Swin's additive mask between tokens of different shift regions
# What every backend adds for a key that attn_mask masks out (False in a bool mask; the floor of a float mask):
# finite, because the online softmax of the kernels turns a row of -inf scores into NaN; -1e4 leaves masked keys
# a weight of exp(-1e4) = 0 and stays finite in fp16 scores beside the shift mask
MASKED_SCORE = -1e4
LOG2E = 1.4426950408889634  # the Triton kernels compute softmax in base 2: exp(x) = exp2(x * log2(e))


# --------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WindowGeometry:
    """Where every token goes. All triples are (time, height, width).

    ``window`` and ``shift`` are the effective ones (shrunk / dropped where an axis is not larger than
    the window); ``bias_window`` are the strides used to decode a flat in-window index into the
    coordinates the relative bias sees; ``table_window`` is the window the bias table was built for.
    """

    sizes: tuple[int, int, int]
    window: tuple[int, int, int]
    shift: tuple[int, int, int]
    bias_window: tuple[int, int, int]
    table_window: tuple[int, int, int]

    @property
    def padded(self) -> tuple[int, int, int]:
        return tuple(-(-s // w) * w for s, w in zip(self.sizes, self.window, strict=True))

    @property
    def windows_per_axis(self) -> tuple[int, int, int]:
        return tuple(p // w for p, w in zip(self.padded, self.window, strict=True))

    @property
    def num_windows(self) -> int:
        return math.prod(self.windows_per_axis)

    @property
    def tokens_per_window(self) -> int:
        return math.prod(self.window)

    @property
    def table_size(self) -> int:
        return math.prod([2 * w - 1 for w in self.table_window])

    @property
    def shifted(self) -> bool:
        return any(self.shift)


@dataclass(frozen=True)
class WindowAttentionCall:
    """One validated call, as every backend check, the dispatch, the launchers and the reference take it
    (flattened only into the ``torch.library`` ops' arguments): q, k, v ``(B, T, H, W, heads, head_dim)``
    sharing q's shape, dtype and device, their geometry, the bias table ``(table_size, heads)``, the pad rows
    ``(heads, head_dim)`` (None: zeros), the additive mask ``(num_masks, N, N)`` (``_additive_mask``; None:
    none), the score scale and the attention dropout."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    geom: WindowGeometry
    table: torch.Tensor | None
    pad_k: torch.Tensor | None
    pad_v: torch.Tensor | None
    attn_mask: torch.Tensor | None
    scale: float
    dropout_p: float = 0.0

    @property
    def heads(self) -> int:
        return self.q.shape[-2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    @property
    def num_masks(self) -> int:
        """Masks the windows cycle through (1 without a mask)."""
        return 1 if self.attn_mask is None else self.attn_mask.shape[0]


def _triple(value, name: str, minimum: int = 0) -> tuple[int, int, int]:
    """``value`` as 3 ints (t, h, w), each at least ``minimum``; one int stands for all three."""
    if isinstance(value, int):
        value = (value,) * 3
    if not isinstance(value, Sequence) or len(value) != 3 or not all(isinstance(x, int) for x in value):
        raise ValueError(f"{name} must be an int or 3 ints (t, h, w), got {value!r}")
    if min(value) < minimum:
        raise ValueError(f"{name} values must be at least {minimum}, got {tuple(value)}")
    return tuple(value)


def window_geometry(
    sizes: Sequence[int], window_size, shift_size=(0, 0, 0), rel_pos_mode: str = "swin"
) -> WindowGeometry:
    """Video Swin's ``get_window_size`` plus padding: the geometry for a ``(T, H, W)`` volume."""
    window_size = _triple(window_size, "window_size", minimum=1)
    shift_size = _triple(shift_size, "shift_size")
    if any(not 0 <= s < w for s, w in zip(shift_size, window_size, strict=True)):
        raise ValueError(
            f"shift_size must satisfy 0 <= shift < window per axis, got {shift_size} for window_size {window_size}"
        )
    if rel_pos_mode not in ("swin", "exact"):
        raise ValueError(f"rel_pos_mode must be 'swin' or 'exact', got {rel_pos_mode!r}")
    sizes = tuple(int(s) for s in sizes)
    window = tuple(min(s, w) for s, w in zip(sizes, window_size, strict=True))
    shift = tuple(0 if s <= w else sh for s, w, sh in zip(sizes, window_size, shift_size, strict=True))
    bias_window = window_size if rel_pos_mode == "swin" else window
    return WindowGeometry(sizes, window, shift, bias_window, window_size)


def _in_window_coords(n: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """``(3, len(n))`` coordinates of flat in-window indices ``n`` for a ``window`` of (t, h, w)."""
    _, wh, ww = window
    return torch.stack((n // (wh * ww), (n // ww) % wh, n % ww))


def relative_position_index(
    table_window: Sequence[int],
    num_tokens: int | None = None,
    bias_window: Sequence[int] | None = None,
    device=None,
) -> torch.Tensor:
    """``(N, N)`` int64 index into a bias table built for ``table_window``; query minus key coordinates.

    N defaults to ``prod(table_window)``; flat indices decode with ``bias_window``'s strides (default
    ``table_window``). With the defaults this is Video Swin's ``relative_position_index`` buffer.
    """
    ft, fh, fw = table_window
    num_tokens = math.prod(table_window) if num_tokens is None else num_tokens
    coords = _in_window_coords(torch.arange(num_tokens, device=device), bias_window or table_window)
    delta = coords[:, :, None] - coords[:, None, :]
    return (delta[0] + ft - 1) * (2 * fh - 1) * (2 * fw - 1) + (delta[1] + fh - 1) * (2 * fw - 1) + (delta[2] + fw - 1)


def _shift_region_ids(geom: WindowGeometry, device) -> torch.Tensor:
    """``(Tp, Hp, Wp)`` region id of each shifted, padded position (Video Swin's ``compute_mask``)."""
    ids = []
    for extent, w, s in zip(geom.padded, geom.window, geom.shift, strict=True):
        p = torch.arange(extent, device=device)
        ids.append((p >= extent - w).long() + (p >= extent - s).long() if s > 0 else torch.zeros_like(p))
    return 9 * ids[0][:, None, None] + 3 * ids[1][None, :, None] + ids[2][None, None, :]


# --------------------------------------------------------------------------------------------------
# Reference (pure PyTorch, the ground truth)
# --------------------------------------------------------------------------------------------------
def _partition(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """``(B, Tp, Hp, Wp, nh, hd)`` -> ``(B*nW, nh, N, hd)``, windows in (t, h, w) order, tokens likewise."""
    b, tp, hp, wp, heads, hd = x.shape
    wt, wh, ww = window
    x = x.reshape(b, tp // wt, wt, hp // wh, wh, wp // ww, ww, heads, hd).permute(0, 1, 3, 5, 7, 2, 4, 6, 8)
    return x.reshape(-1, heads, wt * wh * ww, hd)


def _reverse(x: torch.Tensor, window: Sequence[int], batch: int, padded: Sequence[int]) -> torch.Tensor:
    """``(B*nW, nh, N, hd)`` -> ``(B, Tp, Hp, Wp, nh, hd)``."""
    (wt, wh, ww), (tp, hp, wp) = window, padded
    heads, hd = x.shape[1], x.shape[3]
    x = x.reshape(batch, tp // wt, hp // wh, wp // ww, heads, wt, wh, ww, hd).permute(0, 1, 5, 2, 6, 3, 7, 4, 8)
    return x.reshape(batch, tp, hp, wp, heads, hd)


def _pad_volume(x: torch.Tensor, geom: WindowGeometry, fill: torch.Tensor | None) -> torch.Tensor:
    """Pad ``(B, T, H, W, nh, hd)`` to the padded extents; padded tokens take the row ``fill[nh, hd]``."""
    (t, h, w), (tp, hp, wp) = geom.sizes, geom.padded
    padded = F.pad(x, (0, 0, 0, 0, 0, wp - w, 0, hp - h, 0, tp - t))
    if fill is None or (tp, hp, wp) == (t, h, w):
        return padded
    valid = torch.zeros(tp, hp, wp, dtype=torch.bool, device=x.device)
    valid[:t, :h, :w] = True
    return torch.where(valid[:, :, :, None, None], padded, fill.to(x.dtype))


def _reference(call: WindowAttentionCall) -> torch.Tensor:
    q, geom, table = call.q, call.geom, call.table
    batch = q.shape[0]
    n = geom.tokens_per_window
    qp, kp, vp = (_pad_volume(x, geom, fill) for x, fill in ((q, None), (call.k, call.pad_k), (call.v, call.pad_v)))
    if geom.shifted:
        shifts, dims = tuple(-s for s in geom.shift), (1, 2, 3)
        qp, kp, vp = (torch.roll(x, shifts, dims) for x in (qp, kp, vp))
    qw, kw, vw = (_partition(x, geom.window) for x in (qp, kp, vp))
    attn = (qw * call.scale) @ kw.transpose(-2, -1)  # (B*nW, nh, N, N)
    if table is not None:
        index = relative_position_index(geom.table_window, n, geom.bias_window, q.device)
        attn = attn + table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1).to(attn.dtype)
    if geom.shifted:
        ids = _partition(_shift_region_ids(geom, q.device)[None, :, :, :, None, None], geom.window)[:, 0, :, 0]
        region_mask = (ids[:, :, None] != ids[:, None, :]).to(attn.dtype) * SHIFT_MASK_VALUE  # (nW, N, N)
        attn = (attn.view(batch, -1, *attn.shape[1:]) + region_mask[None, :, None]).view(attn.shape)
    if call.attn_mask is not None:
        masks = call.num_masks
        attn = (attn.view(-1, masks, *attn.shape[1:]) + call.attn_mask[None, :, None].to(attn.dtype)).view(attn.shape)
    attn = attn.softmax(dim=-1)
    if call.dropout_p > 0.0:
        attn = F.dropout(attn, p=call.dropout_p)
    out = _reverse(attn @ vw, geom.window, batch, geom.padded)
    if geom.shifted:
        out = torch.roll(out, geom.shift, (1, 2, 3))
    t, h, w = geom.sizes
    return out[:, :t, :h, :w]


def window_attention_3d_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window_size,
    rel_pos_bias_table: torch.Tensor | None = None,
    shift_size=(0, 0, 0),
    scale: float | None = None,
    pad_k: torch.Tensor | None = None,
    pad_v: torch.Tensor | None = None,
    rel_pos_mode: str = "swin",
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Video-Swin-style eager implementation: pad, roll, partition, attend, reverse, roll back, crop.

    Same arguments and result as :func:`window_attention_3d` (plus attention-probability dropout);
    differentiable by autograd in every input, any dtype.
    """
    return _reference(
        _validate(
            q,
            k,
            v,
            window_size,
            shift_size,
            rel_pos_bias_table,
            pad_k,
            pad_v,
            rel_pos_mode,
            attn_mask,
            scale,
            dropout_p,
        )
    )


# --------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------
def _check_qkv(q, k, v, rank: int, layout: str) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if q.dim() != rank:
        raise ValueError(f"q must be {rank}-D {layout}, got shape {tuple(q.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(x.shape)}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")
    if not q.is_floating_point():
        raise TypeError(f"q must be a floating-point tensor, got {q.dtype}")
    if q.numel() == 0:
        raise ValueError(f"q must not be empty, got shape {tuple(q.shape)}")


def _check_extras(q, geom: WindowGeometry, batch: int, table, pad_k, pad_v, attn_mask) -> None:
    heads, head_dim = q.shape[-2:]
    if table is not None:
        expected = (geom.table_size, heads)
        if table.dim() != 2 or tuple(table.shape) != expected:
            raise ValueError(
                f"rel_pos_bias_table must have shape {expected} for window_size "
                f"{geom.table_window} and {heads} heads, got {tuple(table.shape)}"
            )
        if table.device != q.device:
            raise ValueError(f"rel_pos_bias_table must be on q's device {q.device}, got {table.device}")
        if not table.is_floating_point():
            raise TypeError(f"rel_pos_bias_table must be floating point, got {table.dtype}")
    for name, pad in (("pad_k", pad_k), ("pad_v", pad_v)):
        if pad is None:
            continue
        if tuple(pad.shape) != (heads, head_dim):
            raise ValueError(f"{name} must have shape (heads, head_dim) = {(heads, head_dim)}, got {tuple(pad.shape)}")
        if pad.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {pad.device}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(
                f"attn_mask must be a float additive mask or a bool keep-mask (True = attend, as "
                f"SDPA's), got {attn_mask.dtype}"
            )
        n = geom.tokens_per_window
        if attn_mask.dim() != 3 or attn_mask.shape[1:] != (n, n):
            raise ValueError(f"attn_mask must have shape (num_masks, N, N) with N = {n}, got {tuple(attn_mask.shape)}")
        if (batch * geom.num_windows) % attn_mask.shape[0] != 0:
            raise ValueError(
                f"attn_mask's first dimension {attn_mask.shape[0]} must divide the number of "
                f"windows {batch * geom.num_windows}"
            )
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask must be on q's device {q.device}, got {attn_mask.device}")


def _scale(scale, head_dim: int) -> float:
    """The score scale: ``head_dim ** -0.5`` for None, else ``scale``, a finite real number."""
    if scale is None:
        return head_dim**-0.5
    # abs(nan) < inf is False too; a comparison, not math.isfinite, so that torch.compile traces a symbolic float
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not abs(scale) < math.inf:
        raise ValueError(f"scale must be a finite real number or None, got {scale!r}")
    return float(scale)


def _additive_mask(attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask every backend adds to the scores: a bool keep-mask (True = attend, SDPA's meaning) gives 0
    where True and ``MASKED_SCORE`` where False; a float mask is raised to at least ``MASKED_SCORE`` (-inf
    becomes it). A query whose keys are all masked therefore gets the attention of an unmasked row (all its
    scores move by the same amount), finite in every backend, where SDPA would return zeros."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return torch.where(attn_mask, 0.0, MASKED_SCORE)
    return attn_mask.clamp_min(MASKED_SCORE)


def _validate(
    q, k, v, window_size, shift_size, table, pad_k, pad_v, rel_pos_mode, attn_mask, scale=None, dropout_p: float = 0.0
) -> WindowAttentionCall:
    """The call record of valid volume arguments; invalid ones raise an error naming the argument."""
    _check_qkv(q, k, v, 6, "(B, T, H, W, heads, head_dim)")
    geom = window_geometry(q.shape[1:4], window_size, shift_size, rel_pos_mode)
    _check_extras(q, geom, q.shape[0], table, pad_k, pad_v, attn_mask)
    scale = _scale(scale, q.shape[-1])
    return WindowAttentionCall(q, k, v, geom, table, pad_k, pad_v, _additive_mask(attn_mask), scale, dropout_p)


def compute_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype the kernels run in: q's, or the autocast dtype where autocast casts q (see the ops'
    autocast registration)."""
    return autocast_dtype(q)
