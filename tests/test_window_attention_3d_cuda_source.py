"""Tests of the CUDA window-attention kernels' code (csrc/window_attention_3d_core.cuh).

On CPU tensors ``ssltm_kernels._C`` runs the CPU emulation of the CUDA kernels: the same per-thread
phase functions, in the same order, with loops for the threads of a block. These tests compare it
with an independent float64 implementation of the contract written the way Video Swin does it
(padding, torch.roll, window partition, relative_position_index built from a meshgrid, region mask
from slices), with gradients from autograd. GPU tests compare the real kernels with the emulation.
"""

from __future__ import annotations

import math

import pytest
import torch
from extension import built_extension

_C = built_extension()

fwd = _C.window_attention_3d_forward
bwd = _C.window_attention_3d_backward


# ------------------------------------------------------------------------------------------------
# Independent float64 oracle of the contract (autograd gives the gradients)
# ------------------------------------------------------------------------------------------------
def _relative_index(bias_window, table_window, n):
    """Video Swin's relative_position_index: coordinates of the bias window, offsets of the table window."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(s) for s in bias_window], indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    ft, fh, fw = table_window
    rel = rel + torch.tensor([ft - 1, fh - 1, fw - 1])
    index = rel[..., 0] * (2 * fh - 1) * (2 * fw - 1) + rel[..., 1] * (2 * fw - 1) + rel[..., 2]
    return index[:n, :n]


def _axis_regions(size, window, shift):
    lab = torch.zeros(size, dtype=torch.long)
    if shift > 0:
        lab[slice(-window, -shift)] = 1
        lab[slice(-shift, None)] = 2
    return lab


def _partition(x, window):
    """(B, Tp, Hp, Wp, *rest) -> (B*nW, N, *rest)."""
    b, tp, hp, wp = x.shape[:4]
    rest = x.shape[4:]
    wt, wh, ww = window
    x = x.reshape(b, tp // wt, wt, hp // wh, wh, wp // ww, ww, *rest)
    perm = [0, 1, 3, 5, 2, 4, 6] + list(range(7, 7 + len(rest)))
    return x.permute(*perm).reshape(b * (tp // wt) * (hp // wh) * (wp // ww), wt * wh * ww, *rest)


def _unpartition(x, window, b, padded):
    tp, hp, wp = padded
    wt, wh, ww = window
    rest = x.shape[2:]
    x = x.reshape(b, tp // wt, hp // wh, wp // ww, wt, wh, ww, *rest)
    perm = [0, 1, 4, 2, 5, 3, 6] + list(range(7, 7 + len(rest)))
    return x.permute(*perm).reshape(b, tp, hp, wp, *rest)


def oracle(
    q, k, v, *, window, shift, bias_window, table_window, scale, table=None, pad_k=None, pad_v=None, attn_mask=None
):
    """Returns (out, lse) in the dtype of the inputs (use float64)."""
    b, t, h, w, nh, hd = q.shape
    padded = tuple(math.ceil(s / ws) * ws for s, ws in zip((t, h, w), window, strict=True))
    n = window[0] * window[1] * window[2]

    def pad(x, fill):
        full = (fill if fill is not None else x.new_zeros(nh, hd)).expand(b, *padded, nh, hd).clone()
        full[:, :t, :h, :w] = x
        return full

    def to_windows(x):
        x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
        return _partition(x, window).transpose(1, 2)  # (nWin, nh, N, hd)

    qw, kw, vw = to_windows(pad(q, None)), to_windows(pad(k, pad_k)), to_windows(pad(v, pad_v))
    scores = scale * qw @ kw.transpose(-1, -2)
    if table is not None:
        index = _relative_index(bias_window, table_window, n)
        scores = scores + table[index.reshape(-1)].reshape(n, n, nh).permute(2, 0, 1)
    if any(s > 0 for s in shift):
        lt, lh, lw = (_axis_regions(p, ws, s) for p, ws, s in zip(padded, window, shift, strict=True))
        region = 9 * lt[:, None, None] + 3 * lh[None, :, None] + lw[None, None, :]
        region = _partition(region[None].expand(b, *padded), window)  # (nWin, N)
        mask = (region[:, :, None] != region[:, None, :]).to(q.dtype) * -100.0
        scores = scores + mask[:, None]
    if attn_mask is not None:
        nwin = scores.shape[0]
        scores = scores + attn_mask.to(q.dtype)[torch.arange(nwin) % attn_mask.shape[0]][:, None]
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1) @ vw
    out = _unpartition(out.transpose(1, 2), window, b, padded)
    lse = _unpartition(lse.transpose(1, 2), window, b, padded)
    out = torch.roll(out, shifts=tuple(shift), dims=(1, 2, 3))[:, :t, :h, :w]
    lse = torch.roll(lse, shifts=tuple(shift), dims=(1, 2, 3))[:, :t, :h, :w]
    return out, lse


# ------------------------------------------------------------------------------------------------
# Problem construction
# ------------------------------------------------------------------------------------------------
def make_problem(
    shape,
    nh,
    hd,
    window,
    *,
    full_window=None,
    shift=(0, 0, 0),
    mode="swin",
    table=True,
    pads=True,
    mask=False,
    dtype=torch.float64,
    seed=0,
):
    """q/k/v as non-contiguous views of one (B, T, H, W, 3*nh*hd) tensor, plus the optional inputs."""
    gen = torch.Generator().manual_seed(seed)
    b, t, h, w = shape
    full_window = tuple(full_window or window)
    qkv = torch.randn(b, t, h, w, 3 * nh * hd, generator=gen, dtype=torch.float64)
    q, k, v = qkv.view(b, t, h, w, 3, nh, hd).unbind(4)
    ntab = (2 * full_window[0] - 1) * (2 * full_window[1] - 1) * (2 * full_window[2] - 1)
    n = window[0] * window[1] * window[2]
    nwin = b * math.prod(math.ceil(s / ws) for s, ws in zip((t, h, w), window, strict=True))
    p = dict(
        q=q,
        k=k,
        v=v,
        table=torch.randn(ntab, nh, generator=gen, dtype=torch.float64) if table else None,
        pad_k=torch.randn(nh, hd, generator=gen, dtype=torch.float64) if pads else None,
        pad_v=torch.randn(nh, hd, generator=gen, dtype=torch.float64) if pads else None,
        attn_mask=(torch.randn(2 if nwin % 2 == 0 else 1, n, n, generator=gen) * 2).float() if mask else None,
        window=list(window),
        shift=list(shift),
        bias_window=list(full_window if mode == "swin" else window),
        table_window=list(full_window),
        scale=hd**-0.5,
    )
    p["grad_out"] = torch.randn(b, t, h, w, nh, hd, generator=gen, dtype=torch.float64)
    if dtype != torch.float64:
        for key in ("q", "k", "v", "grad_out"):
            p[key] = p[key].to(dtype)
        for key in ("table", "pad_k", "pad_v"):
            if p[key] is not None:
                p[key] = p[key].float()
    return p


def run_kernel(p, need_table_grad=True, need_pad_grad=True, num_groups=0):
    out, lse = fwd(
        p["q"],
        p["k"],
        p["v"],
        p["table"],
        p["pad_k"],
        p["pad_v"],
        p["attn_mask"],
        p["window"],
        p["shift"],
        p["bias_window"],
        p["table_window"],
        p["scale"],
    )
    grads = bwd(
        p["grad_out"],
        p["q"],
        p["k"],
        p["v"],
        out,
        lse,
        p["table"],
        p["pad_k"],
        p["pad_v"],
        p["attn_mask"],
        p["window"],
        p["shift"],
        p["bias_window"],
        p["table_window"],
        p["scale"],
        need_table_grad,
        need_pad_grad,
        num_groups,
    )
    return out, lse, grads


def run_oracle(p):
    """float64 forward and autograd backward; pad gradients are taken even where pad is None (zeros)."""
    nh, hd = p["q"].shape[-2:]
    leaf = {key: p[key].detach().double().requires_grad_(True) for key in ("q", "k", "v")}
    for key in ("pad_k", "pad_v"):
        src = p[key] if p[key] is not None else torch.zeros(nh, hd)
        leaf[key] = src.detach().double().requires_grad_(True)
    leaf["table"] = p["table"].detach().double().requires_grad_(True) if p["table"] is not None else None
    out, lse = oracle(
        leaf["q"],
        leaf["k"],
        leaf["v"],
        window=p["window"],
        shift=p["shift"],
        bias_window=p["bias_window"],
        table_window=p["table_window"],
        scale=p["scale"],
        table=leaf["table"],
        pad_k=leaf["pad_k"],
        pad_v=leaf["pad_v"],
        attn_mask=p["attn_mask"],
    )
    out.backward(p["grad_out"].double())
    grads = {
        key: (leaf[key].grad if leaf[key] is not None else None) for key in ("q", "k", "v", "table", "pad_k", "pad_v")
    }
    return out.detach(), lse.detach(), grads


def assert_close(name, got, want, atol, rtol):
    got = got.double()
    err = (got - want).abs()
    bound = atol + rtol * want.abs()
    if not bool((err <= bound).all()):
        worst = int(torch.argmax(err - bound))
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), want.shape))
        raise AssertionError(
            f"{name}: max abs error {err.max().item():.3e} (atol {atol}, rtol {rtol}); worst at "
            f"{index}: got {got[index].item():.6g}, want {want[index].item():.6g}"
        )


TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (1.5e-2, 1e-2),
    torch.bfloat16: (8e-2, 3e-2),
}


def check_against_oracle(p, atol=None, rtol=None, num_groups=0):
    dtype = p["q"].dtype
    atol_d, rtol_d = TOL[dtype]
    atol, rtol = atol or atol_d, rtol or rtol_d
    out, lse, (dq, dk, dv, dtable, dpad_k, dpad_v) = run_kernel(p, num_groups=num_groups)
    r_out, r_lse, r = run_oracle(p)
    assert out.dtype == dtype and out.is_contiguous() and out.shape == p["q"].shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close("out", out, r_out, atol, rtol)
    assert_close("lse", lse, r_lse, atol, rtol)
    # gradient magnitudes grow with the number of contributions: scale the tolerance by the reference size
    for name, got, want in (("dq", dq, r["q"]), ("dk", dk, r["k"]), ("dv", dv, r["v"])):
        assert got.dtype == dtype and got.is_contiguous()
        assert_close(name, got, want, atol * max(1.0, want.abs().max().item()), rtol)
    if p["table"] is not None:
        assert_close("dtable", dtable, r["table"], atol * max(1.0, r["table"].abs().max().item()), rtol)
    else:
        assert dtable is None
    if p["pad_k"] is not None or p["pad_v"] is not None:
        assert_close("dpad_k", dpad_k, r["pad_k"], atol * max(1.0, r["pad_k"].abs().max().item()), rtol)
        assert_close("dpad_v", dpad_v, r["pad_v"], atol * max(1.0, r["pad_v"].abs().max().item()), rtol)
    else:
        assert dpad_k is None and dpad_v is None


# ------------------------------------------------------------------------------------------------
# Correctness against the oracle (CPU emulation of the CUDA kernels)
# ------------------------------------------------------------------------------------------------
# (shape B,T,H,W; heads; head_dim; effective window; full window; shift)
GEOMETRIES = {
    # padding on every axis (Tp=6, Hp=15, Wp=12), small windows, 2 batch items
    "pad_all_axes": ((2, 5, 13, 10), 2, 8, (2, 3, 3), None, (0, 0, 0)),
    "pad_all_axes_shift": ((2, 5, 13, 10), 2, 8, (2, 3, 3), None, (1, 1, 2)),
    # SSLTM's 4x7x7 window: N = 196 > 128 threads (two query/key chunks), padding on every axis
    "swin_4x7x7_shift": ((1, 5, 9, 10), 2, 5, (4, 7, 7), None, (2, 3, 3)),
    # windows equal to an axis (T = wt, H = wh): shift only along W
    "window_equals_axis": ((1, 2, 7, 9), 1, 6, (2, 7, 7), None, (0, 0, 3)),
    # Video Swin's shrunk window: full (4,7,7) shrunk to (2,7,7) because T = 2
    "shrunk_t": ((2, 2, 9, 8), 2, 4, (2, 7, 7), (4, 7, 7), (0, 3, 3)),
    # ... and shrunk along H (H = 5): here the "swin" and "exact" bias modes differ
    "shrunk_h": ((1, 5, 5, 9), 2, 4, (4, 5, 7), (4, 7, 7), (2, 0, 3)),
    # head_dim buckets 64 and 128 (zero-padded register rows)
    "head_dim_40": ((1, 3, 5, 6), 1, 40, (2, 3, 4), None, (1, 1, 2)),
    "head_dim_72": ((1, 3, 5, 6), 2, 72, (3, 5, 3), None, (0, 2, 1)),
    "head_dim_128": ((1, 2, 4, 4), 1, 128, (2, 3, 3), None, (1, 1, 1)),
}


def geometry_problem(name, **kwargs):
    shape, nh, hd, window, full, shift = GEOMETRIES[name]
    return make_problem(shape, nh, hd, window, full_window=full, shift=shift, **kwargs)


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_float64_all_inputs(geometry):
    check_against_oracle(geometry_problem(geometry, table=True, pads=True, mask=True))


@pytest.mark.parametrize("geometry", ["pad_all_axes", "pad_all_axes_shift", "swin_4x7x7_shift"])
@pytest.mark.parametrize(
    "table,pads,mask",
    [(False, False, False), (True, False, False), (False, True, False), (False, False, True), (True, True, False)],
)
def test_float64_optional_inputs(geometry, table, pads, mask):
    check_against_oracle(geometry_problem(geometry, table=table, pads=pads, mask=mask))


@pytest.mark.parametrize("mode", ["swin", "exact"])
@pytest.mark.parametrize("geometry", ["shrunk_t", "shrunk_h", "window_equals_axis"])
def test_bias_window_modes(geometry, mode):
    check_against_oracle(geometry_problem(geometry, mode=mode))


def test_bias_window_modes_differ():
    """Shrunk along H, the two bias modes index the table differently (sanity of the test itself)."""
    out_swin = run_kernel(geometry_problem("shrunk_h", mode="swin"))[0]
    out_exact = run_kernel(geometry_problem("shrunk_h", mode="exact"))[0]
    assert (out_swin - out_exact).abs().max() > 1e-3


# float32 takes the CUDA-core kernels; float16/bfloat16 take the tensor-core forward and backward (every
# geometry here fits in shared memory), with head_dim buckets 32, 64 and 128.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "geometry", ["pad_all_axes_shift", "swin_4x7x7_shift", "head_dim_40", "head_dim_72", "head_dim_128"]
)
def test_low_precision(geometry, dtype):
    check_against_oracle(geometry_problem(geometry, mask=True, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_window_beyond_shared_memory(dtype):
    """An 8x8x8 window (512 tokens) fits neither tensor-core kernel's shared memory: CUDA-core kernels."""
    check_against_oracle(make_problem((1, 8, 8, 12), 1, 8, (8, 8, 8), shift=(0, 0, 4), mask=True, dtype=dtype))


