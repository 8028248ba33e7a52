"""Fused depthwise 3x3 convolution of SegFormer's Mix-FFN over channels-last activations.

One op, one file: the pure-PyTorch reference, the input checks and backend predicates, the Triton kernels
and their launchers (and their ahead-of-time compile specs), the ``torch.library`` custom ops with autograd
(Triton or the CUDA kernels of ``ssltm_kernels._C``), and the public :func:`dwconv3x3`.

Semantics: ``x`` is ``(B, H, W, C)`` or ``(B, T, H, W, C)`` (the convolution runs on every frame), the
weight ``(C, 1, 3, 3)`` is PyTorch's depthwise layout (``nn.Conv2d(C, C, 3, padding=1, groups=C)``),
stride 1, zero padding 1, optional bias ``(C,)``, optional fused ``activation="gelu"`` (exact erf GELU,
``nn.GELU()``). The result has the input's shape and dtype (contiguous from the kernels).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from ssltm_kernels._backend import (
    HAS_TRITON,
    BackendCheck,
    cuda_unavailable_reason,
    on_device,
    triton_interpreting,
    triton_unavailable_reason,
)
from ssltm_kernels._device import device_sm_count
from ssltm_kernels._ext import _C
from ssltm_kernels._op import (
    KERNEL_DTYPES,
    autocast_dtype,
    autocasting,
    backend_predicates,
    compile_cases,
    dispatch,
    dtype_reason,
    next_pow2,
    register_autocast,
)
from ssltm_kernels._triton_specs import TYPE_NAMES, CompileConfig, kernel_spec

__all__ = [
    "ACTIVATIONS",
    "dwconv3x3",
    "dwconv3x3_reference",
    "can_run_cuda",
    "can_run_triton",
    "can_run_reference",
    "compute_dtype",
]

ACTIVATIONS = (None, "gelu")


# --------------------------------------------------------------------------------------------------
# Reference (pure PyTorch, the ground truth)
# --------------------------------------------------------------------------------------------------
def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None):
    frames = x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2)  # (B*T, C, H, W)
    y = F.conv2d(frames, weight, bias, padding=1, groups=x.shape[-1])
    if activation == "gelu":
        y = F.gelu(y)
    return y.permute(0, 2, 3, 1).reshape(*x.shape[:-1], y.shape[1])


def dwconv3x3_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """SegFormer's way: permute to ``(B*T, C, H, W)``, ``F.conv2d(groups=C, padding=1)``, GELU, permute
    back. Same arguments and result as :func:`dwconv3x3`; differentiable by autograd, any float dtype."""
    _validate(x, weight, bias, activation)
    return _reference(x, weight, bias, activation)


# --------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------
def _check_param(name: str, p, x: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(p).__name__}")
    if tuple(p.shape) != shape:
        raise ValueError(
            f"{name} must have shape {what} = {shape} for x's {x.shape[-1]} channels, "
            f"got {tuple(p.shape)} (x shape {tuple(x.shape)})"
        )
    if p.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {p.device} ({name} shape {tuple(p.shape)})")
    if not p.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {p.dtype} ({name} shape {tuple(p.shape)})")
    # under autocast the op casts x, weight and bias to the autocast dtype, as nn.Conv2d does
    if p.dtype != x.dtype and not autocasting(x, p):
        raise TypeError(f"{name} must have x's dtype {x.dtype}, got {p.dtype} ({name} shape {tuple(p.shape)})")


def _validate(x, weight, bias, activation) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (4, 5):
        raise ValueError(f"x must be 4-D (B, H, W, C) or 5-D (B, T, H, W, C) channels-last, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype} (shape {tuple(x.shape)})")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    channels = x.shape[-1]
    _check_param("weight", weight, x, (channels, 1, 3, 3), "(C, 1, 3, 3)")
    if bias is not None:
        _check_param("bias", bias, x, (channels,), "(C,)")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the kernels run in: x's, or the autocast dtype where autocast casts x (see the op's
    autocast registration below)."""
    return autocast_dtype(x)


