"""Fused 3D (shifted) window multi-head self-attention with Video Swin semantics.

One op, one file: the pure-PyTorch reference, the Triton kernels and their launchers, the
``torch.library`` custom ops with autograd, and the public :func:`window_attention_3d`.

Semantics (Video Swin Transformer ``SwinTransformerBlock3D`` + ``WindowAttention3D``):
the volume ``(B, T, H, W)`` is zero-padded at the end of every axis to a multiple of the window,
cyclically shifted by ``-shift_size``, cut into non-overlapping windows of ``N = wt*wh*ww`` tokens,
attended within each window with a relative position bias (and, when shifted, Swin's region mask of
-100 between tokens that came from different regions), then shifted back and cropped. Padded tokens
are keys ``pad_k`` and values ``pad_v`` (Video Swin pads after LayerNorm, so they carry the qkv bias);
they are not masked out. An axis not larger than the window shrinks the window to the axis and drops
its shift, as Video Swin's ``get_window_size`` does.

``rel_pos_mode``: with a shrunk window, Video Swin slices its relative position index buffer as
``index[:N, :N]``, which decodes token coordinates with the *full* window's strides. That is right
when only the temporal axis shrinks and wrong otherwise. ``"swin"`` (default) reproduces it for
checkpoint parity; ``"exact"`` uses the true in-window coordinates.

The Triton and CUDA kernels do padding, shift, partition, reverse and crop as address arithmetic,
compute the bias index and the shift mask from coordinates, and never build an ``(nW, N, N)`` tensor.
All gradients are deterministic: no floating-point atomics, partial sums are reduced in fixed order.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

from ssltm_kernels._backend import (
    HAS_TRITON,
    BackendCheck,
    choose_backend,
    cuda_unavailable_reason,
    on_device,
    requested_backend,
    triton_interpreting,
    triton_unavailable_reason,
)
from ssltm_kernels._ext import _C
from ssltm_kernels._triton_specs import TYPE_NAMES, kernel_spec

__all__ = [
    "WindowGeometry",
    "window_geometry",
    "relative_position_index",
    "window_attention_3d",
    "window_attention_3d_reference",
    "window_attention_3d_windows",
    "window_attention_3d_qkvpacked",
    "can_run_cuda",
    "can_run_triton",
    "can_run_reference",
    "compute_dtype",
]

SHIFT_MASK_VALUE = -100.0  # Video Swin's additive mask between tokens of different shift regions
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The Triton kernels' limits (they keep a whole window's keys in one tile); the CUDA kernels' are
# _C.MAX_WINDOW_TOKENS and _C.MAX_HEAD_DIM, defined in csrc/ beside the kernels
MAX_WINDOW_TOKENS = 1024
MAX_HEAD_DIM = 256
# Shared memory a block may opt in to -> the largest key tile (one head's keys of a window, held in shared
# memory by the Triton kernels) taken there; compile_check proves each row for sm_90, sm_80 and sm_86
TRITON_KEY_TILE_LIMITS = ((227 * 1024, 64 * 1024), (163 * 1024, 32 * 1024), (99 * 1024, 16 * 1024))
MAX_TRITON_KEY_TILE_BYTES = TRITON_KEY_TILE_LIMITS[0][1]


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


def _triple(value, name: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        value = (value,) * 3
    if not isinstance(value, Sequence) or len(value) != 3 or not all(isinstance(x, int) for x in value):
        raise ValueError(f"{name} must be an int or 3 ints (t, h, w), got {value!r}")
    return tuple(value)


def window_geometry(
    sizes: Sequence[int], window_size, shift_size=(0, 0, 0), rel_pos_mode: str = "swin"
) -> WindowGeometry:
    """Video Swin's ``get_window_size`` plus padding: the geometry for a ``(T, H, W)`` volume."""
    window_size = _triple(window_size, "window_size")
    shift_size = _triple(shift_size, "shift_size")
    if min(window_size) < 1:
        raise ValueError(f"window_size must be positive, got {window_size}")
    if any(not 0 <= s < w for s, w in zip(shift_size, window_size, strict=True)):
        raise ValueError(f"shift_size must satisfy 0 <= shift < window per axis, got {shift_size} "
                         f"for window_size {window_size}")
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
    table_window: Sequence[int], num_tokens: int | None = None, bias_window: Sequence[int] | None = None,
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
    """``(B, Tp, Hp, Wp, nh, hd)`` -> ``(B*nW, nh, N, hd)``."""
    wt, wh, ww = window
    return rearrange(x, "b (nt wt) (nh wh) (nw ww) h d -> (b nt nh nw) h (wt wh ww) d", wt=wt, wh=wh, ww=ww)


