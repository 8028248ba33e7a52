"""Fused 3D (shifted) window multi-head self-attention with Video Swin semantics.

One op, one package: ``reference`` (geometry, validation, the pure-PyTorch reference), ``triton_kernels``
(the jitted kernels), ``launch`` (their launchers), ``tuning`` (launch configurations, the shipped measured
ones, backend preference, compile specifications and profiles) and here the dispatch, the ``torch.library``
custom ops with autograd and autocast, and the public :func:`window_attention_3d`. Every public name of the
submodules is re-exported here.

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
from dataclasses import replace

import torch

from ssltm_kernels._backend import (
    HAS_TRITON,  # noqa: F401  (re-exported)
    BackendCheck,
    cuda_unavailable_reason,
    on_device,
    requested_backend,
    triton_unavailable_reason,
)
from ssltm_kernels._device import device_arch, device_shared_memory
from ssltm_kernels._ext import _C
from ssltm_kernels._op import KERNEL_DTYPES, backend_predicates, dispatch, dtype_reason, register_autocast  # noqa: F401 (KERNEL_DTYPES re-exported)

# the submodules' public names are re-exported here: the op's import path stays ssltm_kernels.ops.window_attention_3d
from ssltm_kernels.ops.window_attention_3d.launch import (  # noqa: F401
    INTERPRETER_GROUPS,
    PROGRAMS_PER_SM,
    _triton_backward,
    _triton_forward,
    dense_bias,
    window_groups,
)
from ssltm_kernels.ops.window_attention_3d.reference import (  # noqa: F401
    LOG2E,
    MASKED_SCORE,
    SHIFT_MASK_VALUE,
    WindowAttentionCall,
    WindowGeometry,
    _additive_mask,
    _check_extras,
    _check_qkv,
    _reference,
    _scale,
    _triple,
    _validate,
    compute_dtype,
    relative_position_index,
    window_attention_3d_reference,
    window_geometry,
)
from ssltm_kernels.ops.window_attention_3d.triton_kernels import (  # noqa: F401
    WHOLE_WINDOW_BLOCK,
    block_pieces,
    padded_tokens,
)
from ssltm_kernels.ops.window_attention_3d.tuning import (  # noqa: F401
    _DTYPE_NAMES,
    CONFIG_FILE,
    CONFIG_SETS,
    DSUM_BLOCK,
    INTERPRETER_CONFIGS,
    KERNELS,
    MAX_HEAD_DIM,
    MAX_TRITON_KEY_TILE_BYTES,
    MAX_WINDOW_TOKENS,
    PIPELINE_MARGIN_BYTES,
    REDUCE_BLOCKS,
    TRITON_FIRST_ARCHS,
    TRITON_KEY_TILE_LIMITS,
    VARIANTS,
    KernelConfig,
    LaunchConfigs,
    _config_file,
    compile_configs,
    config_key,
    default_configs,
    fit_stages,
    forced_launch_configs,
    key_tile_bytes,
    launch_configs,
    launch_integers,
    pipeline_stage_bytes,
    preferred_backend,
    shipped_configs,
    spec_key,
    sweep_configs,
    triton_compile_specs,
    triton_key_tile_limit,
)

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


# --------------------------------------------------------------------------------------------------
# Backend checks
# --------------------------------------------------------------------------------------------------
def _triton_reason(call: WindowAttentionCall, dtype: torch.dtype) -> str | None:
    q, geom = call.q, call.geom
    reason = triton_unavailable_reason(q) or dtype_reason(dtype)
    if reason is not None:
        return reason
    if call.scale == 0:
        return "scale 0: the Triton kernels start each product at bias / scale"
    if geom.tokens_per_window > MAX_WINDOW_TOKENS:
        return f"a window of {geom.tokens_per_window} tokens exceeds the Triton kernels' {MAX_WINDOW_TOKENS}"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} exceeds the Triton kernels' {MAX_HEAD_DIM}"
    shared = device_shared_memory(q.device)
    limit = triton_key_tile_limit(shared)
    tile = key_tile_bytes(geom.tokens_per_window, q.shape[-1], dtype)
    if limit == 0:
        return (
            f"the device's {shared // 1024} KB of shared memory per block is below the "
            f"{TRITON_KEY_TILE_LIMITS[-1][0] // 1024} KB the Triton kernels need"
        )
    if tile > limit:
        return (
            f"a window's keys ({geom.tokens_per_window} tokens x head_dim {q.shape[-1]} in {dtype}, "
            f"{tile // 1024} KB padded to powers of 2) exceed the {limit // 1024} KB tile the Triton kernels "
            f"take with {shared // 1024} KB of shared memory per block"
        )
    return None


def _cuda_reason(call: WindowAttentionCall, dtype: torch.dtype) -> str | None:
    q, geom = call.q, call.geom
    reason = cuda_unavailable_reason(q) or dtype_reason(dtype)
    if reason is None and geom.tokens_per_window > _C.MAX_WINDOW_TOKENS:
        reason = f"a window of {geom.tokens_per_window} tokens exceeds the CUDA kernels' {_C.MAX_WINDOW_TOKENS}"
    if reason is None and q.shape[-1] > _C.MAX_HEAD_DIM:
        reason = f"head_dim {q.shape[-1]} exceeds the CUDA kernels' {_C.MAX_HEAD_DIM}"
    return reason


def _cuda_kernels(call: WindowAttentionCall, dtype: torch.dtype) -> tuple[str, str]:
    """The CUDA kernel family (``"tensor_cores"`` or ``"cuda_cores"``) of the forward and of the backward
    on q's device, as the extension's launchers decide it."""
    return tuple(
        _C.window_attention_3d_cuda_kernels(
            _DTYPE_NAMES[dtype],
            call.geom.tokens_per_window,
            call.head_dim,
            device_shared_memory(call.q.device),
            device_arch(call.q.device),
        )
    )


_DROPOUT_WARNED = False


def _dropout_reason(dropout_p: float) -> str | None:
    return f"attention dropout (dropout_p={dropout_p}) runs only in the reference" if dropout_p > 0 else None


def _warn_dropout_fallback(dropout_p: float) -> None:
    global _DROPOUT_WARNED
    if not _DROPOUT_WARNED:
        _DROPOUT_WARNED = True
        warnings.warn(
            f"window_attention_3d: attention dropout (dropout_p={dropout_p}) is not fused in the kernels; "
            "it runs in the PyTorch reference, which is slower and takes more memory (warned once)",
            stacklevel=6,
        )


def _checks(call: WindowAttentionCall) -> dict[str, BackendCheck]:
    dtype = compute_dtype(call.q)
    dropout = _dropout_reason(call.dropout_p)
    cuda_reason = dropout or _cuda_reason(call, dtype)
    return {
        "cuda": BackendCheck("cuda", cuda_reason, None if cuda_reason else _cuda_kernels(call, dtype)),
        "triton": BackendCheck("triton", dropout or _triton_reason(call, dtype)),
        "reference": BackendCheck("reference", None),
    }


def _validated_checks(
    q,
    k,
    v,
    *,
    window_size,
    rel_pos_bias_table=None,
    shift_size=(0, 0, 0),
    pad_k=None,
    pad_v=None,
    rel_pos_mode="swin",
    attn_mask=None,
    dropout_p=0.0,
) -> dict[str, BackendCheck]:
    """The backends' checks of valid volume arguments (the CUDA one's ``kernels``: the family,
    ``"tensor_cores"`` or ``"cuda_cores"``, of the forward and of the backward on q's device)."""
    return _checks(
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
            dropout_p=dropout_p,
        )
    )


