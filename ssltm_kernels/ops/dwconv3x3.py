"""Fused depthwise 3x3 convolution of SegFormer's Mix-FFN over channels-last activations.

One op, one file: the pure-PyTorch reference, the input checks, the ``torch.library`` custom ops with
autograd, and the public :func:`dwconv3x3`.

Semantics: ``x`` is ``(B, H, W, C)`` or ``(B, T, H, W, C)`` (the convolution runs on every frame), the
weight ``(C, 1, 3, 3)`` is PyTorch's depthwise layout (``nn.Conv2d(C, C, 3, padding=1, groups=C)``),
stride 1, zero padding 1, optional bias ``(C,)``, optional fused ``activation="gelu"`` (exact erf GELU,
``nn.GELU()``). The result has the input's shape, contiguous, in the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssltm_kernels._backend import BackendCheck, choose_backend, cuda_unavailable_reason, triton_unavailable_reason

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
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Reference (pure PyTorch, the ground truth)
# --------------------------------------------------------------------------------------------------
def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None):
    frames = x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2)  # (B*T, C, H, W)
    y = F.conv2d(frames, weight, bias, padding=1, groups=x.shape[-1])
    if activation == "gelu":
        y = F.gelu(y)
    return y.permute(0, 2, 3, 1).reshape(*x.shape[:-1], y.shape[1])


def dwconv3x3_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        activation: str | None = None) -> torch.Tensor:
    """SegFormer's way: permute to ``(B*T, C, H, W)``, ``F.conv2d(groups=C, padding=1)``, GELU, permute
    back. Same arguments and result as :func:`dwconv3x3`; differentiable by autograd, any float dtype."""
    _validate(x, weight, bias, activation)
    return _reference(x, weight, bias, activation)


# --------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------
def _autocasting(x: torch.Tensor) -> bool:
    return x.dtype in KERNEL_DTYPES and torch.is_autocast_enabled(x.device.type)


def _check_param(name: str, p, x: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(p).__name__}")
    if tuple(p.shape) != shape:
        raise ValueError(f"{name} must have shape {what} = {shape} for x's {x.shape[-1]} channels, "
                         f"got {tuple(p.shape)} (x shape {tuple(x.shape)})")
    if p.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {p.device} ({name} shape {tuple(p.shape)})")
    if not p.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {p.dtype} ({name} shape {tuple(p.shape)})")
    # under autocast the op casts x, weight and bias to the autocast dtype, as nn.Conv2d does
    if p.dtype != x.dtype and not (_autocasting(x) and p.dtype in KERNEL_DTYPES):
        raise TypeError(f"{name} must have x's dtype {x.dtype}, got {p.dtype} ({name} shape {tuple(p.shape)})")


def _validate(x, weight, bias, activation) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (4, 5):
        raise ValueError(f"x must be 4-D (B, H, W, C) or 5-D (B, T, H, W, C) channels-last, got shape "
                         f"{tuple(x.shape)}")
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
    return torch.get_autocast_dtype(x.device.type) if _autocasting(x) else x.dtype


def _dtype_reason(dtype: torch.dtype) -> str | None:
    return None if dtype in KERNEL_DTYPES else f"dtype {dtype} is not one of {KERNEL_DTYPES}"


def _checks(x: torch.Tensor) -> dict[str, BackendCheck]:
    dtype = compute_dtype(x)
    return {
        "cuda": BackendCheck("cuda", cuda_unavailable_reason(x) or _dtype_reason(dtype)
                             or "the CUDA kernels of dwconv3x3 are not built yet"),
        "triton": BackendCheck("triton", triton_unavailable_reason(x) or _dtype_reason(dtype)
                               or "the Triton kernels of dwconv3x3 are not written yet"),
        "reference": BackendCheck("reference", None),
    }


def _can_run(backend: str, x, weight, bias, activation, raise_error: bool) -> BackendCheck:
    _validate(x, weight, bias, activation)
    check = _checks(x)[backend]
    if raise_error:
        check.raise_if_unavailable("dwconv3x3")
    return check


def can_run_cuda(x, weight, bias=None, activation=None, *, raise_error=False) -> BackendCheck:
    """Whether the compiled CUDA kernels can run :func:`dwconv3x3` on these arguments (truthy), with the
    reason when not (``raise_error``: raise it)."""
    return _can_run("cuda", x, weight, bias, activation, raise_error)


def can_run_triton(x, weight, bias=None, activation=None, *, raise_error=False) -> BackendCheck:
    """Whether the Triton kernels can run :func:`dwconv3x3` on these arguments (truthy), with the reason
    when not (``raise_error``: raise it)."""
    return _can_run("triton", x, weight, bias, activation, raise_error)


def can_run_reference(x, weight, bias=None, activation=None, *, raise_error=False) -> BackendCheck:
    """The reference runs any valid arguments (invalid ones raise the input error)."""
    return _can_run("reference", x, weight, bias, activation, raise_error)


# --------------------------------------------------------------------------------------------------
# torch.library custom ops + autograd
# --------------------------------------------------------------------------------------------------
def _forward(x, weight, bias, activation, backend):
    return _reference(x, weight, bias, activation or None).contiguous()


def _backward(grad_out, x, weight, bias, activation, backend):
    act = activation or None
    if bias is None:
        _, vjp = torch.func.vjp(lambda x, weight: _reference(x, weight, None, act), x, weight)
        (dx, dweight), dbias = vjp(grad_out), x.new_empty(0)
    else:
        _, vjp = torch.func.vjp(lambda x, weight, bias: _reference(x, weight, bias, act), x, weight, bias)
        dx, dweight, dbias = vjp(grad_out)
    return dx.contiguous(), dweight.float(), dbias.float()


@torch.library.custom_op("ssltm::dwconv3x3_fwd", mutates_args=())
def _dwconv3x3_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str,
                   backend: str) -> torch.Tensor:
    """Fused forward on ``x (B, T, H, W, C)``: ``y`` contiguous, x's shape and dtype. ``activation``: ``""``
    or ``"gelu"``."""
    return _forward(x, weight, bias, activation, backend)


@_dwconv3x3_fwd.register_fake
def _(x, weight, bias, activation, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("ssltm::dwconv3x3_bwd", mutates_args=())
def _dwconv3x3_bwd(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   activation: str, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def _register_autocast(qualname: str) -> None:
    """Under ``torch.autocast`` the op runs in the autocast dtype, x, weight and bias cast to it (as
    ``nn.Conv2d`` does)."""
    op = torch.ops.ssltm.dwconv3x3_fwd.default

    def cast(t, dtype):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in KERNEL_DTYPES else t

    for device_type, key in (("cuda", "AutocastCUDA"), ("cpu", "AutocastCPU")):
        def autocast_kernel(x, weight, bias, activation, backend, device_type=device_type):
            dtype = torch.get_autocast_dtype(device_type)
            with torch.autocast(device_type, enabled=False):
                return op(cast(x, dtype), cast(weight, dtype), cast(bias, dtype), activation, backend)

        torch.library.impl(qualname, key, autocast_kernel)


_register_autocast("ssltm::dwconv3x3_fwd")


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------
def dwconv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              activation: str | None = None, backend: str | None = None) -> torch.Tensor:
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
        x's shape, contiguous, in x's dtype (the autocast dtype under ``torch.autocast``). Gradients
        reach x, weight and bias.
    """
    _validate(x, weight, bias, activation)
    checks = _checks(x)
    chosen = choose_backend("dwconv3x3", {name: (lambda c=c: c.reason) for name, c in checks.items()}, backend)
    if chosen == "reference":
        return _reference(x, weight, bias, activation)
    frames = x if x.dim() == 5 else x.unsqueeze(1)
    out = torch.ops.ssltm.dwconv3x3_fwd(frames, weight, bias, activation or "", chosen)
    return out if x.dim() == 5 else out.squeeze(1)