def _reverse(x: torch.Tensor, window: Sequence[int], batch: int, padded: Sequence[int]) -> torch.Tensor:
    """``(B*nW, nh, N, hd)`` -> ``(B, Tp, Hp, Wp, nh, hd)``."""
    wt, wh, ww = window
    return rearrange(x, "(b nt nh nw) h (wt wh ww) d -> b (nt wt) (nh wh) (nw ww) h d", b=batch,
                     nt=padded[0] // wt, nh=padded[1] // wh, wt=wt, wh=wh, ww=ww)


def _pad_volume(x: torch.Tensor, geom: WindowGeometry, fill: torch.Tensor | None) -> torch.Tensor:
    """Pad ``(B, T, H, W, nh, hd)`` to the padded extents; padded tokens take the row ``fill[nh, hd]``."""
    (t, h, w), (tp, hp, wp) = geom.sizes, geom.padded
    padded = F.pad(x, (0, 0, 0, 0, 0, wp - w, 0, hp - h, 0, tp - t))
    if fill is None or (tp, hp, wp) == (t, h, w):
        return padded
    valid = torch.zeros(tp, hp, wp, dtype=torch.bool, device=x.device)
    valid[:t, :h, :w] = True
    return torch.where(valid[:, :, :, None, None], padded, fill.to(x.dtype))


def _reference_with_geometry(
    q, k, v, geom: WindowGeometry, table, scale: float, pad_k, pad_v, attn_mask, dropout_p: float = 0.0
) -> torch.Tensor:
    batch = q.shape[0]
    n = geom.tokens_per_window
    qp, kp, vp = (_pad_volume(x, geom, fill) for x, fill in ((q, None), (k, pad_k), (v, pad_v)))
    if geom.shifted:
        shifts, dims = tuple(-s for s in geom.shift), (1, 2, 3)
        qp, kp, vp = (torch.roll(x, shifts, dims) for x in (qp, kp, vp))
    qw, kw, vw = (_partition(x, geom.window) for x in (qp, kp, vp))
    attn = (qw * scale) @ kw.transpose(-2, -1)  # (B*nW, nh, N, N)
    if table is not None:
        index = relative_position_index(geom.table_window, n, geom.bias_window, q.device)
        attn = attn + table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1).to(attn.dtype)
    if geom.shifted:
        ids = _partition(_shift_region_ids(geom, q.device)[None, :, :, :, None, None], geom.window)[:, 0, :, 0]
        region_mask = (ids[:, :, None] != ids[:, None, :]).to(attn.dtype) * SHIFT_MASK_VALUE  # (nW, N, N)
        attn = (attn.view(batch, -1, *attn.shape[1:]) + region_mask[None, :, None]).view(attn.shape)
    if attn_mask is not None:
        masks = attn_mask.shape[0]
        attn = (attn.view(-1, masks, *attn.shape[1:]) + attn_mask[None, :, None].to(attn.dtype)).view(attn.shape)
    attn = attn.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
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
    geom = _validate(q, k, v, window_size, shift_size, rel_pos_bias_table, pad_k, pad_v, rel_pos_mode, attn_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _reference_with_geometry(q, k, v, geom, rel_pos_bias_table, scale, pad_k, pad_v, attn_mask, dropout_p)


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
            raise ValueError(f"rel_pos_bias_table must have shape {expected} for window_size "
                             f"{geom.table_window} and {heads} heads, got {tuple(table.shape)}")
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
        n = geom.tokens_per_window
        if attn_mask.dim() != 3 or attn_mask.shape[1:] != (n, n):
            raise ValueError(f"attn_mask must have shape (num_masks, N, N) with N = {n}, got {tuple(attn_mask.shape)}")
        if (batch * geom.num_windows) % attn_mask.shape[0] != 0:
            raise ValueError(f"attn_mask's first dimension {attn_mask.shape[0]} must divide the number of "
                             f"windows {batch * geom.num_windows}")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask must be on q's device {q.device}, got {attn_mask.device}")


def _validate(q, k, v, window_size, shift_size, table, pad_k, pad_v, rel_pos_mode, attn_mask) -> WindowGeometry:
    _check_qkv(q, k, v, 6, "(B, T, H, W, heads, head_dim)")
    geom = window_geometry(q.shape[1:4], window_size, shift_size, rel_pos_mode)
    _check_extras(q, geom, q.shape[0], table, pad_k, pad_v, attn_mask)
    return geom


def compute_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype the kernels run in: q's, or the autocast dtype where autocast casts q (see the ops'
    autocast registration below)."""
    device_type = q.device.type
    if q.dtype in KERNEL_DTYPES and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return q.dtype


def _dtype_reason(dtype: torch.dtype) -> str | None:
    return None if dtype in KERNEL_DTYPES else f"dtype {dtype} is not one of {KERNEL_DTYPES}"


def triton_key_tile_limit(shared_memory_bytes: int) -> int:
    """The largest key tile, in bytes, the Triton kernels take on a device whose blocks may opt in to
    ``shared_memory_bytes`` of shared memory; 0 below the smallest device they are proven on."""
    return next((tile for needed, tile in TRITON_KEY_TILE_LIMITS if shared_memory_bytes >= needed), 0)


def device_shared_memory(device: torch.device) -> int:
    """Shared memory a block may opt in to on ``device``; the interpreter runs the kernels as sm_90 would."""
    if device.type != "cuda":
        return TRITON_KEY_TILE_LIMITS[0][0]
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def _triton_reason(q: torch.Tensor, geom: WindowGeometry, dtype: torch.dtype) -> str | None:
    reason = triton_unavailable_reason(q) or _dtype_reason(dtype)
    if reason is not None:
        return reason
    if geom.tokens_per_window > MAX_WINDOW_TOKENS:
        return f"a window of {geom.tokens_per_window} tokens exceeds the Triton kernels' {MAX_WINDOW_TOKENS}"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} exceeds the Triton kernels' {MAX_HEAD_DIM}"
    shared = device_shared_memory(q.device)
    limit = triton_key_tile_limit(shared)
    tile = key_tile_bytes(geom.tokens_per_window, q.shape[-1], dtype)
    if limit == 0:
        return (f"the device's {shared // 1024} KB of shared memory per block is below the "
                f"{TRITON_KEY_TILE_LIMITS[-1][0] // 1024} KB the Triton kernels need")
    if tile > limit:
        return (f"a window's keys ({geom.tokens_per_window} tokens x head_dim {q.shape[-1]} in {dtype}, "
                f"{tile // 1024} KB padded to powers of 2) exceed the {limit // 1024} KB tile the Triton kernels "
                f"take with {shared // 1024} KB of shared memory per block")
    return None


def _cuda_reason(q: torch.Tensor, geom: WindowGeometry, dtype: torch.dtype) -> str | None:
    reason = cuda_unavailable_reason(q) or _dtype_reason(dtype)
    if reason is None and geom.tokens_per_window > _C.MAX_WINDOW_TOKENS:
        reason = f"a window of {geom.tokens_per_window} tokens exceeds the CUDA kernels' {_C.MAX_WINDOW_TOKENS}"
    if reason is None and q.shape[-1] > _C.MAX_HEAD_DIM:
        reason = f"head_dim {q.shape[-1]} exceeds the CUDA kernels' {_C.MAX_HEAD_DIM}"
    return reason


_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _cuda_kernels(q: torch.Tensor, geom: WindowGeometry, dtype: torch.dtype) -> tuple[str, str]:
    """The CUDA kernel family (``"tensor_cores"`` or ``"cuda_cores"``) of the forward and of the backward
    on q's device, as the extension's launchers decide it."""
    props = torch.cuda.get_device_properties(q.device)
    return tuple(_C.window_attention_3d_cuda_kernels(
        _DTYPE_NAMES[dtype], geom.tokens_per_window, q.shape[-1], props.shared_memory_per_block_optin,
        10 * props.major + props.minor))


_DROPOUT_WARNED = False


def _dropout_reason(dropout_p: float) -> str | None:
    return f"attention dropout (dropout_p={dropout_p}) runs only in the reference" if dropout_p > 0 else None


def _warn_dropout_fallback(dropout_p: float) -> None:
    global _DROPOUT_WARNED
    if not _DROPOUT_WARNED:
        _DROPOUT_WARNED = True
        warnings.warn(f"window_attention_3d: attention dropout (dropout_p={dropout_p}) is not fused in the kernels; "
                      "it runs in the PyTorch reference, which is slower and takes more memory (warned once)",
                      stacklevel=4)


def _checks(q, geom: WindowGeometry, dropout_p: float) -> dict[str, BackendCheck]:
    dtype = compute_dtype(q)
    dropout = _dropout_reason(dropout_p)
    cuda_reason = dropout or _cuda_reason(q, geom, dtype)
    return {
        "cuda": BackendCheck("cuda", cuda_reason, None if cuda_reason else _cuda_kernels(q, geom, dtype)),
        "triton": BackendCheck("triton", dropout or _triton_reason(q, geom, dtype)),
        "reference": BackendCheck("reference", None),
    }


def _can_run(backend: str, q, k, v, window_size, rel_pos_bias_table, shift_size, pad_k, pad_v, rel_pos_mode,
             attn_mask, dropout_p, raise_error) -> BackendCheck:
    geom = _validate(q, k, v, window_size, shift_size, rel_pos_bias_table, pad_k, pad_v, rel_pos_mode, attn_mask)
    check = _checks(q, geom, dropout_p)[backend]
    if raise_error:
        check.raise_if_unavailable("window_attention_3d")
    return check


def can_run_cuda(q, k, v, *, window_size, rel_pos_bias_table=None, shift_size=(0, 0, 0), pad_k=None, pad_v=None,
                 rel_pos_mode="swin", attn_mask=None, dropout_p=0.0, raise_error=False) -> BackendCheck:
    """Whether the compiled CUDA kernels can run :func:`window_attention_3d` on these arguments (truthy),
    with the reason when not (``raise_error``: raise it) and, when they can, ``kernels``: the family
    (``"tensor_cores"`` or ``"cuda_cores"``) of the forward and of the backward on q's device."""
    return _can_run("cuda", q, k, v, window_size, rel_pos_bias_table, shift_size, pad_k, pad_v, rel_pos_mode,
                    attn_mask, dropout_p, raise_error)


def can_run_triton(q, k, v, *, window_size, rel_pos_bias_table=None, shift_size=(0, 0, 0), pad_k=None, pad_v=None,
                   rel_pos_mode="swin", attn_mask=None, dropout_p=0.0, raise_error=False) -> BackendCheck:
    """Whether the Triton kernels can run :func:`window_attention_3d` on these arguments (truthy), with
    the reason when not (``raise_error``: raise it)."""
    return _can_run("triton", q, k, v, window_size, rel_pos_bias_table, shift_size, pad_k, pad_v, rel_pos_mode,
                    attn_mask, dropout_p, raise_error)