can_run_cuda, can_run_triton, can_run_reference = backend_predicates("window_attention_3d", _validated_checks)


# --------------------------------------------------------------------------------------------------
# torch.library custom ops + autograd
# --------------------------------------------------------------------------------------------------
def _op_call(
    q, k, v, table, pad_k, pad_v, attn_mask, window, shift, bias_window, table_window, scale
) -> WindowAttentionCall:
    """The call record of a custom op's flat arguments (the mask is already additive)."""
    geom = WindowGeometry(tuple(q.shape[1:4]), tuple(window), tuple(shift), tuple(bias_window), tuple(table_window))
    return WindowAttentionCall(q, k, v, geom, table, pad_k, pad_v, attn_mask, scale)


def _forward(q, k, v, table, pad_k, pad_v, attn_mask, window, shift, bias_window, table_window, scale, backend):
    if backend == "cuda":
        return _C.window_attention_3d_forward(
            q, k, v, table, pad_k, pad_v, attn_mask, window, shift, bias_window, table_window, scale
        )
    with on_device(q):
        return _triton_forward(
            _op_call(q, k, v, table, pad_k, pad_v, attn_mask, window, shift, bias_window, table_window, scale)
        )


@torch.library.custom_op("ssltm::window_attention_3d_fwd", mutates_args=())
def _window_attention_3d_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: torch.Tensor | None,
    pad_k: torch.Tensor | None,
    pad_v: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    window: list[int],
    shift: list[int],
    bias_window: list[int],
    table_window: list[int],
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward: ``(out (B,T,H,W,nh,hd), lse (B,T,H,W,nh) fp32)``."""
    return _forward(q, k, v, table, pad_k, pad_v, attn_mask, window, shift, bias_window, table_window, scale, backend)


@torch.library.custom_op("ssltm::window_attention_3d_qkvpacked_fwd", mutates_args=())
def _window_attention_3d_qkvpacked_fwd(
    qkv: torch.Tensor,
    table: torch.Tensor | None,
    pad_k: torch.Tensor | None,
    pad_v: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    window: list[int],
    shift: list[int],
    bias_window: list[int],
    table_window: list[int],
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward on one ``(B,T,H,W,3,nh,hd)`` projection; its backward writes one packed dqkv."""
    return _forward(
        *qkv.unbind(-3), table, pad_k, pad_v, attn_mask, window, shift, bias_window, table_window, scale, backend
    )