def _checks(x: torch.Tensor) -> dict[str, BackendCheck]:
    dtype = compute_dtype(x)
    return {
        "cuda": BackendCheck("cuda", cuda_unavailable_reason(x) or dtype_reason(dtype)),
        "triton": BackendCheck("triton", triton_unavailable_reason(x) or dtype_reason(dtype)),
        "reference": BackendCheck("reference", None),
    }


def _validated_checks(x, weight, bias=None, activation=None) -> dict[str, BackendCheck]:
    _validate(x, weight, bias, activation)
    return _checks(x)


can_run_cuda, can_run_triton, can_run_reference = backend_predicates("dwconv3x3", _validated_checks)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
# A program works on tiles of BLOCK_H x BLOCK_W pixels of one frame and BLOCK_C channels; the 3x3
# neighbours are 9 shifted, masked loads of the tile (zero padding), which the caches serve after the
# first. Tap k = 3 * i + j of the weight multiplies the pixel at offset (i - 1, j - 1).
# Backward with GELU: g = dy * gelu'(z), z recomputed from x (9 loads), is written once (x's dtype) by
# the first kernel together with per-program dweight/dbias partial sums; the second kernel gives
# dx = sum_k w[k] * g[p - offset_k]. Without an activation g = dy and the second kernel also sums the
# weight/bias partials. The partials of a program cover its tiles (a fixed set, visited in order); they
# are reduced across programs in a fixed order: the gradients are deterministic, no float atomics.
PARTIAL_ROWS = 16  # rows of a program's partial sums: the 9 taps, the bias, padding to a power of 2
if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _tile_pixels(tile, tiles_w, tiles_per_frame, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
        """Frame (int64) and the (BLOCK_H * BLOCK_W,) row and column of every pixel of tile ``tile``."""
        frame = tile // tiles_per_frame
        rest = tile % tiles_per_frame
        p = tl.arange(0, BLOCK_H * BLOCK_W)
        h = (rest // tiles_w) * BLOCK_H + p // BLOCK_W
        w = (rest % tiles_w) * BLOCK_W + p % BLOCK_W
        return frame.to(tl.int64), h, w

    @triton.jit
    def _load_strided(X, frame, h, w, c, sx_b, sx_t, sx_h, sx_w, sx_c, T, H, W, C):
        """fp32 ``(pixels, channels)`` of a strided ``(B, T, H, W, C)`` tensor; zero outside the frame."""
        ok = (h >= 0) & (h < H) & (w >= 0) & (w < W)
        base = (frame // T) * sx_b + (frame % T) * sx_t
        ptrs = (
            X + base + h[:, None].to(tl.int64) * sx_h + w[:, None].to(tl.int64) * sx_w + c[None, :].to(tl.int64) * sx_c
        )
        return tl.load(ptrs, mask=ok[:, None] & (c[None, :] < C), other=0.0).to(tl.float32)

    @triton.jit
    def _contiguous_offsets(frame, h, w, c, H, W, C):
        """Element offsets in a contiguous ``(B*T, H, W, C)`` tensor."""
        return ((frame * H + h[:, None]) * W + w[:, None]) * C + c[None, :]

    @triton.jit
    def _load_contiguous(X, frame, h, w, c, H, W, C):
        ok = (h >= 0) & (h < H) & (w >= 0) & (w < W)
        return tl.load(
            X + _contiguous_offsets(frame, h, w, c, H, W, C), mask=ok[:, None] & (c[None, :] < C), other=0.0
        ).to(tl.float32)

    @triton.jit
    def _preactivation(
        X,
        Wt,
        Bias,
        frame,
        h,
        w,
        c,
        sx_b,
        sx_t,
        sx_h,
        sx_w,
        sx_c,
        T,
        H,
        W,
        C,
        HAS_BIAS: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """fp32 conv output (before the activation) of the tile's pixels: sum of the 9 taps + bias."""
        c_ok = c < C
        z = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for k in tl.static_range(9):
            x = _load_strided(X, frame, h + (k // 3 - 1), w + (k % 3 - 1), c, sx_b, sx_t, sx_h, sx_w, sx_c, T, H, W, C)
            z += x * tl.load(Wt + c * 9 + k, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            z += tl.load(Bias + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        return z

    @triton.jit
    def _erf_gelu(z):
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))

    @triton.jit
    def _erf_gelu_grad(z):
        """d gelu / dz = Phi(z) + z * phi(z)."""
        return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)

    @triton.jit
    def _accumulate_partials(acc, g, X, frame, h, w, c, sx_b, sx_t, sx_h, sx_w, sx_c, T, H, W, C, ROWS: tl.constexpr):
        """``acc (ROWS, BLOCK_C)`` += the tile's dweight rows (tap k: sum over pixels of g * x shifted by
        tap k's offset) and its dbias row 9 (sum of g)."""
        rows = tl.arange(0, ROWS)[:, None]
        for k in tl.static_range(9):
            x = _load_strided(X, frame, h + (k // 3 - 1), w + (k % 3 - 1), c, sx_b, sx_t, sx_h, sx_w, sx_c, T, H, W, C)
            acc += tl.where(rows == k, tl.sum(g * x, axis=0)[None, :], 0.0)
        return acc + tl.where(rows == 9, tl.sum(g, axis=0)[None, :], 0.0)

    @triton.jit
    def _dwconv_fwd_kernel(
        X,
        Wt,
        Bias,
        Y,
        sx_b,
        sx_t,
        sx_h,
        sx_w,
        sx_c,
        T,
        H,
        W,
        C,
        tiles_w,
        tiles_per_frame,
        HAS_BIAS: tl.constexpr,
        GELU: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_W: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """One tile of pixels and channels of the output ``Y`` (contiguous)."""
        frame, h, w = _tile_pixels(tl.program_id(0), tiles_w, tiles_per_frame, BLOCK_H, BLOCK_W)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        y = _preactivation(
            X, Wt, Bias, frame, h, w, c, sx_b, sx_t, sx_h, sx_w, sx_c, T, H, W, C, HAS_BIAS, BLOCK_H * BLOCK_W, BLOCK_C
        )
        if GELU:
            y = _erf_gelu(y)
        ok = ((h < H) & (w < W))[:, None] & (c[None, :] < C)
        tl.store(Y + _contiguous_offsets(frame, h, w, c, H, W, C), y.to(Y.dtype.element_ty), mask=ok)

    @triton.jit
    def _dwconv_bwd_gelu_kernel(
        X,
        DY,
        Wt,
        Bias,
        G,
        PARTIAL,
        sx_b,
        sx_t,
        sx_h,
        sx_w,
        sx_c,
        T,
        H,
        W,
        C,
        tiles_w,
        tiles_per_frame,
        num_tiles,
        HAS_BIAS: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_W: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """``G = DY * gelu'(z)`` (z recomputed) on tiles ``program_id(0)``, ``+ num_programs(0)``, ...; their
        dweight/dbias partial sums go to ``PARTIAL[program_id(0), :, channels]``."""
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        acc = tl.zeros((ROWS, BLOCK_C), dtype=tl.float32)
        for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            frame, h, w = _tile_pixels(tile, tiles_w, tiles_per_frame, BLOCK_H, BLOCK_W)
            z = _preactivation(
                X,
                Wt,
                Bias,
                frame,
                h,
                w,
                c,
                sx_b,
                sx_t,
                sx_h,
                sx_w,
                sx_c,
                T,
                H,
                W,
                C,
                HAS_BIAS,
                BLOCK_H * BLOCK_W,
                BLOCK_C,
            )
            g = _load_contiguous(DY, frame, h, w, c, H, W, C) * _erf_gelu_grad(z)  # 0 outside the frame
            ok = ((h < H) & (w < W))[:, None] & (c[None, :] < C)
            tl.store(G + _contiguous_offsets(frame, h, w, c, H, W, C), g.to(G.dtype.element_ty), mask=ok)
            acc = _accumulate_partials(acc, g, X, frame, h, w, c, sx_b, sx_t, sx_h, sx_w, sx_c, T, H, W, C, ROWS)
        rows = tl.arange(0, ROWS)[:, None]
        tl.store(
            PARTIAL + (tl.program_id(0) * ROWS + rows).to(tl.int64) * C + c[None, :],
            acc,
            mask=(rows < 10) & (c[None, :] < C),
        )

    @triton.jit
    def _dwconv_bwd_dx_kernel(
        G,
        X,
        Wt,
        DX,
        PARTIAL,
        sx_b,
        sx_t,
        sx_h,
        sx_w,
        sx_c,
        T,
        H,
        W,
        C,
        tiles_w,
        tiles_per_frame,
        num_tiles,
        NEED_PARTIALS: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_W: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """``DX = sum_k w[k] * G[p - offset_k]`` (the transposed conv) on tiles ``program_id(0)``,
        ``+ num_programs(0)``, ...; with ``NEED_PARTIALS`` (G is dy: no activation) also their dweight/dbias
        partial sums, as the GELU kernel writes them."""
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        acc = tl.zeros((ROWS, BLOCK_C), dtype=tl.float32)
        for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            frame, h, w = _tile_pixels(tile, tiles_w, tiles_per_frame, BLOCK_H, BLOCK_W)
            dx = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_C), dtype=tl.float32)
            for k in tl.static_range(9):
                g = _load_contiguous(G, frame, h - (k // 3 - 1), w - (k % 3 - 1), c, H, W, C)
                dx += g * tl.load(Wt + c * 9 + k, mask=c_ok, other=0.0).to(tl.float32)[None, :]
            ok = ((h < H) & (w < W))[:, None] & c_ok[None, :]
            tl.store(DX + _contiguous_offsets(frame, h, w, c, H, W, C), dx.to(DX.dtype.element_ty), mask=ok)
            if NEED_PARTIALS:
                g = _load_contiguous(G, frame, h, w, c, H, W, C)
                acc = _accumulate_partials(acc, g, X, frame, h, w, c, sx_b, sx_t, sx_h, sx_w, sx_c, T, H, W, C, ROWS)
        if NEED_PARTIALS:
            rows = tl.arange(0, ROWS)[:, None]
            tl.store(
                PARTIAL + (tl.program_id(0) * ROWS + rows).to(tl.int64) * C + c[None, :],
                acc,
                mask=(rows < 10) & c_ok[None, :],
            )


@dataclass(frozen=True)
class TritonConfig:
    """Tile of the kernels: BLOCK_H x BLOCK_W pixels of a frame, BLOCK_C channels."""

    block_h: int
    block_w: int
    block_c: int
    num_warps: int


def triton_config(height: int, width: int, channels: int, dtype: torch.dtype, interpreting: bool) -> TritonConfig:
    """Tiles of 64 pixels (16 wide) and 128 bytes of channels on a GPU; whole frames in the interpreter,
    which pays per program step, not per element."""
    if interpreting:
        return TritonConfig(next_pow2(height), next_pow2(width), next_pow2(channels), 4)
    block_w = min(16, next_pow2(width))
    block_h = min(next_pow2(height), 64 // block_w)
    return TritonConfig(block_h, block_w, min(next_pow2(channels), 128 // dtype.itemsize), 4)


def _launch_config(x: torch.Tensor) -> TritonConfig:
    return triton_config(x.shape[2], x.shape[3], x.shape[4], x.dtype, triton_interpreting())


def launch_ints(x: torch.Tensor, cfg: TritonConfig) -> dict[str, int]:
    """The integer arguments of the kernels for ``x (B, T, H, W, C)`` (its strides, sizes and tiling), by name."""
    batch, frames, height, width, channels = x.shape
    tiles_w = -(-width // cfg.block_w)
    tiles_per_frame = -(-height // cfg.block_h) * tiles_w
    return {
        **dict(zip(("sx_b", "sx_t", "sx_h", "sx_w", "sx_c"), x.stride(), strict=True)),
        "T": frames,
        "H": height,
        "W": width,
        "C": channels,
        "tiles_w": tiles_w,
        "tiles_per_frame": tiles_per_frame,
        "num_tiles": batch * frames * tiles_per_frame,
    }


def _kernel_ints(kernel, ints: dict[str, int]) -> dict[str, int]:
    return {name: value for name, value in ints.items() if name in kernel.arg_names}


def _blocks(cfg: TritonConfig) -> dict[str, int]:
    return dict(BLOCK_H=cfg.block_h, BLOCK_W=cfg.block_w, BLOCK_C=cfg.block_c)


def _partial_groups(num_tiles: int, channel_blocks: int, device: torch.device) -> int:
    """How many programs per channel block the backward spreads the tiles over (each writes one row of
    partial sums): about 8 per multiprocessor in all; one in the interpreter."""
    if device.type != "cuda":
        return 1
    target = 8 * device_sm_count(device)
    return max(1, min(num_tiles, -(-target // channel_blocks)))


def _triton_forward(x, weight, bias, activation):
    cfg = _launch_config(x)
    ints = launch_ints(x, cfg)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    weight = weight.reshape(-1, 9).contiguous()
    grid = (ints["num_tiles"], triton.cdiv(ints["C"], cfg.block_c))
    _dwconv_fwd_kernel[grid](
        x,
        weight,
        weight if bias is None else bias.contiguous(),
        y,
        **_kernel_ints(_dwconv_fwd_kernel, ints),
        HAS_BIAS=bias is not None,
        GELU=activation == "gelu",
        **_blocks(cfg),
        num_warps=cfg.num_warps,
    )
    return y


def _triton_backward(grad_out, x, weight, bias, activation):
    cfg = _launch_config(x)
    ints = launch_ints(x, cfg)
    channels, channel_blocks = ints["C"], triton.cdiv(ints["C"], cfg.block_c)
    weight = weight.reshape(-1, 9).contiguous()
    groups = _partial_groups(ints["num_tiles"], channel_blocks, x.device)
    partials = torch.empty((groups, PARTIAL_ROWS, channels), dtype=torch.float32, device=x.device)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    gelu = activation == "gelu"
    if gelu:
        g = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _dwconv_bwd_gelu_kernel[(groups, channel_blocks)](
            x,
            grad_out,
            weight,
            weight if bias is None else bias.contiguous(),
            g,
            partials,
            **_kernel_ints(_dwconv_bwd_gelu_kernel, ints),
            HAS_BIAS=bias is not None,
            ROWS=PARTIAL_ROWS,
            **_blocks(cfg),
            num_warps=cfg.num_warps,
        )
    else:
        g = grad_out
    _dwconv_bwd_dx_kernel[(ints["num_tiles"] if gelu else groups, channel_blocks)](
        g,
        x,
        weight,
        dx,
        partials,
        **_kernel_ints(_dwconv_bwd_dx_kernel, ints),
        NEED_PARTIALS=not gelu,
        ROWS=PARTIAL_ROWS,
        **_blocks(cfg),
        num_warps=cfg.num_warps,
    )
    sums = partials.sum(0)  # fixed order over the programs
    dweight = sums[:9].t().clone(memory_format=torch.contiguous_format).view(channels, 1, 3, 3)
    return dx, dweight, sums[9].clone()


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile specifications (compile_check)
# --------------------------------------------------------------------------------------------------
# (B, T, H, W, C) of the hidden activations SSLTM's Mix-FFNs convolve (two 4-frame clips of 480x480; hidden
# width 4x the STT dims 32/64/128/256 at strides 4/8/16/32), a large one, and one whose sizes and strides
# are no multiples of 16 (the least specialised launch)
COMPILE_SHAPES = {
    "stride4": (2, 4, 120, 120, 128),
    "stride8": (2, 4, 60, 60, 256),
    "stride16": (2, 4, 30, 30, 512),
    "stride32": (2, 4, 15, 15, 1024),
    "large": (8, 4, 56, 56, 1024),
    "unaligned": (1, 3, 5, 13, 33),
}
_FP32_POINTERS = {"PARTIAL"}
_POINTERS = _FP32_POINTERS | {"X", "Wt", "Bias", "Y", "DY", "G", "DX"}


def triton_compile_specs(dtype: torch.dtype, shape, activation: str | None = "gelu", bias: bool = True):
    """The kernels a launch on a contiguous ``x`` of ``shape`` (B, T, H, W, C) runs, specialised on its
    integers as Triton's launcher does (``launch_ints``), as ``(name, kernel, signature, constexprs, attrs,
    options)`` for ``triton.compile`` ahead of time."""
    cfg = triton_config(*shape[2:], dtype, interpreting=False)
    ints = launch_ints(torch.empty(shape, device="meta"), cfg)
    pointer_types = {name: "fp32" if name in _FP32_POINTERS else TYPE_NAMES[dtype] for name in _POINTERS}
    gelu = activation == "gelu"
    kernels = [(_dwconv_fwd_kernel, dict(HAS_BIAS=bias, GELU=gelu))]
    if gelu:
        kernels.append((_dwconv_bwd_gelu_kernel, dict(HAS_BIAS=bias, ROWS=PARTIAL_ROWS)))
    kernels.append((_dwconv_bwd_dx_kernel, dict(NEED_PARTIALS=not gelu, ROWS=PARTIAL_ROWS)))
    for kernel, constexprs in kernels:
        yield kernel_spec(
            kernel,
            {**constexprs, **_blocks(cfg)},
            pointer_types,
            int_arg=ints.__getitem__,
            options={"num_warps": cfg.num_warps},
        )


def _compile_specs(dtype: torch.dtype, shape_name: str, activation: str | None, arch: int) -> list[tuple]:
    return list(triton_compile_specs(dtype, COMPILE_SHAPES[shape_name], activation))


def compile_configs(arch: int, config_set: str = "full") -> list[CompileConfig]:
    """The configurations ``compile_check`` compiles for ``arch`` (the kernels take no architecture-dependent
    blocks). ``full``: every dtype, with and without GELU, on every ``COMPILE_SHAPES`` entry.
    ``representative``: what SSLTM launches, bf16 with GELU at stride 16, and fp32 once; bf16 without an
    activation on the unaligned shape (the dx kernel that also sums the weight gradient)."""
    chosen = compile_cases(
        config_set,
        representative=[
            (torch.bfloat16, "stride16", "gelu"),
            (torch.float32, "stride16", "gelu"),
            (torch.bfloat16, "unaligned", None),
        ],
        full=list(itertools.product(KERNEL_DTYPES, COMPILE_SHAPES, ("gelu", None))),
    )
    return [
        CompileConfig(
            f"dwconv3x3 {str(dtype).removeprefix('torch.')} {name} {COMPILE_SHAPES[name]} activation={activation}",
            partial(_compile_specs, dtype, name, activation),
            cost=dtype.itemsize,
        )
        for dtype, name, activation in chosen
    ]


# --------------------------------------------------------------------------------------------------
# torch.library custom ops + autograd
# --------------------------------------------------------------------------------------------------
def _forward(x, weight, bias, activation, backend):
    if backend == "cuda":
        return _C.dwconv3x3_forward(x, weight, bias, activation)
    with on_device(x):
        return _triton_forward(x, weight, bias, activation)


def _backward(grad_out, x, weight, bias, activation, backend):
    if backend == "cuda":
        dx, dweight, dbias = _C.dwconv3x3_backward(grad_out, x, weight, bias, activation)
    else:
        with on_device(x):
            dx, dweight, dbias = _triton_backward(grad_out, x, weight, bias, activation)
    return dx, dweight, dbias if bias is not None else x.new_empty(0, dtype=torch.float32)


@torch.library.custom_op("ssltm::dwconv3x3_fwd", mutates_args=())
def _dwconv3x3_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str, backend: str
) -> torch.Tensor:
    """Fused forward on ``x (B, T, H, W, C)``: ``y`` contiguous, x's shape and dtype. ``activation``: ``""``
    or ``"gelu"``."""
    return _forward(x, weight, bias, activation, backend)


@_dwconv3x3_fwd.register_fake
def _(x, weight, bias, activation, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("ssltm::dwconv3x3_bwd", mutates_args=())
def _dwconv3x3_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward: ``(dx, dweight (C, 1, 3, 3) fp32, dbias (C,) fp32)``; dbias is empty without a bias.
    The activation's input is recomputed from x, not stored."""
    return _backward(grad_out, x, weight, bias, activation, backend)


@_dwconv3x3_bwd.register_fake
def _(grad_out, x, weight, bias, activation, backend):
    dbias = x.new_empty((0,) if bias is None else bias.shape, dtype=torch.float32)
    return x.new_empty(x.shape), x.new_empty(weight.shape, dtype=torch.float32), dbias


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation, backend = inputs
    ctx.params = (activation, backend)
    ctx.save_for_backward(x, weight, bias)


def _autograd_backward(ctx, grad_out):
    x, weight, bias = ctx.saved_tensors
    dx, dweight, dbias = _dwconv3x3_bwd(grad_out.contiguous(), x, weight, bias, *ctx.params)
    return (dx, dweight.to(weight.dtype), None if bias is None else dbias.to(bias.dtype), None, None)


torch.library.register_autograd("ssltm::dwconv3x3_fwd", _autograd_backward, setup_context=_setup_context)


# under torch.autocast the forward op runs in the autocast dtype, x, weight and bias cast to it (as nn.Conv2d does)
register_autocast("ssltm::dwconv3x3_fwd", activations=(0, 1, 2))


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------
def dwconv3x3(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Depthwise 3x3 convolution (stride 1, zero padding 1) over channels-last frames, optionally fused
    with an exact (erf) GELU.

    Args:
        x: ``(B, H, W, C)`` or ``(B, T, H, W, C)`` (each of the B*T frames is convolved on its own);
            fp32/fp16/bf16 for the kernels (any float for the reference); any strides.
        weight: ``(C, 1, 3, 3)``, the depthwise ``nn.Conv2d(C, C, 3, padding=1, groups=C)`` weight.
        bias: ``(C,)`` or None.
        activation: None or ``"gelu"`` (``nn.GELU()``, applied after the bias).
        backend: ``"cuda"``, ``"triton"`` or ``"reference"``; default ``SSLTM_BACKEND`` or the first
            that can run (cuda -> triton -> reference).

    Returns:
        x's shape in x's dtype (the autocast dtype under ``torch.autocast``), contiguous from the kernels.
        Gradients reach x, weight and bias.
    """
    _validate(x, weight, bias, activation)
    return dispatch(
        "dwconv3x3",
        _checks(x),
        backend,
        fused=partial(_fused, x, weight, bias, activation),
        reference=partial(_reference, x, weight, bias, activation),
    )


def _fused(x, weight, bias, activation, backend: str) -> torch.Tensor:
    """The kernels of ``backend`` ('cuda' or 'triton') on validated arguments, through the custom op."""
    frames = x if x.dim() == 5 else x.unsqueeze(1)
    out = torch.ops.ssltm.dwconv3x3_fwd(frames, weight, bias, activation or "", backend)
    return out if x.dim() == 5 else out.squeeze(1)