@pytest.mark.parametrize("pad_v", [False, True])
def test_low_precision_without_pad_k(pad_v):
    """Padded keys of the tensor-core forward without pad_k (zero rows), with and without pad_v."""
    p = geometry_problem("pad_all_axes_shift", pads=pad_v, mask=True, dtype=torch.float16)
    p["pad_k"] = None
    check_against_oracle(p)


# float16 takes the tensor-core dk/dv kernel, whose blocks also run their group's windows in turn. Each
# dk/dv block sums dS and the padded keys' gradients over its group's windows on chip and stores them
# once; the emulation fills those partials with NaN first, so a missing store fails the comparison.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("num_groups", [1, 2, 3, 7, 1000])
def test_window_groups(num_groups, dtype):
    """The dk/dv kernel's window groups (forced here) change only the order of the bias/pad reductions."""
    p = geometry_problem("pad_all_axes_shift", mask=True, dtype=dtype)  # 120 windows, padded on every axis
    check_against_oracle(p, num_groups=num_groups)
    auto = run_kernel(p)[2]
    forced = run_kernel(p, num_groups=num_groups)[2]
    for a, b in zip(auto[:3], forced[:3], strict=True):
        assert torch.equal(a, b)


# 196-token windows: float64 runs dkv_kernel with 96 keys per block (its dS sums fill the emulated 227 KB:
# 3 blocks per group, the last one partial), float32 with 128 keys (2 blocks), float16 the tensor-core
# dk/dv pass with 32 keys per block (7 blocks); 8 windows in 3 groups of 3, 3 and 2
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_window_groups_several_key_blocks(dtype):
    check_against_oracle(geometry_problem("swin_4x7x7_shift", mask=True, dtype=dtype), num_groups=3)


