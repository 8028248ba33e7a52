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

import contextlib
import functools
import json
import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

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
from ssltm_kernels._device import SHARED_MEMORY_LIMIT, device_arch, device_shared_memory, device_sm_count
from ssltm_kernels._ext import _C
from ssltm_kernels._op import dot_block
from ssltm_kernels._triton_specs import TYPE_NAMES, kernel_spec

if HAS_TRITON:
    import triton
    import triton.language as tl

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
# What every backend adds for a key that attn_mask masks out (False in a bool mask; the floor of a float mask):
# finite, because the online softmax of the kernels turns a row of -inf scores into NaN; -1e4 leaves masked keys
# a weight of exp(-1e4) = 0 and stays finite in fp16 scores beside the shift mask
MASKED_SCORE = -1e4
LOG2E = 1.4426950408889634  # the Triton kernels compute softmax in base 2: exp(x) = exp2(x * log2(e))
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The Triton kernels' limits; the CUDA kernels' are _C.MAX_WINDOW_TOKENS and _C.MAX_HEAD_DIM, defined in
# csrc/ beside the kernels
MAX_WINDOW_TOKENS = 1024
MAX_HEAD_DIM = 256
# Shared memory a block may opt in to -> the largest "key tile" (one head's keys of a window padded to
# powers of 2, key_tile_bytes: a measure of the window's size) the Triton dispatch takes there; compile_check
# compiles the largest such windows for sm_90, sm_80 and sm_86 (their shared memory and registers)
TRITON_KEY_TILE_LIMITS = ((SHARED_MEMORY_LIMIT[90], 64 * 1024), (SHARED_MEMORY_LIMIT[80], 32 * 1024),
                          (SHARED_MEMORY_LIMIT[86], 16 * 1024))
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
    return _reference_with_geometry(q, k, v, geom, rel_pos_bias_table, _scale(scale, q.shape[-1]), pad_k, pad_v,
                                    _additive_mask(attn_mask), dropout_p)


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
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask must be a float additive mask or a bool keep-mask (True = attend, as "
                            f"SDPA's), got {attn_mask.dtype}")
        n = geom.tokens_per_window
        if attn_mask.dim() != 3 or attn_mask.shape[1:] != (n, n):
            raise ValueError(f"attn_mask must have shape (num_masks, N, N) with N = {n}, got {tuple(attn_mask.shape)}")
        if (batch * geom.num_windows) % attn_mask.shape[0] != 0:
            raise ValueError(f"attn_mask's first dimension {attn_mask.shape[0]} must divide the number of "
                             f"windows {batch * geom.num_windows}")
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


def _triton_reason(q: torch.Tensor, geom: WindowGeometry, dtype: torch.dtype, scale: float | None) -> str | None:
    reason = triton_unavailable_reason(q) or _dtype_reason(dtype)
    if reason is not None:
        return reason
    if scale == 0:
        return "scale 0: the Triton kernels start each product at bias / scale"
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
    return tuple(_C.window_attention_3d_cuda_kernels(
        _DTYPE_NAMES[dtype], geom.tokens_per_window, q.shape[-1], device_shared_memory(q.device),
        device_arch(q.device)))


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