@_window_attention_3d_fwd.register_fake
def _(q, k, v, table, pad_k, pad_v, attn_mask, window, shift, bias_window, table_window, scale, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:5], dtype=torch.float32)


@_window_attention_3d_qkvpacked_fwd.register_fake
def _(qkv, table, pad_k, pad_v, attn_mask, window, shift, bias_window, table_window, scale, backend):
    shape = (*qkv.shape[:-3], *qkv.shape[-2:])
    return qkv.new_empty(shape), qkv.new_empty(shape[:5], dtype=torch.float32)


@torch.library.custom_op("ssltm::window_attention_3d_bwd", mutates_args=())
def _window_attention_3d_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    table: torch.Tensor | None,
    pad_k: torch.Tensor | None,
    pad_v: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    window: list[int],
    shift: list[int],
    bias_window: list[int],
    table_window: list[int],
    scale: float,
    backend: str,
    need_table_grad: bool,
    need_pad_grad: bool,
    packed: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward: ``(dq, dk, dv, dtable, dpad_k, dpad_v)``; gradients not asked for are empty.
    ``packed``: the first result is one ``(B,T,H,W,3,nh,hd)`` dqkv that the kernels wrote, dk and dv are empty."""
    grad_qkv = q.new_empty((*q.shape[:4], 3, *q.shape[4:])) if packed else None
    if backend == "cuda":
        grads = _C.window_attention_3d_backward(
            grad_out,
            q,
            k,
            v,
            out,
            lse,
            table,
            pad_k,
            pad_v,
            attn_mask,
            window,
            shift,
            bias_window,
            table_window,
            scale,
            need_table_grad,
            need_pad_grad,
            grad_qkv=grad_qkv,
        )
    else:
        call = _op_call(q, k, v, table, pad_k, pad_v, attn_mask, window, shift, bias_window, table_window, scale)
        with on_device(q):
            grads = _triton_backward(call, grad_out, out, lse, need_table_grad, need_pad_grad, grad_qkv)
    empty = q.new_empty(0, dtype=torch.float32)
    dq, dk, dv = (grad_qkv, empty, empty.clone()) if packed else grads[:3]
    return (dq, dk, dv, *(empty.clone() if g is None else g for g in grads[3:]))


@_window_attention_3d_bwd.register_fake
def _(
    grad_out,
    q,
    k,
    v,
    out,
    lse,
    table,
    pad_k,
    pad_v,
    attn_mask,
    window,
    shift,
    bias_window,
    table_window,
    scale,
    backend,
    need_table_grad,
    need_pad_grad,
    packed,
):
    heads, head_dim = q.shape[-2:]
    empty = q.new_empty(0, dtype=torch.float32)
    dtable = q.new_empty(table.shape, dtype=torch.float32) if need_table_grad and table is not None else empty
    has_pad = need_pad_grad and (pad_k is not None or pad_v is not None)
    dpad = q.new_empty((heads, head_dim), dtype=torch.float32) if has_pad else empty.clone()
    if packed:
        return q.new_empty((*q.shape[:4], 3, *q.shape[4:])), empty.clone(), empty.clone(), dtable, dpad, dpad.clone()
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), dtable, dpad, dpad.clone()


def _backward_grads(ctx, grad_out, saved: tuple[torch.Tensor, ...], packed: bool):
    """The backward op on the saved tensors ``saved`` (``ctx.saved_tensors``, read once by the caller: under
    non-reentrant activation checkpointing each saved tensor can be unpacked only once); table and pad
    gradients in their parameters' dtypes."""
    q, k, v = saved[0].unbind(-3) if packed else saved[:3]
    out, lse, table, pad_k, pad_v, attn_mask = saved[-6:]
    window, shift, bias_window, table_window, scale, backend = ctx.params
    need_table, need_pad_k, need_pad_v = ctx.needs_input_grad[-10:-7]  # both ops end with these
    dq, dk, dv, dtable, dpad_k, dpad_v = _window_attention_3d_bwd(
        grad_out,
        q,
        k,
        v,
        out,
        lse,
        table,
        pad_k,
        pad_v,
        attn_mask,
        window,
        shift,
        bias_window,
        table_window,
        scale,
        backend,
        bool(need_table),
        bool(need_pad_k or need_pad_v),
        packed,
    )
    return (
        dq,
        dk,
        dv,
        dtable.to(table.dtype) if need_table else None,
        dpad_k.to(pad_k.dtype) if need_pad_k else None,
        dpad_v.to(pad_v.dtype) if need_pad_v else None,
    )


