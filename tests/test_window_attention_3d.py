"""window_attention_3d / WindowAttention3D: reference semantics, Triton kernels (interpreter on CPU),
custom-op registration, module compatibility and input errors. GPU tests run only with a GPU."""

from __future__ import annotations

import copy
import functools
import json
import math
import types
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_close, assert_within_twice_low_precision_error, upcast
from torch.utils.checkpoint import checkpoint
from video_swin_oracle import (
    video_swin_block_attention,
    video_swin_relative_position_index,
    video_swin_window_attention,
)

import ssltm_kernels
import ssltm_kernels.ops.window_attention_3d as op
from ssltm_kernels import BackendUnavailableError, WindowAttention3D, window_attention_3d, window_attention_3d_reference
from ssltm_kernels.ops.window_attention_3d import relative_position_index, window_attention_3d_windows, window_geometry


def table_size(window):
    return math.prod(2 * w - 1 for w in window)


def make_inputs(batch, sizes, heads, head_dim, window, dtype=torch.float32, device="cpu", seed=0, pads=True):
    """q, k, v as strided views of one (B, T, H, W, 3, heads, hd) projection, a bias table, pad rows."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, *sizes, 3, heads, head_dim, generator=gen).to(device, dtype).requires_grad_()
    table = (0.5 * torch.randn(table_size(window), heads, generator=gen)).to(device).requires_grad_()
    pad_k = pad_v = None
    if pads:
        pad_k = torch.randn(heads, head_dim, generator=gen).to(device, dtype).requires_grad_()
        pad_v = torch.randn(heads, head_dim, generator=gen).to(device, dtype).requires_grad_()
    return qkv, table, pad_k, pad_v


def run(fn, qkv, table, pad_k, pad_v, grad_seed=1, **kwargs):
    """Forward + backward; returns the output and the gradients of every input that has one."""
    q, k, v = qkv.unbind(-3)
    out = fn(q, k, v, rel_pos_bias_table=table, pad_k=pad_k, pad_v=pad_v, **kwargs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out)
    leaves = [x for x in (qkv, table, pad_k, pad_v) if x is not None]
    return out, torch.autograd.grad(out, leaves, grad)


def attend_windows(qkv, table, **kwargs):
    """``window_attention_3d_windows`` on a (B*nW, N, 3, heads, hd) projection, and the gradients of qkv and
    the table for the loss sum(out**2)."""
    out = window_attention_3d_windows(*qkv.unbind(2), rel_pos_bias_table=table, **kwargs)
    return out, torch.autograd.grad(out.float().square().sum(), (qkv, table))


# ------------------------------------------------------------------------------------------------------
# Reference semantics
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [(0, 0, 0), (1, 1, 2)])
def test_reference_gradcheck_float64(shift):
    qkv, table, pad_k, pad_v = upcast(make_inputs(1, (3, 4, 5), 2, 3, (2, 3, 3)))

    def f(qkv, table, pad_k, pad_v):
        q, k, v = qkv.unbind(-3)
        return window_attention_3d_reference(
            q, k, v, window_size=(2, 3, 3), shift_size=shift, rel_pos_bias_table=table, pad_k=pad_k, pad_v=pad_v
        )

    assert torch.autograd.gradcheck(f, (qkv, table, pad_k, pad_v))


def test_relative_position_index_matches_video_swin_buffer():
    for window in [(4, 7, 7), (2, 3, 5), (1, 1, 1)]:
        assert torch.equal(relative_position_index(window), video_swin_relative_position_index(window))


@pytest.mark.parametrize(
    "sizes, window, shift",
    [
        ((5, 13, 9), (2, 3, 3), (0, 0, 0)),  # padding on every axis
        ((5, 13, 9), (2, 3, 3), (1, 1, 2)),  # padding + shift
        ((4, 7, 10), (4, 7, 7), (2, 3, 3)),  # axes equal to the window: their shift is dropped
        ((2, 5, 9), (4, 7, 7), (2, 3, 3)),  # axes smaller than the window: shrink + index[:N, :N]
    ],
)
def test_module_volume_path_matches_video_swin_block(sizes, window, shift):
    torch.manual_seed(0)
    module = WindowAttention3D(16, window, num_heads=2, qkv_bias=True).double()
    with torch.no_grad():
        module.relative_position_bias_table.normal_(std=0.5)
        module.qkv.bias.normal_()
    x = torch.randn(2, *sizes, 16, dtype=torch.float64)
    expected = video_swin_block_attention(x, module, window, shift)
    module.backend = "reference"
    assert_close(module(x, shift_size=shift), expected, 1e-9, "reference backend vs Video Swin")
    fused = copy.deepcopy(module).float()
    fused.backend = "triton"
    assert_close(fused(x.float(), shift_size=shift), expected, 2e-5, "triton backend vs Video Swin")


def test_module_window_batch_path_is_video_swin_window_attention():
    torch.manual_seed(0)
    window = (2, 3, 3)
    module = WindowAttention3D(12, window, num_heads=3, qkv_bias=True).double()
    index = video_swin_relative_position_index(window)
    for n in (18, 12):  # a full window and a temporally shrunk one
        x = torch.randn(8, n, 12, dtype=torch.float64)
        mask = torch.where(torch.rand(4, n, n) > 0.7, -100.0, 0.0).double()
        expected = video_swin_window_attention(
            x, module.qkv, module.proj, module.relative_position_bias_table, index, 3, module.scale, mask
        )
        assert_close(module(x, mask), expected, 1e-9, f"window batch N={n}")


@pytest.mark.parametrize("shift", [(0, 0, 0), (1, 1, 1)])
def test_window_batch_path_equals_volume_path_triton(shift):
    from video_swin_oracle import compute_mask, window_partition, window_reverse

    torch.manual_seed(0)
    window = (2, 3, 3)
    module = WindowAttention3D(8, window, num_heads=2, backend="triton")
    x = torch.randn(2, 4, 6, 6, 8)
    volume = module(x, shift_size=shift)
    shifted = torch.roll(x, tuple(-s for s in shift), (1, 2, 3))
    mask = compute_mask(4, 6, 6, window, shift, x.device) if any(shift) else None
    windows = module(window_partition(shifted, window), mask)
    from_windows = torch.roll(window_reverse(windows.view(-1, *window, 8), window, 2, 4, 6, 6), shift, (1, 2, 3))
    assert_close(volume, from_windows, 1e-5, "volume vs window batches")


def test_rel_pos_mode_exact_uses_true_coordinates():
    """exact mode with a shrunk window equals swin mode on a table re-indexed for the shrunk window;
    swin mode differs from it when a spatial axis shrinks (Video Swin's slicing quirk)."""
    heads, window, sizes = 2, (2, 3, 3), (2, 2, 3)  # H shrinks 3 -> 2
    qkv, table, _, _ = upcast(make_inputs(1, sizes, heads, 4, window, pads=False))
    q, k, v = qkv.unbind(-3)
    shrunk = window_geometry(sizes, window).window
    deltas = torch.stack(torch.meshgrid(*[torch.arange(-w + 1, w) for w in shrunk], indexing="ij")).reshape(3, -1)
    full_idx = (
        (deltas[0] + window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1)
        + (deltas[1] + window[1] - 1) * (2 * window[2] - 1)
        + deltas[2]
        + window[2]
        - 1
    )
    shrunk_table = table[full_idx]
    exact = window_attention_3d_reference(q, k, v, window_size=window, rel_pos_bias_table=table, rel_pos_mode="exact")
    expected = window_attention_3d_reference(q, k, v, window_size=shrunk, rel_pos_bias_table=shrunk_table)
    swin = window_attention_3d_reference(q, k, v, window_size=window, rel_pos_bias_table=table)
    assert_close(exact, expected, 1e-12, "exact mode")
    assert (swin - exact).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU) against the reference: forward and every gradient
# ------------------------------------------------------------------------------------------------------
TRITON_CASES = [
    # batch, (T, H, W), heads, head_dim, window, shift, rel_pos_mode
    pytest.param(1, (5, 13, 9), 2, 32, (4, 7, 7), (0, 0, 0), "swin", id="ssltm-window-pad-all-axes"),
    pytest.param(1, (5, 13, 9), 2, 32, (4, 7, 7), (2, 3, 3), "swin", id="ssltm-window-pad-all-axes-shift"),
    pytest.param(2, (3, 7, 5), 2, 8, (2, 3, 3), (1, 1, 2), "swin", id="small-window-many-windows-shift"),
    pytest.param(1, (4, 7, 9), 1, 16, (4, 7, 7), (2, 3, 3), "swin", id="window-equal-axes-shift"),
    pytest.param(2, (2, 5, 9), 2, 16, (4, 7, 7), (2, 3, 3), "swin", id="window-smaller-axes-swin"),
    pytest.param(2, (2, 5, 9), 2, 16, (4, 7, 7), (2, 3, 3), "exact", id="window-smaller-axes-exact"),
    pytest.param(1, (3, 4, 5), 3, 12, (2, 3, 3), (1, 2, 1), "swin", id="head-dim-not-power-of-two"),
]