def can_run_reference(q, k, v, *, window_size, rel_pos_bias_table=None, shift_size=(0, 0, 0), pad_k=None,
                      pad_v=None, rel_pos_mode="swin", attn_mask=None, dropout_p=0.0,
                      raise_error=False) -> BackendCheck:
    """The reference runs any valid arguments (invalid ones raise the input error)."""
    return _can_run("reference", q, k, v, window_size, rel_pos_bias_table, shift_size, pad_k, pad_v, rel_pos_mode,
                    attn_mask, dropout_p, raise_error)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _locate_tokens(win, offs, T, H, W, N: tl.constexpr, WT: tl.constexpr, WH: tl.constexpr,
                       WW: tl.constexpr, ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr):
        """Window ``win`` (linear over batch and windows), in-window indices ``offs`` -> batch, original
        coordinates, validity (real token, not padding or block overhang) and shift-region id."""
        TP = tl.cdiv(T, WT) * WT
        HP = tl.cdiv(H, WH) * WH
        WP = tl.cdiv(W, WW) * WW
        iw = win % (WP // WW)
        rest = win // (WP // WW)
        ih = rest % (HP // WH)
        rest = rest // (HP // WH)
        it = rest % (TP // WT)
        b = rest // (TP // WT)
        pt = it * WT + offs // (WH * WW)
        ph = ih * WH + (offs // WW) % WH
        pw = iw * WW + offs % WW
        ot = (pt + ST) % TP
        oh = (ph + SH) % HP
        ow = (pw + SW) % WP
        valid = (offs < N) & (ot < T) & (oh < H) & (ow < W)
        region = offs * 0
        if ST > 0:
            region += 9 * ((pt >= TP - WT).to(tl.int32) + (pt >= TP - ST).to(tl.int32))
        if SH > 0:
            region += 3 * ((ph >= HP - WH).to(tl.int32) + (ph >= HP - SH).to(tl.int32))
        if SW > 0:
            region += (pw >= WP - WW).to(tl.int32) + (pw >= WP - SW).to(tl.int32)
        return b.to(tl.int64), ot, oh, ow, valid, region

    @triton.jit
    def _token_rows(b, ot, oh, ow, T, H, W):
        """Flat token index into a contiguous ``(B, T, H, W, ...)`` tensor."""
        return ((b * T + ot) * H + oh) * W + ow

    @triton.jit
    def _load_rows(X, b, ot, oh, ow, valid, head, offs_d, s_b, s_t, s_h, s_w, s_n, HD,
                   PAD, HAS_PAD: tl.constexpr):
        """``(len(rows), BLOCK_D)`` rows of a strided ``(B, T, H, W, heads, hd)`` tensor; padded tokens
        take ``PAD[head]`` when given, else zeros."""
        # int64 offsets: one batch element of a qkv projection may span more than 2**31 elements
        ptrs = X + b[:, None] * s_b + ot[:, None].to(tl.int64) * s_t + oh[:, None].to(tl.int64) * s_h \
            + ow[:, None].to(tl.int64) * s_w + head.to(tl.int64) * s_n + offs_d[None, :]
        d_ok = offs_d[None, :] < HD
        x = tl.load(ptrs, mask=valid[:, None] & d_ok, other=0.0)
        if HAS_PAD:
            pad = tl.load(PAD + head * HD + offs_d, mask=offs_d < HD, other=0.0).to(x.dtype)
            x = tl.where(valid[:, None], x, pad[None, :])
        return x

    @triton.jit
    def _scores(q, k, scale, offs_m, offs_n, region_m, region_n, win, head, NH, num_masks,
                TABLE, MASK, N: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
                FT: tl.constexpr, FH: tl.constexpr, FW: tl.constexpr, HAS_BIAS: tl.constexpr,
                SHIFTED: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
        """fp32 scores ``scale * q k^T + bias + shift mask + attn_mask``; keys beyond N get -inf."""
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        pair_ok = (offs_m[:, None] < N) & (offs_n[None, :] < N)
        if HAS_BIAS:
            dt = offs_m[:, None] // (BH * BW) - offs_n[None, :] // (BH * BW)
            dh = (offs_m[:, None] // BW) % BH - (offs_n[None, :] // BW) % BH
            dw = offs_m[:, None] % BW - offs_n[None, :] % BW
            idx = (dt + FT - 1) * ((2 * FH - 1) * (2 * FW - 1)) + (dh + FH - 1) * (2 * FW - 1) + (dw + FW - 1)
            s += tl.load(TABLE + idx * NH + head, mask=pair_ok, other=0.0).to(tl.float32)
        if SHIFTED:
            s += tl.where(region_m[:, None] != region_n[None, :], -100.0, 0.0)
        if HAS_MASK:
            mask_ptrs = MASK + (win % num_masks).to(tl.int64) * (N * N) + offs_m[:, None] * N + offs_n[None, :]
            s += tl.load(mask_ptrs, mask=pair_ok, other=0.0).to(tl.float32)
        return tl.where(offs_n[None, :] < N, s, float("-inf"))

    @triton.jit
    def _window_attn_fwd_kernel(
        Q, K, V, Out, Lse, TABLE, PAD_K, PAD_V, MASK,
        sq_b, sq_t, sq_h, sq_w, sq_n, sk_b, sk_t, sk_h, sk_w, sk_n, sv_b, sv_t, sv_h, sv_w, sv_n,
        T, H, W, NH, HD, num_masks, scale,
        N: tl.constexpr, WT: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
        ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        BH: tl.constexpr, BW: tl.constexpr,
        FT: tl.constexpr, FH: tl.constexpr, FW: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_PAD_K: tl.constexpr, HAS_PAD_V: tl.constexpr, HAS_MASK: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program: ``BLOCK_M`` queries of one window and head against all the window's keys."""
        blocks_m: tl.constexpr = (N + BLOCK_M - 1) // BLOCK_M
        win = tl.program_id(0) // blocks_m
        offs_m = (tl.program_id(0) % blocks_m) * BLOCK_M + tl.arange(0, BLOCK_M)
        head = tl.program_id(1)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        shifted: tl.constexpr = (ST > 0) | (SH > 0) | (SW > 0)

        b, ot, oh, ow, valid_m, region_m = _locate_tokens(win, offs_m, T, H, W, N, WT, WH, WW, ST, SH, SW)
        q = _load_rows(Q, b, ot, oh, ow, valid_m, head, offs_d, sq_b, sq_t, sq_h, sq_w, sq_n, HD, PAD_K, False)
        kb, kt, kh, kw, valid_n, region_n = _locate_tokens(win, offs_n, T, H, W, N, WT, WH, WW, ST, SH, SW)
        k = _load_rows(K, kb, kt, kh, kw, valid_n, head, offs_d, sk_b, sk_t, sk_h, sk_w, sk_n, HD, PAD_K, HAS_PAD_K)
        v = _load_rows(V, kb, kt, kh, kw, valid_n, head, offs_d, sv_b, sv_t, sv_h, sv_w, sv_n, HD, PAD_V, HAS_PAD_V)

        s = _scores(q, k, scale, offs_m, offs_n, region_m, region_n, win, head, NH, num_masks, TABLE, MASK,
                    N, BH, BW, FT, FH, FW, HAS_BIAS, shifted, HAS_MASK, PRECISION)
        row_max = tl.max(s, axis=1)
        p = tl.exp(s - row_max[:, None])
        row_sum = tl.sum(p, axis=1)
        out = tl.dot(p.to(v.dtype), v, input_precision=PRECISION) / row_sum[:, None]

        rows = _token_rows(b, ot, oh, ow, T, H, W) * NH + head
        tl.store(Out + rows[:, None] * HD + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=valid_m[:, None] & (offs_d[None, :] < HD))
        tl.store(Lse + rows, row_max + tl.log(row_sum), mask=valid_m)

    @triton.jit
    def _window_attn_bwd_dq_kernel(
        Q, K, V, Out, DO, Lse, Delta, DQ, DBIAS, TABLE, PAD_K, PAD_V, MASK,
        sq_b, sq_t, sq_h, sq_w, sq_n, sk_b, sk_t, sk_h, sk_w, sk_n, sv_b, sv_t, sv_h, sv_w, sv_n,
        T, H, W, NH, HD, num_masks, num_windows, sg_tok, sg_head, scale,
        N: tl.constexpr, WT: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
        ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        BH: tl.constexpr, BW: tl.constexpr,
        FT: tl.constexpr, FH: tl.constexpr, FW: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_PAD_K: tl.constexpr, HAS_PAD_V: tl.constexpr, HAS_MASK: tl.constexpr,
        NEED_DBIAS: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """dq for ``BLOCK_M`` queries of every ``num_programs(2)``-th window; the summed dS of those
        windows goes to ``DBIAS[group, head]`` (an (N, N) slice), reduced later in fixed order.
        Also writes ``Delta = rowsum(dO * O)`` of its queries for the dk/dv kernel. Gradient rows sit
        ``sg_tok`` elements apart per token and ``sg_head`` per head (contiguous, or one packed dqkv)."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        head = tl.program_id(1)
        group = tl.program_id(2)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        shifted: tl.constexpr = (ST > 0) | (SH > 0) | (SW > 0)
        dbias = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for win in range(group, num_windows, tl.num_programs(2)):
            b, ot, oh, ow, valid_m, region_m = _locate_tokens(win, offs_m, T, H, W, N, WT, WH, WW, ST, SH, SW)
            kb, kt, kh, kw, valid_n, region_n = _locate_tokens(win, offs_n, T, H, W, N, WT, WH, WW, ST, SH, SW)
            q = _load_rows(Q, b, ot, oh, ow, valid_m, head, offs_d, sq_b, sq_t, sq_h, sq_w, sq_n, HD, PAD_K, False)
            k = _load_rows(K, kb, kt, kh, kw, valid_n, head, offs_d, sk_b, sk_t, sk_h, sk_w, sk_n, HD,
                           PAD_K, HAS_PAD_K)
            v = _load_rows(V, kb, kt, kh, kw, valid_n, head, offs_d, sv_b, sv_t, sv_h, sv_w, sv_n, HD,
                           PAD_V, HAS_PAD_V)
            rows = _token_rows(b, ot, oh, ow, T, H, W) * NH + head
            row_d_ok = valid_m[:, None] & (offs_d[None, :] < HD)
            do = tl.load(DO + rows[:, None] * HD + offs_d[None, :], mask=row_d_ok, other=0.0)
            o = tl.load(Out + rows[:, None] * HD + offs_d[None, :], mask=row_d_ok, other=0.0)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
            tl.store(Delta + rows, delta, mask=valid_m)
            lse = tl.load(Lse + rows, mask=valid_m, other=0.0)

            s = _scores(q, k, scale, offs_m, offs_n, region_m, region_n, win, head, NH, num_masks, TABLE, MASK,
                        N, BH, BW, FT, FH, FW, HAS_BIAS, shifted, HAS_MASK, PRECISION)
            p = tl.where(valid_m[:, None], tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * scale
            grad_rows = _token_rows(b, ot, oh, ow, T, H, W) * sg_tok + head * sg_head
            tl.store(DQ + grad_rows[:, None] + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_d_ok)
            if NEED_DBIAS:
                dbias += ds
        if NEED_DBIAS:
            ptrs = DBIAS + ((group * NH + head) * N).to(tl.int64) * N + offs_m[:, None] * N + offs_n[None, :]
            tl.store(ptrs, dbias, mask=(offs_m[:, None] < N) & (offs_n[None, :] < N))

    @triton.jit
    def _window_attn_bwd_dkdv_kernel(
        Q, K, V, DO, Lse, Delta, DK, DV, DPAD, TABLE, PAD_K, PAD_V, MASK,
        sq_b, sq_t, sq_h, sq_w, sq_n, sk_b, sk_t, sk_h, sk_w, sk_n, sv_b, sv_t, sv_h, sv_w, sv_n,
        T, H, W, NH, HD, num_masks, sg_tok, sg_head, scale,
        N: tl.constexpr, WT: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
        ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        BH: tl.constexpr, BW: tl.constexpr,
        FT: tl.constexpr, FH: tl.constexpr, FW: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_PAD_K: tl.constexpr, HAS_PAD_V: tl.constexpr, HAS_MASK: tl.constexpr,
        NEED_DPAD: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """dk, dv for ``BLOCK_N`` keys of one window and head, looping over the window's queries.
        The summed dk/dv of the window's padded keys go to ``DPAD[window, 0|1, head]``."""
        blocks_n: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
        win = tl.program_id(0) // blocks_n
        offs_n = (tl.program_id(0) % blocks_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        head = tl.program_id(1)
        offs_d = tl.arange(0, BLOCK_D)
        shifted: tl.constexpr = (ST > 0) | (SH > 0) | (SW > 0)

        kb, kt, kh, kw, valid_n, region_n = _locate_tokens(win, offs_n, T, H, W, N, WT, WH, WW, ST, SH, SW)
        k = _load_rows(K, kb, kt, kh, kw, valid_n, head, offs_d, sk_b, sk_t, sk_h, sk_w, sk_n, HD, PAD_K, HAS_PAD_K)
        v = _load_rows(V, kb, kt, kh, kw, valid_n, head, offs_d, sv_b, sv_t, sv_h, sv_w, sv_n, HD, PAD_V, HAS_PAD_V)
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for start_m in range(0, N, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            b, ot, oh, ow, valid_m, region_m = _locate_tokens(win, offs_m, T, H, W, N, WT, WH, WW, ST, SH, SW)
            q = _load_rows(Q, b, ot, oh, ow, valid_m, head, offs_d, sq_b, sq_t, sq_h, sq_w, sq_n, HD, PAD_K, False)
            rows = _token_rows(b, ot, oh, ow, T, H, W) * NH + head
            do = tl.load(DO + rows[:, None] * HD + offs_d[None, :], mask=valid_m[:, None] & (offs_d[None, :] < HD),
                         other=0.0)
            lse = tl.load(Lse + rows, mask=valid_m, other=0.0)
            delta = tl.load(Delta + rows, mask=valid_m, other=0.0)
            s = _scores(q, k, scale, offs_m, offs_n, region_m, region_n, win, head, NH, num_masks, TABLE, MASK,
                        N, BH, BW, FT, FH, FW, HAS_BIAS, shifted, HAS_MASK, PRECISION)
            p = tl.where(valid_m[:, None], tl.exp(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        dk = dk * scale
        grad_rows = _token_rows(kb, kt, kh, kw, T, H, W) * sg_tok + head * sg_head
        key_d_ok = valid_n[:, None] & (offs_d[None, :] < HD)
        tl.store(DK + grad_rows[:, None] + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=key_d_ok)
        tl.store(DV + grad_rows[:, None] + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=key_d_ok)
        if NEED_DPAD:
            padded = (offs_n < N) & (valid_n == 0)
            dpad_k = tl.sum(tl.where(padded[:, None], dk, 0.0), axis=0)
            dpad_v = tl.sum(tl.where(padded[:, None], dv, 0.0), axis=0)
            base = DPAD + (tl.program_id(0).to(tl.int64) * 2 * NH + head) * HD
            tl.store(base + offs_d, dpad_k, mask=offs_d < HD)
            tl.store(base + NH * HD + offs_d, dpad_v, mask=offs_d < HD)

    @triton.jit
    def _window_attn_table_grad_kernel(
        DBIAS, DTABLE, groups, NH,
        N: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
        FT: tl.constexpr, FH: tl.constexpr, FW: tl.constexpr,
        BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        """Bias-table gradient ``DTABLE[e, head]`` for ``BLOCK_E`` table entries: the sum over the window
        groups' dS partials ``DBIAS (groups, NH, N, N)`` and over queries m of ``dS[m, key]``, where the key
        sits at m's bias coordinates minus entry e's offset (when that is a token of the window). Fixed
        summation order: deterministic."""
        head = tl.program_id(1)
        offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
        table_size: tl.constexpr = (2 * FT - 1) * (2 * FH - 1) * (2 * FW - 1)
        dt = offs_e // ((2 * FH - 1) * (2 * FW - 1)) - (FT - 1)
        dh = (offs_e // (2 * FW - 1)) % (2 * FH - 1) - (FH - 1)
        dw = offs_e % (2 * FW - 1) - (FW - 1)
        acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
        for group in range(0, groups):
            base = DBIAS + ((group * NH + head) * N).to(tl.int64) * N
            for start_m in range(0, N, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                kt = (offs_m // (BH * BW))[None, :] - dt[:, None]
                kh = ((offs_m // BW) % BH)[None, :] - dh[:, None]
                kw = (offs_m % BW)[None, :] - dw[:, None]
                key = (kt * BH + kh) * BW + kw
                ok = (offs_e[:, None] < table_size) & (offs_m[None, :] < N) & (kt >= 0) & (kh >= 0) & (kh < BH) \
                    & (kw >= 0) & (kw < BW) & (key < N)
                acc += tl.sum(tl.load(base + offs_m[None, :] * N + key, mask=ok, other=0.0), axis=1)
        tl.store(DTABLE + offs_e * NH + head, acc, mask=offs_e < table_size)


def _next_pow2(x: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (x - 1).bit_length())


@dataclass(frozen=True)
class TritonConfig:
    """Block sizes and launch options of the forward, dq and dk/dv kernels for one window size / head dim / dtype."""

    block_n: int  # all keys of a window (forward and dq kernels)
    block_d: int
    fwd_block_m: int
    dq_block_m: int
    dkdv_block_m: int
    dkdv_block_n: int
    num_warps: int
    dq_num_stages: int  # the dq kernel's window loop: double-buffering large key tiles overflows shared memory
    dkdv_num_stages: int  # the dkdv kernel's query loop: Triton's default three buffers need sm_90's memory


def triton_config(tokens_per_window: int, head_dim: int, dtype: torch.dtype, interpreting: bool,
                  key_tile_limit: int = MAX_TRITON_KEY_TILE_BYTES) -> TritonConfig:
    """Blocks for a window of ``tokens_per_window`` tokens on a device whose key tiles may reach
    ``key_tile_limit`` bytes (``triton_key_tile_limit``)."""
    block_n = _next_pow2(tokens_per_window)
    block_d = _next_pow2(head_dim)
    if interpreting:  # the interpreter pays per block step, not per element: use whole windows
        return TritonConfig(block_n, block_d, block_n, block_n, block_n, block_n, 4, 1, 1)
    wide = block_n * block_d > 256 * 64
    wide_rows = block_d * dtype.itemsize >= 512
    return TritonConfig(
        block_n=block_n,
        block_d=block_d,
        # the (BLOCK_M, BLOCK_N) fp32 scores pass through shared memory: at most 16K of them
        fwd_block_m=min(block_n, 32 if wide else 64, max(16, 16384 // block_n)),
        dq_block_m=16,
        dkdv_block_m=min(block_n, 32 if wide else 64),
        dkdv_block_n=min(block_n, 32 if wide_rows else 64),
        num_warps=8 if block_n >= 256 else 4,
        dq_num_stages=2 if block_n <= 512 and key_tile_bytes(tokens_per_window, head_dim, dtype) <= key_tile_limit // 2
        else 1,
        dkdv_num_stages=3 if key_tile_limit >= MAX_TRITON_KEY_TILE_BYTES else 2,
    )


def _launch_config(q: torch.Tensor, tokens_per_window: int) -> TritonConfig:
    """The blocks for windows of ``q`` (B, T, H, W, heads, head_dim) on its device."""
    return triton_config(tokens_per_window, q.shape[-1], q.dtype, triton_interpreting(),
                         triton_key_tile_limit(device_shared_memory(q.device)))


def key_tile_bytes(tokens_per_window: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one head's keys of a window as the forward and dq kernels hold them (one tile)."""
    return _next_pow2(tokens_per_window) * _next_pow2(head_dim) * dtype.itemsize


def _kernel_constants(geom: WindowGeometry, dtype: torch.dtype, *, bias: bool, pad_k: bool, pad_v: bool,
                      mask: bool) -> dict:
    return dict(
        N=geom.tokens_per_window,
        WT=geom.window[0], WH=geom.window[1], WW=geom.window[2],
        ST=geom.shift[0], SH=geom.shift[1], SW=geom.shift[2],
        BH=geom.bias_window[1], BW=geom.bias_window[2],
        FT=geom.table_window[0], FH=geom.table_window[1], FW=geom.table_window[2],
        HAS_BIAS=bias, HAS_PAD_K=pad_k, HAS_PAD_V=pad_v, HAS_MASK=mask,
        PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )


def _present(table, pad_k, pad_v, attn_mask) -> dict:
    return dict(bias=table is not None, pad_k=pad_k is not None, pad_v=pad_v is not None, mask=attn_mask is not None)


def _strides(x: torch.Tensor) -> tuple[int, ...]:
    return x.stride()[:5]


def _triton_forward(q, k, v, table, pad_k, pad_v, attn_mask, geom: WindowGeometry, scale: float):
    batch, t, h, w, heads, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:5], dtype=torch.float32, device=q.device)
    cfg = _launch_config(q, geom.tokens_per_window)
    dummy = q.new_empty(0)
    grid = (batch * geom.num_windows * triton.cdiv(geom.tokens_per_window, cfg.fwd_block_m), heads)
    _window_attn_fwd_kernel[grid](
        q, k, v, out, lse,
        dummy if table is None else table, dummy if pad_k is None else pad_k,
        dummy if pad_v is None else pad_v, dummy if attn_mask is None else attn_mask,
        *_strides(q), *_strides(k), *_strides(v),
        t, h, w, heads, head_dim, 1 if attn_mask is None else attn_mask.shape[0], scale,
        **_kernel_constants(geom, q.dtype, **_present(table, pad_k, pad_v, attn_mask)),
        BLOCK_M=cfg.fwd_block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
    )
    return out, lse


def _dbias_groups(num_windows: int, blocks_m: int, heads: int, device: torch.device) -> int:
    """How many window groups the dq kernel splits the windows into (each writes one dS partial)."""
    if device.type != "cuda":
        return 1
    target_programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(num_windows, -(-target_programs // (blocks_m * heads))))


TABLE_GRAD_BLOCKS = (32, 64)  # (BLOCK_E, BLOCK_M) of the table-gradient kernel on a GPU: ~40 programs per head at 4x7x7


def _table_grad_blocks(table_size: int, tokens_per_window: int) -> tuple[int, int]:
    """(BLOCK_E, BLOCK_M) of the table-gradient kernel; the interpreter takes whole tables and windows."""
    if triton_interpreting():
        return _next_pow2(table_size), _next_pow2(tokens_per_window)
    return TABLE_GRAD_BLOCKS


def _triton_table_grad(dbias: torch.Tensor, geom: WindowGeometry) -> torch.Tensor:
    """``(groups, heads, N, N)`` dS partials -> ``(table_size, heads)`` fp32 bias-table gradient."""
    groups, heads = dbias.shape[:2]
    dtable = torch.empty((geom.table_size, heads), dtype=torch.float32, device=dbias.device)
    block_e, block_m = _table_grad_blocks(geom.table_size, geom.tokens_per_window)
    _window_attn_table_grad_kernel[(triton.cdiv(geom.table_size, block_e), heads)](
        dbias, dtable, groups, heads, N=geom.tokens_per_window, BH=geom.bias_window[1], BW=geom.bias_window[2],
        FT=geom.table_window[0], FH=geom.table_window[1], FW=geom.table_window[2],
        BLOCK_E=block_e, BLOCK_M=block_m, num_warps=4,
    )
    return dtable


def _triton_backward(grad_out, q, k, v, out, lse, table, pad_k, pad_v, attn_mask, geom: WindowGeometry,
                     scale: float, need_table_grad: bool, need_pad_grad: bool, grad_qkv: torch.Tensor | None):
    batch, t, h, w, heads, head_dim = q.shape
    n = geom.tokens_per_window
    num_windows = batch * geom.num_windows
    grad_out = grad_out.contiguous()
    delta = torch.empty(q.shape[:5], dtype=torch.float32, device=q.device)  # written by the dq kernel
    if grad_qkv is None:
        dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    else:
        dq, dk, dv = grad_qkv.unbind(-3)
    grad_strides = dq.stride(3), dq.stride(4)  # per token, per head: the kernels write rows of head_dim
    cfg = _launch_config(q, n)
    need_table_grad = need_table_grad and table is not None
    need_pad_grad = need_pad_grad and (pad_k is not None or pad_v is not None)
    dummy = q.new_empty(0)
    common = (
        dummy if table is None else table, dummy if pad_k is None else pad_k, dummy if pad_v is None else pad_v,
        dummy if attn_mask is None else attn_mask, *_strides(q), *_strides(k), *_strides(v),
        t, h, w, heads, head_dim, 1 if attn_mask is None else attn_mask.shape[0],
    )
    constants = _kernel_constants(geom, q.dtype, **_present(table, pad_k, pad_v, attn_mask))

    blocks_m = triton.cdiv(n, cfg.dq_block_m)
    groups = _dbias_groups(num_windows, blocks_m, heads, q.device)  # parallelism over windows, dS partials or not
    dbias = torch.empty((groups, heads, n, n), dtype=torch.float32, device=q.device) if need_table_grad else dummy
    _window_attn_bwd_dq_kernel[(blocks_m, heads, groups)](
        q, k, v, out, grad_out, lse, delta, dq, dbias, *common, num_windows, *grad_strides, scale, **constants,
        NEED_DBIAS=need_table_grad, BLOCK_M=cfg.dq_block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.dq_num_stages,
    )
    blocks_n = triton.cdiv(n, cfg.dkdv_block_n)
    dpad = (torch.empty((num_windows * blocks_n, 2, heads, head_dim), dtype=torch.float32, device=q.device)
            if need_pad_grad else dummy)
    _window_attn_bwd_dkdv_kernel[(num_windows * blocks_n, heads)](
        q, k, v, grad_out, lse, delta, dk, dv, dpad, *common, *grad_strides, scale, **constants,
        NEED_DPAD=need_pad_grad, BLOCK_M=cfg.dkdv_block_m, BLOCK_N=cfg.dkdv_block_n, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.dkdv_num_stages,
    )
    dtable = _triton_table_grad(dbias, geom) if need_table_grad else None
    dpad_k, dpad_v = (dpad[:, 0].sum(0), dpad[:, 1].sum(0)) if need_pad_grad else (None, None)
    return dq, dk, dv, dtable, dpad_k, dpad_v


_TRITON_FP32_POINTERS = {"Lse", "Delta", "DBIAS", "DPAD", "MASK", "TABLE", "DTABLE"}
_TRITON_POINTERS = _TRITON_FP32_POINTERS | {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV", "PAD_K", "PAD_V"}


def triton_compile_specs(dtype: torch.dtype, window, head_dim: int, shift=(0, 0, 0), *, bias: bool = True,
                         pad: bool = True, mask: bool = False, key_tile_limit: int = MAX_TRITON_KEY_TILE_BYTES,
                         window_batches: bool = False, int_arg=None, aligned_pointers: bool = True):
    """The kernels as the GPU launcher would specialise them for one configuration on a device whose key
    tiles may reach ``key_tile_limit`` bytes, as ``(name, kernel, signature, constexprs, attrs, options)``
    for ``triton.compile`` ahead of time.

    ``window_batches``: the geometry ``window_attention_3d_windows`` launches (rows of ``prod(window)``
    tokens whose bias coordinates decode by ``window``; no shift, no pad rows) instead of a volume's.

    ``int_arg(name)`` is the value a launch passes for the integer argument ``name``; the signature and
    ``attrs`` specialise the kernel on it as Triton's launcher does: 1 becomes a constant, a multiple of
    16 is marked divisible by 16, values outside int32 make it i64 (u64 from 2**63). Default: 16 for
    every one, as for a qkv projection whose sizes are multiples of 16, the most specialised variant,
    whose software pipelining takes the most shared memory. ``aligned_pointers``: every tensor starts at
    a multiple of 16 bytes (torch's allocations, and q/k/v views into a qkv projection when
    ``head_dim * itemsize`` is a multiple of 16, do), so pointers are marked divisible by 16 too."""
    window, shift = _triple(tuple(window), "window"), _triple(tuple(shift), "shift")
    if window_batches:
        if any(shift) or pad:
            raise ValueError("window batches take neither a shift (it is in their attn_mask) nor pad rows")
        tokens = math.prod(window)
        geom = WindowGeometry((1, 1, tokens), (1, 1, tokens), (0, 0, 0), window, window)
    else:
        geom = WindowGeometry(window, window, shift, window, window)
    cfg = triton_config(geom.tokens_per_window, head_dim, dtype, interpreting=False, key_tile_limit=key_tile_limit)
    constants = _kernel_constants(geom, dtype, bias=bias, pad_k=pad, pad_v=pad, mask=mask)
    kernels = (
        (_window_attn_fwd_kernel, dict(BLOCK_M=cfg.fwd_block_m, BLOCK_N=cfg.block_n), {}),
        (_window_attn_bwd_dq_kernel, dict(NEED_DBIAS=bias, BLOCK_M=cfg.dq_block_m, BLOCK_N=cfg.block_n),
         {"num_stages": cfg.dq_num_stages}),
        (_window_attn_bwd_dkdv_kernel, dict(NEED_DPAD=pad, BLOCK_M=cfg.dkdv_block_m, BLOCK_N=cfg.dkdv_block_n),
         {"num_stages": cfg.dkdv_num_stages}),
    )
    if bias:
        block_e, block_m = TABLE_GRAD_BLOCKS
        kernels += ((_window_attn_table_grad_kernel, dict(BLOCK_E=block_e, BLOCK_M=block_m), {"num_warps": 4}),)
    pointer_types = {name: "fp32" if name in _TRITON_FP32_POINTERS else TYPE_NAMES[dtype] for name in _TRITON_POINTERS}
    for kernel, blocks, options in kernels:
        yield kernel_spec(kernel, {**constants, **blocks, "BLOCK_D": cfg.block_d}, pointer_types,
                          float_args=("scale",), int_arg=int_arg, aligned_pointers=aligned_pointers,
                          options={"num_warps": cfg.num_warps} | options)


# --------------------------------------------------------------------------------------------------
# torch.library custom ops + autograd
# --------------------------------------------------------------------------------------------------
def _geometry_from_lists(q, window, shift, bias_window, table_window) -> WindowGeometry:
    return WindowGeometry(tuple(q.shape[1:4]), tuple(window), tuple(shift), tuple(bias_window), tuple(table_window))


def _forward(q, k, v, table, pad_k, pad_v, attn_mask, window, shift, bias_window, table_window, scale, backend):
    if backend == "cuda":
        return _C.window_attention_3d_forward(q, k, v, table, pad_k, pad_v, attn_mask, window, shift,
                                              bias_window, table_window, scale)
    geom = _geometry_from_lists(q, window, shift, bias_window, table_window)
    with on_device(q):
        return _triton_forward(q, k, v, table, pad_k, pad_v, attn_mask, geom, scale)


@torch.library.custom_op("ssltm::window_attention_3d_fwd", mutates_args=())
def _window_attention_3d_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor | None, pad_k: torch.Tensor | None,
    pad_v: torch.Tensor | None, attn_mask: torch.Tensor | None, window: list[int], shift: list[int],
    bias_window: list[int], table_window: list[int], scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward: ``(out (B,T,H,W,nh,hd), lse (B,T,H,W,nh) fp32)``."""
    return _forward(q, k, v, table, pad_k, pad_v, attn_mask, window, shift, bias_window, table_window, scale, backend)


@torch.library.custom_op("ssltm::window_attention_3d_qkvpacked_fwd", mutates_args=())
def _window_attention_3d_qkvpacked_fwd(
    qkv: torch.Tensor, table: torch.Tensor | None, pad_k: torch.Tensor | None, pad_v: torch.Tensor | None,
    attn_mask: torch.Tensor | None, window: list[int], shift: list[int], bias_window: list[int],
    table_window: list[int], scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward on one ``(B,T,H,W,3,nh,hd)`` projection; its backward writes one packed dqkv."""
    return _forward(*qkv.unbind(-3), table, pad_k, pad_v, attn_mask, window, shift, bias_window, table_window,
                    scale, backend)


@_window_attention_3d_fwd.register_fake
def _(q, k, v, table, pad_k, pad_v, attn_mask, window, shift, bias_window, table_window, scale, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:5], dtype=torch.float32)


@_window_attention_3d_qkvpacked_fwd.register_fake
def _(qkv, table, pad_k, pad_v, attn_mask, window, shift, bias_window, table_window, scale, backend):
    shape = (*qkv.shape[:-3], *qkv.shape[-2:])
    return qkv.new_empty(shape), qkv.new_empty(shape[:5], dtype=torch.float32)


@torch.library.custom_op("ssltm::window_attention_3d_bwd", mutates_args=())
def _window_attention_3d_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, table: torch.Tensor | None, pad_k: torch.Tensor | None, pad_v: torch.Tensor | None,
    attn_mask: torch.Tensor | None, window: list[int], shift: list[int], bias_window: list[int],
    table_window: list[int], scale: float, backend: str, need_table_grad: bool, need_pad_grad: bool, packed: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward: ``(dq, dk, dv, dtable, dpad_k, dpad_v)``; gradients not asked for are empty.
    ``packed``: the first result is one ``(B,T,H,W,3,nh,hd)`` dqkv that the kernels wrote, dk and dv are empty."""
    grad_qkv = q.new_empty((*q.shape[:4], 3, *q.shape[4:])) if packed else None
    if backend == "cuda":
        grads = _C.window_attention_3d_backward(grad_out, q, k, v, out, lse, table, pad_k, pad_v, attn_mask,
                                                window, shift, bias_window, table_window, scale,
                                                need_table_grad, need_pad_grad, grad_qkv=grad_qkv)
    else:
        geom = _geometry_from_lists(q, window, shift, bias_window, table_window)
        with on_device(q):
            grads = _triton_backward(grad_out, q, k, v, out, lse, table, pad_k, pad_v, attn_mask, geom, scale,
                                     need_table_grad, need_pad_grad, grad_qkv)
    empty = q.new_empty(0, dtype=torch.float32)
    dq, dk, dv = (grad_qkv, empty, empty.clone()) if packed else grads[:3]
    return (dq, dk, dv, *(empty.clone() if g is None else g for g in grads[3:]))


@_window_attention_3d_bwd.register_fake
def _(grad_out, q, k, v, out, lse, table, pad_k, pad_v, attn_mask, window, shift, bias_window, table_window,
      scale, backend, need_table_grad, need_pad_grad, packed):
    heads, head_dim = q.shape[-2:]
    empty = q.new_empty(0, dtype=torch.float32)
    dtable = q.new_empty(table.shape, dtype=torch.float32) if need_table_grad and table is not None else empty
    has_pad = need_pad_grad and (pad_k is not None or pad_v is not None)
    dpad = q.new_empty((heads, head_dim), dtype=torch.float32) if has_pad else empty.clone()
    if packed:
        return q.new_empty((*q.shape[:4], 3, *q.shape[4:])), empty.clone(), empty.clone(), dtable, dpad, dpad.clone()
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), dtable, dpad, dpad.clone()


def _backward_grads(ctx, grad_out, q, k, v, packed: bool):
    """The backward op on the saved tensors; table and pad gradients in their parameters' dtypes."""
    out, lse, table, pad_k, pad_v, attn_mask = ctx.saved_tensors[-6:]
    window, shift, bias_window, table_window, scale, backend = ctx.params
    need_table, need_pad_k, need_pad_v = ctx.needs_input_grad[-10:-7]  # both ops end with these
    dq, dk, dv, dtable, dpad_k, dpad_v = _window_attention_3d_bwd(
        grad_out, q, k, v, out, lse, table, pad_k, pad_v, attn_mask, window, shift, bias_window, table_window,
        scale, backend, bool(need_table), bool(need_pad_k or need_pad_v), packed)
    return (dq, dk, dv, dtable.to(table.dtype) if need_table else None,
            dpad_k.to(pad_k.dtype) if need_pad_k else None, dpad_v.to(pad_v.dtype) if need_pad_v else None)


def _setup_context(ctx, inputs, output):
    *tensors, window, shift, bias_window, table_window, scale, backend = inputs
    ctx.params = (window, shift, bias_window, table_window, scale, backend)
    ctx.save_for_backward(*tensors[:-4], output[0], output[1], *tensors[-4:])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, _grad_lse):
    q, k, v = ctx.saved_tensors[:3]
    dq, dk, dv, *rest = _backward_grads(ctx, grad_out, q, k, v, packed=False)
    return dq, dk, dv, *rest, *[None] * 7  # attn_mask and the non-tensor arguments


def _backward_qkvpacked(ctx, grad_out, _grad_lse):
    dqkv, _, _, *rest = _backward_grads(ctx, grad_out, *ctx.saved_tensors[0].unbind(-3), packed=True)
    return dqkv, *rest, *[None] * 7  # attn_mask and the non-tensor arguments


torch.library.register_autograd("ssltm::window_attention_3d_fwd", _backward, setup_context=_setup_context)
torch.library.register_autograd("ssltm::window_attention_3d_qkvpacked_fwd", _backward_qkvpacked,
                                setup_context=_setup_context)


def _register_autocast(qualname: str, activations: tuple[int, ...]) -> None:
    """Autocast declaration of a forward op, as SDPA's: under ``torch.autocast`` the float arguments at
    positions ``activations`` (q/k/v or qkv, and the pad rows) run in the autocast dtype; the bias table
    and the mask keep their precision, as the reference adds them to fp32 scores."""
    op = torch.ops.ssltm.__getattr__(qualname.split("::")[1]).default

    def cast(x, dtype):
        return x.to(dtype) if isinstance(x, torch.Tensor) and x.dtype in KERNEL_DTYPES else x

    for device_type, key in (("cuda", "AutocastCUDA"), ("cpu", "AutocastCPU")):
        def autocast_kernel(*args, device_type=device_type):
            dtype = torch.get_autocast_dtype(device_type)
            args = [cast(x, dtype) if i in activations else x for i, x in enumerate(args)]
            with torch.autocast(device_type, enabled=False):
                return op(*args)

        torch.library.impl(qualname, key, autocast_kernel)


_register_autocast("ssltm::window_attention_3d_fwd", activations=(0, 1, 2, 4, 5))  # q, k, v, pad_k, pad_v
_register_autocast("ssltm::window_attention_3d_qkvpacked_fwd", activations=(0, 2, 3))  # qkv, pad_k, pad_v


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------
def _fused_window_attention(q, k, v, geom: WindowGeometry, table, scale, pad_k, pad_v, attn_mask, backend,
                            qkv: torch.Tensor | None):
    """Run the fused kernels of ``backend`` ('cuda' or 'triton') on validated inputs; with ``qkv`` (the
    packed tensor q, k, v are views of) the backward writes one packed gradient."""
    pad_k, pad_v = (None if p is None else p.to(q.dtype).contiguous() for p in (pad_k, pad_v))
    table = None if table is None else table.contiguous()
    attn_mask = None if attn_mask is None else attn_mask.float().contiguous()
    lists = list(geom.window), list(geom.shift), list(geom.bias_window), list(geom.table_window)
    if qkv is not None:
        out, _ = torch.ops.ssltm.window_attention_3d_qkvpacked_fwd(
            qkv if qkv.stride(-1) == 1 else qkv.contiguous(), table, pad_k, pad_v, attn_mask, *lists, float(scale),
            backend)
        return out
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out, _ = torch.ops.ssltm.window_attention_3d_fwd(q, k, v, table, pad_k, pad_v, attn_mask, *lists, float(scale),
                                                     backend)
    return out


def _dispatch(q, k, v, geom, table, scale, pad_k, pad_v, attn_mask, dropout_p, backend, qkv=None):
    checks = _checks(q, geom, dropout_p)
    cuda, triton_check = checks["cuda"], checks["triton"]

    def cuda_passed_over():
        if "cuda_cores" in cuda.kernels and triton_check:
            return f"the CUDA kernels would run on CUDA cores (forward, backward: {cuda.kernels}) and Triton can run"
        return None

    chosen = choose_backend("window_attention_3d", {name: (lambda c=c: c.reason) for name, c in checks.items()},
                            backend, passed_over={"cuda": cuda_passed_over})
    if chosen == "reference":
        if dropout_p > 0 and requested_backend(backend) is None and any(
                c for c in _checks(q, geom, 0.0).values() if c.backend != "reference"):
            _warn_dropout_fallback(dropout_p)
        return _reference_with_geometry(q, k, v, geom, table, scale, pad_k, pad_v, attn_mask, dropout_p)
    return _fused_window_attention(q, k, v, geom, table, scale, pad_k, pad_v, attn_mask, chosen, qkv)


def window_attention_3d(
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
    backend: str | None = None,
) -> torch.Tensor:
    """Fused (shifted) 3D window multi-head self-attention over a channels-last volume.

    Args:
        q, k, v: ``(B, T, H, W, heads, head_dim)``, fp32/fp16/bf16 for the kernels (any float for the
            reference); may be strided views into one ``(B, T, H, W, 3*C)`` qkv projection.
        window_size: ``(wt, wh, ww)`` (or one int); shrinks per axis to the volume like Video Swin.
        rel_pos_bias_table: ``((2wt-1)(2wh-1)(2ww-1), heads)`` relative position bias, or None.
        shift_size: cyclic shift ``(st, sh, sw)``, ``0 <= s < w``; adds Swin's -100 region mask.
        scale: score scale, default ``head_dim ** -0.5``.
        pad_k, pad_v: ``(heads, head_dim)`` key / value of padded tokens (the qkv bias), default zeros.
        rel_pos_mode: ``"swin"`` (checkpoint parity) or ``"exact"``, see the module docstring.
        attn_mask: optional additive ``(num_masks, N, N)`` mask; window ``i`` (over batch and windows)
            uses ``attn_mask[i % num_masks]``. Not differentiated.
        dropout_p: dropout on the attention probabilities (training); only the reference has it.
        backend: ``"cuda"``, ``"triton"`` or ``"reference"``; default ``SSLTM_BACKEND`` or the first
            that can run (cuda -> triton -> reference).

    Returns:
        ``(B, T, H, W, heads, head_dim)`` in q's dtype.
    """
    geom = _validate(q, k, v, window_size, shift_size, rel_pos_bias_table, pad_k, pad_v, rel_pos_mode, attn_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _dispatch(q, k, v, geom, rel_pos_bias_table, scale, pad_k, pad_v, attn_mask, dropout_p, backend)


def window_attention_3d_qkvpacked(
    qkv: torch.Tensor,
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
    backend: str | None = None,
) -> torch.Tensor:
    """:func:`window_attention_3d` on one packed projection ``qkv (B, T, H, W, 3, heads, head_dim)``
    (e.g. ``linear(x).unflatten(-1, (3, heads, head_dim))``): the kernels read q, k, v from it and the
    backward writes dq, dk, dv into one gradient of that layout, instead of three that autograd then
    stacks. Other arguments and the result as :func:`window_attention_3d`."""
    q, k, v = _unpack_qkv(qkv, 7, "(B, T, H, W, 3, heads, head_dim)")
    geom = _validate(q, k, v, window_size, shift_size, rel_pos_bias_table, pad_k, pad_v, rel_pos_mode, attn_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _dispatch(q, k, v, geom, rel_pos_bias_table, scale, pad_k, pad_v, attn_mask, dropout_p, backend, qkv)


def _unpack_qkv(qkv, rank: int, layout: str):
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dim() != rank or qkv.shape[-3] != 3:
        raise ValueError(f"qkv must be {rank}-D {layout}, got shape {tuple(qkv.shape)}")
    return qkv.unbind(-3)


def window_attention_3d_windows(
    q: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    *,
    window_size,
    rel_pos_bias_table: torch.Tensor | None = None,
    scale: float | None = None,
    rel_pos_mode: str = "swin",
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention over already partitioned windows, as Video Swin's ``WindowAttention3D.forward``.

    Args:
        q, k, v: ``(B*nW, N, heads, head_dim)`` with ``N <= wt*wh*ww``; a window of fewer tokens
            (Video Swin's shrunk window) takes ``relative_position_index[:N, :N]`` like Video Swin. Or
            ``q`` alone, packed: ``(B*nW, N, 3, heads, head_dim)`` (the backward then writes one packed
            gradient, see :func:`window_attention_3d_qkvpacked`).
        window_size: the ``(wt, wh, ww)`` the bias table was built for.
        rel_pos_mode: ``"swin"``; ``"exact"`` only for full windows (``N = wt*wh*ww``, where both modes
            agree): a batch of N tokens does not say which axes of a window shrank.
        attn_mask: optional additive ``(nW, N, N)`` mask, window ``i`` uses ``attn_mask[i % nW]``.
        Other arguments as :func:`window_attention_3d`.

    Returns:
        ``(B*nW, N, heads, head_dim)`` in q's dtype.
    """
    qkv = None
    if k is None and v is None:
        qkv = q
        q, k, v = _unpack_qkv(qkv, 5, "(B*nW, N, 3, heads, head_dim) when k and v are not given")
    _check_qkv(q, k, v, 4, "(B*nW, N, heads, head_dim)")
    window_size = _triple(window_size, "window_size")
    windows, n = q.shape[:2]
    if n > math.prod(window_size):
        raise ValueError(f"q has {n} tokens per window, more than window_size {window_size} holds")
    if rel_pos_mode not in ("swin", "exact"):
        raise ValueError(f"rel_pos_mode must be 'swin' or 'exact', got {rel_pos_mode!r}")
    if rel_pos_mode == "exact" and n != math.prod(window_size):
        raise ValueError(f"rel_pos_mode='exact' needs the shape of the shrunk window, which a window batch of {n} "
                         f"tokens (window_size {window_size}) does not give: pass volumes (B, T, H, W, C) to take "
                         "the exact coordinates, or use rel_pos_mode='swin' (Video Swin's index[:N, :N])")
    geom = WindowGeometry((1, 1, n), (1, 1, n), (0, 0, 0), window_size, window_size)
    _check_extras(q, geom, windows, rel_pos_bias_table, None, None, attn_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    as_volume = [x.unsqueeze(1).unsqueeze(1) for x in (q, k, v)]
    packed = None if qkv is None else qkv.unsqueeze(1).unsqueeze(1)
    out = _dispatch(*as_volume, geom, rel_pos_bias_table, scale, None, None, attn_mask, dropout_p, backend, packed)
    return out.squeeze(2).squeeze(1)