def _setup_context(ctx, inputs, output):
    *tensors, window, shift, bias_window, table_window, scale, backend = inputs
    ctx.params = (window, shift, bias_window, table_window, scale, backend)
    ctx.save_for_backward(*tensors[:-4], output[0], output[1], *tensors[-4:])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, _grad_lse):
    dq, dk, dv, *rest = _backward_grads(ctx, grad_out, ctx.saved_tensors, packed=False)
    return dq, dk, dv, *rest, *[None] * 7  # attn_mask and the non-tensor arguments


def _backward_qkvpacked(ctx, grad_out, _grad_lse):
    dqkv, _, _, *rest = _backward_grads(ctx, grad_out, ctx.saved_tensors, packed=True)
    return dqkv, *rest, *[None] * 7  # attn_mask and the non-tensor arguments


torch.library.register_autograd("ssltm::window_attention_3d_fwd", _backward, setup_context=_setup_context)
torch.library.register_autograd(
    "ssltm::window_attention_3d_qkvpacked_fwd", _backward_qkvpacked, setup_context=_setup_context
)


# Autocast as SDPA's: q/k/v (or qkv) and the pad rows run in the autocast dtype; the bias table and the mask keep
# their precision, as the reference adds them to fp32 scores.
register_autocast("ssltm::window_attention_3d_fwd", activations=(0, 1, 2, 4, 5))  # q, k, v, pad_k, pad_v
register_autocast("ssltm::window_attention_3d_qkvpacked_fwd", activations=(0, 2, 3))  # qkv, pad_k, pad_v


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------
def _fused_window_attention(call: WindowAttentionCall, backend: str, qkv: torch.Tensor | None):
    """Run the fused kernels of ``backend`` ('cuda' or 'triton') on a validated call, flattened into the
    custom op's arguments; with ``qkv`` (the packed tensor q, k, v are views of) the backward writes one
    packed gradient."""
    q, geom, scale = call.q, call.geom, call.scale
    pad_k, pad_v = (None if p is None else p.to(q.dtype).contiguous() for p in (call.pad_k, call.pad_v))
    table = None if call.table is None else call.table.contiguous()
    attn_mask = None if call.attn_mask is None else call.attn_mask.float().contiguous()
    lists = list(geom.window), list(geom.shift), list(geom.bias_window), list(geom.table_window)
    if qkv is not None:
        out, _ = torch.ops.ssltm.window_attention_3d_qkvpacked_fwd(
            qkv if qkv.stride(-1) == 1 else qkv.contiguous(),
            table,
            pad_k,
            pad_v,
            attn_mask,
            *lists,
            float(scale),
            backend,
        )
        return out
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, call.k, call.v))
    out, _ = torch.ops.ssltm.window_attention_3d_fwd(
        q, k, v, table, pad_k, pad_v, attn_mask, *lists, float(scale), backend
    )
    return out


