"""Host-side launchers of the window attention's Triton kernels: the dense bias, the window groups, the
forward, the backward passes A, A2, B and their fixed-order reduction C."""

from __future__ import annotations

import functools
from dataclasses import replace

import torch
import torch.nn.functional as F

from ssltm_kernels._backend import HAS_TRITON, triton_interpreting
from ssltm_kernels._device import device_sm_count
from ssltm_kernels._op import dot_block
from ssltm_kernels.ops.window_attention_3d import triton_kernels
from ssltm_kernels.ops.window_attention_3d.reference import (
    LOG2E,
    WindowAttentionCall,
    WindowGeometry,
    relative_position_index,
)
from ssltm_kernels.ops.window_attention_3d.triton_kernels import block_pieces, padded_tokens
from ssltm_kernels.ops.window_attention_3d.tuning import (
    DSUM_BLOCK,
    REDUCE_BLOCKS,
    LaunchConfigs,
    _kernel_constants,
    _launch_configs,
    _reduce_constants,
)

if HAS_TRITON:
    import triton


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


def dense_bias(
    table: torch.Tensor, geom: WindowGeometry, scale: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
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


def _bias_operand(
    table: torch.Tensor | None,
    geom: WindowGeometry,
    scale: float,
    configs: LaunchConfigs,
    dtype: torch.dtype,
    dummy: torch.Tensor,
) -> torch.Tensor:
    """The kernels' ``BIAS``: the dense bias in the dtype ``configs.bias_dtype`` asks for (``dtype``: the
    inputs'), or ``dummy`` without a table."""
    if table is None:
        return dummy
    return dense_bias(table, geom, scale, dtype if configs.bias_dtype == "input" else torch.float32)


def _present(call: WindowAttentionCall) -> dict:
    return dict(
        bias=call.table is not None,
        pad_k=call.pad_k is not None,
        pad_v=call.pad_v is not None,
        mask=call.attn_mask is not None,
    )


def _same_strides(call: WindowAttentionCall) -> WindowAttentionCall:
    """The call with one set of strides for q, k, v, as the kernels take them: views of one projection have
    it; other layouts become contiguous copies."""
    if call.q.stride() == call.k.stride() == call.v.stride():
        return call
    return replace(call, q=call.q.contiguous(), k=call.k.contiguous(), v=call.v.contiguous())


def _operands(call: WindowAttentionCall, configs: LaunchConfigs) -> tuple:
    """The arguments every attention kernel takes after its own tensors: the dense bias, the pad rows and the
    mask (empty where absent), q's strides (b, t, h, w, head), T, H, W, heads, head_dim, the masks and the
    windows over the batch."""
    q, geom = call.q, call.geom
    batch, t, h, w, heads, head_dim = q.shape
    dummy = q.new_empty(0)
    return (
        _bias_operand(call.table, geom, call.scale, configs, q.dtype, dummy),
        *(dummy if x is None else x for x in (call.pad_k, call.pad_v, call.attn_mask)),
        *q.stride()[:5],
        t,
        h,
        w,
        heads,
        head_dim,
        call.num_masks,
        batch * geom.num_windows,
    )


def _triton_forward(call: WindowAttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
    call = _same_strides(call)
    q, geom = call.q, call.geom
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:5], dtype=torch.float32, device=q.device)  # base 2
    configs = _launch_configs(q, geom)
    cfg = configs.fwd
    num_windows = q.shape[0] * geom.num_windows
    pieces = len(block_pieces(geom.tokens_per_window, cfg.block_m))
    groups = window_groups(num_windows, pieces * call.heads, q.device)
    triton_kernels._window_attn_fwd_kernel[(pieces, call.heads, groups)](
        q,
        call.k,
        call.v,
        out,
        lse,
        *_operands(call, configs),
        call.scale * LOG2E,
        **_kernel_constants(geom, q.dtype, **_present(call)),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_D=dot_block(call.head_dim),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out, lse


def _triton_backward(
    call: WindowAttentionCall,
    grad_out: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    need_table_grad: bool,
    need_pad_grad: bool,
    grad_qkv: torch.Tensor | None,
):
    """Backward A (dq, delta), A2 (dS sums per window group, or per head with ``dbias_sum="owner"``), B (dk,
    dv, pad sums per program), C (the fixed-order reductions of the partials)."""
    call = _same_strides(call)
    q, k, v, geom, scale = call.q, call.k, call.v, call.geom, call.scale
    heads, head_dim = call.heads, call.head_dim
    n, num_windows = geom.tokens_per_window, q.shape[0] * geom.num_windows
    grad_out = grad_out.contiguous()
    delta = torch.empty(q.shape[:5], dtype=torch.float32, device=q.device)  # written by backward A
    if grad_qkv is None:
        dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    else:
        dq, dk, dv = grad_qkv.unbind(-3)
    configs = _launch_configs(q, geom)
    need_table_grad = need_table_grad and call.table is not None
    need_pad_grad = need_pad_grad and (call.pad_k is not None or call.pad_v is not None)
    dummy = q.new_empty(0)
    operands = _operands(call, configs)
    grads = (dq.stride(3), dq.stride(4), scale)  # gradient rows: elements per token, per head
    constants = _kernel_constants(geom, q.dtype, **_present(call))
    block_d = dot_block(head_dim)

    def launch(kernel, cfg, grid, *args, **extra):
        kernel[grid](
            *args,
            **constants,
            **extra,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_D=block_d,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )

    cfg = configs.dq
    pieces = len(block_pieces(n, cfg.block_m))
    launch(
        triton_kernels._window_attn_bwd_dq_kernel,
        cfg,
        (pieces, heads, window_groups(num_windows, pieces * heads, q.device)),
        q,
        k,
        v,
        out,
        grad_out,
        lse,
        delta,
        dq,
        *operands,
        *grads,
        scale * LOG2E,
    )
    dbias = dummy
    if need_table_grad:
        cfg = configs.dbias
        pieces = len(block_pieces(n, cfg.block_m)) * len(block_pieces(n, cfg.block_n))
        # "owner": one group, each program sums its tile over every window into the final per-head sums
        groups = (
            1 if configs.dbias_sum == "owner" else window_groups(num_windows, pieces * heads, q.device, cfg.group_mult)
        )
        dbias = torch.empty((groups, heads, padded_tokens(n), padded_tokens(n)), dtype=torch.float32, device=q.device)
        launch(
            triton_kernels._window_attn_bwd_dbias_kernel,
            cfg,
            (pieces, heads, groups),
            q,
            k,
            v,
            grad_out,
            lse,
            delta,
            dbias,
            *operands,
            scale * LOG2E,
        )
    cfg = configs.dkdv
    pieces = len(block_pieces(n, cfg.block_n))
    groups = window_groups(num_windows, pieces * heads, q.device)
    dpad = (
        torch.empty((groups * pieces, 2, heads, head_dim), dtype=torch.float32, device=q.device)
        if need_pad_grad
        else dummy
    )
    launch(
        triton_kernels._window_attn_bwd_dkdv_kernel,
        cfg,
        (pieces, heads, groups),
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        dk,
        dv,
        dpad,
        *operands,
        *grads,
        scale * LOG2E,
        NEED_DPAD=need_pad_grad,
    )
    return (
        dq,
        dk,
        dv,
        *_triton_reduce(dbias, dpad, geom, heads, head_dim, need_table_grad, need_pad_grad, configs.reduce_stages),
    )


def _reduce_blocks(table_size: int, tokens_per_window: int) -> tuple[int, int, int]:
    """(BLOCK_E, BLOCK_M) of backward C and BLOCK_S of its first stage (at most one head's ``Np**2`` sums);
    the interpreter takes whole tables, windows and sums."""
    sums = padded_tokens(tokens_per_window) ** 2
    if triton_interpreting():
        return dot_block(table_size), dot_block(tokens_per_window), sums
    return (*REDUCE_BLOCKS, min(DSUM_BLOCK, sums))


def _triton_reduce(
    dbias,
    dpad,
    geom: WindowGeometry,
    heads: int,
    head_dim: int,
    need_table_grad: bool,
    need_pad_grad: bool,
    stages: int = 1,
):
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
        triton_kernels._window_attn_bwd_dsum_kernel[(dbias[0, 0].numel() // block_s, heads)](
            dbias, dsum, dbias.shape[0], heads, N=geom.tokens_per_window, BLOCK_S=block_s, num_warps=4
        )
        dbias = dsum
    table_blocks = triton.cdiv(geom.table_size, block_e) if need_table_grad else 0
    dtable = (
        torch.empty((geom.table_size, heads), dtype=torch.float32, device=dummy.device) if need_table_grad else dummy
    )
    dpad_k, dpad_v = (
        torch.empty((heads, head_dim), dtype=torch.float32, device=dummy.device) if need_pad_grad else dummy
        for _ in range(2)
    )
    triton_kernels._window_attn_bwd_reduce_kernel[(table_blocks + need_pad_grad, heads)](
        dbias,
        dtable,
        dpad,
        dpad_k,
        dpad_v,
        dbias.shape[0] if need_table_grad else 0,
        dpad.shape[0] if need_pad_grad else 0,
        heads,
        head_dim,
        **_reduce_constants(geom),
        NEED_DTABLE=need_table_grad,
        NEED_DPAD=need_pad_grad,
        BLOCK_E=block_e,
        BLOCK_M=block_m,
        BLOCK_D=dot_block(head_dim),
        num_warps=4,
    )
    return (dtable if need_table_grad else None, *((dpad_k, dpad_v) if need_pad_grad else (None, None)))