@pytest.mark.parametrize("batch, sizes, heads, head_dim, window, shift, mode", TRITON_CASES)
def test_triton_matches_reference_fp32(batch, sizes, heads, head_dim, window, shift, mode):
    inputs = make_inputs(batch, sizes, heads, head_dim, window)
    kw = dict(window_size=window, shift_size=shift, rel_pos_mode=mode)
    out, grads = run(window_attention_3d, *inputs, backend="triton", **kw)
    ref_out, ref_grads = run(window_attention_3d_reference, *upcast(inputs), **kw)
    assert out.dtype == torch.float32 and out.shape == (batch, *sizes, heads, head_dim)
    assert_close(out, ref_out, 2e-5, "out")
    for name, g, r in zip(("dqkv", "dtable", "dpad_k", "dpad_v"), grads, ref_grads, strict=True):
        assert_close(g, r, 5e-5 * max(1.0, r.abs().max().item()), name)


# Every launch configuration a GPU sweep may ship (each kernel's set, op.sweep_configs) on windows that take
# several blocks and 16-granular tails: 70 tokens (2x5x7) padded on every axis and shifted, and a spatially
# shrunk window (H = 4 < 5: 56 tokens, whose bias coordinates decode by the full window in "swin" mode)
CONFIG_CASES = [
    pytest.param(1, (3, 6, 9), 1, 16, (2, 5, 7), (1, 2, 3), "swin", id="pad-all-axes-shift"),
    pytest.param(1, (3, 4, 9), 2, 16, (2, 5, 7), (1, 2, 3), "swin", id="shrunk-swin-shift"),
]


@pytest.mark.parametrize("index", range(len(op.sweep_configs())))
def test_every_shipped_config_matches_reference_fp32(index):
    """Each configuration (query/key blocks of 32, 64 or 128 over 56- and 70-token windows: whole blocks,
    tail pieces, a block wider than the window, several window groups) in the interpreter, forward and every
    gradient against the float64 reference."""
    for case in CONFIG_CASES:
        batch, sizes, heads, head_dim, window, shift, mode = case.values
        inputs = make_inputs(batch, sizes, heads, head_dim, window)
        kw = dict(window_size=window, shift_size=shift, rel_pos_mode=mode)
        with op.forced_launch_configs(op.sweep_configs()[index]):
            out, grads = run(window_attention_3d, *inputs, backend="triton", **kw)
        ref_out, ref_grads = run(window_attention_3d_reference, *upcast(inputs), **kw)
        assert_close(out, ref_out, 2e-5, f"out {case.id}")
        for name, g, r in zip(("dqkv", "dtable", "dpad_k", "dpad_v"), grads, ref_grads, strict=True):
            assert_close(g, r, 5e-5 * max(1.0, r.abs().max().item()), f"{name} {case.id}")


@pytest.mark.parametrize("index", range(len(op.sweep_configs())))
def test_every_shipped_config_matches_reference_fp16(index):
    """Each configuration in fp16 (the interpreter has no bf16 dot) on the shrunk, shifted window in
    "exact" mode: within twice the fp16 reference's own error of the fp32 reference."""
    batch, sizes, heads, head_dim, window, shift, _ = CONFIG_CASES[1].values
    inputs = make_inputs(batch, sizes, heads, head_dim, window, dtype=torch.float16)
    kw = dict(window_size=window, shift_size=shift, rel_pos_mode="exact")
    with op.forced_launch_configs(op.sweep_configs()[index]):
        out, grads = run(window_attention_3d, *inputs, backend="triton", **kw)
    low_out, low_grads = run(window_attention_3d_reference, *inputs, **kw)
    fp32 = tuple(x.detach().float().requires_grad_() for x in inputs)
    ref_out, ref_grads = run(window_attention_3d_reference, *fp32, **kw)
    assert out.dtype == torch.float16
    assert_within_twice_low_precision_error(
        ("out", "dqkv", "dtable", "dpad_k", "dpad_v"),
        (out, *grads),
        (low_out, *low_grads),
        (ref_out, *ref_grads),
        torch.float16,
        "fp16",
    )