def test_tensor_core_backward_with_16_row_blocks():
    """N = 196, head_dim 128: with the dS sums the dk/dv layout needs 16-row blocks to fit in 227 KB."""
    assert _C.window_attention_3d_cuda_kernels("float16", 196, 128, 227 * 1024, 90)[1] == "tensor_cores"
    p = make_problem((1, 5, 9, 10), 1, 128, (4, 7, 7), shift=(2, 3, 3), mask=True, dtype=torch.float16)
    check_against_oracle(p, num_groups=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_deterministic(dtype):
    p = geometry_problem("swin_4x7x7_shift", mask=True, dtype=dtype)
    first = run_kernel(p, num_groups=3)
    second = run_kernel(p, num_groups=3)
    for a, b in zip((first[0], first[1], *first[2]), (second[0], second[1], *second[2]), strict=True):
        assert torch.equal(a, b)


def test_gradients_not_requested():
    p = geometry_problem("pad_all_axes_shift")
    _, _, (dq, dk, dv, dtable, dpad_k, dpad_v) = run_kernel(p, need_table_grad=False, need_pad_grad=False)
    assert dtable is None and dpad_k is None and dpad_v is None
    _, _, r = run_oracle(p)
    assert_close("dq", dq, r["q"], 1e-10, 1e-10)
    assert_close("dk", dk, r["k"], 1e-10, 1e-10)


def test_only_pad_v_given():
    p = geometry_problem("pad_all_axes", pads=True)
    p["pad_k"] = None
    check_against_oracle(p)


def test_contiguous_inputs_and_broadcast_grad():
    p = geometry_problem("pad_all_axes_shift")
    ref = run_kernel(p)
    q, k, v = (p[key].contiguous() for key in ("q", "k", "v"))
    assert not p["q"].is_contiguous() and q.is_contiguous()
    out, lse = fwd(
        q,
        k,
        v,
        p["table"],
        p["pad_k"],
        p["pad_v"],
        None,
        p["window"],
        p["shift"],
        p["bias_window"],
        p["table_window"],
        p["scale"],
    )
    assert torch.equal(out, ref[0]) and torch.equal(lse, ref[1])
    # a broadcast (stride 0) gradient, as autograd produces for sum()
    ones = torch.ones((), dtype=q.dtype).expand(q.shape)
    dq = bwd(
        ones,
        q,
        k,
        v,
        out,
        lse,
        p["table"],
        p["pad_k"],
        p["pad_v"],
        None,
        p["window"],
        p["shift"],
        p["bias_window"],
        p["table_window"],
        p["scale"],
        True,
        True,
    )[0]
    p["grad_out"] = ones
    _, _, r = run_oracle(p)
    assert_close("dq", dq, r["q"], 1e-10, 1e-10)


@pytest.mark.parametrize("mode", ["swin", "exact"])
@pytest.mark.parametrize("geometry,requested_shift", [("shrunk_t", (2, 3, 3)), ("shrunk_h", (2, 3, 3))])
def test_matches_package_reference(geometry, requested_shift, mode):
    """Cross-check with the package's PyTorch reference (which shrinks the window itself), if present."""
    ref_mod = pytest.importorskip("ssltm_kernels.ops.window_attention_3d")
    reference = getattr(ref_mod, "window_attention_3d_reference", None)
    if reference is None:
        pytest.skip("ssltm_kernels.ops.window_attention_3d has no window_attention_3d_reference")
    p = geometry_problem(geometry, mode=mode)
    out = run_kernel(p)[0]
    want = reference(
        p["q"],
        p["k"],
        p["v"],
        window_size=tuple(p["table_window"]),
        rel_pos_bias_table=p["table"],
        shift_size=requested_shift,
        scale=p["scale"],
        pad_k=p["pad_k"],
        pad_v=p["pad_v"],
        rel_pos_mode=mode,
    )
    assert_close("out vs package reference", out, want.double(), 1e-9, 1e-9)


# ------------------------------------------------------------------------------------------------
# Input checks (TORCH_CHECK messages name the argument and its shape)
# ------------------------------------------------------------------------------------------------
def _call_fwd(p, **override):
    args = dict(
        q=p["q"],
        k=p["k"],
        v=p["v"],
        bias_table=p["table"],
        pad_k=p["pad_k"],
        pad_v=p["pad_v"],
        attn_mask=p["attn_mask"],
        window=p["window"],
        shift=p["shift"],
        bias_window=p["bias_window"],
        table_window=p["table_window"],
        scale=p["scale"],
    )
    args.update(override)
    return fwd(**args)


@pytest.fixture
def small():
    return make_problem((1, 3, 4, 5), 2, 8, (2, 3, 3), shift=(1, 1, 1), mask=True, dtype=torch.float32)


@pytest.mark.parametrize(
    "override,message",
    [
        (lambda p: {"q": p["q"][0]}, r"q must be 6-D .* got shape \[3, 4, 5, 2, 8\]"),
        (lambda p: {"k": p["k"][:, :2]}, r"k must have the shape of q \[1, 3, 4, 5, 2, 8\], got \[1, 2, 4, 5, 2, 8\]"),
        (lambda p: {"v": p["v"].double()}, r"v must have the dtype of q \(Float\), got Double"),
        (lambda p: {"q": p["q"].int(), "k": p["k"].int(), "v": p["v"].int()}, r"must be float32, float16 or bfloat16"),
        (lambda p: {key: p[key].transpose(-1, -2) for key in "qkv"}, r"q must have stride 1 in its last dimension"),
        (
            lambda p: {"v": torch.zeros(*p["v"].shape, 2)[..., 0]},
            r"v must have stride 1 in its last dimension \(head_dim\), got strides \[1920, 640, 160, 32, 16, 2\]",
        ),
        (lambda p: {"bias_table": p["table"][:-1]}, r"bias_table must have shape \(75, 2\) .* got \[74, 2\]"),
        (lambda p: {"bias_table": p["table"].t()}, r"bias_table must have shape \(75, 2\)"),
        (lambda p: {"pad_k": p["pad_k"][:, :4]}, r"pad_k must have shape \(heads, head_dim\) = \(2, 8\), got \[2, 4\]"),
        (
            lambda p: {"pad_v": p["pad_v"][None]},
            r"pad_v must have shape \(heads, head_dim\) = \(2, 8\), got \[1, 2, 8\]",
        ),
        (lambda p: {"attn_mask": p["attn_mask"][:, :3]}, r"attn_mask must have shape \(nMask, N, N\) with N = 18"),
        (lambda p: {"attn_mask": torch.zeros(3, 18, 18)}, r"attn_mask's first dimension 3 must divide .* = 8"),
        (lambda p: {"attn_mask": p["attn_mask"].double()}, r"attn_mask must be float32, got Double"),
        (lambda p: {"window": [2, 3]}, r"window must have 3 entries \(t, h, w\), got 2 entries: \[2, 3\]"),
        (lambda p: {"shift": [1, 1, 1, 1]}, r"shift must have 3 entries"),
        (lambda p: {"bias_window": [2, 3]}, r"bias_window must have 3 entries"),
        (lambda p: {"table_window": []}, r"table_window must have 3 entries"),
        (lambda p: {"shift": [2, 1, 1]}, r"0 <= shift < window on every axis, got shift \[2, 1, 1\]"),
        (lambda p: {"window": [0, 3, 3]}, r"window must be positive"),
        (lambda p: {"bias_window": [3, 3, 3]}, r"need 1 <= bias_window <= table_window"),
        (lambda p: {"bias_window": [1, 3, 3], "table_window": [2, 3, 3]}, r"do not fit the bias_window \[1, 3, 3\]"),
        (lambda p: {"scale": float("nan")}, r"scale must be finite"),
    ],
)
def test_bad_forward_inputs(small, override, message):
    with pytest.raises(RuntimeError, match=message):
        _call_fwd(small, **override(small))


def test_bad_head_dim():
    p = make_problem((1, 2, 3, 3), 1, 129, (2, 3, 3), table=False, pads=False, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"head_dim 129 exceeds the maximum 128"):
        _call_fwd(p)


def test_bad_head_count():
    q = torch.zeros(1, 1, 1, 1, 65536, 1)
    with pytest.raises(RuntimeError, match=r"65536 heads exceed the 65535 supported"):
        fwd(q, q, q, None, None, None, None, [1, 1, 1], [0, 0, 0], [1, 1, 1], [1, 1, 1], 1.0)


def test_bad_window_too_large(small):
    with pytest.raises(RuntimeError, match=r"has 4913 tokens, more than the 4096 supported"):
        _call_fwd(
            small,
            window=[17, 17, 17],
            bias_window=[17, 17, 17],
            table_window=[17, 17, 17],
            bias_table=None,
            attn_mask=None,
        )


def test_bad_empty():
    q = torch.zeros(1, 0, 3, 3, 1, 4)
    with pytest.raises(RuntimeError, match=r"q must not be empty, got shape \[1, 0, 3, 3, 1, 4\]"):
        fwd(q, q, q, None, None, None, None, [1, 1, 1], [0, 0, 0], [1, 1, 1], [1, 1, 1], 1.0)


def test_bad_backward_inputs(small):
    out, lse = _call_fwd(small)
    args = [
        small["grad_out"],
        small["q"],
        small["k"],
        small["v"],
        out,
        lse,
        small["table"],
        small["pad_k"],
        small["pad_v"],
        small["attn_mask"],
        small["window"],
        small["shift"],
        small["bias_window"],
        small["table_window"],
        small["scale"],
        True,
        True,
    ]

    def call(index, value):
        bad = list(args)
        bad[index] = value
        return bwd(*bad)

    with pytest.raises(RuntimeError, match=r"grad_out must have the shape of q"):
        call(0, small["grad_out"][:, :1])
    with pytest.raises(RuntimeError, match=r"out must have the dtype of q \(Float\), got Half"):
        call(4, out.half())
    with pytest.raises(RuntimeError, match=r"lse must have shape \(B, T, H, W, heads\) \[1, 3, 4, 5, 2\], got"):
        call(5, lse[..., :1])
    with pytest.raises(RuntimeError, match=r"lse must be Float for Float inputs, got Double"):
        call(5, lse.double())
    with pytest.raises(RuntimeError, match=r"num_groups must be >= 0"):
        bwd(*args, -1)


def test_module_attributes():
    assert _C.MAX_HEAD_DIM == 128
    assert _C.MAX_WINDOW_TOKENS == 4096
    assert isinstance(_C.WITH_CUDA, bool)


# ------------------------------------------------------------------------------------------------
# Packed gradient output (grad_qkv)
# ------------------------------------------------------------------------------------------------
def _packed_grads(p, grad_qkv, num_groups=0):
    out, lse = fwd(
        p["q"],
        p["k"],
        p["v"],
        p["table"],
        p["pad_k"],
        p["pad_v"],
        p["attn_mask"],
        p["window"],
        p["shift"],
        p["bias_window"],
        p["table_window"],
        p["scale"],
    )
    return bwd(
        p["grad_out"],
        p["q"],
        p["k"],
        p["v"],
        out,
        lse,
        p["table"],
        p["pad_k"],
        p["pad_v"],
        p["attn_mask"],
        p["window"],
        p["shift"],
        p["bias_window"],
        p["table_window"],
        p["scale"],
        True,
        True,
        num_groups,
        grad_qkv=grad_qkv,
    )


# float32: CUDA-core kernels; float16: tensor-core kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("geometry", ["pad_all_axes_shift", "swin_4x7x7_shift"])
def test_grad_qkv_packed(geometry, dtype):
    p = geometry_problem(geometry, mask=True, dtype=dtype)
    want = run_kernel(p, num_groups=3)[2]
    grad_qkv = torch.full((*p["q"].shape[:4], 3, *p["q"].shape[4:]), float("nan"), dtype=dtype)
    got = _packed_grads(p, grad_qkv, num_groups=3)
    for i, name in enumerate(("dq", "dk", "dv")):
        assert torch.equal(got[i], want[i]), name
        assert got[i].data_ptr() == grad_qkv[..., i, :, :].data_ptr(), f"{name} is not a view of grad_qkv"
        assert got[i].stride() == grad_qkv[..., i, :, :].stride()
        assert torch.equal(grad_qkv[..., i, :, :], want[i])
    for a, b in zip(got[3:], want[3:], strict=True):
        assert torch.equal(a, b)


def test_grad_qkv_strided_view():
    """A grad_qkv that is a view into a wider buffer (stride 1 along head_dim only): only its elements change."""
    p = geometry_problem("pad_all_axes_shift", mask=True)
    want = run_kernel(p)[2]
    hd = p["q"].shape[-1]
    buffer = torch.full((*p["q"].shape[:4], 3, p["q"].shape[4], 2 * hd + 1), -7.0, dtype=p["q"].dtype)
    grad_qkv = buffer[..., 1 : hd + 1]
    assert not grad_qkv.is_contiguous()
    got = _packed_grads(p, grad_qkv)
    for i in range(3):
        assert torch.equal(got[i], want[i])
    assert (buffer[..., 0] == -7).all() and (buffer[..., hd + 1 :] == -7).all()


@pytest.mark.parametrize(
    "make,message",
    [
        (
            lambda q: torch.empty(*q.shape[:4], 3, *q.shape[4:])[..., :1, :, :],
            r"grad_qkv must have shape \(B, T, H, W, 3, heads, head_dim\) = \[1, 3, 4, 5, 3, 2, 8\], "
            r"got \[1, 3, 4, 5, 1, 2, 8\]",
        ),
        (lambda q: torch.empty(*q.shape), r"grad_qkv must have shape .* got \[1, 3, 4, 5, 2, 8\]"),
        (
            lambda q: torch.empty(*q.shape[:4], 3, *q.shape[4:], dtype=torch.float64),
            r"grad_qkv must have the dtype of q \(Float\), got Double \(shape \[1, 3, 4, 5, 3, 2, 8\]\)",
        ),
        (
            lambda q: torch.empty(*q.shape[:4], 3, q.shape[5], q.shape[4]).transpose(-1, -2),
            r"grad_qkv must have stride 1 in its last dimension \(head_dim\), got strides .* "
            r"for shape \[1, 3, 4, 5, 3, 2, 8\]",
        ),
        (
            lambda q: torch.empty(*q.shape[:4], 1, *q.shape[4:]).expand(*q.shape[:4], 3, *q.shape[4:]),
            r"grad_qkv must not overlap itself",
        ),
    ],
)
def test_bad_grad_qkv(small, make, message):
    with pytest.raises(RuntimeError, match=message):
        _packed_grads(small, make(small["q"]))


# ------------------------------------------------------------------------------------------------
# Kernel families: the launchers' decision, from plain numbers
# ------------------------------------------------------------------------------------------------
H100_SHARED_MEMORY = 227 * 1024


@pytest.mark.parametrize(
    "args,families",
    [
        # fp32 always runs on CUDA cores
        (("float32", 196, 32, H100_SHARED_MEMORY, 90), ("cuda_cores", "cuda_cores")),
        # SSLTM's 4x7x7 window at head_dim 32 in fp16 / bf16 on an H100
        (("float16", 196, 32, H100_SHARED_MEMORY, 90), ("tensor_cores", "tensor_cores")),
        (("bfloat16", 196, 32, H100_SHARED_MEMORY, 90), ("tensor_cores", "tensor_cores")),
        # bf16 WMMA needs sm_80, fp16 sm_70
        (("bfloat16", 18, 32, 64 * 1024, 75), ("cuda_cores", "cuda_cores")),
        (("float16", 18, 32, 64 * 1024, 75), ("tensor_cores", "tensor_cores")),
        (("float16", 18, 32, 64 * 1024, 60), ("cuda_cores", "cuda_cores")),
        (("bfloat16", 196, 32, 163 * 1024, 80), ("tensor_cores", "tensor_cores")),
        # windows too big for the shared memory
        (("float16", 512, 8, H100_SHARED_MEMORY, 90), ("cuda_cores", "cuda_cores")),
        (("float16", 196, 32, 64 * 1024, 75), ("cuda_cores", "cuda_cores")),
        # the two passes decide separately: the forward's 64-query layout is the larger one here
        (("float16", 196, 128, 200 * 1024, 90), ("cuda_cores", "tensor_cores")),
    ],
)
def test_cuda_kernel_families(args, families):
    assert _C.window_attention_3d_cuda_kernels(*args) == families


def test_cuda_kernel_families_keywords_and_limits():
    assert _C.window_attention_3d_cuda_kernels(
        dtype="float16",
        tokens=_C.MAX_WINDOW_TOKENS,
        head_dim=_C.MAX_HEAD_DIM,
        shared_memory=H100_SHARED_MEMORY,
        arch=90,
    ) == ("cuda_cores", "cuda_cores")
    with pytest.raises(RuntimeError, match=r'dtype must be "float32", "float16" or "bfloat16", got "float64"'):
        _C.window_attention_3d_cuda_kernels("float64", 196, 32, H100_SHARED_MEMORY, 90)
    with pytest.raises(RuntimeError, match=r"tokens must be in \[1, 4096\], got 4097"):
        _C.window_attention_3d_cuda_kernels("float16", _C.MAX_WINDOW_TOKENS + 1, 32, H100_SHARED_MEMORY, 90)
    with pytest.raises(RuntimeError, match=r"head_dim must be in \[1, 128\], got 129"):
        _C.window_attention_3d_cuda_kernels("float16", 196, _C.MAX_HEAD_DIM + 1, H100_SHARED_MEMORY, 90)
    with pytest.raises(RuntimeError, match=r"shared_memory must be a byte count >= 0, got -1"):
        _C.window_attention_3d_cuda_kernels("float16", 196, 32, -1, 90)


# ------------------------------------------------------------------------------------------------
# GPU: the real kernels against their emulation and the oracle
# ------------------------------------------------------------------------------------------------
def _to(p, device):
    return {key: (value.to(device) if isinstance(value, torch.Tensor) else value) for key, value in p.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_gpu_matches_emulation(geometry, dtype):
    if not _C.WITH_CUDA:
        pytest.skip("ssltm_kernels._C was built without CUDA kernels")
    p = geometry_problem(geometry, mask=True, dtype=dtype)
    cpu = run_kernel(p, num_groups=3)
    gpu = run_kernel(_to(p, "cuda"), num_groups=3)
    # same phases; fp32 runs the same code in the same order (FMA contraction and expf/logf rounding differ),
    # fp16/bf16 tensor-core products accumulate in another order than the emulation's loops
    atol, rtol = (2e-5, 2e-5) if dtype == torch.float32 else TOL[dtype]
    names = ("out", "lse", "dq", "dk", "dv", "dtable", "dpad_k", "dpad_v")
    for name, a, b in zip(names, (cpu[0], cpu[1], *cpu[2]), (gpu[0], gpu[1], *gpu[2]), strict=True):
        assert b.device.type == "cuda" and b.dtype == a.dtype
        assert_close(f"{name} (gpu vs emulation)", b.cpu(), a.double(), atol * max(1.0, a.abs().max().item()), rtol)


@pytest.mark.gpu
def test_gpu_deterministic_and_larger():
    if not _C.WITH_CUDA:
        pytest.skip("ssltm_kernels._C was built without CUDA kernels")
    p = _to(make_problem((2, 8, 30, 33), 4, 32, (4, 7, 7), shift=(2, 3, 3), mask=True, dtype=torch.bfloat16), "cuda")
    first = run_kernel(p)
    second = run_kernel(p)
    for a, b in zip((first[0], first[1], *first[2]), (second[0], second[1], *second[2]), strict=True):
        assert torch.equal(a, b)
    cpu = _to(p, "cpu")
    r_out = run_oracle(cpu)[0]
    out_err = (first[0].double().cpu() - r_out).abs().max().item()
    # 2x rule: at most twice the error of the reference computed from the same bfloat16 inputs
    low_out, _ = oracle(
        cpu["q"].float(),
        cpu["k"].float(),
        cpu["v"].float(),
        window=p["window"],
        shift=p["shift"],
        bias_window=p["bias_window"],
        table_window=p["table_window"],
        scale=p["scale"],
        table=cpu["table"],
        pad_k=cpu["pad_k"],
        pad_v=cpu["pad_v"],
        attn_mask=cpu["attn_mask"],
    )
    ref_err = (low_out.to(torch.bfloat16).double() - r_out).abs().max().item()
    assert out_err <= 2 * ref_err + 1e-6, (out_err, ref_err)
