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

import torch

from ssltm_kernels._backend import (
    BackendCheck,
    choose_backend,
)

__all__ = [
    "soft_region_pool",
    "soft_region_pool_reference",
    "can_run_cuda",
    "can_run_triton",
    "can_run_reference",
    "compute_dtype",
]

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
        raise ValueError(f"feats must have the batch size of logits (B = {logits.shape[0]}, logits shape "
                         f"{tuple(logits.shape)}), got shape {tuple(feats.shape)}")
    if feats.shape[2:] != logits.shape[2:]:
        raise ValueError(f"feats must have the spatial size of logits ((H, W) = {tuple(logits.shape[2:])}, logits "
                         f"shape {tuple(logits.shape)}), got shape {tuple(feats.shape)}")
    if feats.device != logits.device:
        raise ValueError(f"feats must be on the device of logits ({logits.device}), got {feats.device} "
                         f"(feats shape {tuple(feats.shape)})")
    for name, x in (("logits", logits), ("feats", feats)):
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype} (shape {tuple(x.shape)})")
    if feats.dtype != logits.dtype and not _autocast_casts(logits, feats):
        raise TypeError(f"feats must have the dtype of logits ({logits.dtype}), got {feats.dtype} "
                        f"(feats shape {tuple(feats.shape)})")
    for name, x in (("logits", logits), ("feats", feats)):
        if x.numel() == 0:
            raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite real number, got {scale!r}")


def _autocast_casts(logits: torch.Tensor, feats: torch.Tensor) -> bool:
    """Whether autocast casts both inputs to one dtype before the fused op runs (see the registration below)."""
    device_type = logits.device.type
    return (device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type)
            and logits.dtype in KERNEL_DTYPES and feats.dtype in KERNEL_DTYPES)


def compute_dtype(logits: torch.Tensor, feats: torch.Tensor) -> torch.dtype:
    """The dtype the kernels run in: the inputs', or the autocast dtype where autocast casts them."""
    if _autocast_casts(logits, feats):
        return torch.get_autocast_dtype(logits.device.type)
    return logits.dtype


def _dtype_reason(dtype: torch.dtype) -> str | None:
    return None if dtype in KERNEL_DTYPES else f"dtype {dtype} is not one of {KERNEL_DTYPES}"


def _checks(logits: torch.Tensor, feats: torch.Tensor) -> dict[str, BackendCheck]:
    dtype = compute_dtype(logits, feats)
    pending = "the fused kernels are not built into this version yet"
    return {
        "cuda": BackendCheck("cuda", pending or _dtype_reason(dtype)),
        "triton": BackendCheck("triton", pending or _dtype_reason(dtype)),
        "reference": BackendCheck("reference", None),
    }


def _can_run(backend: str, logits, feats, scale, raise_error: bool) -> BackendCheck:
    _validate(logits, feats, scale)
    check = _checks(logits, feats)[backend]
    if raise_error:
        check.raise_if_unavailable("soft_region_pool")
    return check


def can_run_cuda(logits, feats, scale=1.0, *, raise_error=False) -> BackendCheck:
    """Whether the compiled CUDA kernels can run :func:`soft_region_pool` on these arguments (truthy), with
    the reason when not (``raise_error``: raise it)."""
    return _can_run("cuda", logits, feats, scale, raise_error)


def can_run_triton(logits, feats, scale=1.0, *, raise_error=False) -> BackendCheck:
    """Whether the Triton kernels can run :func:`soft_region_pool` on these arguments (truthy), with the
    reason when not (``raise_error``: raise it)."""
    return _can_run("triton", logits, feats, scale, raise_error)


def can_run_reference(logits, feats, scale=1.0, *, raise_error=False) -> BackendCheck:
    """The reference runs any valid arguments (invalid ones raise the input error)."""
    return _can_run("reference", logits, feats, scale, raise_error)


# --------------------------------------------------------------------------------------------------
# Fused computation (the kernels' formulas, in PyTorch until the kernels land)
# --------------------------------------------------------------------------------------------------
def _fused_forward(logits, feats, scale):
    sign, magnitude = (1.0 if scale >= 0 else -1.0), abs(scale)
    x = sign * logits.flatten(2).float()
    m = x.amax(-1, keepdim=True)
    p = torch.exp(magnitude * (x - m))
    total = p.sum(-1, keepdim=True)
    out = (p / total) @ feats.flatten(2).float().transpose(1, 2)
    return out.to(logits.dtype), torch.cat((m, total.log()), -1)