def test_block_pieces_cover_the_window_in_16_granular_tails():
    assert op.block_pieces(196, 64) == ((0, 64), (64, 64), (128, 64), (192, 16))  # 208 rows, not 256
    assert op.block_pieces(196, 32) == (*((i * 32, 32) for i in range(6)), (192, 16))
    assert op.block_pieces(98, 64) == ((0, 64), (64, 32), (96, 16))  # the rest, 34 -> 48 = 32 + 16
    assert op.block_pieces(60, 64) == ((0, 64),)  # one block, past the window
    assert op.block_pieces(18, 128) == ((0, 32),)
    assert op.block_pieces(196, op.WHOLE_WINDOW_BLOCK) == ((0, 256),)  # the interpreter's whole windows
    for tokens in (1, 15, 16, 17, 70, 196, 392, 1024):
        for block in (16, 32, 64, 128):
            pieces = op.block_pieces(tokens, block)
            assert sum(width for _, width in pieces) == -(-tokens // 16) * 16 <= op.padded_tokens(tokens)
            assert all(start == prev + width for (prev, width), (start, _) in zip(pieces, pieces[1:], strict=False))
            assert all(width <= block and width & (width - 1) == 0 for _, width in pieces)


@pytest.mark.parametrize("sizes, mode", [((4, 7, 7), "swin"), ((2, 4, 7), "swin"), ((2, 4, 7), "exact")])
def test_dense_bias_is_the_reference_bias_over_the_scale(sizes, mode):
    """The call's dense bias: the reference's table gather by the op's relative_position_index (both modes,
    shrunk windows) over the scale (the kernels start the scaled product at it), zero-padded to 16-granular
    rows and keys."""
    window, heads = (4, 7, 7), 3
    table = torch.randn(table_size(window), heads, dtype=torch.float64)
    geom = window_geometry(sizes, window, rel_pos_mode=mode)
    n = geom.tokens_per_window
    bias = op.dense_bias(table, geom, 0.25)
    index = relative_position_index(window, n, geom.bias_window)
    expected = table[index.reshape(-1)].reshape(n, n, heads).permute(2, 0, 1).float() / 0.25
    assert bias.shape == (heads, op.padded_tokens(n), op.padded_tokens(n)) and bias.dtype == torch.float32
    assert torch.equal(bias[:, :n, :n], expected)
    assert not bias[:, n:].any() and not bias[:, :, n:].any()
    assert torch.equal(op.dense_bias(table, geom, 0.25, torch.float16), bias.half())  # bias_dtype="input"


@pytest.mark.parametrize(
    "batch, sizes, heads, head_dim, window, shift, mode", [TRITON_CASES[1], TRITON_CASES[2], TRITON_CASES[4]]
)
def test_triton_matches_reference_fp16(batch, sizes, heads, head_dim, window, shift, mode):
    """Kernel error vs the fp32 reference is at most 2x the fp16 reference's own error."""
    inputs = make_inputs(batch, sizes, heads, head_dim, window, dtype=torch.float16)
    kw = dict(window_size=window, shift_size=shift, rel_pos_mode=mode)
    out, grads = run(window_attention_3d, *inputs, backend="triton", **kw)
    low_out, low_grads = run(window_attention_3d_reference, *inputs, **kw)
    fp32 = tuple(None if x is None else x.detach().float().requires_grad_() for x in inputs)
    ref_out, ref_grads = run(window_attention_3d_reference, *fp32, **kw)
    assert out.dtype == torch.float16
    for name, g, low, r in zip(
        ("out", "dqkv", "dtable", "dpad_k", "dpad_v"),
        (out, *grads),
        (low_out, *low_grads),
        (ref_out, *ref_grads),
        strict=True,
    ):
        low_err = (low.float() - r).abs().max().item()
        assert_close(g.float(), r, 2 * low_err + 1e-6 * r.abs().max().item(), f"{name} (fp16 ref err {low_err:.2e})")


def test_triton_backward_is_deterministic_and_skips_unneeded_grads():
    inputs = make_inputs(1, (3, 5, 4), 2, 8, (2, 3, 3))
    kw = dict(window_size=(2, 3, 3), shift_size=(1, 1, 1), backend="triton")
    first = run(window_attention_3d, *inputs, **kw)[1]
    second = run(window_attention_3d, *inputs, **kw)[1]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    # GPU blocks (query and key pieces, three window groups of unequal sizes): still bit-identical
    blocked = make_inputs(*CONFIG_CASES[0].values[:5])
    blocked_kw = dict(window_size=CONFIG_CASES[0].values[4], shift_size=CONFIG_CASES[0].values[5], backend="triton")
    with op.forced_launch_configs(op.default_configs(70, 16)):
        runs = [run(window_attention_3d, *blocked, **blocked_kw)[1] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    qkv, table, _, _ = inputs
    q, k, v = qkv.unbind(-3)
    out = window_attention_3d(q, k, v, rel_pos_bias_table=table.detach(), window_size=(2, 3, 3), backend="triton")
    (dqkv,) = torch.autograd.grad(out.sum(), qkv)
    ref = window_attention_3d_reference(q, k, v, rel_pos_bias_table=table.detach(), window_size=(2, 3, 3))
    assert_close(dqkv, torch.autograd.grad(ref.sum(), qkv)[0], 5e-5, "dqkv without table grad")


@pytest.mark.parametrize("packed", [False, True], ids=["qkv", "qkvpacked"])
def test_triton_backward_under_activation_checkpointing(packed):
    """Non-reentrant ``torch.utils.checkpoint`` lets a backward unpack each saved tensor once (the op reads them
    once), and the recomputed forward gives the gradients of the plain one, bit for bit."""
    inputs = make_inputs(1, (3, 5, 4), 2, 8, (2, 3, 3))
    kw = dict(window_size=(2, 3, 3), shift_size=(1, 1, 1), backend="triton")

    def attention(q, k, v, **kwargs):
        if packed:
            return op.window_attention_3d_qkvpacked(torch.stack((q, k, v), dim=-3), **kwargs)
        return window_attention_3d(q, k, v, **kwargs)

    def checkpointed(q, k, v, **kwargs):
        return checkpoint(functools.partial(attention, **kwargs), q, k, v, use_reentrant=False)

    plain = run(attention, *inputs, **kw)
    recomputed = run(checkpointed, *inputs, **kw)
    assert torch.equal(plain[0], recomputed[0])
    assert all(torch.equal(a, b) for a, b in zip(plain[1], recomputed[1], strict=True))


def test_triton_additive_attn_mask_window_batches():
    torch.manual_seed(0)
    window, heads, hd = (2, 2, 3), 2, 8
    qkv = torch.randn(6, 12, 3, heads, hd, requires_grad=True)
    table = torch.randn(table_size(window), heads, requires_grad=True)
    mask = torch.where(torch.rand(3, 12, 12) > 0.6, -100.0, 0.0)
    out, grads = attend_windows(qkv, table, window_size=window, attn_mask=mask, backend="triton")
    ref, ref_grads = attend_windows(qkv, table, window_size=window, attn_mask=mask, backend="reference")
    assert_close(out, ref, 2e-5, "out")
    for name, g, r in zip(("dqkv", "dtable"), grads, ref_grads, strict=True):
        assert_close(g, r, 1e-4, name)


# The kernels' variants (op.VARIANTS), each against the reference on 4 windows: T and H padded and shifted, W
# shrunk to 4 (its shift dropped; "swin" bias coordinates), 40 tokens, head_dim 12 (not a power of 2)
VARIANT_CASE = (1, (3, 6, 4), 2, 12, (2, 5, 7), (1, 2, 3))
VARIANT_CHOICES = [pytest.param({name: choices[1]}, id=f"{name}-{choices[1]}") for name, choices in op.VARIANTS.items()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("variant", VARIANT_CHOICES)
def test_triton_variants_match_reference_and_are_deterministic(variant, dtype, monkeypatch):
    """Each non-default variant with GPU-like blocks (32 rows and keys: a full block and a 16-wide tail;
    backward C in its GPU blocks, its first stage over several programs) and three window groups of unequal
    sizes: forward and every gradient (qkv, bias table, pad rows) against the float64 reference (fp32) or
    within twice the fp16 reference's own error (fp16), and a second backward bit-identical."""
    batch, sizes, heads, head_dim, window, shift = VARIANT_CASE
    inputs = make_inputs(batch, sizes, heads, head_dim, window, dtype=dtype)
    kw = dict(window_size=window, shift_size=shift)
    monkeypatch.setattr(
        op.launch,
        "_reduce_blocks",
        lambda table_size, tokens: (*op.REDUCE_BLOCKS, min(op.DSUM_BLOCK, op.padded_tokens(tokens) ** 2) // 2),
    )
    configs = replace(op.LaunchConfigs(*(op.KernelConfig(32, 32, 4, 1) for _ in op.KERNELS)), **variant)
    with op.forced_launch_configs(configs):
        out, grads = run(window_attention_3d, *inputs, backend="triton", **kw)
        again = run(window_attention_3d, *inputs, backend="triton", **kw)
    assert all(torch.equal(a, b) for a, b in zip((out, *grads), (again[0], *again[1]), strict=True))
    names = ("out", "dqkv", "dtable", "dpad_k", "dpad_v")
    ref_out, ref_grads = run(window_attention_3d_reference, *upcast(inputs), **kw)
    if dtype == torch.float32:
        assert_close(out, ref_out, 2e-5, "out")
        for name, g, r in zip(names[1:], grads, ref_grads, strict=True):
            assert_close(g, r, 5e-5 * max(1.0, r.abs().max().item()), name)
    else:
        assert out.dtype == torch.float16
        low_out, low_grads = run(window_attention_3d_reference, *inputs, **kw)
        assert_within_twice_low_precision_error(
            names, (out, *grads), (low_out, *low_grads), (ref_out, *ref_grads), dtype, str(variant)
        )


def test_launch_config_variants_validate_and_round_trip_the_config_file(tmp_path, monkeypatch):
    """The variants are fields of the launch configurations: checked, written to and read from the config file
    (a record written before they existed takes the defaults), kept by the dispatch's stage fitting, and each
    choice is in the configurations a GPU sweep may ship (the first: the defaults)."""
    defaults = op.default_configs(196, 32)
    chosen = replace(defaults, bias_dtype="input", dbias_sum="owner", reduce_stages=2)
    assert chosen.variant_label == "bias_dtype=input dbias_sum=owner reduce_stages=2" and defaults.variant_label == ""
    assert op.LaunchConfigs.from_json(json.loads(json.dumps(chosen.to_json()))) == chosen
    older = {name: record for name, record in chosen.to_json().items() if name in op.KERNELS}
    assert op.LaunchConfigs.from_json(older) == defaults
    for name, bad in (("bias_dtype", "float16"), ("dbias_sum", "atomics"), ("reduce_stages", 3)):
        with pytest.raises(ValueError, match=f"{name} must be one of"):
            replace(defaults, **{name: bad})
    assert op.sweep_configs()[0] == defaults
    for name, choices in op.VARIANTS.items():
        assert {getattr(configs, name) for configs in op.sweep_configs()} == set(choices), name
    path = tmp_path / "configs.json"
    key = op.config_key("GPU A", 196, 32, 4, torch.bfloat16, True)
    path.write_text(json.dumps({"configs": {key: chosen.to_json()}}))
    monkeypatch.setattr(op.tuning, "_config_file", lambda read=op.tuning._config_file.__wrapped__: read(path))
    monkeypatch.setattr(op.tuning, "launch_configs", op.tuning.launch_configs.__wrapped__)  # uncached
    fitted = op.tuning.launch_configs(196, 32, 4, torch.bfloat16, True, "GPU A", shared_memory=99 * 1024)
    assert (fitted.bias_dtype, fitted.dbias_sum, fitted.reduce_stages) == ("input", "owner", 2)


def test_compile_specs_follow_the_variants():
    """What a launch of each variant compiles: the bias pointer in the input's dtype, backward C's first stage
    (only over groups' partials), and backward C specialised on its one group."""

    def specs(**variant):
        configs = replace(op.default_configs(196, 32), **variant)
        return {
            name: (signature, constexprs)
            for name, _, signature, constexprs, _, _ in op.triton_compile_specs(
                torch.bfloat16, (4, 7, 7), 32, (2, 3, 3), configs=configs
            )
        }

    attention = (
        "_window_attn_fwd_kernel",
        "_window_attn_bwd_dq_kernel",
        "_window_attn_bwd_dbias_kernel",
        "_window_attn_bwd_dkdv_kernel",
    )
    reduce, dsum = "_window_attn_bwd_reduce_kernel", "_window_attn_bwd_dsum_kernel"
    default, bias_input = specs(), specs(bias_dtype="input")
    assert all(default[k][0]["BIAS"] == "*fp32" and bias_input[k][0]["BIAS"] == "*bf16" for k in attention)
    assert dsum not in default and default[reduce][0]["groups"] == "i32"
    two_stage, owner = specs(reduce_stages=2), specs(dbias_sum="owner")
    assert two_stage[dsum][1] == {"N": 196, "BLOCK_S": op.DSUM_BLOCK} and dsum not in owner
    assert two_stage[reduce][1]["groups"] == owner[reduce][1]["groups"] == 1
    assert owner["_window_attn_bwd_dbias_kernel"] == default["_window_attn_bwd_dbias_kernel"]
    assert dsum not in specs(dbias_sum="owner", reduce_stages=2)


# ------------------------------------------------------------------------------------------------------
# torch.library registration and torch.compile
# ------------------------------------------------------------------------------------------------------
def test_opcheck_forward_and_backward_ops():
    qkv, table, pad_k, pad_v = make_inputs(1, (3, 4, 4), 2, 16, (2, 3, 3))
    q, k, v = (x.detach().clone().requires_grad_() for x in qkv.unbind(-3))
    params = ([2, 3, 3], [1, 1, 1], [2, 3, 3], [2, 3, 3], 0.25, "triton")
    torch.library.opcheck(
        torch.ops.ssltm.window_attention_3d_fwd.default, (q, k, v, table, pad_k, pad_v, None, *params)
    )
    out, lse = torch.ops.ssltm.window_attention_3d_fwd(q, k, v, table, pad_k, pad_v, None, *params)
    torch.library.opcheck(
        torch.ops.ssltm.window_attention_3d_bwd.default,
        (
            torch.randn_like(out),
            q.detach(),
            k.detach(),
            v.detach(),
            out.detach(),
            lse,
            table.detach(),
            pad_k.detach(),
            pad_v.detach(),
            None,
            *params,
            True,
            True,
            False,
        ),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_opcheck_qkvpacked_ops():
    qkv, table, pad_k, pad_v = make_inputs(1, (3, 4, 4), 2, 16, (2, 3, 3))
    params = ([2, 3, 3], [1, 1, 1], [2, 3, 3], [2, 3, 3], 0.25, "triton")
    torch.library.opcheck(
        torch.ops.ssltm.window_attention_3d_qkvpacked_fwd.default, (qkv, table, pad_k, pad_v, None, *params)
    )
    out, lse = torch.ops.ssltm.window_attention_3d_qkvpacked_fwd(qkv, table, pad_k, pad_v, None, *params)
    torch.library.opcheck(
        torch.ops.ssltm.window_attention_3d_bwd.default,
        (
            torch.randn_like(out),
            *qkv.detach().unbind(-3),
            out.detach(),
            lse,
            table.detach(),
            pad_k.detach(),
            pad_v.detach(),
            None,
            *params,
            True,
            True,
            True,
        ),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_torch_compile_fullgraph_traces_module():
    torch.manual_seed(0)
    module = WindowAttention3D(16, (2, 3, 3), num_heads=2, qkv_bias=True, backend="triton")
    x = torch.randn(1, 3, 5, 4, 16, requires_grad=True)
    eager = module(x, shift_size=(1, 1, 1))
    compiled = torch.compile(module, fullgraph=True)
    out = compiled(x, shift_size=(1, 1, 1))
    assert_close(out, eager, 1e-6, "compiled vs eager")
    (gx,) = torch.autograd.grad(out.sum(), x)
    (gx_eager,) = torch.autograd.grad(eager.sum(), x)
    assert_close(gx, gx_eager, 1e-6, "compiled grad")


# ------------------------------------------------------------------------------------------------------
# Module compatibility
# ------------------------------------------------------------------------------------------------------
def test_state_dict_loads_video_swin_and_torchvision_keys():
    window, dim, heads = (2, 7, 7), 32, 4
    n = math.prod(window)
    video_swin = {
        "qkv.weight": torch.randn(3 * dim, dim),
        "qkv.bias": torch.randn(3 * dim),
        "proj.weight": torch.randn(dim, dim),
        "proj.bias": torch.randn(dim),
        "relative_position_bias_table": torch.randn(table_size(window), heads),
        "relative_position_index": video_swin_relative_position_index(window),
    }
    module = WindowAttention3D(dim, window, heads, qkv_bias=True)
    assert set(module.state_dict()) == set(video_swin)
    module.load_state_dict(video_swin, strict=True)
    assert torch.equal(module.relative_position_bias_table, video_swin["relative_position_bias_table"])
    torchvision_layout = dict(video_swin, relative_position_index=video_swin["relative_position_index"].flatten())
    module.load_state_dict(torchvision_layout, strict=True)
    assert module.relative_position_index.shape == (n, n)
    wrong = dict(video_swin, relative_position_index=video_swin["relative_position_index"].flip(0))
    with pytest.raises(ValueError, match="relative_position_index"):
        module.load_state_dict(wrong)


def test_module_defaults_match_video_swin():
    module = WindowAttention3D(64, (4, 7, 7), 2)
    assert module.qkv.bias is None and module.proj.bias is not None
    assert module.scale == 32**-0.5
    assert module.attn_drop.p == 0.0 and module.proj_drop.p == 0.0
    assert module.relative_position_bias_table.shape == (7 * 13 * 13, 2)
    assert WindowAttention3D(64, (4, 7, 7), 2, qk_scale=0.5).scale == 0.5


def test_attention_dropout_in_training_uses_reference_and_eval_is_deterministic(monkeypatch):
    torch.manual_seed(0)
    module = WindowAttention3D(8, (2, 2, 2), 2, attn_drop=0.5)
    x = torch.randn(1, 2, 3, 3, 8)
    module.train()
    monkeypatch.setattr(op, "_DROPOUT_WARNED", False)
    with pytest.warns(UserWarning, match=r"dropout_p=0.5\) is not fused in the kernels; it runs in the PyTorch"):
        first = module(x)  # the Triton kernels could run this input: the slow path is announced ...
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = module(x)  # ... once
        monkeypatch.setattr(op, "_DROPOUT_WARNED", False)
        module.backend = "reference"
        module(x)  # a forced reference is no surprise: no warning
        module.backend = None
    assert not torch.equal(first, second)
    module.eval()
    assert torch.equal(module(x), module(x))
    module.train()
    module.backend = "triton"
    with pytest.raises(BackendUnavailableError, match="dropout"):
        module(x)


# ------------------------------------------------------------------------------------------------------
# Drop-in for torchvision's Video Swin (ShiftedWindowAttention3d carries its shift)
# ------------------------------------------------------------------------------------------------------
def _swap(model, backend):
    """Every attention of ``model`` swapped in place; the same parameters, state_dict keys and shifts."""
    from torchvision.models.video.swin_transformer import ShiftedWindowAttention3d as TorchvisionAttention

    originals = [m for m in model.modules() if isinstance(m, TorchvisionAttention)]
    keys, params = model.state_dict().keys(), list(model.parameters())
    assert ssltm_kernels.replace_torchvision_attention(model, backend=backend) is model
    swapped = [m for m in model.modules() if isinstance(m, ssltm_kernels.ShiftedWindowAttention3d)]
    assert len(swapped) == len(originals) > 0
    assert not any(isinstance(m, TorchvisionAttention) for m in model.modules())
    assert [m.shift_size for m in swapped] == [tuple(m.shift_size) for m in originals]
    assert model.state_dict().keys() == keys
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))


def test_swin3d_t_with_every_attention_swapped_matches_torchvision_float64():
    """(1, 3, 2, 64, 64) gives 16x16 then 8x8 tokens in one frame: shifted windows over padded volumes in the
    first two stages (7x7 windows, shift 3), windows shrunk to the volume (shift dropped) on every axis after."""
    from torchvision.models.video import swin3d_t

    torch.manual_seed(0)
    model = swin3d_t(weights=None).double().eval()
    x = torch.randn(1, 3, 2, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        _swap(model, "reference")
        got = model(x)
    assert expected.shape == (1, 400)
    assert_close(got, expected, 1e-10, "swin3d_t logits")


def test_video_swin_with_every_attention_swapped_matches_torchvision_fp32_triton():
    """A small torchvision SwinTransformer3d whose (3, 5, 5) tokens shift and pad on every axis of a (2, 3, 3)
    window, attention by the Triton kernels in fp32: within twice torchvision's own fp32 error."""
    from torchvision.models.video.swin_transformer import SwinTransformer3d

    torch.manual_seed(0)
    model = SwinTransformer3d(
        patch_size=[2, 4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[2, 3, 3], num_classes=5
    ).eval()
    x = torch.randn(1, 3, 6, 20, 20)
    with torch.no_grad():
        exact, low = copy.deepcopy(model).double()(x.double()), model(x)
        _swap(model, "triton")
        assert_within_twice_low_precision_error(
            ("logits",), (model(x),), (low,), (exact,), torch.float32, "triton drop-in"
        )


def test_torchvision_drop_in_constructor_and_errors():
    from torchvision.models.video.swin_transformer import ShiftedWindowAttention3d as TorchvisionAttention

    torch.manual_seed(0)
    theirs = TorchvisionAttention(16, [2, 3, 3], [1, 1, 1], 2, proj_bias=False, attention_dropout=0.1, dropout=0.2)
    ours = ssltm_kernels.ShiftedWindowAttention3d(
        16, [2, 3, 3], [1, 1, 1], 2, proj_bias=False, attention_dropout=0.1, dropout=0.2
    )
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    assert (ours.attention_dropout, ours.dropout) == (0.1, 0.2)
    x = torch.randn(2, 3, 5, 4, 16)
    assert_close(ours.eval()(x), theirs.eval()(x), 1e-5, "module")
    with pytest.raises(ValueError, match=r"shift_size must satisfy .* \(1, 3, 1\)"):
        ssltm_kernels.ShiftedWindowAttention3d(16, [2, 3, 3], [1, 3, 1], 2)
    with pytest.raises(ValueError, match=r"x must be \(B, T, H, W, 16\) volumes"):
        ours(torch.randn(4, 18, 16))
    with pytest.raises(ValueError, match="holds no torchvision ShiftedWindowAttention3d"):
        ssltm_kernels.replace_torchvision_attention(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# ------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------
def _qkv(shape=(1, 2, 3, 3, 2, 4), dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: a.update(q=a["q"][0]), ValueError, r"q must be 6-D .*\(2, 3, 3, 2, 4\)"),
        (lambda a: a.update(k=a["k"][..., :3]), ValueError, r"k must have q's shape"),
        (lambda a: a.update(v=a["v"].double()), TypeError, r"v must have q's dtype"),
        (lambda a: a.update(k=a["k"].to("meta")), ValueError, r"k must be on q's device"),
        (lambda a: a.update(q=torch.zeros(0, 2, 3, 3, 2, 4)), ValueError, r"k must have q's shape"),
        (
            lambda a: a.update(rel_pos_bias_table=torch.zeros(10, 2)),
            ValueError,
            r"rel_pos_bias_table must have shape \(405, 2\).*got \(10, 2\)",
        ),
        (lambda a: a.update(pad_k=torch.zeros(4, 2)), ValueError, r"pad_k must have shape .*\(2, 4\)"),
        (lambda a: a.update(shift_size=(0, 5, 0)), ValueError, r"shift_size must satisfy"),
        (lambda a: a.update(window_size=(2, 3)), ValueError, r"window_size must be"),
        (lambda a: a.update(rel_pos_mode="approx"), ValueError, r"rel_pos_mode"),
        (lambda a: a.update(attn_mask=torch.zeros(5, 18, 18)), ValueError, r"attn_mask's first dimension 5"),
        (lambda a: a.update(backend="cudnn"), ValueError, r"backend must be one of"),
        (lambda a: a.update(backend="cuda"), BackendUnavailableError, r"backend 'cuda' cannot run: .*"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, error, match):
    q, k, v = _qkv()
    args = dict(q=q, k=k, v=v, window_size=(3, 5, 5))
    mutate(args)
    with pytest.raises(error, match=match):
        window_attention_3d(**args)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), "0.5"])
@pytest.mark.parametrize("fn", ["window_attention_3d", "window_attention_3d_reference", "window_attention_3d_windows"])
def test_non_finite_scale_is_an_error_naming_scale(fn, scale):
    q, k, v = _qkv()
    if fn == "window_attention_3d_windows":
        q, k, v = (x.flatten(1, 3) for x in (q, k, v))
    with pytest.raises(ValueError, match=r"scale must be a finite real number"):
        getattr(op, fn)(q, k, v, window_size=(2, 3, 3), scale=scale)


@pytest.mark.parametrize("window_size", [0, (2, 0, 2), (2, 3, -1)])
def test_window_size_below_one_is_an_error_naming_window_size(window_size):
    q, k, v = _qkv()
    match = r"window_size values must be at least 1"
    with pytest.raises(ValueError, match=match):
        window_attention_3d(q, k, v, window_size=window_size)
    with pytest.raises(ValueError, match=match):
        window_attention_3d_windows(*(x.flatten(1, 3) for x in (q, k, v)), window_size=window_size)
    with pytest.raises(ValueError, match=match):
        WindowAttention3D(8, window_size, 2)
    with pytest.raises(ValueError, match=match):
        ssltm_kernels.ShiftedWindowAttention3d(8, window_size, 0, 2)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.complex64])
def test_attn_mask_of_another_dtype_is_an_error_naming_attn_mask(dtype):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"attn_mask must be a float additive mask or a bool keep-mask"):
        window_attention_3d(q, k, v, window_size=(2, 3, 3), attn_mask=torch.zeros(1, 18, 18, dtype=dtype))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bool_attn_mask_keeps_where_true_like_sdpa(backend):
    """A bool mask is SDPA's keep-mask; a query with no key kept, or with only -inf in a float mask, attends
    as if unmasked (finite) in every backend."""
    torch.manual_seed(0)
    qkv = torch.randn(6, 18, 3, 2, 8)
    keep = torch.rand(3, 18, 18) > 0.5
    keep[:, torch.arange(18), torch.arange(18)] = True  # every query keeps a key ...
    keep[1, 4] = False  # ... but one
    out = window_attention_3d_windows(qkv, window_size=(2, 3, 3), attn_mask=keep, backend=backend)
    q, k, v = (x.transpose(1, 2).unflatten(0, (2, 3)) for x in qkv.unbind(2))  # (B, nW, heads, N, hd)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[None, :, None]).flatten(0, 1).transpose(1, 2)
    partly = torch.ones(6, 18, dtype=torch.bool)
    partly[1::3, 4] = False
    assert_close(out[partly], sdpa[partly], 1e-5, "bool mask vs SDPA")
    unmasked = window_attention_3d_windows(qkv, window_size=(2, 3, 3), backend=backend)
    assert_close(out[~partly], unmasked[~partly], 2e-3, "query with every key masked")
    additive = torch.where(keep, 0.0, -float("inf"))
    assert_close(
        window_attention_3d_windows(qkv, window_size=(2, 3, 3), attn_mask=additive, backend=backend),
        out,
        1e-6,
        "-inf float mask vs bool mask",
    )


def test_empty_and_integer_inputs_raise():
    q = torch.zeros(0, 2, 3, 3, 2, 4)
    with pytest.raises(ValueError, match="must not be empty"):
        window_attention_3d(q, q, q, window_size=(2, 2, 2))
    qi = torch.zeros(1, 2, 3, 3, 2, 4, dtype=torch.int32)
    with pytest.raises(TypeError, match="floating-point"):
        window_attention_3d(qi, qi, qi, window_size=(2, 2, 2))


def test_module_bad_inputs():
    with pytest.raises(ValueError, match=r"dim \(30\) must be divisible by num_heads \(4\)"):
        WindowAttention3D(30, (2, 7, 7), 4)
    module = WindowAttention3D(8, (2, 2, 2), 2)
    with pytest.raises(ValueError, match=r"x must be .* got shape \(2, 8\)"):
        module(torch.randn(2, 8))
    with pytest.raises(ValueError, match="more than window_size"):
        module(torch.randn(3, 9, 8))
    with pytest.raises(ValueError, match="mask applies to window batches"):
        module(torch.randn(1, 2, 2, 2, 8), torch.zeros(1, 8, 8))


def test_scale_zero_runs_outside_the_triton_kernels():
    """The Triton kernels start each product at bias / scale: a zero scale goes to the reference, and forcing
    Triton says why."""
    q, k, v = _qkv()
    table = torch.randn(table_size((2, 2, 2)), 2)
    out = window_attention_3d(q, k, v, window_size=2, rel_pos_bias_table=table, scale=0.0)
    ref = window_attention_3d_reference(q, k, v, window_size=2, rel_pos_bias_table=table, scale=0.0)
    assert_close(out, ref, 0.0, "scale 0")
    with pytest.raises(BackendUnavailableError, match="scale 0"):
        window_attention_3d(q, k, v, window_size=2, rel_pos_bias_table=table, scale=0.0, backend="triton")


def test_env_backend_variable_forces_backend(monkeypatch):
    q, k, v = _qkv()
    monkeypatch.setenv("SSLTM_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        window_attention_3d(q, k, v, window_size=(2, 2, 2))
    monkeypatch.setenv("SSLTM_BACKEND", "reference")
    ref = window_attention_3d(q, k, v, window_size=(2, 2, 2))
    assert_close(ref, window_attention_3d_reference(q, k, v, window_size=(2, 2, 2)), 0.0, "forced reference")


# ------------------------------------------------------------------------------------------------------
# GPU: CUDA and Triton backends in low precision (skipped without a GPU)
# ------------------------------------------------------------------------------------------------------
GPU_CASES = [
    pytest.param(2, (4, 30, 30), 4, 32, (4, 7, 7), (0, 0, 0), id="ssltm-stride16", marks=pytest.mark.gpu_quick),
    pytest.param(2, (5, 13, 9), 2, 32, (4, 7, 7), (2, 3, 3), id="pad-all-axes-shift", marks=pytest.mark.gpu_quick),
    pytest.param(1, (2, 20, 17), 3, 64, (4, 7, 7), (2, 3, 3), id="shrunk-time-hd64"),
    pytest.param(1, (8, 14, 14), 2, 32, (8, 7, 7), (4, 3, 3), id="window-392"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch, sizes, heads, head_dim, window, shift", GPU_CASES)
def test_gpu_backend_matches_fp32_reference(backend, dtype, batch, sizes, heads, head_dim, window, shift):
    inputs = make_inputs(batch, sizes, heads, head_dim, window, dtype=dtype, device="cuda")
    kw = dict(window_size=window, shift_size=shift)
    out, grads = run(window_attention_3d, *inputs, backend=backend, **kw)
    again = run(window_attention_3d, *inputs, backend=backend, **kw)[1]
    assert all(torch.equal(a, b) for a, b in zip(grads, again, strict=True)), "a second backward differs"
    low_out, low_grads = run(window_attention_3d_reference, *inputs, **kw)
    fp32 = tuple(None if x is None else x.detach().float().requires_grad_() for x in inputs)
    ref_out, ref_grads = run(window_attention_3d_reference, *fp32, **kw)
    assert_within_twice_low_precision_error(
        ("out", "dqkv", "dtable", "dpad_k", "dpad_v"),
        (out, *grads),
        (low_out, *low_grads),
        (ref_out, *ref_grads),
        dtype,
        backend,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_cuda_equals_triton(dtype):
    inputs = make_inputs(2, (5, 13, 9), 2, 32, (4, 7, 7), dtype=dtype, device="cuda")
    kw = dict(window_size=(4, 7, 7), shift_size=(2, 3, 3))
    cuda_out, cuda_grads = run(window_attention_3d, *inputs, backend="cuda", **kw)
    triton_out, triton_grads = run(window_attention_3d, *inputs, backend="triton", **kw)
    for name, a, b in zip(
        ("out", "dqkv", "dtable", "dpad_k", "dpad_v"), (cuda_out, *cuda_grads), (triton_out, *triton_grads), strict=True
    ):
        assert_close(a.float(), b.float(), 2e-2 * max(1.0, b.abs().max().item()), f"cuda vs triton {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("index", range(len(op.sweep_configs())))
def test_gpu_every_shipped_config_matches_fp32_reference_and_is_deterministic(index, dtype):
    """Each configuration a GPU sweep may ship, compiled, on SSLTM's shifted windows padded on every axis:
    the 2x-reference-error rule, and a second backward bit-identical (no atomics, fixed-order sums)."""
    inputs = make_inputs(2, (5, 30, 23), 4, 32, (4, 7, 7), dtype=dtype, device="cuda")
    kw = dict(window_size=(4, 7, 7), shift_size=(2, 3, 3))
    with op.forced_launch_configs(op.sweep_configs()[index]):
        out, grads = run(window_attention_3d, *inputs, backend="triton", **kw)
        again = run(window_attention_3d, *inputs, backend="triton", **kw)
    assert all(torch.equal(a, b) for a, b in zip((out, *grads), (again[0], *again[1]), strict=True))
    low_out, low_grads = run(window_attention_3d_reference, *inputs, **kw)
    fp32 = tuple(x.detach().float().requires_grad_() for x in inputs)
    ref_out, ref_grads = run(window_attention_3d_reference, *fp32, **kw)
    assert_within_twice_low_precision_error(
        ("out", "dqkv", "dtable", "dpad_k", "dpad_v"),
        (out, *grads),
        (low_out, *low_grads),
        (ref_out, *ref_grads),
        dtype,
        f"config {index}",
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_largest_triton_windows_launch_and_match_the_reference(dtype):
    """The windows compile_check proves for this device's shared memory (the largest the Triton dispatch
    accepts per head dim, window-batch mask included) launch and follow the 2x-reference-error rule."""
    from ssltm_kernels.ops.window_attention_3d import device_shared_memory, triton_key_tile_limit
    from ssltm_kernels.ops.window_attention_3d.tuning import largest_window_configs

    key_tile_limit = triton_key_tile_limit(device_shared_memory(torch.device("cuda")))
    gen = torch.Generator().manual_seed(0)
    for config_dtype, window, head_dim in largest_window_configs(key_tile_limit):
        if config_dtype != dtype:
            continue
        n, heads = math.prod(window), 2
        qkv = torch.randn(4, n, 3, heads, head_dim, generator=gen).cuda().to(dtype).requires_grad_()
        table = torch.randn(table_size(window), heads, generator=gen).cuda().requires_grad_()
        mask = torch.where(torch.rand(2, n, n, generator=gen) > 0.7, -100.0, 0.0).cuda()
        kw = dict(window_size=window, attn_mask=mask)
        out, grads = attend_windows(qkv, table, backend="triton", **kw)
        low_out, low_grads = attend_windows(qkv, table, backend="reference", **kw)
        ref_out, ref_grads = attend_windows(qkv.detach().float().requires_grad_(), table, backend="reference", **kw)
        assert_within_twice_low_precision_error(
            ("out", "dqkv", "dtable"),
            (out, *grads),
            (low_out, *low_grads),
            (ref_out, *ref_grads),
            dtype,
            f"{window} head_dim {head_dim}",
        )


def test_backend_predicates_take_the_ops_arguments_and_give_reasons():
    from ssltm_kernels.ops.window_attention_3d import can_run_cuda, can_run_reference, can_run_triton

    q, k, v = _qkv()
    assert can_run_triton(q, k, v, window_size=2)  # CPU tensors run Triton under the interpreter (conftest)
    assert can_run_reference(q, k, v, window_size=2, dropout_p=0.1)
    check = can_run_triton(*(x.double() for x in (q, k, v)), window_size=2)
    assert not check and "float64" in check.reason
    with pytest.raises(BackendUnavailableError, match="float64"):
        can_run_triton(*(x.double() for x in (q, k, v)), window_size=(2, 2, 2), raise_error=True)
    with pytest.raises(BackendUnavailableError, match="dropout"):
        can_run_triton(q, k, v, window_size=2, dropout_p=0.1, raise_error=True)
    check = can_run_cuda(q, k, v, window_size=2, shift_size=(1, 1, 1))
    assert not check and check.kernels is None
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run"):
        can_run_cuda(q, k, v, window_size=2, raise_error=True)
    with pytest.raises(ValueError, match="shift_size must satisfy"):  # invalid arguments: the input error
        can_run_reference(q, k, v, window_size=2, shift_size=(0, 5, 0))


@pytest.mark.parametrize(
    "shape, window, dtype, match",
    [
        ((1, 2, 33, 32, 1, 8), (1, 33, 32), torch.float16, "1056 tokens exceeds"),  # a window over 1024 tokens
        ((1, 1, 2, 2, 1, 264), (1, 2, 2), torch.float16, "head_dim 264 exceeds"),
        # (16,7,7) windows of fp32 head_dim 32: 1024 x 32 x 4 B = 128 KB of keys per tile
        ((1, 16, 7, 7, 1, 32), (16, 7, 7), torch.float32, r"784 tokens x head_dim 32 .* 128 KB"),
    ],
)
def test_triton_refuses_windows_beyond_its_tiles_and_dispatch_falls_back(shape, window, dtype, match):
    from ssltm_kernels.ops.window_attention_3d import can_run_triton

    q, k, v = (torch.randn(shape, dtype=dtype) for _ in range(3))
    with pytest.raises(BackendUnavailableError, match=match):
        can_run_triton(q, k, v, window_size=window, raise_error=True)
    out = window_attention_3d(q, k, v, window_size=window)  # automatic dispatch: the reference
    assert_close(out.float(), window_attention_3d_reference(q, k, v, window_size=window).float(), 0.0, "fallback")


def test_largest_triton_window_of_each_dtype_fits_the_tile():
    from ssltm_kernels.ops.window_attention_3d import MAX_TRITON_KEY_TILE_BYTES, key_tile_bytes

    # Video Swin's SSv2 window (16,7,7) with head_dim 32 in 16-bit, (8,7,7) in fp32: the compile check
    # proves these fit sm_90's shared memory
    assert key_tile_bytes(16 * 7 * 7, 32, torch.bfloat16) == MAX_TRITON_KEY_TILE_BYTES
    assert key_tile_bytes(8 * 7 * 7, 32, torch.float32) == MAX_TRITON_KEY_TILE_BYTES


@pytest.mark.parametrize(
    "shared_kb, tile_kb", [(227, 64), (256, 64), (163, 32), (226, 32), (99, 16), (100, 16), (98, 0), (64, 0)]
)
def test_triton_key_tile_limit_follows_the_devices_shared_memory(shared_kb, tile_kb):
    from ssltm_kernels.ops.window_attention_3d import triton_key_tile_limit

    # H100/H200 opt in to 227 KB per block, A100 163 KB, RTX 30xx/40xx 99 KB, Turing 64 KB
    assert triton_key_tile_limit(shared_kb * 1024) == tile_kb * 1024


@pytest.mark.parametrize(
    "shared_kb, window, head_dim, dtype, match",
    [
        (227, (16, 7, 7), 64, torch.bfloat16, r"128 KB padded to powers of 2\) exceed the 64 KB tile .* 227 KB"),
        (163, (8, 7, 7), 64, torch.bfloat16, r"64 KB padded to powers of 2\) exceed the 32 KB tile .* 163 KB"),
        (99, (8, 7, 7), 32, torch.bfloat16, r"32 KB padded to powers of 2\) exceed the 16 KB tile .* 99 KB"),
        (99, (4, 7, 7), 32, torch.float32, r"32 KB padded to powers of 2\) exceed the 16 KB tile"),
        (64, (1, 4, 4), 16, torch.float16, r"64 KB of shared memory per block is below the 99 KB"),
    ],
)
def test_triton_refuses_tiles_beyond_the_devices_limit(monkeypatch, shared_kb, window, head_dim, dtype, match):
    monkeypatch.setattr(op, "device_shared_memory", lambda device: shared_kb * 1024)
    q = torch.randn(1, *window, 1, head_dim, dtype=dtype)
    with pytest.raises(BackendUnavailableError, match=match):
        op.can_run_triton(q, q, q, window_size=window, raise_error=True)
    half_window = (max(1, window[0] // 2), *window[1:])  # half the tile fits, but for the 64 KB device
    half = q[:, : half_window[0]]
    assert bool(op.can_run_triton(half, half, half, window_size=half_window)) == (shared_kb >= 99)


def test_pipeline_stages_follow_the_devices_shared_memory():
    """A configuration's software pipeline keeps as many stages as fit the device (a stage: one iteration's
    loads of the innermost loop, e.g. a key block's keys, values and fp32 bias rows)."""

    def stages(kernel, cfg, head_dim, dtype, shared_kb):
        return op.fit_stages(kernel, cfg, 196, head_dim, dtype, shared_kb * 1024).num_stages

    fwd = op.KernelConfig(64, 64, 4, 3)  # 8 KB of keys and values, 16 KB of bias rows per stage
    assert op.fit_stages("fwd", fwd, 196, 32, torch.bfloat16, 227 * 1024) is fwd
    assert stages("fwd", fwd, 32, torch.bfloat16, 99) == 2
    assert stages("dq", fwd, 32, torch.bfloat16, 99) == 2
    assert stages("fwd", fwd, 256, torch.float32, 99) == 1
    assert stages("dkdv", op.KernelConfig(64, 128, 8, 3), 256, torch.float32, 163) == 1
    assert stages("dbias", op.KernelConfig(64, 64, 8, 3), 256, torch.float32, 227) == 1


def test_launch_configs_take_the_shipped_file_for_the_device_then_any_device_then_defaults(tmp_path, monkeypatch):
    device_cfg = op.LaunchConfigs(*(op.KernelConfig(32, 32, 4, 1) for _ in op.KERNELS))
    any_cfg = op.LaunchConfigs(*(op.KernelConfig(64, 32, 4, 1) for _ in op.KERNELS))
    key = lambda device, shifted=False: op.config_key(device, 196, 32, 4, torch.bfloat16, shifted)
    path = tmp_path / "configs.json"
    path.write_text(json.dumps({"configs": {key("GPU A"): device_cfg.to_json(), key("*"): any_cfg.to_json()}}))
    monkeypatch.setattr(op.tuning, "_config_file", lambda read=op.tuning._config_file.__wrapped__: read(path))
    monkeypatch.setattr(op.tuning, "launch_configs", op.tuning.launch_configs.__wrapped__)  # uncached

    def chosen(device, shifted=False, tokens=196):
        return op.tuning.launch_configs(tokens, 32, 4, torch.bfloat16, shifted, device)

    assert chosen("GPU A") == device_cfg
    assert chosen("GPU B") == any_cfg
    assert chosen("GPU A", shifted=True) == op.default_configs(196, 32)  # other keys: the defaults
    assert chosen("GPU A", tokens=98) == op.default_configs(98, 32)
    assert (
        op.tuning.launch_configs(196, 32, 4, torch.bfloat16, False, "GPU A", interpreting=True)
        == op.INTERPRETER_CONFIGS
    )
    assert op.LaunchConfigs.from_json(json.loads(json.dumps(device_cfg.to_json()))) == device_cfg


def test_shipped_config_file_holds_valid_configurations():
    """The shipped file parses, names known dtypes and backends, and ships SSLTM's 4x7x7 bf16 windows."""
    shipped = op.shipped_configs()
    assert op.config_key("*", 196, 32, 4, torch.bfloat16, True) in shipped
    for key, configs in shipped.items():
        _, tokens, head_dim, heads, dtype, shift = key.split("|")
        assert tokens.startswith("N=") and head_dim.startswith("hd=") and heads.startswith("heads="), key
        assert dtype in ("bfloat16", "float16", "float32") and shift in ("shifted", "unshifted"), key
        assert all(getattr(configs, name).num_warps in (2, 4, 8) for name in op.KERNELS), key
    assert set(op._config_file().get("default_backend", {}).values()) <= {"triton", "cuda"}


def test_triton_comes_first_on_sm_90_until_a_measurement_says_otherwise(monkeypatch, tmp_path):
    props = {}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props["value"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: props["name"])
    gpu = torch.device("cuda", 0)
    for name, (major, minor), first in (("H100", (9, 0), "triton"), ("A100", (8, 0), "cuda"), ("L4", (8, 9), "cuda")):
        props.update(value=types.SimpleNamespace(major=major, minor=minor), name=name)
        assert op.preferred_backend(gpu) == first, name
    path = tmp_path / "configs.json"
    path.write_text(json.dumps({"default_backend": {"H100": "cuda"}}))
    monkeypatch.setattr(op.tuning, "_config_file", lambda read=op.tuning._config_file.__wrapped__: read(path))
    props.update(value=types.SimpleNamespace(major=9, minor=0), name="H100")
    assert op.preferred_backend(gpu) == "cuda"
    assert op.preferred_backend(torch.device("cpu")) == "cuda"


# ------------------------------------------------------------------------------------------------------
# API a Video Swin user expects: int windows, rel_pos_mode on window batches, autocast, packed qkv
# ------------------------------------------------------------------------------------------------------
def test_module_takes_an_int_window_like_video_swin():
    module = WindowAttention3D(96, 7, 3)
    assert module.window_size == (7, 7, 7)
    assert module.relative_position_bias_table.shape == (13**3, 3)
    assert module.relative_position_index.shape == (343, 343)
    out = module(torch.randn(1, 2, 3, 3, 96), shift_size=1)
    assert out.shape == (1, 2, 3, 3, 96) and torch.isfinite(out).all()


def test_window_batches_honour_or_refuse_rel_pos_mode():
    torch.manual_seed(0)
    swin = WindowAttention3D(8, (2, 3, 3), 2)
    exact = copy.deepcopy(swin)
    exact.rel_pos_mode = "exact"
    full = torch.randn(4, 18, 8)
    assert_close(exact(full), swin(full), 0.0, "full windows: both modes agree")
    with pytest.raises(ValueError, match=r"rel_pos_mode='exact' needs the shape of the shrunk window.* 12 tokens"):
        exact(torch.randn(4, 12, 8))
    assert swin(torch.randn(4, 12, 8)).shape == (4, 12, 8)


def test_qkvpacked_backward_writes_one_gradient_without_a_stack():
    """The module's projection feeds the op packed: autograd reaches qkv straight from the op's backward
    (no unbind/stack node), and the packed gradient equals the reference's."""
    qkv, table, pad_k, pad_v = make_inputs(1, (5, 13, 9), 2, 16, (4, 7, 7))
    kw = dict(window_size=(4, 7, 7), shift_size=(2, 3, 3), rel_pos_bias_table=table, pad_k=pad_k, pad_v=pad_v)
    out = op.window_attention_3d_qkvpacked(qkv, backend="triton", **kw)
    assert out.grad_fn.next_functions[0][0].variable is qkv  # the op's backward hands its dqkv to the leaf
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, (qkv, table, pad_k, pad_v), grad)
    ref_inputs = upcast((qkv, table, pad_k, pad_v))
    ref_out, ref_grads = run(window_attention_3d_reference, *ref_inputs, window_size=(4, 7, 7), shift_size=(2, 3, 3))
    assert_close(out, ref_out, 2e-5, "out")
    for name, g, r in zip(("dqkv", "dtable", "dpad_k", "dpad_v"), grads, ref_grads, strict=True):
        assert_close(g, r, 5e-5 * max(1.0, r.abs().max().item()), name)
    with pytest.raises(ValueError, match=r"qkv must be 7-D \(B, T, H, W, 3, heads, head_dim\), got shape"):
        op.window_attention_3d_qkvpacked(qkv[..., :2, :, :], window_size=(4, 7, 7))


def test_module_window_batches_feed_the_op_packed():
    torch.manual_seed(0)
    module = WindowAttention3D(16, (2, 3, 3), 2, qkv_bias=True, backend="triton")
    x = torch.randn(3, 18, 16, requires_grad=True)
    mask = torch.zeros(3, 18, 18).masked_fill(torch.rand(3, 18, 18) > 0.7, -100.0)
    out = module(x, mask)
    nodes, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in nodes:
            nodes.add(type(node).__name__)
            todo += [next_node for next_node, _ in node.next_functions]
    assert not any("Unbind" in name or "Stack" in name for name in nodes), nodes
    reference = copy.deepcopy(module)
    reference.backend = "reference"
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    ref = reference(x, mask)
    (gx_ref,) = torch.autograd.grad(ref.square().sum(), x)
    assert_close(out, ref, 2e-5, "out")
    assert_close(gx, gx_ref, 1e-4, "dx")


@pytest.mark.parametrize("packed", [False, True], ids=["qkv-views", "packed"])
def test_autocast_runs_the_kernels_in_the_autocast_dtype(packed):
    """As SDPA: fp32 activations under torch.autocast run the kernels in the autocast dtype (fp16 here, the
    interpreter has no bf16 dot), the fp32 bias table stays fp32, gradients come back in the leaves' dtypes,
    and the numbers follow the reference run under the same autocast (2x rule against fp32)."""
    qkv, table, pad_k, pad_v = make_inputs(1, (5, 13, 9), 2, 32, (4, 7, 7))
    kw = dict(window_size=(4, 7, 7), shift_size=(2, 3, 3), rel_pos_bias_table=table, pad_k=pad_k, pad_v=pad_v)
    grad = torch.randn(1, 5, 13, 9, 2, 32, generator=torch.Generator().manual_seed(1))

    def attend(fn, **extra):
        with torch.autocast("cpu", dtype=torch.float16):
            assert op.compute_dtype(qkv) == torch.float16
            out = op.window_attention_3d_qkvpacked(qkv, **kw, **extra) if packed else fn(*qkv.unbind(-3), **kw, **extra)
        return out, torch.autograd.grad(out, (qkv, table, pad_k, pad_v), grad.to(out.dtype))

    out, grads = attend(window_attention_3d, backend="triton")
    assert out.dtype == torch.float16
    assert [g.dtype for g in grads] == [torch.float32] * 4
    low_out, low_grads = attend(window_attention_3d_reference)
    ref_out, ref_grads = run(
        window_attention_3d_reference,
        qkv,
        table,
        pad_k,
        pad_v,
        **{k: v for k, v in kw.items() if k in ("window_size", "shift_size")},
    )
    assert_within_twice_low_precision_error(
        ("out", "dqkv", "dtable", "dpad_k", "dpad_v"),
        (out, *grads),
        (low_out, *low_grads),
        (ref_out, *ref_grads),
        torch.float16,
        "autocast",
    )


def test_torch_compile_fullgraph_under_autocast():
    torch.manual_seed(0)
    module = WindowAttention3D(32, (2, 3, 3), num_heads=2, qkv_bias=True, backend="triton")
    x = torch.randn(1, 3, 5, 4, 32)
    compiled = torch.compile(module, fullgraph=True)
    with torch.autocast("cpu", dtype=torch.float16):
        eager = module(x, shift_size=(1, 1, 1))
        out = compiled(x, shift_size=(1, 1, 1))
    assert out.dtype == eager.dtype
    assert_close(out.float(), eager.float(), 2e-3, "compiled vs eager under autocast")


# ------------------------------------------------------------------------------------------------------
# Dispatch: the CUDA backend's Python side, and which CUDA kernels it would take
# ------------------------------------------------------------------------------------------------------
def _pretend_cuda_backend_runs_on_cpu(monkeypatch, kernels=("tensor_cores", "tensor_cores")):
    """Let dispatch take the 'cuda' backend for CPU tensors: the extension runs its CPU emulation of the
    CUDA kernels there, so the custom op -> _C path and the backward's casts run as on a GPU."""
    if not ssltm_kernels.HAS_CUDA_EXT:
        pytest.fail("ssltm_kernels._C is not built: pip install -e . --no-build-isolation")
    monkeypatch.setattr(op, "cuda_unavailable_reason", lambda q: None)
    monkeypatch.setattr(op, "_cuda_kernels", lambda call, dtype: kernels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("packed", [False, True], ids=["qkv-views", "packed"])
def test_cuda_backend_python_side_through_the_cpu_emulation(monkeypatch, dtype, packed):
    _pretend_cuda_backend_runs_on_cpu(monkeypatch)
    qkv, table, pad_k, pad_v = make_inputs(2, (3, 7, 5), 2, 8, (2, 3, 3), dtype=dtype)
    kw = dict(window_size=(2, 3, 3))  # unshifted: the padded keys carry weight (shifted, ~e^-100 for some)
    fused = (
        (lambda *qkv_views, **k: op.window_attention_3d_qkvpacked(torch.stack(qkv_views, -3), **k))
        if packed
        else window_attention_3d
    )
    calls = []
    monkeypatch.setattr(
        op, "_fused_window_attention", lambda *a, _f=op._fused_window_attention: calls.append(a[1]) or _f(*a)
    )
    out, grads = run(fused, qkv, table, pad_k, pad_v, **kw)
    assert calls == ["cuda"]
    assert out.dtype == dtype and [g.dtype for g in grads] == [dtype, torch.float32, dtype, dtype]
    low_out, low_grads = run(window_attention_3d_reference, qkv, table, pad_k, pad_v, **kw)
    fp32 = tuple(x.detach().float().requires_grad_() for x in (qkv, table, pad_k, pad_v))
    ref_out, ref_grads = run(window_attention_3d_reference, *fp32, **kw)
    assert_within_twice_low_precision_error(
        ("out", "dqkv", "dtable", "dpad_k", "dpad_v"),
        (out, *grads),
        (low_out, *low_grads),
        (ref_out, *ref_grads),
        dtype,
        "cuda emulation",
    )


@pytest.mark.parametrize(
    "kernels, chosen",
    [
        (("tensor_cores", "tensor_cores"), "cuda"),
        (("cuda_cores", "cuda_cores"), "triton"),
        (("tensor_cores", "cuda_cores"), "triton"),
    ],
)
def test_dispatch_prefers_triton_over_cuda_core_kernels(monkeypatch, kernels, chosen):
    _pretend_cuda_backend_runs_on_cpu(monkeypatch, kernels)
    q, k, v = _qkv()
    assert op.can_run_cuda(q, k, v, window_size=2).kernels == kernels
    calls = []
    monkeypatch.setattr(op, "_fused_window_attention", lambda *a: calls.append(a[1]) or q)
    window_attention_3d(q, k, v, window_size=2)
    window_attention_3d(q, k, v, window_size=2, backend="cuda")  # forced: whatever family
    assert calls == [chosen, "cuda"]
    monkeypatch.setattr(op, "triton_unavailable_reason", lambda q: "no triton")
    window_attention_3d(q, k, v, window_size=2)  # CUDA cores beat the reference
    assert calls[-1] == "cuda"


def test_dispatch_takes_triton_first_where_preferred(monkeypatch):
    """Where Triton comes first (sm_90 by default), automatic dispatch takes it over the tensor-core CUDA
    kernels; backend="cuda" still forces them, and without Triton the CUDA kernels run."""
    _pretend_cuda_backend_runs_on_cpu(monkeypatch)
    monkeypatch.setattr(op, "preferred_backend", lambda device: "triton")
    q, k, v = _qkv()
    calls = []
    monkeypatch.setattr(op, "_fused_window_attention", lambda *a: calls.append(a[1]) or q)
    window_attention_3d(q, k, v, window_size=2)
    window_attention_3d(q, k, v, window_size=2, backend="cuda")
    monkeypatch.setattr(op, "triton_unavailable_reason", lambda q: "no triton")
    window_attention_3d(q, k, v, window_size=2)
    assert calls == ["triton", "cuda", "cuda"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_module_under_bf16_autocast_with_packed_qkv(backend):
    """The SSLTM training setting: fp32 module, bf16 autocast, volume path (packed qkv), on the GPU."""
    torch.manual_seed(0)
    module = WindowAttention3D(128, (4, 7, 7), 4, qkv_bias=True, backend=backend).cuda()
    x = torch.randn(2, 4, 30, 30, 128, device="cuda", requires_grad=True)

    def attend(m):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(x, shift_size=(2, 3, 3))
        return out, torch.autograd.grad(out.float().square().sum(), (x, m.relative_position_bias_table, m.qkv.weight))

    out, grads = attend(module)
    assert out.dtype == torch.bfloat16 and [g.dtype for g in grads] == [torch.float32] * 3
    reference = copy.deepcopy(module)
    reference.backend = "reference"
    low_out, low_grads = attend(reference)
    fp32_out = reference(x, shift_size=(2, 3, 3))
    fp32_grads = torch.autograd.grad(
        fp32_out.square().sum(), (x, reference.relative_position_bias_table, reference.qkv.weight)
    )
    assert_within_twice_low_precision_error(
        ("out", "dx", "dtable", "dqkv_weight"),
        (out, *grads),
        (low_out, *low_grads),
        (fp32_out, *fp32_grads),
        torch.bfloat16,
        backend,
    )


def test_op_submodule_is_a_module_and_the_package_exports_the_functions():
    import importlib
    import types

    module = importlib.import_module("ssltm_kernels.ops.window_attention_3d")
    assert isinstance(module, types.ModuleType) and module is op
    assert ssltm_kernels.window_attention_3d is op.window_attention_3d  # a function, beside the ops package
    assert ssltm_kernels.window_attention_3d_qkvpacked is op.window_attention_3d_qkvpacked
    assert {"can_run_cuda", "can_run_triton", "can_run_reference"} <= set(op.__all__)
