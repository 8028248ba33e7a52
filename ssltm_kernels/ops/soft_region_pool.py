"""OCR soft region pooling (OCRNet's ``SpatialGather_Module``): class-weighted averages of feature vectors.

One op, one file: the pure-PyTorch reference, the Triton kernels and their launchers, the
``torch.library`` custom ops with autograd, and the public :func:`soft_region_pool`.

Semantics: for logits ``(B, K, H, W)`` (coarse class scores, not softmaxed) and features
``(B, C, H, W)``, ``out[b, k] = sum_n softmax_n(scale * logits[b, k, :])[n] * feats[b, :, n]`` over the
``N = H*W`` positions ``n``: a ``(B, K, C)`` region representation per class.

Numerics: the kernels never write the ``(B, K, N)`` probabilities. They keep, per ``(b, k)``, the running
maximum ``M`` of ``sign(scale) * logits`` and evaluate ``exp(|scale| * (sign(scale) * logit - M))``: the
difference is taken before the scaling, so logits of magnitude 1e4 with ``scale`` 100 (scaled logits of
1e6, whose float32 spacing is 0.06) keep the accuracy of the logits themselves. The backward recomputes
the probabilities from ``M`` and the log of the softmax denominator, the two floats per ``(b, k)`` the
forward saves (``stats``). fp16/bf16 inputs accumulate in fp32. Gradients are deterministic: every
element is written by one program, partial sums are reduced in fixed order, no atomics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

from ssltm_kernels._backend import (
    HAS_TRITON,
    BackendCheck,
    cuda_unavailable_reason,
    on_device,
    triton_interpreting,
    triton_unavailable_reason,
)
from ssltm_kernels._device import INTERPRETER_DEVICE, device_shared_memory, device_sm_count, shared_memory_limit
from ssltm_kernels._ext import _C
from ssltm_kernels._op import (
    KERNEL_DTYPES,
    autocast_dtype,
    autocasting,
    backend_predicates,
    compile_cases,
    dispatch,
    dot_block,
    dtype_reason,
    register_autocast,
)
from ssltm_kernels._triton_specs import TYPE_NAMES, CompileConfig, kernel_spec

__all__ = [
    "soft_region_pool",
    "soft_region_pool_reference",
    "can_run_cuda",
    "can_run_triton",
    "can_run_reference",
    "compute_dtype",
]


# --------------------------------------------------------------------------------------------------
# Reference (pure PyTorch, the ground truth)
# --------------------------------------------------------------------------------------------------
def _reference(logits: torch.Tensor, feats: torch.Tensor, scale: float) -> torch.Tensor:
    probs = torch.softmax(scale * logits.flatten(2), dim=-1)  # (B, K, N)
    return probs @ feats.flatten(2).transpose(1, 2)  # (B, K, N) @ (B, N, C)


def soft_region_pool_reference(logits: torch.Tensor, feats: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """OCRNet's eager computation: ``softmax(scale * logits)`` over the H*W positions of each class,
    then a batched matrix product with the features. Same arguments and result as
    :func:`soft_region_pool`; differentiable by autograd in both inputs, any float dtype."""
    _validate(logits, feats, scale)
    return _reference(logits, feats, float(scale))


# --------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------
def _validate(logits, feats, scale) -> None:
    for name, x in (("logits", logits), ("feats", feats)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if logits.dim() != 4:
        raise ValueError(f"logits must be 4-D (B, K, H, W), got shape {tuple(logits.shape)}")
    if feats.dim() != 4:
        raise ValueError(f"feats must be 4-D (B, C, H, W), got shape {tuple(feats.shape)}")
    if feats.shape[0] != logits.shape[0]:
        raise ValueError(
            f"feats must have the batch size of logits (B = {logits.shape[0]}, logits shape "
            f"{tuple(logits.shape)}), got shape {tuple(feats.shape)}"
        )
    if feats.shape[2:] != logits.shape[2:]:
        raise ValueError(
            f"feats must have the spatial size of logits ((H, W) = {tuple(logits.shape[2:])}, logits "
            f"shape {tuple(logits.shape)}), got shape {tuple(feats.shape)}"
        )
    if feats.device != logits.device:
        raise ValueError(
            f"feats must be on the device of logits ({logits.device}), got {feats.device} "
            f"(feats shape {tuple(feats.shape)})"
        )
    for name, x in (("logits", logits), ("feats", feats)):
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype} (shape {tuple(x.shape)})")
    if feats.dtype != logits.dtype and not autocasting(logits, feats):
        raise TypeError(
            f"feats must have the dtype of logits ({logits.dtype}), got {feats.dtype} "
            f"(feats shape {tuple(feats.shape)})"
        )
    for name, x in (("logits", logits), ("feats", feats)):
        if x.numel() == 0:
            raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite real number, got {scale!r}")


def compute_dtype(logits: torch.Tensor, feats: torch.Tensor) -> torch.dtype:
    """The dtype the kernels run in: the inputs', or the autocast dtype where autocast casts them (see the
    registration below)."""
    return autocast_dtype(logits, feats)


def _extent_reason(logits: torch.Tensor, feats: torch.Tensor) -> str | None:
    """The Triton kernels index within one batch item in int32 (the CUDA kernels in int64)."""
    for name, x in (("logits", logits), ("feats", feats)):
        extent = sum((size - 1) * abs(stride) for size, stride in zip(x.shape[1:], x.stride()[1:], strict=True))
        if extent >= 2**31:
            return f"{name} spans {extent + 1} elements per batch item (shape {tuple(x.shape)}), beyond int32 indexing"
    return None


def _cuda_reason(logits: torch.Tensor) -> str | None:
    reason = cuda_unavailable_reason(logits)
    if reason is None and logits.shape[1] > _C.SOFT_REGION_POOL_MAX_CLASSES:
        reason = (
            f"the CUDA backward holds at most {_C.SOFT_REGION_POOL_MAX_CLASSES} classes, got logits of shape "
            f"{tuple(logits.shape)}"
        )
    return reason


def _checks(logits: torch.Tensor, feats: torch.Tensor) -> dict[str, BackendCheck]:
    dtype = dtype_reason(compute_dtype(logits, feats))
    return {
        "cuda": BackendCheck("cuda", _cuda_reason(logits) or dtype),
        "triton": BackendCheck("triton", triton_unavailable_reason(logits) or dtype or _extent_reason(logits, feats)),
        "reference": BackendCheck("reference", None),
    }


def _validated_checks(logits, feats, scale=1.0) -> dict[str, BackendCheck]:
    _validate(logits, feats, scale)
    return _checks(logits, feats)


can_run_cuda, can_run_triton, can_run_reference = backend_predicates("soft_region_pool", _validated_checks)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _srp_store_out(Out, OutAcc, Stats, b, offs_k, offs_c, cb, acc, total, m, K, C, STORE_ACC: tl.constexpr):
        """The normalised sums of classes ``offs_k`` x channels ``offs_c``: the output in its dtype (and in
        fp32 with ``STORE_ACC``, for the backward's Delta), and, from the first channel block, the stats."""
        rows = b * K + offs_k
        k_ok = offs_k < K
        kc_ok = k_ok[:, None] & (offs_c[None, :] < C)
        out = acc / total[:, None]
        tl.store(Out + rows[:, None] * C + offs_c[None, :], out.to(Out.dtype.element_ty), mask=kc_ok)
        if STORE_ACC:
            tl.store(OutAcc + rows[:, None] * C + offs_c[None, :], out, mask=kc_ok)
        tl.store(Stats + rows * 2, m, mask=k_ok & (cb == 0))
        tl.store(Stats + rows * 2 + 1, tl.log(total), mask=k_ok & (cb == 0))

    @triton.jit
    def _srp_fwd_kernel(
        L,
        F,
        Out,
        OutAcc,
        Stats,
        PartAcc,
        PartStats,
        sl_b,
        sl_k,
        sl_n,
        sf_b,
        sf_c,
        sf_n,
        K,
        C,
        N,
        splits,
        split_len,
        sign,
        magnitude,
        PARTIAL: tl.constexpr,
        STORE_ACC: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """One program: ``BLOCK_K`` classes x ``BLOCK_C`` channels of one batch item over the positions of one
        split, ``[s * split_len, (s + 1) * split_len)``: an online softmax over the positions fused with the
        weighted sum of the feature vectors. Without ``PARTIAL`` (one split) it writes the output and the
        stats; with it, the unnormalised sums and their running maximum and denominator, in split order,
        for ``_srp_combine_kernel``. The channel block varies fastest over the programs, so the programs
        that read the same logits run together."""
        blocks_c = tl.cdiv(C, BLOCK_C)
        blocks_k = tl.cdiv(K, BLOCK_K)
        pid = tl.program_id(0)
        cb = pid % blocks_c
        split = (pid // blocks_c) % splits
        kb = (pid // (blocks_c * splits)) % blocks_k
        b = (pid // (blocks_c * splits * blocks_k)).to(tl.int64)
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        k_ok = offs_k < K
        c_ok = offs_c < C
        l_rows = L + b * sl_b + offs_k[:, None] * sl_k
        f_cols = F + b * sf_b + offs_c[None, :] * sf_c

        # -FLT_MAX rather than -inf: the rescale factor of a first step stays exp(-inf) = 0, or 1 for scale 0
        m = tl.full((BLOCK_K,), -3.4028234663852886e38, dtype=tl.float32)
        total = tl.zeros((BLOCK_K,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_K, BLOCK_C), dtype=tl.float32)
        n_end = tl.minimum(N, (split + 1) * split_len)
        for n0 in range(split * split_len, n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < n_end
            x = tl.load(l_rows + offs_n[None, :] * sl_n, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            x = x.to(tl.float32) * sign
            m_new = tl.maximum(m, tl.max(tl.where(n_ok[None, :], x, float("-inf")), axis=1))
            alpha = tl.exp(magnitude * (m - m_new))
            p = tl.where(n_ok[None, :], tl.exp(magnitude * (x - m_new[:, None])), 0.0)
            total = total * alpha + tl.sum(p, axis=1)
            f = tl.load(f_cols + offs_n[:, None] * sf_n, mask=n_ok[:, None] & c_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(f.dtype), f, input_precision=PRECISION)
            m = m_new

        if PARTIAL:
            rows = (b * splits + split) * K + offs_k
            tl.store(PartAcc + rows[:, None] * C + offs_c[None, :], acc, mask=k_ok[:, None] & c_ok[None, :])
            tl.store(PartStats + rows * 2, m, mask=k_ok & (cb == 0))
            tl.store(PartStats + rows * 2 + 1, total, mask=k_ok & (cb == 0))
        else:
            _srp_store_out(Out, OutAcc, Stats, b, offs_k, offs_c, cb, acc, total, m, K, C, STORE_ACC)

    @triton.jit
    def _srp_combine_kernel(
        PartAcc,
        PartStats,
        Out,
        OutAcc,
        Stats,
        K,
        C,
        splits,
        magnitude,
        STORE_ACC: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """The output and stats of ``BLOCK_K`` classes x ``BLOCK_C`` channels from the splits' partial sums,
        each rescaled to the overall maximum and added in split order (deterministic)."""
        blocks_c = tl.cdiv(C, BLOCK_C)
        blocks_k = tl.cdiv(K, BLOCK_K)
        pid = tl.program_id(0)
        cb = pid % blocks_c
        kb = (pid // blocks_c) % blocks_k
        b = (pid // (blocks_c * blocks_k)).to(tl.int64)
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        k_ok = offs_k < K
        kc_ok = k_ok[:, None] & (offs_c[None, :] < C)
        m = tl.full((BLOCK_K,), -3.4028234663852886e38, dtype=tl.float32)
        for split in range(0, splits):
            m = tl.maximum(m, tl.load(PartStats + ((b * splits + split) * K + offs_k) * 2, mask=k_ok, other=0.0))
        total = tl.zeros((BLOCK_K,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_K, BLOCK_C), dtype=tl.float32)
        for split in range(0, splits):
            rows = (b * splits + split) * K + offs_k
            weight = tl.exp(magnitude * (tl.load(PartStats + rows * 2, mask=k_ok, other=0.0) - m))
            total += weight * tl.load(PartStats + rows * 2 + 1, mask=k_ok, other=1.0)  # rows beyond K: not 0/0
            acc += weight[:, None] * tl.load(PartAcc + rows[:, None] * C + offs_c[None, :], mask=kc_ok, other=0.0)
        _srp_store_out(Out, OutAcc, Stats, b, offs_k, offs_c, cb, acc, total, m, K, C, STORE_ACC)

    @triton.jit
    def _srp_delta_kernel(
        DO, Out, Delta, K, C, rows, sdo_b, sdo_k, sdo_c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
    ):
        """``Delta[b, k] = sum_c dOut[b, k, c] * Out[b, k, c]`` (fp32) for ``BLOCK_R`` rows ``b * K + k``."""
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < rows
        do_rows = DO + (offs_r // K).to(tl.int64) * sdo_b + (offs_r % K) * sdo_k
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            ok = r_ok[:, None] & (offs_c[None, :] < C)
            do = tl.load(do_rows[:, None] + offs_c[None, :] * sdo_c, mask=ok, other=0.0)
            o = tl.load(Out + offs_r[:, None].to(tl.int64) * C + offs_c[None, :], mask=ok, other=0.0)
            acc += tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
        tl.store(Delta + offs_r, acc, mask=r_ok)

    @triton.jit
    def _srp_probs(L, Stats, b, offs_k, offs_n, k_ok, n_ok, sl_b, sl_k, sl_n, K, sign, magnitude):
        """The probabilities ``(len(offs_k), len(offs_n))`` recomputed from the logits and the saved stats;
        0 outside the classes and positions."""
        x = (
            tl.load(
                L + b * sl_b + offs_k[:, None] * sl_k + offs_n[None, :] * sl_n,
                mask=k_ok[:, None] & n_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            * sign
        )
        stats = Stats + (b * K + offs_k) * 2
        m = tl.load(stats, mask=k_ok, other=0.0)
        log_total = tl.load(stats + 1, mask=k_ok, other=0.0)
        p = tl.exp(magnitude * (x - m[:, None]) - log_total[:, None])
        return tl.where(k_ok[:, None] & n_ok[None, :], p, 0.0)

    @triton.jit
    def _srp_dlogits_block(
        L,
        F,
        DO,
        Stats,
        Delta,
        DL,
        b,
        offs_k,
        offs_n,
        n_ok,
        sl_b,
        sl_k,
        sl_n,
        sf_b,
        sf_c,
        sf_n,
        sdo_b,
        sdo_k,
        sdo_c,
        sdl_b,
        sdl_k,
        sdl_n,
        K,
        C,
        sign,
        magnitude,
        scale,
        PRECISION: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """``dlogits = scale * P * (dOut F - Delta)`` of classes ``offs_k`` at positions ``offs_n``, written;
        returns the probabilities ``P``."""
        k_ok = offs_k < K
        dp = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_ok = offs_c < C
            do = tl.load(
                DO + b * sdo_b + offs_k[:, None] * sdo_k + offs_c[None, :] * sdo_c,
                mask=k_ok[:, None] & c_ok[None, :],
                other=0.0,
            )
            f = tl.load(
                F + b * sf_b + offs_c[:, None] * sf_c + offs_n[None, :] * sf_n,
                mask=c_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            dp += tl.dot(do.to(f.dtype), f, input_precision=PRECISION)
        p = _srp_probs(L, Stats, b, offs_k, offs_n, k_ok, n_ok, sl_b, sl_k, sl_n, K, sign, magnitude)
        delta = tl.load(Delta + b * K + offs_k, mask=k_ok, other=0.0)
        dl = scale * p * (dp - delta[:, None])
        tl.store(
            DL + b * sdl_b + offs_k[:, None] * sdl_k + offs_n[None, :] * sdl_n,
            dl.to(DL.dtype.element_ty),
            mask=k_ok[:, None] & n_ok[None, :],
        )
        return p

    @triton.jit
    def _srp_bwd_kernel(
        L,
        F,
        DO,
        Stats,
        Delta,
        DL,
        DF,
        sl_b,
        sl_k,
        sl_n,
        sf_b,
        sf_c,
        sf_n,
        sdo_b,
        sdo_k,
        sdo_c,
        sdl_b,
        sdl_k,
        sdl_n,
        sdf_b,
        sdf_c,
        sdf_n,
        K,
        C,
        N,
        sign,
        magnitude,
        scale,
        NEED_DL: tl.constexpr,
        NEED_DF: tl.constexpr,
        ONE_K_BLOCK: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """One program: ``BLOCK_N`` positions of one batch item, every class and channel. dlogits needs
        ``dP = dOut F`` over all channels, dfeats ``dOut^T P`` over all classes: both sums stay inside the
        program, so every gradient element has one writer. With one class block the probabilities of the
        dlogits pass feed the dfeats pass; with several they are recomputed per channel block."""
        blocks_n = tl.cdiv(N, BLOCK_N)
        b = (tl.program_id(0) // blocks_n).to(tl.int64)
        offs_n = (tl.program_id(0) % blocks_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        if ONE_K_BLOCK:
            offs_k = tl.arange(0, BLOCK_K)
            if NEED_DL:
                p = _srp_dlogits_block(
                    L,
                    F,
                    DO,
                    Stats,
                    Delta,
                    DL,
                    b,
                    offs_k,
                    offs_n,
                    n_ok,
                    sl_b,
                    sl_k,
                    sl_n,
                    sf_b,
                    sf_c,
                    sf_n,
                    sdo_b,
                    sdo_k,
                    sdo_c,
                    sdl_b,
                    sdl_k,
                    sdl_n,
                    K,
                    C,
                    sign,
                    magnitude,
                    scale,
                    PRECISION,
                    BLOCK_K,
                    BLOCK_C,
                    BLOCK_N,
                )
            else:
                p = _srp_probs(L, Stats, b, offs_k, offs_n, offs_k < K, n_ok, sl_b, sl_k, sl_n, K, sign, magnitude)
            if NEED_DF:
                p = p.to(F.dtype.element_ty)
                for c0 in range(0, C, BLOCK_C):
                    offs_c = c0 + tl.arange(0, BLOCK_C)
                    c_ok = offs_c < C
                    do = tl.load(
                        DO + b * sdo_b + offs_k[:, None] * sdo_k + offs_c[None, :] * sdo_c,
                        mask=(offs_k[:, None] < K) & c_ok[None, :],
                        other=0.0,
                    )
                    df = tl.dot(tl.trans(do.to(p.dtype)), p, input_precision=PRECISION)
                    tl.store(
                        DF + b * sdf_b + offs_c[:, None] * sdf_c + offs_n[None, :] * sdf_n,
                        df.to(DF.dtype.element_ty),
                        mask=c_ok[:, None] & n_ok[None, :],
                    )
        else:
            if NEED_DL:
                for k0 in range(0, K, BLOCK_K):
                    _srp_dlogits_block(
                        L,
                        F,
                        DO,
                        Stats,
                        Delta,
                        DL,
                        b,
                        k0 + tl.arange(0, BLOCK_K),
                        offs_n,
                        n_ok,
                        sl_b,
                        sl_k,
                        sl_n,
                        sf_b,
                        sf_c,
                        sf_n,
                        sdo_b,
                        sdo_k,
                        sdo_c,
                        sdl_b,
                        sdl_k,
                        sdl_n,
                        K,
                        C,
                        sign,
                        magnitude,
                        scale,
                        PRECISION,
                        BLOCK_K,
                        BLOCK_C,
                        BLOCK_N,
                    )
            if NEED_DF:
                for c0 in range(0, C, BLOCK_C):
                    offs_c = c0 + tl.arange(0, BLOCK_C)
                    c_ok = offs_c < C
                    df = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)
                    for k0 in range(0, K, BLOCK_K):
                        offs_k = k0 + tl.arange(0, BLOCK_K)
                        k_ok = offs_k < K
                        p = _srp_probs(L, Stats, b, offs_k, offs_n, k_ok, n_ok, sl_b, sl_k, sl_n, K, sign, magnitude)
                        do = tl.load(
                            DO + b * sdo_b + offs_k[:, None] * sdo_k + offs_c[None, :] * sdo_c,
                            mask=k_ok[:, None] & c_ok[None, :],
                            other=0.0,
                        )
                        df += tl.dot(
                            tl.trans(do.to(F.dtype.element_ty)), p.to(F.dtype.element_ty), input_precision=PRECISION
                        )
                    tl.store(
                        DF + b * sdf_b + offs_c[:, None] * sdf_c + offs_n[None, :] * sdf_n,
                        df.to(DF.dtype.element_ty),
                        mask=c_ok[:, None] & n_ok[None, :],
                    )


@dataclass(frozen=True)
class ForwardConfig:
    """Blocks of the forward kernel (and of the combine kernel when ``splits > 1``)."""

    block_k: int
    block_c: int
    block_n: int
    splits: int  # parallel chunks of the positions, each with its own partial sums
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class BackwardConfig:
    block_k: int  # classes held at once; more classes loop, recomputing the probabilities for dfeats
    block_c: int  # channels per step of the loops over the channels
    block_n: int  # positions per program
    num_warps: int
    num_stages: int


COMBINE_BLOCKS = (32, 64)  # (BLOCK_K, BLOCK_C) of the combine kernel: many programs for a small read
DELTA_BLOCKS = (16, 128)  # (BLOCK_R, BLOCK_C) of the delta kernel
# below this much shared memory per block (sm_86: 99 KB) the loops keep two stages instead of three
THREE_STAGE_SHARED_MEMORY = 160 * 1024
# without a device: the shared memory of the board the interpreter stands in for
_DEFAULT_SHARED_MEMORY = shared_memory_limit(INTERPRETER_DEVICE.arch)


def forward_config(
    batch: int,
    classes: int,
    channels: int,
    positions: int,
    dtype: torch.dtype,
    *,
    interpreting: bool,
    sm_count: int = INTERPRETER_DEVICE.sm_count,
    shared_memory: int = _DEFAULT_SHARED_MEMORY,
) -> ForwardConfig:
    """Blocks for ``(batch, classes, channels, positions)`` in ``dtype``. On a GPU a program holds up to 128
    classes and 128 channels (256 for 32 classes or fewer) in fp32 accumulators and steps 64 positions at a
    time (32 for fp32 inputs: the same bytes per stage); the positions are split so that about two programs
    run per multiprocessor. The interpreter pays per block step: it takes whole problems in one block."""
    block_k = dot_block(classes)
    if interpreting:
        return ForwardConfig(block_k, dot_block(channels), min(256, dot_block(positions)), 1, 4, 1)
    block_k = min(block_k, 128)
    block_c = min(dot_block(channels), 256 if block_k <= 32 else 128)
    block_n = 32 if dtype == torch.float32 else 64
    programs = batch * triton.cdiv(classes, block_k) * triton.cdiv(channels, block_c)
    splits = max(1, min((2 * sm_count) // programs, triton.cdiv(positions, 4 * block_n)))
    return ForwardConfig(
        block_k,
        block_c,
        block_n,
        splits,
        8 if block_k * block_c >= 128 * 128 else 4,
        3 if shared_memory >= THREE_STAGE_SHARED_MEMORY else 2,
    )


def backward_config(
    classes: int,
    channels: int,
    positions: int,
    dtype: torch.dtype,
    *,
    interpreting: bool,
    shared_memory: int = _DEFAULT_SHARED_MEMORY,
) -> BackwardConfig:
    """Blocks of the backward kernel: up to 128 classes per program (one class block for SSLTM's 124),
    64 positions per program (128 for 32 classes or fewer), 64 channels per loop step (32 for fp32)."""
    block_k = dot_block(classes)
    if interpreting:
        return BackwardConfig(block_k, dot_block(channels), min(256, dot_block(positions)), 4, 1)
    block_k = min(block_k, 128)
    block_n = 64 if block_k >= 64 else 128
    return BackwardConfig(
        block_k,
        32 if dtype == torch.float32 else 64,
        block_n,
        8 if block_k * block_n >= 128 * 64 else 4,
        3 if shared_memory >= THREE_STAGE_SHARED_MEMORY else 2,
    )


def _forward_launch_config(logits: torch.Tensor, channels: int) -> ForwardConfig:
    batch, classes, h, w = logits.shape
    return forward_config(
        batch,
        classes,
        channels,
        h * w,
        logits.dtype,
        interpreting=triton_interpreting(),
        sm_count=device_sm_count(logits.device),
        shared_memory=device_shared_memory(logits.device),
    )


def _backward_launch_config(logits: torch.Tensor, channels: int) -> BackwardConfig:
    return backward_config(
        logits.shape[1],
        channels,
        logits.shape[2] * logits.shape[3],
        logits.dtype,
        interpreting=triton_interpreting(),
        shared_memory=device_shared_memory(logits.device),
    )


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # 16-bit dots ignore it


def _sign_magnitude(scale: float) -> tuple[float, float]:
    return (1.0 if scale >= 0 else -1.0), abs(scale)


def _triton_forward(logits: torch.Tensor, feats: torch.Tensor, scale: float):
    batch, classes = logits.shape[:2]
    channels = feats.shape[1]
    l3, f3 = _flat(logits), _flat(feats)
    positions = l3.shape[2]
    cfg = _forward_launch_config(logits, channels)
    out = torch.empty((batch, classes, channels), dtype=logits.dtype, device=logits.device)
    stats = torch.empty((batch, classes, 2), dtype=torch.float32, device=logits.device)
    store_acc = logits.dtype != torch.float32
    out_acc = torch.empty(out.shape if store_acc else 0, dtype=torch.float32, device=logits.device)
    split_len = triton.cdiv(triton.cdiv(positions, cfg.splits), cfg.block_n) * cfg.block_n
    splits = triton.cdiv(positions, split_len)  # none empty
    part_acc = part_stats = out
    if splits > 1:
        part_acc = torch.empty((batch, splits, classes, channels), dtype=torch.float32, device=logits.device)
        part_stats = torch.empty((batch, splits, classes, 2), dtype=torch.float32, device=logits.device)
    sign, magnitude = _sign_magnitude(scale)
    blocks = batch * triton.cdiv(classes, cfg.block_k) * triton.cdiv(channels, cfg.block_c)
    _srp_fwd_kernel[(blocks * splits,)](
        l3,
        f3,
        out,
        out_acc,
        stats,
        part_acc,
        part_stats,
        *l3.stride(),
        *f3.stride(),
        classes,
        channels,
        positions,
        splits,
        split_len,
        sign,
        magnitude,
        PARTIAL=splits > 1,
        STORE_ACC=store_acc,
        PRECISION=_precision(logits.dtype),
        BLOCK_K=cfg.block_k,
        BLOCK_C=cfg.block_c,
        BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if splits > 1:
        block_k, block_c = COMBINE_BLOCKS
        grid = (batch * triton.cdiv(classes, block_k) * triton.cdiv(channels, block_c),)
        _srp_combine_kernel[grid](
            part_acc,
            part_stats,
            out,
            out_acc,
            stats,
            classes,
            channels,
            splits,
            magnitude,
            STORE_ACC=store_acc,
            BLOCK_K=block_k,
            BLOCK_C=block_c,
            num_warps=4,
        )
    return out, stats, out_acc


def _triton_backward(grad_out, logits, feats, out, stats, scale: float, need_dlogits: bool, need_dfeats: bool):
    batch, classes = logits.shape[:2]
    channels = feats.shape[1]
    l3, f3 = _flat(logits), _flat(feats)
    positions = l3.shape[2]
    cfg = _backward_launch_config(logits, channels)
    dlogits = _grad_buffer(logits) if need_dlogits else None
    dfeats = _grad_buffer(feats) if need_dfeats else None
    dl3 = l3 if dlogits is None else _flat(dlogits)
    df3 = f3 if dfeats is None else _flat(dfeats)
    delta = stats  # read only for dlogits
    if need_dlogits:
        delta = torch.empty((batch, classes), dtype=torch.float32, device=logits.device)
        block_r, block_c = DELTA_BLOCKS
        _srp_delta_kernel[(triton.cdiv(batch * classes, block_r),)](
            grad_out,
            out,
            delta,
            classes,
            channels,
            batch * classes,
            *grad_out.stride(),
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            num_warps=4,
        )
    sign, magnitude = _sign_magnitude(scale)
    _srp_bwd_kernel[(batch * triton.cdiv(positions, cfg.block_n),)](
        l3,
        f3,
        grad_out,
        stats,
        delta,
        dl3,
        df3,
        *l3.stride(),
        *f3.stride(),
        *grad_out.stride(),
        *dl3.stride(),
        *df3.stride(),
        classes,
        channels,
        positions,
        sign,
        magnitude,
        scale,
        NEED_DL=need_dlogits,
        NEED_DF=need_dfeats,
        ONE_K_BLOCK=cfg.block_k >= classes,
        PRECISION=_precision(logits.dtype),
        BLOCK_K=cfg.block_k,
        BLOCK_C=cfg.block_c,
        BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return dlogits, dfeats


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile specifications (compile_check)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    """One training step's launches: the shapes and layouts their integer arguments come from.

    ``channels_last``: feats is a permuted ``(B, H, W, C)`` tensor; ``gather_grad``: the output's gradient
    arrives through ``SpatialGather``'s ``(B, C, K, 1)`` view of it, class stride 1."""

    batch: int
    classes: int
    channels: int
    height: int
    width: int
    channels_last: bool = False
    gather_grad: bool = True

    @property
    def positions(self) -> int:
        return self.height * self.width

    def __str__(self) -> str:
        layout = "channels-last" if self.channels_last else "contiguous"
        grad = "gather grad" if self.gather_grad else "contiguous grad"
        return f"B={self.batch} K={self.classes} C={self.channels} {self.height}x{self.width} {layout} feats, {grad}"

    def ints(self, dtype: torch.dtype) -> dict[str, int]:
        """The integer arguments of every kernel, as the launchers pass them."""
        b, k, c, n = self.batch, self.classes, self.channels, self.positions
        feats = (c * n, 1, c) if self.channels_last else (c * n, n, 1)
        grad = (k * c, 1, k) if self.gather_grad else (k * c, c, 1)
        cfg = forward_config(b, k, c, n, dtype, interpreting=False)
        split_len = triton.cdiv(triton.cdiv(n, cfg.splits), cfg.block_n) * cfg.block_n
        ints = {"K": k, "C": c, "N": n, "rows": b * k, "splits": triton.cdiv(n, split_len), "split_len": split_len}
        logits = (k * n, n, 1)
        for names, strides in (
            (("sl_b", "sl_k", "sl_n"), logits),
            (("sf_b", "sf_c", "sf_n"), feats),
            (("sdo_b", "sdo_k", "sdo_c"), grad),
            (("sdl_b", "sdl_k", "sdl_n"), logits),
            (("sdf_b", "sdf_c", "sdf_n"), feats),
        ):
            ints.update(zip(names, strides, strict=True))
        return ints


_FP32_POINTERS = {"OutAcc", "Stats", "PartAcc", "PartStats", "Delta"}


def triton_compile_specs(
    dtype: torch.dtype, launch: Launch, *, shared_memory: int = _DEFAULT_SHARED_MEMORY, int_arg=None
):
    """The kernels one forward and backward of ``launch`` runs on a device with ``shared_memory`` bytes per
    block, specialised as the launchers specialise them, as ``(name, kernel, signature, constexprs, attrs,
    options)`` for ``triton.compile``. ``int_arg(name)`` overrides the launch's integer arguments (e.g.
    values that are neither 1 nor multiples of 16, the least specialised variant)."""
    ints = launch.ints(dtype)
    int_arg = int_arg or ints.get
    b, k, c, n = launch.batch, launch.classes, launch.channels, launch.positions
    fwd = forward_config(b, k, c, n, dtype, interpreting=False, shared_memory=shared_memory)
    bwd = backward_config(k, c, n, dtype, interpreting=False, shared_memory=shared_memory)
    split = ints["splits"] > 1
    kernels = [
        (
            _srp_fwd_kernel,
            dict(
                PARTIAL=split,
                STORE_ACC=dtype != torch.float32,
                BLOCK_K=fwd.block_k,
                BLOCK_C=fwd.block_c,
                BLOCK_N=fwd.block_n,
            ),
            fwd.num_warps,
            fwd.num_stages,
        )
    ]
    if split:
        kernels.append(
            (
                _srp_combine_kernel,
                dict(STORE_ACC=dtype != torch.float32, BLOCK_K=COMBINE_BLOCKS[0], BLOCK_C=COMBINE_BLOCKS[1]),
                4,
                None,
            )
        )
    kernels.append((_srp_delta_kernel, dict(BLOCK_R=DELTA_BLOCKS[0], BLOCK_C=DELTA_BLOCKS[1]), 4, None))
    kernels.append(
        (
            _srp_bwd_kernel,
            dict(
                NEED_DL=True,
                NEED_DF=True,
                ONE_K_BLOCK=bwd.block_k >= k,
                BLOCK_K=bwd.block_k,
                BLOCK_C=bwd.block_c,
                BLOCK_N=bwd.block_n,
            ),
            bwd.num_warps,
            bwd.num_stages,
        )
    )
    element = TYPE_NAMES[dtype]
    for kernel, constexprs, num_warps, num_stages in kernels:
        pointers = {
            name: "fp32" if name in _FP32_POINTERS else element
            for name in ("L", "F", "Out", "OutAcc", "Stats", "PartAcc", "PartStats", "DO", "Delta", "DL", "DF")
        }
        if kernel is _srp_delta_kernel:
            pointers["Out"] = "fp32"  # the fp32 output of 16-bit inputs (out_acc), or the fp32 output itself
        options = {"num_warps": num_warps} | ({} if num_stages is None else {"num_stages": num_stages})
        yield kernel_spec(
            kernel,
            {**constexprs, "PRECISION": _precision(dtype)},
            pointers,
            float_args=("sign", "magnitude", "scale"),
            int_arg=int_arg,
            options=options,
        )


SSLTM_LAUNCHES = (  # the query and reference frames' OCR gather at stride 4 of 480x480, VSPW's 124 classes
    Launch(8, 124, 512, 120, 120),
    Launch(8, 124, 512, 120, 120, channels_last=True),
)
FULL_LAUNCHES = SSLTM_LAUNCHES + (
    Launch(8, 19, 512, 60, 60),  # Cityscapes' classes
    Launch(8, 150, 512, 60, 60, channels_last=True),  # ADE20K's: several class blocks
    Launch(3, 124, 77, 30, 30, gather_grad=False),
)


def _compile_specs(arch: int, dtype: torch.dtype, launch: Launch, unaligned: bool) -> list:
    int_arg = (lambda name: 31) if unaligned else None
    return list(triton_compile_specs(dtype, launch, shared_memory=shared_memory_limit(arch), int_arg=int_arg))


def compile_configs(arch: int, config_set: str) -> list[CompileConfig]:
    """``compile_check``'s configurations: ``representative``, SSLTM's launches in bf16 (contiguous and
    channels-last features) and the contiguous one in fp32; ``full``, every launch of ``FULL_LAUNCHES`` in
    every dtype, as launched and with unaligned integers."""
    chosen = compile_cases(
        config_set,
        representative=[(torch.bfloat16, launch, False) for launch in SSLTM_LAUNCHES]
        + [(torch.float32, SSLTM_LAUNCHES[0], False)],
        full=[
            (dtype, launch, unaligned)
            for dtype in KERNEL_DTYPES
            for launch in FULL_LAUNCHES
            for unaligned in (False, True)
        ],
    )
    return [
        CompileConfig(
            f"soft_region_pool {TYPE_NAMES[dtype]} {launch}{' unaligned' if unaligned else ''}",
            partial(_compile_specs, dtype=dtype, launch=launch, unaligned=unaligned),
            cost=4 if dtype == torch.float32 else 2,
        )
        for dtype, launch, unaligned in chosen
    ]


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``(B, X, H, W)`` -> ``(B, X, H*W)``: a view whenever H and W merge (contiguous and channels-last do)."""
    return x.flatten(2)


def _mergeable(x: torch.Tensor) -> bool:
    return x.shape[2] == 1 or x.shape[3] == 1 or x.stride(2) == x.stride(3) * x.shape[3]


def _grad_buffer(x: torch.Tensor) -> torch.Tensor:
    """The gradient of an input, in the input's layout where that is dense with mergeable H and W (a
    channels-last ``feats`` gets a channels-last gradient, which autograd accumulates without a copy)."""
    grad = torch.empty_like(x)
    return grad if _mergeable(grad) else torch.empty(x.shape, dtype=x.dtype, device=x.device)


# --------------------------------------------------------------------------------------------------
# torch.library custom ops + autograd
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("ssltm::soft_region_pool_fwd", mutates_args=())
def _soft_region_pool_fwd(
    logits: torch.Tensor, feats: torch.Tensor, scale: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward: ``(out (B, K, C) in the inputs' dtype, stats (B, K, 2) float32, out_acc)``; ``stats``
    holds the maximum of ``sign(scale) * logits`` and the log of the softmax denominator per ``(b, k)``,
    ``out_acc`` the output in float32 for 16-bit inputs (the backward's Delta = sum_c dOut * Out is then
    free of the output's rounding), else an empty tensor."""
    if backend == "cuda":
        out, stats, out_acc = _C.soft_region_pool_forward(logits, feats, scale)
        return out, stats, logits.new_empty(0, dtype=torch.float32) if out_acc is None else out_acc
    with on_device(logits):
        return _triton_forward(logits, feats, scale)


@_soft_region_pool_fwd.register_fake
def _(logits, feats, scale, backend):
    shape = (logits.shape[0], logits.shape[1], feats.shape[1])
    return (
        logits.new_empty(shape),
        logits.new_empty((*shape[:2], 2), dtype=torch.float32),
        logits.new_empty(shape if logits.dtype != torch.float32 else 0, dtype=torch.float32),
    )


@torch.library.custom_op("ssltm::soft_region_pool_bwd", mutates_args=())
def _soft_region_pool_bwd(
    grad_out: torch.Tensor,
    logits: torch.Tensor,
    feats: torch.Tensor,
    out: torch.Tensor,
    stats: torch.Tensor,
    scale: float,
    backend: str,
    need_dlogits: bool,
    need_dfeats: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused backward: ``(dlogits (B, K, H, W), dfeats (B, C, H, W))`` in the inputs' dtype and layouts
    (``_grad_buffer``); a gradient not asked for is an empty tensor. ``out``: the forward's output, or its
    float32 ``out_acc``."""
    if backend == "cuda":
        dlogits, dfeats = _C.soft_region_pool_backward(
            grad_out,
            logits,
            feats,
            out,
            stats,
            scale,
            _grad_buffer(logits) if need_dlogits else None,
            _grad_buffer(feats) if need_dfeats else None,
        )
    else:
        with on_device(logits):
            dlogits, dfeats = _triton_backward(grad_out, logits, feats, out, stats, scale, need_dlogits, need_dfeats)
    empty = logits.new_empty(0)
    return (empty if dlogits is None else dlogits), (empty.clone() if dfeats is None else dfeats)


@_soft_region_pool_bwd.register_fake
def _(grad_out, logits, feats, out, stats, scale, backend, need_dlogits, need_dfeats):
    empty = logits.new_empty(0)
    return (_grad_buffer(logits) if need_dlogits else empty), (_grad_buffer(feats) if need_dfeats else empty.clone())


def _setup_context(ctx, inputs, output):
    logits, feats, scale, backend = inputs
    ctx.params = (scale, backend)
    out, stats, out_acc = output
    ctx.save_for_backward(logits, feats, out_acc if out_acc.numel() else out, stats)
    ctx.mark_non_differentiable(stats, out_acc)


def _backward(ctx, grad_out, _grad_stats, _grad_out_acc):
    logits, feats, out, stats = ctx.saved_tensors
    need_dlogits, need_dfeats = ctx.needs_input_grad[:2]
    dlogits, dfeats = _soft_region_pool_bwd(
        grad_out, logits, feats, out, stats, *ctx.params, bool(need_dlogits), bool(need_dfeats)
    )
    return (dlogits if need_dlogits else None), (dfeats if need_dfeats else None), None, None


torch.library.register_autograd("ssltm::soft_region_pool_fwd", _backward, setup_context=_setup_context)


# under torch.autocast both inputs run in the autocast dtype (as a matmul's would)
register_autocast("ssltm::soft_region_pool_fwd", activations=(0, 1))


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------
def soft_region_pool(
    logits: torch.Tensor, feats: torch.Tensor, scale: float = 1.0, backend: str | None = None
) -> torch.Tensor:
    """OCR soft region pooling: per class, the softmax-weighted average of the feature vectors.

    Args:
        logits: ``(B, K, H, W)`` class scores (not softmaxed), fp32/fp16/bf16 for the kernels (any float
            for the reference).
        feats: ``(B, C, H, W)`` features of logits' dtype; any strides (channels-last, i.e. a permuted
            ``(B, H, W, C)`` tensor, is read in place).
        scale: multiplies the logits before the softmax (OCRNet's ``scale``); any finite number.
        backend: ``"cuda"``, ``"triton"`` or ``"reference"``; default ``SSLTM_BACKEND`` or the first that
            can run (cuda -> triton -> reference).

    Returns:
        ``(B, K, C)`` in the inputs' dtype: ``out[b, k] = sum_n softmax(scale * logits[b, k])[n] *
        feats[b, :, n]`` over the ``H*W`` positions.
    """
    _validate(logits, feats, scale)
    checks = _checks(logits, feats)

    def cuda_passed_over():  # the CUDA kernels accumulate on CUDA cores, Triton's on tensor cores
        return "the CUDA kernels run on CUDA cores and Triton can run" if checks["triton"] else None

    return dispatch(
        "soft_region_pool",
        checks,
        backend,
        fused=partial(_fused, logits, feats, float(scale)),
        reference=partial(_reference, logits, feats, float(scale)),
        passed_over={"cuda": cuda_passed_over},
    )


def _fused(logits: torch.Tensor, feats: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
    """The fused kernels of ``backend`` ('cuda' or 'triton') on validated inputs, through the custom op."""
    return torch.ops.ssltm.soft_region_pool_fwd(logits, feats, scale, backend)[0]