def _fused_backward(grad_out, logits, feats, out, stats, scale):
    sign, magnitude = (1.0 if scale >= 0 else -1.0), abs(scale)
    x = sign * logits.flatten(2).float()
    p = torch.exp(magnitude * (x - stats[..., :1]) - stats[..., 1:])
    f = feats.flatten(2).float()
    g = grad_out.float()
    delta = (g * out.float()).sum(-1, keepdim=True)
    dp = g @ f
    dlogits = scale * p * (dp - delta)
    dfeats = g.transpose(1, 2) @ p
    return dlogits.view(logits.shape).to(logits.dtype), dfeats.view(feats.shape).to(feats.dtype)


# --------------------------------------------------------------------------------------------------
# torch.library custom ops + autograd
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("ssltm::soft_region_pool_fwd", mutates_args=())
def _soft_region_pool_fwd(logits: torch.Tensor, feats: torch.Tensor, scale: float,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward: ``(out (B, K, C) in the inputs' dtype, stats (B, K, 2) float32)``, ``stats`` holding
    the maximum of ``sign(scale) * logits`` and the log of the softmax denominator per ``(b, k)``."""
    return _fused_forward(logits, feats, scale)


@_soft_region_pool_fwd.register_fake
def _(logits, feats, scale, backend):
    batch, classes = logits.shape[:2]
    return (logits.new_empty((batch, classes, feats.shape[1])),
            logits.new_empty((batch, classes, 2), dtype=torch.float32))


@torch.library.custom_op("ssltm::soft_region_pool_bwd", mutates_args=())
def _soft_region_pool_bwd(grad_out: torch.Tensor, logits: torch.Tensor, feats: torch.Tensor, out: torch.Tensor,
                          stats: torch.Tensor, scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused backward: ``(dlogits (B, K, H, W), dfeats (B, C, H, W))`` in the inputs' dtype."""
    return _fused_backward(grad_out, logits, feats, out, stats, scale)


@_soft_region_pool_bwd.register_fake
def _(grad_out, logits, feats, out, stats, scale, backend):
    return logits.new_empty(logits.shape), feats.new_empty(feats.shape)


def _setup_context(ctx, inputs, output):
    logits, feats, scale, backend = inputs
    ctx.params = (scale, backend)
    ctx.save_for_backward(logits, feats, output[0], output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, _grad_stats):
    logits, feats, out, stats = ctx.saved_tensors
    dlogits, dfeats = _soft_region_pool_bwd(grad_out, logits, feats, out, stats, *ctx.params)
    return dlogits, dfeats, None, None


torch.library.register_autograd("ssltm::soft_region_pool_fwd", _backward, setup_context=_setup_context)


def _register_autocast(qualname: str) -> None:
    """Under ``torch.autocast`` both inputs run in the autocast dtype (as a matmul's would)."""
    op = torch.ops.ssltm.__getattr__(qualname.split("::")[1]).default

    for device_type, key in (("cuda", "AutocastCUDA"), ("cpu", "AutocastCPU")):
        def autocast_kernel(logits, feats, *args, device_type=device_type):
            dtype = torch.get_autocast_dtype(device_type)
            logits, feats = (x.to(dtype) if x.dtype in KERNEL_DTYPES else x for x in (logits, feats))
            with torch.autocast(device_type, enabled=False):
                return op(logits, feats, *args)

        torch.library.impl(qualname, key, autocast_kernel)


_register_autocast("ssltm::soft_region_pool_fwd")


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------
def soft_region_pool(logits: torch.Tensor, feats: torch.Tensor, scale: float = 1.0,
                     backend: str | None = None) -> torch.Tensor:
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
    chosen = choose_backend("soft_region_pool", {name: (lambda c=c: c.reason) for name, c in checks.items()},
                            backend)
    if chosen == "reference":
        return _reference(logits, feats, float(scale))
    out, _ = torch.ops.ssltm.soft_region_pool_fwd(logits, feats, float(scale), chosen)
    return out