def _dispatch(call: WindowAttentionCall, backend: str | None, qkv: torch.Tensor | None = None) -> torch.Tensor:
    checks = _checks(call)
    cuda, triton_check = checks["cuda"], checks["triton"]

    def cuda_passed_over():
        if not triton_check:
            return None
        if "cuda_cores" in cuda.kernels:
            return f"the CUDA kernels would run on CUDA cores (forward, backward: {cuda.kernels}) and Triton can run"
        if preferred_backend(call.q.device) == "triton":
            return "Triton comes first on this device (preferred_backend) and can run"
        return None

    def reference():
        if (
            call.dropout_p > 0
            and requested_backend(backend) is None
            and any(c for c in _checks(replace(call, dropout_p=0.0)).values() if c.backend != "reference")
        ):
            _warn_dropout_fallback(call.dropout_p)
        return _reference(call)

    return dispatch(
        "window_attention_3d",
        checks,
        backend,
        fused=lambda chosen: _fused_window_attention(call, chosen, qkv),
        reference=reference,
        passed_over={"cuda": cuda_passed_over},
    )


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
    return _dispatch(
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
        ),
        backend,
    )


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
    return _dispatch(
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
        ),
        backend,
        qkv,
    )


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
        raise ValueError(
            f"rel_pos_mode='exact' needs the shape of the shrunk window, which a window batch of {n} "
            f"tokens (window_size {window_size}) does not give: pass volumes (B, T, H, W, C) to take "
            "the exact coordinates, or use rel_pos_mode='swin' (Video Swin's index[:N, :N])"
        )
    geom = WindowGeometry((1, 1, n), (1, 1, n), (0, 0, 0), window_size, window_size)
    _check_extras(q, geom, windows, rel_pos_bias_table, None, None, attn_mask)
    as_volume = [x.unsqueeze(1).unsqueeze(1) for x in (q, k, v)]
    call = WindowAttentionCall(
        *as_volume,
        geom,
        rel_pos_bias_table,
        None,
        None,
        _additive_mask(attn_mask),
        _scale(scale, q.shape[-1]),
        dropout_p,
    )
    out = _dispatch(call, backend, None if qkv is None else qkv.unsqueeze(1).unsqueeze(1))
    return out.squeeze(2).squeeze(1)