def _checks(q, geom: WindowGeometry, dropout_p: float, scale: float | None = None) -> dict[str, BackendCheck]:
    dtype = compute_dtype(q)
    dropout = _dropout_reason(dropout_p)
    cuda_reason = dropout or _cuda_reason(q, geom, dtype)
    return {
        "cuda": BackendCheck("cuda", cuda_reason, None if cuda_reason else _cuda_kernels(q, geom, dtype)),
        "triton": BackendCheck("triton", dropout or _triton_reason(q, geom, dtype, scale)),
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
# Triton block layout: 16-granular tails
# --------------------------------------------------------------------------------------------------
def _compile_time(fn):
    """A function the Triton kernels call at compile time on constexpr arguments (also callable here)."""
    return triton.constexpr_function(fn) if HAS_TRITON else fn


WHOLE_WINDOW_BLOCK = 1024  # a block this wide takes a window in one power-of-2 piece (the interpreter's)


@_compile_time
def block_pieces(tokens: int, block: int) -> tuple[tuple[int, int], ...]:
    """``(start, width)`` of the blocks the Triton kernels cut ``tokens`` rows or keys of a window into:
    full blocks of ``block``, then the rest rounded up to 16 in power-of-2 pieces, largest first (196 tokens
    in blocks of 64: 64, 64, 64, 16, i.e. 208 rows instead of 256). A block of ``WHOLE_WINDOW_BLOCK`` takes
    the window in one piece (the interpreter pays per block step, not per element)."""
    if block >= WHOLE_WINDOW_BLOCK:
        return ((0, max(16, 1 << (tokens - 1).bit_length())),)
    full, rest = divmod(tokens, block)
    pieces = [(i * block, block) for i in range(full)]
    rest, start, width = -(-rest // 16) * 16, full * block, block
    while rest:
        if rest >= width:
            pieces.append((start, width))
            start, rest = start + width, rest - width
        width //= 2
    return tuple(pieces)


@_compile_time
def padded_tokens(tokens: int) -> int:
    """Rows and keys the dense bias and the dS partials are padded to: a power of 2, so that every
    ``block_pieces`` (at most that many) indexes inside them."""
    return max(16, 1 << (tokens - 1).bit_length())


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
if HAS_TRITON:
    _LOG2E = tl.constexpr(LOG2E)
    _SHIFT_MASK_2 = tl.constexpr(SHIFT_MASK_VALUE * LOG2E)  # the shift mask in base-2 scores

    @triton.constexpr_function
    def _num_pieces(n, block):
        return len(block_pieces(n, block))

    @triton.constexpr_function
    def _full_pieces(n, block):
        """How many of ``block_pieces(n, block)`` are whole blocks inside the window (the others reach past n
        or are narrower)."""
        return n // block

    @triton.constexpr_function
    def _piece_start(i, n, block):
        return block_pieces(n, block)[i][0]

    @triton.constexpr_function
    def _piece_width(i, n, block):
        return block_pieces(n, block)[i][1]

    @triton.constexpr_function
    def _past_window(i, n, block):
        """Whether piece ``i`` of ``block_pieces(n, block)`` reaches past the window's n tokens."""
        start, width = block_pieces(n, block)[i]
        return start + width > n

    # ----------------------------------------------------------------------------------------------
    # Where tokens are: padding, cyclic shift, window partition and crop as address arithmetic.
    # ``vol`` = ((T, H, W), padded (T, H, W), q/k/v strides (b, t, h, w, head)); ``WIN`` = the constexpr tuple
    # (N, WT, WH, WW, ST, SH, SW, WIDE_INDEX) (constexpr tuples keep their items constexpr when indexed).
    # ----------------------------------------------------------------------------------------------
    @triton.jit
    def _volume(T, H, W, s_b, s_t, s_h, s_w, s_n, WT: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
                WIDE_INDEX: tl.constexpr):
        """``vol``: the extents, the extents padded to whole windows and the strides. ``WIDE_INDEX``: index
        arithmetic in int64 (the interpreter checks every int32 operation for overflow, which makes it slow
        there; compiled kernels take int32)."""
        index = tl.int64 if WIDE_INDEX else tl.int32
        t, h, w = tl.cast(T, index), tl.cast(H, index), tl.cast(W, index)
        padded = ((t + WT - 1) // WT * WT, (h + WH - 1) // WH * WH, (w + WW - 1) // WW * WW)
        return (t, h, w), padded, (s_b, s_t, s_h, s_w, s_n)

    @triton.jit
    def _window_origin(win, vol, WIN: tl.constexpr):
        """Window ``win`` (linear over batch and windows) -> where its first token comes from: the volume
        coordinates (t, h, w) before the wrap of the cyclic shift, its element offset in q/k/v (int64) and
        its flat token offset in contiguous ``(B, T, H, W)`` tensors."""
        extents, padded, strides = vol
        T, H, W = extents
        WT: tl.constexpr = WIN[1]
        WH: tl.constexpr = WIN[2]
        WW: tl.constexpr = WIN[3]
        win = tl.cast(win, T.dtype)
        rest = win // (padded[2] // WW)
        rest_h = rest // (padded[1] // WH)
        b = rest_h // (padded[0] // WT)
        t0 = rest_h % (padded[0] // WT) * WT + WIN[4]
        h0 = rest % (padded[1] // WH) * WH + WIN[5]
        w0 = win % (padded[2] // WW) * WW + WIN[6]
        elem = tl.cast(b, tl.int64) * strides[0] + tl.cast(t0, tl.int64) * strides[1] \
            + tl.cast(h0, tl.int64) * strides[2] + tl.cast(w0, tl.int64) * strides[3]
        return t0, h0, w0, elem, ((b * T + t0) * H + h0) * W + w0

    @triton.jit
    def _tokens(origin, offs, vol, WIN: tl.constexpr):
        """The tokens at in-window indices ``offs`` of the window at ``origin`` (``_window_origin``): element
        offsets in q/k/v (int64, without the head's), flat token offsets, validity (a real token: not padding,
        not past N) and shift region. The volume is rolled by -shift: the window's padded coordinate p holds
        token p + shift, wrapped to the start of an axis where it passes the padded extent (Swin's last
        region along that axis: tokens of one window differ in region exactly where they differ in wraps)."""
        extents, padded, strides = vol
        T, H, W = extents
        WH: tl.constexpr = WIN[2]
        WW: tl.constexpr = WIN[3]
        offs = offs.to(tl.int64 if WIN[7] else tl.int32)
        t = offs // (WH * WW)
        h = (offs // WW) % WH
        w = offs % WW
        elem = origin[3] + (t.to(tl.int64) * strides[1] + h.to(tl.int64) * strides[2] + w.to(tl.int64) * strides[3])
        tok = origin[4] + (t * H + h) * W + w
        ot = origin[0] + t
        oh = origin[1] + h
        ow = origin[2] + w
        region = 0
        if WIN[4] > 0:
            wrap = ot >= padded[0]
            ot = tl.where(wrap, ot - padded[0], ot)
            elem -= wrap.to(tl.int64) * (tl.cast(padded[0], tl.int64) * strides[1])
            tok = tl.where(wrap, tok - padded[0] * H * W, tok)
            region = region + tl.where(wrap, 4, 0)
        if WIN[5] > 0:
            wrap = oh >= padded[1]
            oh = tl.where(wrap, oh - padded[1], oh)
            elem -= wrap.to(tl.int64) * (tl.cast(padded[1], tl.int64) * strides[2])
            tok = tl.where(wrap, tok - padded[1] * W, tok)
            region = region + tl.where(wrap, 2, 0)
        if WIN[6] > 0:
            wrap = ow >= padded[2]
            ow = tl.where(wrap, ow - padded[2], ow)
            elem -= wrap.to(tl.int64) * (tl.cast(padded[2], tl.int64) * strides[3])
            tok = tl.where(wrap, tok - padded[2], tok)
            region = region + tl.where(wrap, 1, 0)
        valid = (offs < WIN[0]) & (ot < T) & (oh < H) & (ow < W)
        return elem, tok, valid, region

    @triton.jit
    def _pad_row(PAD, head, offs_d, HD, HAS_PAD: tl.constexpr):
        """``PAD[head]`` (the key or value of padded tokens), or 0 without pad rows."""
        if HAS_PAD:
            return tl.load(PAD + head * HD + offs_d, mask=offs_d < HD, other=0.0)
        else:
            return 0.0

    @triton.jit
    def _load_rows(X, elem, valid, offs_d, HD, pad, HAS_PAD: tl.constexpr):
        """Rows of head_dim at element offsets ``elem`` (the head's included); rows of invalid tokens take
        ``pad`` (a row) with ``HAS_PAD``, else zeros. Every q/k/v/o/dO row load goes through here: compile_check
        asserts that its loads are as wide as the launch's alignment and the tile allow."""
        x = tl.load(X + elem[:, None] + offs_d[None, :], mask=valid[:, None] & (offs_d[None, :] < HD), other=0.0)
        if HAS_PAD:
            x = tl.where(valid[:, None], x, pad[None, :].to(x.dtype))
        return x

    @triton.jit
    def _head_kv_constants(PAD_K, PAD_V, head, offs_d, vol, HD, FEAT: tl.constexpr):
        """``kv_c`` of ``_key_rows`` for ``head``: its pad rows, its element offset, ``offs_d`` and head_dim."""
        return (_pad_row(PAD_K, head, offs_d, HD, FEAT[3]), _pad_row(PAD_V, head, offs_d, HD, FEAT[4]),
                tl.cast(head, tl.int64) * vol[2][4], offs_d, HD)

    @triton.jit
    def _key_rows(K, V, kv_c, origin, offs_n, vol, WIN: tl.constexpr, FEAT: tl.constexpr):
        """Keys and values of tokens ``offs_n`` of the window at ``origin`` (pad rows where the token is padding),
        with the tokens' indices, validity and shift regions; ``kv_c`` = (pad_k, pad_v, head_elem, offs_d, HD)."""
        pad_k, pad_v, head_elem, offs_d, HD = kv_c
        elem_n, tok_n, valid_n, region_n = _tokens(origin, offs_n, vol, WIN)
        k = _load_rows(K, elem_n + head_elem, valid_n, offs_d, HD, pad_k, FEAT[3])
        v = _load_rows(V, elem_n + head_elem, valid_n, offs_d, HD, pad_v, FEAT[4])
        return k, v, tok_n, valid_n, region_n

    @triton.jit
    def _query_rows(Q, kv_c, origin, offs_m, vol, WIN: tl.constexpr):
        """Queries of tokens ``offs_m`` of the window at ``origin`` (zeros where padding), with the tokens'
        indices, validity and shift regions."""
        _, _, head_elem, offs_d, HD = kv_c
        elem_m, tok_m, valid_m, region_m = _tokens(origin, offs_m, vol, WIN)
        return _load_rows(Q, elem_m + head_elem, valid_m, offs_d, HD, 0.0, False), tok_m, valid_m, region_m

    @triton.jit
    def _query_grad_rows(DO, Lse, Delta, rows, valid_m, offs_d, HD):
        """dO, the base-2 log-sum-exp and delta of the query rows ``rows`` (token * heads + head)."""
        do = _load_rows(DO, rows * HD, valid_m, offs_d, HD, 0.0, False)
        lse = tl.load(Lse + rows, mask=valid_m, other=0.0)
        delta = tl.load(Delta + rows, mask=valid_m, other=0.0)
        return do, lse, delta

    # ----------------------------------------------------------------------------------------------
    # Scores in base 2. ``FEAT`` = the constexpr tuple (HAS_BIAS, HAS_MASK, PRECISION, HAS_PAD_K, HAS_PAD_V);
    # ``bias_c`` = (BIAS, MASK, num_masks, qk_scale): the call's dense bias (``dense_bias``: bias / scale per
    # head, zero-padded to (NK, NK)), the attn_mask, and scale * log2(e).
    # ----------------------------------------------------------------------------------------------
    @triton.jit
    def _bias_tile(BIAS, head, offs_m, offs_n, N: tl.constexpr, HAS_BIAS: tl.constexpr):
        """The dense bias at (queries ``offs_m``, keys ``offs_n``) of ``head`` (every index is inside the
        zero-padded slice) in fp32 (the products' accumulators), whatever dtype it is stored in; or 0 without a
        bias table."""
        NK: tl.constexpr = padded_tokens(N)
        if HAS_BIAS:
            return tl.load(BIAS + (head * NK + offs_m[:, None]) * NK + offs_n[None, :]).to(tl.float32)
        else:
            return 0.0

    @triton.jit
    def _scores2(q, k, bias, win, offs_m, offs_n, region_m, region_n, bias_c, N: tl.constexpr,
                 SHIFTED: tl.constexpr, KEY_TAIL: tl.constexpr, FEAT: tl.constexpr):
        """``log2(e) * (scale q k^T + bias + shift mask + attn_mask)`` in fp32: the bias tile (``_bias_tile``)
        initialises the product's accumulator, ``qk_scale`` scales both; with ``KEY_TAIL`` (the block
        reaches past the window) keys beyond N get -inf."""
        _, MASK, num_masks, qk_scale = bias_c
        if FEAT[0]:
            s = tl.dot(q, tl.trans(k), acc=bias, input_precision=FEAT[2]) * qk_scale
        else:
            s = tl.dot(q, tl.trans(k), input_precision=FEAT[2]) * qk_scale
        if SHIFTED:
            s += tl.where(region_m[:, None] != region_n[None, :], _SHIFT_MASK_2, 0.0)
        if FEAT[1]:
            pair_ok = (offs_m[:, None] < N) & (offs_n[None, :] < N)
            mask_ptrs = MASK + (win % num_masks).to(tl.int64) * (N * N) + offs_m[:, None] * N + offs_n[None, :]
            s += tl.load(mask_ptrs, mask=pair_ok, other=0.0) * _LOG2E
        if KEY_TAIL:
            s = tl.where(offs_n[None, :] < N, s, float("-inf"))
        return s

    # ----------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------
    @triton.jit
    def _key_block_scores(q, offs_m, region_m, head, K, V, kv_c, origin, start_n, vol, win, bias_c,
                          WIN: tl.constexpr, FEAT: tl.constexpr, WIDTH: tl.constexpr, KEY_TAIL: tl.constexpr):
        """Keys and values ``start_n + arange(WIDTH)`` of the window and the base-2 scores of the queries
        ``offs_m`` against them."""
        offs_n = start_n + tl.arange(0, WIDTH)
        k, v, _, _, region_n = _key_rows(K, V, kv_c, origin, offs_n, vol, WIN, FEAT)
        s = _scores2(q, k, _bias_tile(bias_c[0], head, offs_m, offs_n, WIN[0], FEAT[0]), win, offs_m, offs_n,
                     region_m, region_n, bias_c, WIN[0], (WIN[4] > 0) | (WIN[5] > 0) | (WIN[6] > 0), KEY_TAIL, FEAT)
        return k, v, s

    @triton.jit
    def _fwd_key_block(m_i, l_i, acc, q, rows, K, V, kv_c, origin, start_n, vol, win, bias_c, WIN: tl.constexpr,
                       FEAT: tl.constexpr, WIDTH: tl.constexpr, KEY_TAIL: tl.constexpr):
        """One key block of the online softmax: keys ``start_n + arange(WIDTH)``."""
        offs_m, region_m, head = rows
        _, v, s = _key_block_scores(q, offs_m, region_m, head, K, V, kv_c, origin, start_n, vol, win, bias_c, WIN,
                                    FEAT, WIDTH, KEY_TAIL)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=FEAT[2])
        return m_new, l_i, acc

    @triton.jit
    def _fwd_rows(Q, K, V, Out, Lse, PAD_K, PAD_V, vol, NH, HD, num_windows, bias_c, start_m,
                  BLOCK_M: tl.constexpr, N: tl.constexpr, WIN: tl.constexpr, FEAT: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Queries ``start_m + arange(BLOCK_M)`` of one head in every ``num_programs(2)``-th window: the full
        key blocks in a loop, then the 16-granular tail pieces of ``block_pieces(N, BLOCK_N)``."""
        head = tl.program_id(1)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        kv_c = _head_kv_constants(PAD_K, PAD_V, head, offs_d, vol, HD, FEAT)
        for win in range(tl.program_id(2), num_windows, tl.num_programs(2)):
            origin = _window_origin(win, vol, WIN)
            q, tok_m, valid_m, region_m = _query_rows(Q, kv_c, origin, offs_m, vol, WIN)
            rows = (offs_m, region_m, head)
            m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
            acc = tl.full((BLOCK_M, BLOCK_D), 0.0, tl.float32)
            for start_n in tl.range(0, _full_pieces(N, BLOCK_N) * BLOCK_N, BLOCK_N):
                m_i, l_i, acc = _fwd_key_block(m_i, l_i, acc, q, rows, K, V, kv_c, origin, start_n, vol, win, bias_c,
                                               WIN, FEAT, BLOCK_N, False)
            for j in tl.static_range(_full_pieces(N, BLOCK_N), _num_pieces(N, BLOCK_N)):
                m_i, l_i, acc = _fwd_key_block(m_i, l_i, acc, q, rows, K, V, kv_c, origin,
                                               _piece_start(j, N, BLOCK_N), vol, win, bias_c, WIN, FEAT,
                                               _piece_width(j, N, BLOCK_N), _past_window(j, N, BLOCK_N))
            rows_out = tl.cast(tok_m, tl.int64) * NH + head
            tl.store(Out + rows_out[:, None] * HD + offs_d[None, :], (acc / l_i[:, None]).to(Out.dtype.element_ty),
                     mask=valid_m[:, None] & (offs_d[None, :] < HD))
            tl.store(Lse + rows_out, m_i + tl.math.log2(l_i), mask=valid_m)

    @triton.jit
    def _window_attn_fwd_kernel(
        Q, K, V, Out, Lse, BIAS, PAD_K, PAD_V, MASK, s_b, s_t, s_h, s_w, s_n,
        T, H, W, NH, HD, num_masks, num_windows, qk_scale,
        N: tl.constexpr, WT: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
        ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_PAD_K: tl.constexpr, HAS_PAD_V: tl.constexpr, HAS_MASK: tl.constexpr,
        PRECISION: tl.constexpr, WIDE_INDEX: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Persistent forward: program (query piece, head, window group) attends its queries in the group's
        windows ``program_id(2) + k * num_programs(2)``. Query pieces are ``block_pieces(N, BLOCK_M)``: whole
        blocks, then 16-granular tail pieces (each width its own code path). q, k, v share the strides
        ``s_*``. Writes the output and the base-2 log-sum-exp of every real query's scores."""
        pid = tl.program_id(0)
        vol = _volume(T, H, W, s_b, s_t, s_h, s_w, s_n, WT, WH, WW, WIDE_INDEX)
        WIN: tl.constexpr = (N, WT, WH, WW, ST, SH, SW, WIDE_INDEX)
        FEAT: tl.constexpr = (HAS_BIAS, HAS_MASK, PRECISION, HAS_PAD_K, HAS_PAD_V)
        bias_c = (BIAS, MASK, num_masks, qk_scale)
        if _full_pieces(N, BLOCK_M) > 0 and pid < _full_pieces(N, BLOCK_M):
            _fwd_rows(Q, K, V, Out, Lse, PAD_K, PAD_V, vol, NH, HD, num_windows, bias_c, pid * BLOCK_M, BLOCK_M, N,
                      WIN, FEAT, BLOCK_N, BLOCK_D)
        for i in tl.static_range(_full_pieces(N, BLOCK_M), _num_pieces(N, BLOCK_M)):
            if pid == i:
                _fwd_rows(Q, K, V, Out, Lse, PAD_K, PAD_V, vol, NH, HD, num_windows, bias_c,
                          _piece_start(i, N, BLOCK_M), _piece_width(i, N, BLOCK_M), N, WIN, FEAT, BLOCK_N, BLOCK_D)

    # ----------------------------------------------------------------------------------------------
    # Backward A: dq and delta = rowsum(dO * O)
    # ----------------------------------------------------------------------------------------------
    @triton.jit
    def _dq_key_block(dq, q, do, lse, delta, rows, K, V, kv_c, origin, start_n, vol, win, bias_c,
                      WIN: tl.constexpr, FEAT: tl.constexpr, WIDTH: tl.constexpr, KEY_TAIL: tl.constexpr):
        """dq contribution of the keys ``start_n + arange(WIDTH)``."""
        offs_m, region_m, head, valid_m = rows
        k, v, s = _key_block_scores(q, offs_m, region_m, head, K, V, kv_c, origin, start_n, vol, win, bias_c, WIN,
                                    FEAT, WIDTH, KEY_TAIL)
        p = tl.where(valid_m[:, None], tl.math.exp2(s - lse[:, None]), 0.0)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=FEAT[2]) - delta[:, None])
        return dq + tl.dot(ds.to(k.dtype), k, input_precision=FEAT[2])

    @triton.jit
    def _dq_rows(Q, K, V, Out, DO, Lse, Delta, DQ, PAD_K, PAD_V, vol, NH, HD, num_windows, grad_c, bias_c,
                 start_m, BLOCK_M: tl.constexpr, N: tl.constexpr, WIN: tl.constexpr, FEAT: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """dq and delta of queries ``start_m + arange(BLOCK_M)`` of one head in the group's windows: the full
        key blocks in a loop, then the tail pieces."""
        sg_tok, sg_head, scale = grad_c
        head = tl.program_id(1)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d[None, :] < HD
        kv_c = _head_kv_constants(PAD_K, PAD_V, head, offs_d, vol, HD, FEAT)
        for win in range(tl.program_id(2), num_windows, tl.num_programs(2)):
            origin = _window_origin(win, vol, WIN)
            q, tok_m, valid_m, region_m = _query_rows(Q, kv_c, origin, offs_m, vol, WIN)
            rows = tl.cast(tok_m, tl.int64) * NH + head
            do = _load_rows(DO, rows * HD, valid_m, offs_d, HD, 0.0, False)
            o = _load_rows(Out, rows * HD, valid_m, offs_d, HD, 0.0, False)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
            tl.store(Delta + rows, delta, mask=valid_m)
            lse = tl.load(Lse + rows, mask=valid_m, other=0.0)
            query = (offs_m, region_m, head, valid_m)
            dq = tl.full((BLOCK_M, BLOCK_D), 0.0, tl.float32)
            for start_n in tl.range(0, _full_pieces(N, BLOCK_N) * BLOCK_N, BLOCK_N):
                dq = _dq_key_block(dq, q, do, lse, delta, query, K, V, kv_c, origin, start_n, vol, win, bias_c, WIN,
                                   FEAT, BLOCK_N, False)
            for j in tl.static_range(_full_pieces(N, BLOCK_N), _num_pieces(N, BLOCK_N)):
                dq = _dq_key_block(dq, q, do, lse, delta, query, K, V, kv_c, origin, _piece_start(j, N, BLOCK_N), vol,
                                   win, bias_c, WIN, FEAT, _piece_width(j, N, BLOCK_N), _past_window(j, N, BLOCK_N))
            grad_rows = tl.cast(tok_m, tl.int64) * sg_tok + head * sg_head
            tl.store(DQ + grad_rows[:, None] + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
                     mask=valid_m[:, None] & d_ok)

    @triton.jit
    def _window_attn_bwd_dq_kernel(
        Q, K, V, Out, DO, Lse, Delta, DQ, BIAS, PAD_K, PAD_V, MASK, s_b, s_t, s_h, s_w, s_n,
        T, H, W, NH, HD, num_masks, num_windows, sg_tok, sg_head, scale, qk_scale,
        N: tl.constexpr, WT: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
        ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_PAD_K: tl.constexpr, HAS_PAD_V: tl.constexpr, HAS_MASK: tl.constexpr,
        PRECISION: tl.constexpr, WIDE_INDEX: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Persistent backward A: program (query piece, head, window group) writes dq and ``Delta`` of its
        queries in the group's windows. Gradient rows sit ``sg_tok`` elements apart per token and ``sg_head``
        per head (contiguous, or one packed dqkv)."""
        pid = tl.program_id(0)
        vol = _volume(T, H, W, s_b, s_t, s_h, s_w, s_n, WT, WH, WW, WIDE_INDEX)
        WIN: tl.constexpr = (N, WT, WH, WW, ST, SH, SW, WIDE_INDEX)
        FEAT: tl.constexpr = (HAS_BIAS, HAS_MASK, PRECISION, HAS_PAD_K, HAS_PAD_V)
        bias_c = (BIAS, MASK, num_masks, qk_scale)
        grad_c = (sg_tok, sg_head, scale)
        if _full_pieces(N, BLOCK_M) > 0 and pid < _full_pieces(N, BLOCK_M):
            _dq_rows(Q, K, V, Out, DO, Lse, Delta, DQ, PAD_K, PAD_V, vol, NH, HD, num_windows, grad_c, bias_c,
                     pid * BLOCK_M, BLOCK_M, N, WIN, FEAT, BLOCK_N, BLOCK_D)
        for i in tl.static_range(_full_pieces(N, BLOCK_M), _num_pieces(N, BLOCK_M)):
            if pid == i:
                _dq_rows(Q, K, V, Out, DO, Lse, Delta, DQ, PAD_K, PAD_V, vol, NH, HD, num_windows, grad_c, bias_c,
                         _piece_start(i, N, BLOCK_M), _piece_width(i, N, BLOCK_M), N, WIN, FEAT, BLOCK_N, BLOCK_D)

    # ----------------------------------------------------------------------------------------------
    # Backward A2: per window group the dS sums, the bias gradient's partial
    # ----------------------------------------------------------------------------------------------
    @triton.jit
    def _dbias_tile(Q, K, V, DO, Lse, Delta, DBIAS, PAD_K, PAD_V, vol, NH, HD, num_windows, bias_c, start_m,
                    BLOCK_M: tl.constexpr, start_n, BLOCK_N: tl.constexpr, WIN: tl.constexpr, FEAT: tl.constexpr,
                    BLOCK_D: tl.constexpr):
        """dS of queries ``start_m + arange(BLOCK_M)`` and keys ``start_n + arange(BLOCK_N)`` of one head summed
        over the group's windows in registers, stored once into ``DBIAS[group, head]`` (a zero-padded (NK, NK)
        slice); the bias tile stays in registers for all the windows."""
        N: tl.constexpr = WIN[0]
        NK: tl.constexpr = padded_tokens(N)
        head = tl.program_id(1)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        kv_c = _head_kv_constants(PAD_K, PAD_V, head, offs_d, vol, HD, FEAT)
        bias = _bias_tile(bias_c[0], head, offs_m, offs_n, N, FEAT[0])
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for win in range(tl.program_id(2), num_windows, tl.num_programs(2)):
            origin = _window_origin(win, vol, WIN)
            q, tok_m, valid_m, region_m = _query_rows(Q, kv_c, origin, offs_m, vol, WIN)
            k, v, _, _, region_n = _key_rows(K, V, kv_c, origin, offs_n, vol, WIN, FEAT)
            do, lse, delta = _query_grad_rows(DO, Lse, Delta, tl.cast(tok_m, tl.int64) * NH + head, valid_m, offs_d,
                                              HD)
            # keys past N need no -inf: their sums are never read
            s = _scores2(q, k, bias, win, offs_m, offs_n, region_m, region_n, bias_c, N,
                         (WIN[4] > 0) | (WIN[5] > 0) | (WIN[6] > 0), False, FEAT)
            p = tl.where(valid_m[:, None], tl.math.exp2(s - lse[:, None]), 0.0)
            acc += p * (tl.dot(do, tl.trans(v), input_precision=FEAT[2]) - delta[:, None])
        base = DBIAS + ((tl.program_id(2) * NH + head) * NK).to(tl.int64) * NK
        tl.store(base + offs_m[:, None] * NK + offs_n[None, :], acc)

    @triton.jit
    def _dbias_rows(Q, K, V, DO, Lse, Delta, DBIAS, PAD_K, PAD_V, vol, NH, HD, num_windows, bias_c, start_m,
                    BLOCK_M: tl.constexpr, key_piece, WIN: tl.constexpr, FEAT: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr):
        """``_dbias_tile`` of the program's key piece ``key_piece`` of ``block_pieces(N, BLOCK_N)``."""
        N: tl.constexpr = WIN[0]
        if _full_pieces(N, BLOCK_N) > 0 and key_piece < _full_pieces(N, BLOCK_N):
            _dbias_tile(Q, K, V, DO, Lse, Delta, DBIAS, PAD_K, PAD_V, vol, NH, HD, num_windows, bias_c, start_m,
                        BLOCK_M, key_piece * BLOCK_N, BLOCK_N, WIN, FEAT, BLOCK_D)
        for j in tl.static_range(_full_pieces(N, BLOCK_N), _num_pieces(N, BLOCK_N)):
            if key_piece == j:
                _dbias_tile(Q, K, V, DO, Lse, Delta, DBIAS, PAD_K, PAD_V, vol, NH, HD, num_windows, bias_c, start_m,
                            BLOCK_M, _piece_start(j, N, BLOCK_N), _piece_width(j, N, BLOCK_N), WIN, FEAT, BLOCK_D)

    @triton.jit
    def _window_attn_bwd_dbias_kernel(
        Q, K, V, DO, Lse, Delta, DBIAS, BIAS, PAD_K, PAD_V, MASK, s_b, s_t, s_h, s_w, s_n,
        T, H, W, NH, HD, num_masks, num_windows, qk_scale,
        N: tl.constexpr, WT: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
        ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_PAD_K: tl.constexpr, HAS_PAD_V: tl.constexpr, HAS_MASK: tl.constexpr,
        PRECISION: tl.constexpr, WIDE_INDEX: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Persistent backward A2: program (query piece x key piece, head, window group) sums the dS tile of
        its queries and keys over the group's windows into ``DBIAS (groups, NH, NK, NK)``; reads ``Delta``
        from backward A. (Holding a whole query row of dS sums per program, as backward A would have to,
        spills registers; this recomputes the tile's scores instead: a third pass of exps.)"""
        vol = _volume(T, H, W, s_b, s_t, s_h, s_w, s_n, WT, WH, WW, WIDE_INDEX)
        WIN: tl.constexpr = (N, WT, WH, WW, ST, SH, SW, WIDE_INDEX)
        FEAT: tl.constexpr = (HAS_BIAS, HAS_MASK, PRECISION, HAS_PAD_K, HAS_PAD_V)
        bias_c = (BIAS, MASK, num_masks, qk_scale)
        query_piece = tl.program_id(0) // _num_pieces(N, BLOCK_N)
        key_piece = tl.program_id(0) % _num_pieces(N, BLOCK_N)
        if _full_pieces(N, BLOCK_M) > 0 and query_piece < _full_pieces(N, BLOCK_M):
            _dbias_rows(Q, K, V, DO, Lse, Delta, DBIAS, PAD_K, PAD_V, vol, NH, HD, num_windows, bias_c,
                        query_piece * BLOCK_M, BLOCK_M, key_piece, WIN, FEAT, BLOCK_N, BLOCK_D)
        for i in tl.static_range(_full_pieces(N, BLOCK_M), _num_pieces(N, BLOCK_M)):
            if query_piece == i:
                _dbias_rows(Q, K, V, DO, Lse, Delta, DBIAS, PAD_K, PAD_V, vol, NH, HD, num_windows, bias_c,
                            _piece_start(i, N, BLOCK_M), _piece_width(i, N, BLOCK_M), key_piece, WIN, FEAT, BLOCK_N,
                            BLOCK_D)

    # ----------------------------------------------------------------------------------------------
    # Backward B: dk, dv, and per program the pad rows' gradient sums
    # ----------------------------------------------------------------------------------------------
    @triton.jit
    def _dkdv_query_block(dk, dv, k, v, keys, Q, DO, Lse, Delta, origin, start_m, vol, NH, kv_c, win, bias_c,
                          WIN: tl.constexpr, FEAT: tl.constexpr, WIDTH: tl.constexpr):
        """dk and dv contributions of the queries ``start_m + arange(WIDTH)`` to the program's keys."""
        offs_n, region_n, head = keys
        offs_m = start_m + tl.arange(0, WIDTH)
        q, tok_m, valid_m, region_m = _query_rows(Q, kv_c, origin, offs_m, vol, WIN)
        offs_d, HD = kv_c[3], kv_c[4]
        do, lse, delta = _query_grad_rows(DO, Lse, Delta, tl.cast(tok_m, tl.int64) * NH + head, valid_m, offs_d, HD)
        # keys past N need no -inf: their dk/dv rows are neither stored nor summed into the pad gradients
        s = _scores2(q, k, _bias_tile(bias_c[0], head, offs_m, offs_n, WIN[0], FEAT[0]), win, offs_m, offs_n,
                     region_m, region_n, bias_c, WIN[0], (WIN[4] > 0) | (WIN[5] > 0) | (WIN[6] > 0), False, FEAT)
        p = tl.where(valid_m[:, None], tl.math.exp2(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=FEAT[2])
        dp = tl.dot(do, tl.trans(v), input_precision=FEAT[2])
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=FEAT[2])
        return dk, dv

    @triton.jit
    def _dkdv_keys(Q, K, V, DO, Lse, Delta, DK, DV, DPAD, PAD_K, PAD_V, vol, NH, HD, num_windows, grad_c, bias_c,
                   dpad_row, start_n, BLOCK_N: tl.constexpr, N: tl.constexpr, WIN: tl.constexpr, FEAT: tl.constexpr,
                   NEED_DPAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """dk, dv of keys ``start_n + arange(BLOCK_N)`` of one head in the group's windows, the full query
        blocks in a loop, then the tail pieces. The pad rows' gradients of the keys that are padding are summed
        over the group's windows and stored once into ``DPAD[dpad_row, 0|1, head]``."""
        sg_tok, sg_head, scale = grad_c
        head = tl.program_id(1)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d[None, :] < HD
        kv_c = _head_kv_constants(PAD_K, PAD_V, head, offs_d, vol, HD, FEAT)
        dpad_k = tl.full((BLOCK_D,), 0.0, tl.float32)
        dpad_v = tl.full((BLOCK_D,), 0.0, tl.float32)
        for win in range(tl.program_id(2), num_windows, tl.num_programs(2)):
            origin = _window_origin(win, vol, WIN)
            k, v, tok_n, valid_n, region_n = _key_rows(K, V, kv_c, origin, offs_n, vol, WIN, FEAT)
            keys = (offs_n, region_n, head)
            dk = tl.full((BLOCK_N, BLOCK_D), 0.0, tl.float32)
            dv = tl.full((BLOCK_N, BLOCK_D), 0.0, tl.float32)
            for start_m in tl.range(0, _full_pieces(N, BLOCK_M) * BLOCK_M, BLOCK_M):
                dk, dv = _dkdv_query_block(dk, dv, k, v, keys, Q, DO, Lse, Delta, origin, start_m, vol, NH, kv_c, win,
                                           bias_c, WIN, FEAT, BLOCK_M)
            for j in tl.static_range(_full_pieces(N, BLOCK_M), _num_pieces(N, BLOCK_M)):
                dk, dv = _dkdv_query_block(dk, dv, k, v, keys, Q, DO, Lse, Delta, origin, _piece_start(j, N, BLOCK_M),
                                           vol, NH, kv_c, win, bias_c, WIN, FEAT, _piece_width(j, N, BLOCK_M))
            dk = dk * scale
            grad_ptrs = (tl.cast(tok_n, tl.int64) * sg_tok + head * sg_head)[:, None] + offs_d[None, :]
            tl.store(DK + grad_ptrs, dk.to(DK.dtype.element_ty), mask=valid_n[:, None] & d_ok)
            tl.store(DV + grad_ptrs, dv.to(DV.dtype.element_ty), mask=valid_n[:, None] & d_ok)
            if NEED_DPAD:
                padding = ((offs_n < N) & (valid_n == 0))[:, None]
                dpad_k += tl.sum(tl.where(padding, dk, 0.0), axis=0)
                dpad_v += tl.sum(tl.where(padding, dv, 0.0), axis=0)
        if NEED_DPAD:
            base = DPAD + ((dpad_row * 2 * NH + head) * HD).to(tl.int64)
            tl.store(base + offs_d, dpad_k, mask=offs_d < HD)
            tl.store(base + NH * HD + offs_d, dpad_v, mask=offs_d < HD)

    @triton.jit
    def _window_attn_bwd_dkdv_kernel(
        Q, K, V, DO, Lse, Delta, DK, DV, DPAD, BIAS, PAD_K, PAD_V, MASK, s_b, s_t, s_h, s_w, s_n,
        T, H, W, NH, HD, num_masks, num_windows, sg_tok, sg_head, scale, qk_scale,
        N: tl.constexpr, WT: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
        ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_PAD_K: tl.constexpr, HAS_PAD_V: tl.constexpr, HAS_MASK: tl.constexpr,
        NEED_DPAD: tl.constexpr, PRECISION: tl.constexpr, WIDE_INDEX: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Persistent backward B: program (key piece, head, window group) writes dk, dv of its keys in the
        group's windows and, with ``NEED_DPAD``, its pad-row gradient sums into ``DPAD (groups * pieces, 2,
        NH, HD)``. Key pieces are ``block_pieces(N, BLOCK_N)``; reads ``Delta`` from backward A."""
        pid = tl.program_id(0)
        vol = _volume(T, H, W, s_b, s_t, s_h, s_w, s_n, WT, WH, WW, WIDE_INDEX)
        WIN: tl.constexpr = (N, WT, WH, WW, ST, SH, SW, WIDE_INDEX)
        FEAT: tl.constexpr = (HAS_BIAS, HAS_MASK, PRECISION, HAS_PAD_K, HAS_PAD_V)
        bias_c = (BIAS, MASK, num_masks, qk_scale)
        grad_c = (sg_tok, sg_head, scale)
        dpad_row = tl.program_id(2) * _num_pieces(N, BLOCK_N) + pid
        if _full_pieces(N, BLOCK_N) > 0 and pid < _full_pieces(N, BLOCK_N):
            _dkdv_keys(Q, K, V, DO, Lse, Delta, DK, DV, DPAD, PAD_K, PAD_V, vol, NH, HD, num_windows, grad_c,
                       bias_c, dpad_row, pid * BLOCK_N, BLOCK_N, N, WIN, FEAT, NEED_DPAD, BLOCK_M, BLOCK_D)
        for i in tl.static_range(_full_pieces(N, BLOCK_N), _num_pieces(N, BLOCK_N)):
            if pid == i:
                _dkdv_keys(Q, K, V, DO, Lse, Delta, DK, DV, DPAD, PAD_K, PAD_V, vol, NH, HD, num_windows, grad_c,
                           bias_c, dpad_row, _piece_start(i, N, BLOCK_N), _piece_width(i, N, BLOCK_N), N, WIN,
                           FEAT, NEED_DPAD, BLOCK_M, BLOCK_D)

    # ----------------------------------------------------------------------------------------------
    # Backward C: the fixed-order reductions of the partials
    # ----------------------------------------------------------------------------------------------
    @triton.jit
    def _window_attn_bwd_dsum_kernel(DBIAS, DSUM, groups, NH, N: tl.constexpr, BLOCK_S: tl.constexpr):
        """Backward C's first stage (``reduce_stages=2``): program ``(block, head)`` sums ``BLOCK_S`` consecutive
        elements of the groups' dS sums ``DBIAS (groups, NH, NK, NK)`` over the groups, in group order, into
        ``DSUM (1, NH, NK, NK)``: coalesced loads, no gathers; elements of rows or keys past N are zeros."""
        NK: tl.constexpr = padded_tokens(N)
        head = tl.program_id(1)
        offs = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        inside = (offs // NK < N) & (offs % NK < N)
        acc = tl.full((BLOCK_S,), 0.0, tl.float32)
        for group in range(0, groups):
            acc += tl.load(DBIAS + ((group * NH + head) * NK).to(tl.int64) * NK + offs, mask=inside, other=0.0)
        tl.store(DSUM + (head * NK).to(tl.int64) * NK + offs, acc)

    @triton.jit
    def _window_attn_bwd_reduce_kernel(
        DBIAS, DTABLE, DPAD, DPAD_K, DPAD_V, groups, pad_rows, NH, HD,
        N: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
        FT: tl.constexpr, FH: tl.constexpr, FW: tl.constexpr,
        NEED_DTABLE: tl.constexpr, NEED_DPAD: tl.constexpr,
        BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Backward C, one launch for every partial; fixed summation orders, so deterministic.

        Programs ``(e, head)`` below ``cdiv(table_size, BLOCK_E)``: bias-table gradient ``DTABLE[e, head]`` of
        ``BLOCK_E`` entries, the sum over the window groups' dS sums ``DBIAS (groups, NH, NK, NK)`` and over
        queries m of ``dS[m, key]``, where the key sits at m's bias coordinates minus entry e's offset (when
        that is a token of the window). The last program per head: the pad rows' gradients ``DPAD_K, DPAD_V
        (NH, HD)``, the sums of ``DPAD``'s ``pad_rows`` rows."""
        head = tl.program_id(1)
        table_size: tl.constexpr = (2 * FT - 1) * (2 * FH - 1) * (2 * FW - 1)
        table_blocks: tl.constexpr = (table_size + BLOCK_E - 1) // BLOCK_E
        NK: tl.constexpr = padded_tokens(N)
        if NEED_DTABLE and tl.program_id(0) < table_blocks:
            offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
            dt = offs_e // ((2 * FH - 1) * (2 * FW - 1)) - (FT - 1)
            dh = (offs_e // (2 * FW - 1)) % (2 * FH - 1) - (FH - 1)
            dw = offs_e % (2 * FW - 1) - (FW - 1)
            acc = tl.full((BLOCK_E,), 0.0, tl.float32)
            for group in range(0, groups):
                base = DBIAS + ((group * NH + head) * NK).to(tl.int64) * NK
                for start_m in range(0, N, BLOCK_M):
                    offs_m = start_m + tl.arange(0, BLOCK_M)
                    kt = (offs_m // (BH * BW))[None, :] - dt[:, None]
                    kh = ((offs_m // BW) % BH)[None, :] - dh[:, None]
                    kw = (offs_m % BW)[None, :] - dw[:, None]
                    key = (kt * BH + kh) * BW + kw
                    ok = (offs_e[:, None] < table_size) & (offs_m[None, :] < N) & (kt >= 0) & (kh >= 0) \
                        & (kh < BH) & (kw >= 0) & (kw < BW) & (key < N)
                    acc += tl.sum(tl.load(base + offs_m[None, :] * NK + key, mask=ok, other=0.0), axis=1)
            tl.store(DTABLE + offs_e * NH + head, acc, mask=offs_e < table_size)
        if NEED_DPAD and tl.program_id(0) == tl.num_programs(0) - 1:
            offs_d = tl.arange(0, BLOCK_D)
            dpad_k = tl.full((BLOCK_D,), 0.0, tl.float32)
            dpad_v = tl.full((BLOCK_D,), 0.0, tl.float32)
            for row in range(0, pad_rows):
                base = DPAD + ((row * 2 * NH + head) * HD).to(tl.int64)
                dpad_k += tl.load(base + offs_d, mask=offs_d < HD, other=0.0)
                dpad_v += tl.load(base + NH * HD + offs_d, mask=offs_d < HD, other=0.0)
            tl.store(DPAD_K + head * HD + offs_d, dpad_k, mask=offs_d < HD)
            tl.store(DPAD_V + head * HD + offs_d, dpad_v, mask=offs_d < HD)


# --------------------------------------------------------------------------------------------------
# Triton launch configurations: per-kernel sets, the shipped (measured) choices, defaults
# --------------------------------------------------------------------------------------------------
KERNELS = ("fwd", "dq", "dbias", "dkdv")


@dataclass(frozen=True)
class KernelConfig:
    """Blocks and launch options of one Triton kernel.

    ``fwd`` and ``dq``: a program takes ``block_m`` query rows (one of ``block_pieces(N, block_m)``) of one
    head in a group of windows and runs over the keys in blocks of ``block_n``. ``dbias``: a program takes a
    ``block_m x block_n`` tile of (query, key) pairs. ``dkdv``: a program takes ``block_n`` keys and runs over
    the queries in blocks of ``block_m``. ``num_stages``: software pipelining of the innermost loop (fwd and
    dq: key blocks; dbias: windows; dkdv: query blocks). ``group_mult`` (dbias): the number of window groups
    times this (more programs, a larger dS partial; ignored with ``LaunchConfigs.dbias_sum="owner"``)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    group_mult: int = 1

    @property
    def label(self) -> str:
        groups = f" groups-x{self.group_mult}" if self.group_mult > 1 else ""
        return f"m{self.block_m} n{self.block_n} w{self.num_warps} s{self.num_stages}{groups}"


# The kernels' variants a GPU measurement chooses between, per problem (fields of LaunchConfigs; the first of
# each is the default):
#   bias_dtype     the dense bias tile every attention kernel reads per window-head: "float32", or "input",
#                  the input's dtype (half the bytes in fp16/bf16; products still accumulate in fp32)
#   dbias_sum      backward A2's dS sums: "groups", per window group (more programs, a (groups, heads, Np, Np)
#                  partial that backward C reduces), or "owner", one program per (query piece x key piece, head)
#                  over every window, writing the final per-head sums (fewer programs, no partial)
#   reduce_stages  backward C over the groups' partials: 1, the table gather over every group's partial, or 2,
#                  a dense coalesced sum over the groups first, then the gather from that one sum
VARIANTS = {"bias_dtype": ("float32", "input"), "dbias_sum": ("groups", "owner"), "reduce_stages": (1, 2)}


@dataclass(frozen=True)
class LaunchConfigs:
    """One configuration per kernel: forward, dq (+ delta), dbias (the dS partial), dk/dv (+ pad partial), and
    the kernels' variants (``VARIANTS``)."""

    fwd: KernelConfig
    dq: KernelConfig
    dbias: KernelConfig
    dkdv: KernelConfig
    bias_dtype: str = VARIANTS["bias_dtype"][0]
    dbias_sum: str = VARIANTS["dbias_sum"][0]
    reduce_stages: int = VARIANTS["reduce_stages"][0]

    def __post_init__(self) -> None:
        for name, choices in VARIANTS.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")

    @property
    def variant_label(self) -> str:
        """The variants that differ from the defaults, e.g. ``"bias_dtype=input dbias_sum=owner"`` ("" if none)."""
        return " ".join(f"{name}={getattr(self, name)}" for name, choices in VARIANTS.items()
                        if getattr(self, name) != choices[0])

    def to_json(self) -> dict:
        return {**{name: asdict(getattr(self, name)) for name in KERNELS},
                **{name: getattr(self, name) for name in VARIANTS}}

    @classmethod
    def from_json(cls, record: dict) -> LaunchConfigs:
        """The configurations of a ``to_json`` record; a record without the variants (written before they
        existed) takes their defaults."""
        return cls(**{name: KernelConfig(**record[name]) for name in KERNELS},
                   **{name: record[name] for name in VARIANTS if name in record})


# The configurations a GPU sweep (benchmarks/wmsa_decide.py) chooses from, per kernel, for SSLTM's windows
# (4x7x7, head_dim 32); compile_check proves every one (``--set full``) and the tests run each.
CONFIG_SETS = {  # the first of each: the default for SSLTM's windows in 16-bit (default_configs)
    "fwd": (KernelConfig(64, 64, 4, 2), KernelConfig(64, 64, 4, 3), KernelConfig(64, 64, 8, 2),
            KernelConfig(32, 64, 4, 2), KernelConfig(128, 64, 8, 2), KernelConfig(64, 32, 4, 3)),
    "dq": (KernelConfig(64, 64, 8, 2), KernelConfig(32, 64, 4, 2), KernelConfig(64, 64, 4, 2),
           KernelConfig(64, 32, 4, 2), KernelConfig(128, 64, 8, 1)),
    "dbias": (KernelConfig(64, 64, 8, 2), KernelConfig(64, 32, 4, 3), KernelConfig(32, 64, 4, 2),
              KernelConfig(64, 64, 4, 2), KernelConfig(64, 64, 8, 2, group_mult=2)),
    "dkdv": (KernelConfig(64, 64, 8, 1), KernelConfig(64, 64, 8, 2), KernelConfig(64, 32, 4, 2),
             KernelConfig(64, 32, 8, 1), KernelConfig(32, 64, 4, 3)),
}


def _variants(index: int) -> dict:
    """The ``index``-th combination of ``VARIANTS`` (mixed radix, the first variant fastest; 0: the defaults)."""
    chosen = {}
    for name, choices in VARIANTS.items():
        index, digit = divmod(index, len(choices))
        chosen[name] = choices[digit]
    return chosen


def sweep_configs() -> list[LaunchConfigs]:
    """Every kernel's configuration set as launch configurations: the i-th of each set together (a shorter
    set starts again) with the i-th combination of the variants, so that compiling or testing these covers
    every configuration of every kernel and every variant (the first: the defaults)."""
    count = max(len(configs) for configs in CONFIG_SETS.values())
    return [LaunchConfigs(**{name: CONFIG_SETS[name][i % len(CONFIG_SETS[name])] for name in KERNELS},
                          **_variants(i)) for i in range(count)]


# The interpreter pays per block step, not per element: whole windows per program
INTERPRETER_CONFIGS = LaunchConfigs(*(KernelConfig(WHOLE_WINDOW_BLOCK, WHOLE_WINDOW_BLOCK, 4, 1) for _ in KERNELS))
CONFIG_FILE = Path(__file__).with_name("window_attention_3d_configs.json")


def default_configs(tokens_per_window: int, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> LaunchConfigs:
    """Configurations before any measurement, by what compile_check reports: at SSLTM's windows in 16-bit
    the first of each ``CONFIG_SETS`` (none spills registers on sm_90); fp32 (three tf32 products per
    product) and head dims from 128 take 32-row/key blocks, the fewest spills compiled."""
    if dtype == torch.float32 or dot_block(head_dim) >= 128:
        warps = 4 if dtype == torch.float32 else 8
        return LaunchConfigs(*(KernelConfig(32, 32, warps, 1) for _ in KERNELS))
    return LaunchConfigs(**{name: CONFIG_SETS[name][0] for name in KERNELS})


def config_key(device: str, tokens_per_window: int, head_dim: int, heads: int, dtype: torch.dtype,
               shifted: bool) -> str:
    """The shipped configuration file's key of one problem (``device``: the GPU's name, or ``*`` for any)."""
    return f"{device}|N={tokens_per_window}|hd={head_dim}|heads={heads}|{_DTYPE_NAMES[dtype]}|" + \
        ("shifted" if shifted else "unshifted")


@functools.cache
def _config_file(path: Path = CONFIG_FILE) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def shipped_configs() -> dict[str, LaunchConfigs]:
    """The configurations ``benchmarks/wmsa_decide.py`` measured and wrote, by ``config_key``."""
    return {key: LaunchConfigs.from_json(record) for key, record in _config_file().get("configs", {}).items()}


# Automatic dispatch prefers the Triton kernels to the CUDA ones on these compute capabilities (10 * major +
# minor) until a measurement on the device (benchmarks/wmsa_decide.py, "default_backend" in the config file)
# says otherwise: the design analysis (research/wmsa-perf-design.md) expects the redesigned Triton kernels
# to beat the WMMA kernels on Hopper; elsewhere the CUDA kernels keep their place before Triton.
TRITON_FIRST_ARCHS = (90,)


def preferred_backend(device: torch.device) -> str:
    """``"triton"`` or ``"cuda"``: which fused backend automatic dispatch tries first on ``device``."""
    if device.type != "cuda":
        return "cuda"
    measured = _config_file().get("default_backend", {}).get(torch.cuda.get_device_name(device))
    if measured is not None:
        return measured
    props = torch.cuda.get_device_properties(device)
    return "triton" if 10 * props.major + props.minor in TRITON_FIRST_ARCHS else "cuda"


def pipeline_stage_bytes(kernel: str, cfg: KernelConfig, tokens_per_window: int, head_dim: int,
                         dtype: torch.dtype) -> int:
    """Shared memory one stage of a kernel's software pipeline takes, what one iteration of its innermost
    loop loads (fwd and dq: a key block's keys, values and fp32 bias rows; dbias: a window's query, dO, key
    and value rows; dkdv: a query block's query and dO rows and fp32 bias rows), an upper estimate that
    compile_check holds against the compiled kernels."""
    d, e = dot_block(head_dim), dtype.itemsize
    if kernel == "dbias":
        return 2 * (cfg.block_m + cfg.block_n) * d * e
    rows = cfg.block_m if kernel == "dkdv" else cfg.block_n
    return 2 * rows * d * e + cfg.block_m * cfg.block_n * 4


def fit_stages(kernel: str, cfg: KernelConfig, tokens_per_window: int, head_dim: int, dtype: torch.dtype,
               shared_memory: int) -> KernelConfig:
    """``cfg`` with as many pipeline stages as fit ``shared_memory`` (at least 1: no prefetch)."""
    stage = pipeline_stage_bytes(kernel, cfg, tokens_per_window, head_dim, dtype)
    stages = max(1, min(cfg.num_stages, (shared_memory - PIPELINE_MARGIN_BYTES) // stage))
    return cfg if stages == cfg.num_stages else replace(cfg, num_stages=stages)


PIPELINE_MARGIN_BYTES = 32 * 1024  # shared memory kept for the products' operand tiles and reductions


@functools.lru_cache(maxsize=1024)
def launch_configs(tokens_per_window: int, head_dim: int, heads: int, dtype: torch.dtype, shifted: bool,
                   device: str = "*", shared_memory: int = TRITON_KEY_TILE_LIMITS[0][0],
                   interpreting: bool = False) -> LaunchConfigs:
    """The configurations for one problem: fixed ones under the interpreter; else the shipped measured
    ones for the device (or for any device), else ``default_configs``; pipeline stages cut to what fits
    the device's ``shared_memory``."""
    if interpreting:
        return INTERPRETER_CONFIGS
    shipped = shipped_configs()
    keys = [config_key(name, tokens_per_window, head_dim, heads, dtype, shifted) for name in (device, "*")]
    configs = next((shipped[key] for key in keys if key in shipped), None) or default_configs(tokens_per_window,
                                                                                              head_dim, dtype)
    return replace(configs, **{name: fit_stages(name, getattr(configs, name), tokens_per_window, head_dim, dtype,
                                                shared_memory) for name in KERNELS})


_FORCED_CONFIGS: list[LaunchConfigs] = []


@contextlib.contextmanager
def forced_launch_configs(configs: LaunchConfigs):
    """Every Triton launch inside the context takes ``configs`` (GPU sweeps and tests; not thread-safe)."""
    _FORCED_CONFIGS.append(configs)
    try:
        yield configs
    finally:
        _FORCED_CONFIGS.pop()


def _launch_configs(q: torch.Tensor, geom: WindowGeometry) -> LaunchConfigs:
    """The configurations for windows of ``q`` (B, T, H, W, heads, head_dim) on its device."""
    if _FORCED_CONFIGS:
        return _FORCED_CONFIGS[-1]
    device = torch.cuda.get_device_name(q.device) if q.is_cuda else "*"
    return launch_configs(geom.tokens_per_window, q.shape[-1], q.shape[-2], q.dtype, geom.shifted, device,
                          device_shared_memory(q.device), triton_interpreting())


PROGRAMS_PER_SM = 4  # window groups fill the device with this many programs per multiprocessor
INTERPRETER_GROUPS = 3  # the interpreter runs programs one after another; several groups test the partial sums


def window_groups(num_windows: int, programs_per_group: int, device: torch.device, mult: int = 1) -> int:
    """How many window groups the persistent kernels split the windows into: the fewest that give the
    device ``PROGRAMS_PER_SM`` programs per multiprocessor (times ``mult``)."""
    if device.type != "cuda":
        return min(num_windows, INTERPRETER_GROUPS * mult)
    target = PROGRAMS_PER_SM * mult * device_sm_count(device)
    return max(1, min(num_windows, -(-target // programs_per_group)))


@functools.lru_cache(maxsize=64)
def _bias_index(table_window: tuple, tokens: int, bias_window: tuple, device: torch.device) -> torch.Tensor:
    return relative_position_index(table_window, tokens, bias_window, device)


def dense_bias(table: torch.Tensor, geom: WindowGeometry, scale: float,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(heads, Np, Np)`` bias of one call in units of the scaled product, ``table[index[i, j], head] /
    scale`` for ``i, j < N`` with ``index = relative_position_index(...)`` of the geometry (so exact for both
    ``rel_pos_mode``), zeros in the rows and keys up to ``Np = padded_tokens(N)``, computed in fp32 and
    stored in ``dtype``. The kernels start each product's fp32 accumulator at it: ``(q k^T + bias / scale)
    * scale * log2(e)`` are the base-2 scores."""
    n = geom.tokens_per_window
    index = _bias_index(geom.table_window, n, geom.bias_window, table.device)
    bias = table.detach().t().float()[:, index] / scale
    pad = padded_tokens(n) - n
    return F.pad(bias, (0, pad, 0, pad)).to(dtype).contiguous()


def _bias_operand(table: torch.Tensor | None, geom: WindowGeometry, scale: float, configs: LaunchConfigs,
                  dtype: torch.dtype, dummy: torch.Tensor) -> torch.Tensor:
    """The kernels' ``BIAS``: the dense bias in the dtype ``configs.bias_dtype`` asks for (``dtype``: the
    inputs'), or ``dummy`` without a table."""
    if table is None:
        return dummy
    return dense_bias(table, geom, scale, dtype if configs.bias_dtype == "input" else torch.float32)


def key_tile_bytes(tokens_per_window: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one head's keys of a window padded to powers of 2: the size the Triton dispatch limits per
    device (``TRITON_KEY_TILE_LIMITS``)."""
    return dot_block(tokens_per_window) * dot_block(head_dim) * dtype.itemsize


def _kernel_constants(geom: WindowGeometry, dtype: torch.dtype, *, bias: bool, pad_k: bool, pad_v: bool,
                      mask: bool) -> dict:
    return dict(
        N=geom.tokens_per_window,
        WT=geom.window[0], WH=geom.window[1], WW=geom.window[2],
        ST=geom.shift[0], SH=geom.shift[1], SW=geom.shift[2],
        HAS_BIAS=bias, HAS_PAD_K=pad_k, HAS_PAD_V=pad_v, HAS_MASK=mask,
        PRECISION="tf32x3" if dtype == torch.float32 else "tf32",
        WIDE_INDEX=triton_interpreting(),
    )


def _present(table, pad_k, pad_v, attn_mask) -> dict:
    return dict(bias=table is not None, pad_k=pad_k is not None, pad_v=pad_v is not None, mask=attn_mask is not None)


def _strides(x: torch.Tensor) -> tuple[int, ...]:
    return x.stride()[:5]


def _same_strides(q, k, v):
    """q, k, v with one set of strides, as the kernels take them: views of one projection have it; other
    layouts become contiguous copies."""
    if q.stride() == k.stride() == v.stride():
        return q, k, v
    return q.contiguous(), k.contiguous(), v.contiguous()


def _triton_forward(q, k, v, table, pad_k, pad_v, attn_mask, geom: WindowGeometry, scale: float):
    q, k, v = _same_strides(q, k, v)
    batch, t, h, w, heads, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:5], dtype=torch.float32, device=q.device)  # base 2
    configs = _launch_configs(q, geom)
    cfg = configs.fwd
    num_windows = batch * geom.num_windows
    pieces = len(block_pieces(geom.tokens_per_window, cfg.block_m))
    groups = window_groups(num_windows, pieces * heads, q.device)
    dummy = q.new_empty(0)
    _window_attn_fwd_kernel[(pieces, heads, groups)](
        q, k, v, out, lse,
        _bias_operand(table, geom, scale, configs, q.dtype, dummy), dummy if pad_k is None else pad_k,
        dummy if pad_v is None else pad_v, dummy if attn_mask is None else attn_mask, *_strides(q),
        t, h, w, heads, head_dim, 1 if attn_mask is None else attn_mask.shape[0], num_windows, scale * LOG2E,
        **_kernel_constants(geom, q.dtype, **_present(table, pad_k, pad_v, attn_mask)),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=dot_block(head_dim), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out, lse


def _triton_backward(grad_out, q, k, v, out, lse, table, pad_k, pad_v, attn_mask, geom: WindowGeometry,
                     scale: float, need_table_grad: bool, need_pad_grad: bool, grad_qkv: torch.Tensor | None):
    """Backward A (dq, delta), A2 (dS sums per window group, or per head with ``dbias_sum="owner"``), B (dk,
    dv, pad sums per program), C (the fixed-order reductions of the partials)."""
    q, k, v = _same_strides(q, k, v)
    batch, t, h, w, heads, head_dim = q.shape
    n, num_windows = geom.tokens_per_window, batch * geom.num_windows
    grad_out = grad_out.contiguous()
    delta = torch.empty(q.shape[:5], dtype=torch.float32, device=q.device)  # written by backward A
    if grad_qkv is None:
        dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    else:
        dq, dk, dv = grad_qkv.unbind(-3)
    configs = _launch_configs(q, geom)
    need_table_grad = need_table_grad and table is not None
    need_pad_grad = need_pad_grad and (pad_k is not None or pad_v is not None)
    dummy = q.new_empty(0)
    operands = (_bias_operand(table, geom, scale, configs, q.dtype, dummy), dummy if pad_k is None else pad_k,
                dummy if pad_v is None else pad_v, dummy if attn_mask is None else attn_mask, *_strides(q),
                t, h, w, heads, head_dim, 1 if attn_mask is None else attn_mask.shape[0], num_windows)
    grads = (dq.stride(3), dq.stride(4), scale)  # gradient rows: elements per token, per head
    constants = _kernel_constants(geom, q.dtype, **_present(table, pad_k, pad_v, attn_mask))
    block_d = dot_block(head_dim)

    def launch(kernel, cfg, grid, *args, **extra):
        kernel[grid](*args, **constants, **extra, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
                     num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    cfg = configs.dq
    pieces = len(block_pieces(n, cfg.block_m))
    launch(_window_attn_bwd_dq_kernel, cfg, (pieces, heads, window_groups(num_windows, pieces * heads, q.device)),
           q, k, v, out, grad_out, lse, delta, dq, *operands, *grads, scale * LOG2E)
    dbias = dummy
    if need_table_grad:
        cfg = configs.dbias
        pieces = len(block_pieces(n, cfg.block_m)) * len(block_pieces(n, cfg.block_n))
        # "owner": one group, each program sums its tile over every window into the final per-head sums
        groups = 1 if configs.dbias_sum == "owner" else window_groups(num_windows, pieces * heads, q.device,
                                                                         cfg.group_mult)
        dbias = torch.empty((groups, heads, padded_tokens(n), padded_tokens(n)), dtype=torch.float32,
                            device=q.device)
        launch(_window_attn_bwd_dbias_kernel, cfg, (pieces, heads, groups), q, k, v, grad_out, lse, delta, dbias,
               *operands, scale * LOG2E)
    cfg = configs.dkdv
    pieces = len(block_pieces(n, cfg.block_n))
    groups = window_groups(num_windows, pieces * heads, q.device)
    dpad = (torch.empty((groups * pieces, 2, heads, head_dim), dtype=torch.float32, device=q.device)
            if need_pad_grad else dummy)
    launch(_window_attn_bwd_dkdv_kernel, cfg, (pieces, heads, groups), q, k, v, grad_out, lse, delta, dk, dv, dpad,
           *operands, *grads, scale * LOG2E, NEED_DPAD=need_pad_grad)
    return dq, dk, dv, *_triton_reduce(dbias, dpad, geom, heads, head_dim, need_table_grad, need_pad_grad,
                                       configs.reduce_stages)


REDUCE_BLOCKS = (32, 64)  # (BLOCK_E, BLOCK_M) of backward C's table gradient on a GPU: ~40 programs per head at 4x7x7
DSUM_BLOCK = 1024  # dS-sum elements per program of backward C's first stage (reduce_stages=2) on a GPU


def _reduce_blocks(table_size: int, tokens_per_window: int) -> tuple[int, int, int]:
    """(BLOCK_E, BLOCK_M) of backward C and BLOCK_S of its first stage (at most one head's ``Np**2`` sums);
    the interpreter takes whole tables, windows and sums."""
    sums = padded_tokens(tokens_per_window) ** 2
    if triton_interpreting():
        return dot_block(table_size), dot_block(tokens_per_window), sums
    return (*REDUCE_BLOCKS, min(DSUM_BLOCK, sums))


def _reduce_constants(geom: WindowGeometry) -> dict:
    """How backward C decodes bias coordinates: ``bias_window`` strides, ``table_window``."""
    return dict(N=geom.tokens_per_window, BH=geom.bias_window[1], BW=geom.bias_window[2],
                FT=geom.table_window[0], FH=geom.table_window[1], FW=geom.table_window[2])


def _triton_reduce(dbias, dpad, geom: WindowGeometry, heads: int, head_dim: int, need_table_grad: bool,
                   need_pad_grad: bool, stages: int = 1):
    """Backward C: ``(dtable (table_size, heads), dpad_k, dpad_v (heads, head_dim))``, fp32, None where not
    needed, from the dS sums ``dbias (groups, heads, NK, NK)`` and the pad sums ``dpad (rows, 2, heads,
    head_dim)``. ``stages=2``: the groups' dS sums are first summed densely into one ``(1, heads, NK, NK)``
    (many programs, coalesced), then the table gathers from that."""
    if not (need_table_grad or need_pad_grad):
        return None, None, None
    dummy = dbias.new_empty(0) if need_table_grad else dpad.new_empty(0)
    block_e, block_m, block_s = _reduce_blocks(geom.table_size, geom.tokens_per_window)
    if need_table_grad and stages == 2 and dbias.shape[0] > 1:
        dsum = torch.empty((1, *dbias.shape[1:]), dtype=torch.float32, device=dbias.device)
        _window_attn_bwd_dsum_kernel[(dbias[0, 0].numel() // block_s, heads)](
            dbias, dsum, dbias.shape[0], heads, N=geom.tokens_per_window, BLOCK_S=block_s, num_warps=4)
        dbias = dsum
    table_blocks = triton.cdiv(geom.table_size, block_e) if need_table_grad else 0
    dtable = torch.empty((geom.table_size, heads), dtype=torch.float32, device=dummy.device) if need_table_grad \
        else dummy
    dpad_k, dpad_v = (torch.empty((heads, head_dim), dtype=torch.float32, device=dummy.device) if need_pad_grad
                      else dummy for _ in range(2))
    _window_attn_bwd_reduce_kernel[(table_blocks + need_pad_grad, heads)](
        dbias, dtable, dpad, dpad_k, dpad_v, dbias.shape[0] if need_table_grad else 0,
        dpad.shape[0] if need_pad_grad else 0, heads, head_dim, **_reduce_constants(geom),
        NEED_DTABLE=need_table_grad, NEED_DPAD=need_pad_grad, BLOCK_E=block_e, BLOCK_M=block_m,
        BLOCK_D=dot_block(head_dim), num_warps=4,
    )
    return (dtable if need_table_grad else None, *((dpad_k, dpad_v) if need_pad_grad else (None, None)))


_TRITON_FP32_POINTERS = {"Lse", "Delta", "DBIAS", "DSUM", "DPAD", "DPAD_K", "DPAD_V", "MASK", "DTABLE", "BIAS"}
_TRITON_POINTERS = _TRITON_FP32_POINTERS | {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV", "PAD_K", "PAD_V"}


def triton_compile_specs(dtype: torch.dtype, window, head_dim: int, shift=(0, 0, 0), *, bias: bool = True,
                         pad: bool = True, mask: bool = False, window_batches: bool = False, int_arg=None,
                         aligned_pointers: bool = True, shared_memory: int = TRITON_KEY_TILE_LIMITS[0][0],
                         configs: LaunchConfigs | None = None):
    """The kernels as the GPU launcher would specialise them for one configuration on a device whose blocks
    may opt in to ``shared_memory`` bytes, as ``(name, kernel, signature, constexprs, attrs, options)`` for
    ``triton.compile`` ahead of time. ``configs``: the launch configurations (default: those the dispatch
    takes, ``launch_configs``), variants included (the bias pointer's dtype, backward C's first stage, one
    group where backward C takes per-head sums).

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
    configs = configs or launch_configs(geom.tokens_per_window, head_dim, 1, dtype, geom.shifted,
                                        shared_memory=shared_memory)
    constants = _kernel_constants(geom, dtype, bias=bias, pad_k=pad, pad_v=pad, mask=mask) | {"WIDE_INDEX": False}
    block_d = dot_block(head_dim)
    kernels = ((_window_attn_fwd_kernel, configs.fwd, {}), (_window_attn_bwd_dq_kernel, configs.dq, {}))
    kernels += ((_window_attn_bwd_dbias_kernel, configs.dbias, {}),) if bias else ()
    kernels += ((_window_attn_bwd_dkdv_kernel, configs.dkdv, {"NEED_DPAD": pad}),)
    pointer_types = {name: "fp32" if name in _TRITON_FP32_POINTERS else TYPE_NAMES[dtype] for name in _TRITON_POINTERS}
    if configs.bias_dtype == "input":
        pointer_types["BIAS"] = TYPE_NAMES[dtype]
    for kernel, cfg, extra in kernels:
        blocks = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_D": block_d}
        yield kernel_spec(kernel, {**constants, **extra, **blocks}, pointer_types, float_args=("scale", "qk_scale"),
                          int_arg=int_arg, aligned_pointers=aligned_pointers,
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    # the launcher passes backward C one group where A2 wrote per-head sums or C's first stage summed the groups
    one_group = bias and (configs.dbias_sum == "owner" or configs.reduce_stages == 2)
    if bias and configs.dbias_sum == "groups" and configs.reduce_stages == 2:
        block_s = min(DSUM_BLOCK, padded_tokens(geom.tokens_per_window) ** 2)
        yield kernel_spec(_window_attn_bwd_dsum_kernel, {"N": geom.tokens_per_window, "BLOCK_S": block_s},
                          pointer_types, int_arg=int_arg, aligned_pointers=aligned_pointers, options={"num_warps": 4})
    if bias or pad:
        block_e, block_m = REDUCE_BLOCKS
        reduce_ints = int_arg if not one_group else (
            lambda name: 1 if name == "groups" else 16 if int_arg is None else int_arg(name))
        yield kernel_spec(_window_attn_bwd_reduce_kernel,
                          {**_reduce_constants(geom), "NEED_DTABLE": bias, "NEED_DPAD": pad, "BLOCK_E": block_e,
                           "BLOCK_M": block_m, "BLOCK_D": block_d}, pointer_types, int_arg=reduce_ints,
                          aligned_pointers=aligned_pointers, options={"num_warps": 4})


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
    attn_mask = _additive_mask(attn_mask)
    checks = _checks(q, geom, dropout_p, scale)
    cuda, triton_check = checks["cuda"], checks["triton"]

    def cuda_passed_over():
        if not triton_check:
            return None
        if "cuda_cores" in cuda.kernels:
            return f"the CUDA kernels would run on CUDA cores (forward, backward: {cuda.kernels}) and Triton can run"
        if preferred_backend(q.device) == "triton":
            return "Triton comes first on this device (preferred_backend) and can run"
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
        scale: score scale, a finite real number; default ``head_dim ** -0.5``.
        pad_k, pad_v: ``(heads, head_dim)`` key / value of padded tokens (the qkv bias), default zeros.
        rel_pos_mode: ``"swin"`` (checkpoint parity) or ``"exact"``, see the module docstring.
        attn_mask: optional ``(num_masks, N, N)`` mask; window ``i`` (over batch and windows) uses
            ``attn_mask[i % num_masks]``. Float: added to the scores; bool: a keep-mask (True = attend, as
            SDPA's), False adds ``MASKED_SCORE`` (-1e4). Float values below ``MASKED_SCORE`` (-inf) count as
            it, so a query with every key masked attends as if unmasked (finite; SDPA gives zeros there).
            Not differentiated.
        dropout_p: dropout on the attention probabilities (training); only the reference has it.
        backend: ``"cuda"``, ``"triton"`` or ``"reference"``; default ``SSLTM_BACKEND`` or the first
            that can run (cuda -> triton -> reference; triton first where ``preferred_backend`` says so,
            sm_90 by default, and over CUDA kernels that would run on CUDA cores).

    Returns:
        ``(B, T, H, W, heads, head_dim)`` in q's dtype.
    """
    geom = _validate(q, k, v, window_size, shift_size, rel_pos_bias_table, pad_k, pad_v, rel_pos_mode, attn_mask)
    scale = _scale(scale, q.shape[-1])
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
    scale = _scale(scale, q.shape[-1])
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
        attn_mask: optional ``(nW, N, N)`` mask (float additive or bool keep-mask, as for
            :func:`window_attention_3d`), window ``i`` uses ``attn_mask[i % nW]``.
        Other arguments as :func:`window_attention_3d`.

    Returns:
        ``(B*nW, N, heads, head_dim)`` in q's dtype.
    """
    qkv = None
    if k is None and v is None:
        qkv = q
        q, k, v = _unpack_qkv(qkv, 5, "(B*nW, N, 3, heads, head_dim) when k and v are not given")
    _check_qkv(q, k, v, 4, "(B*nW, N, heads, head_dim)")
    window_size = _triple(window_size, "window_size", minimum=1)
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
    scale = _scale(scale, q.shape[-1])
    as_volume = [x.unsqueeze(1).unsqueeze(1) for x in (q, k, v)]
    packed = None if qkv is None else qkv.unsqueeze(1).unsqueeze(1)
    out = _dispatch(*as_volume, geom, rel_pos_bias_table, scale, None, None, attn_mask, dropout_p, backend, packed)
    return out.squeeze(2).squeeze(1)
