"""Tests of the CUDA soft-region-pooling kernels' code (csrc/soft_region_pool_core.cuh).

On CPU tensors ``ssltm_kernels._C`` runs the CPU emulation of the CUDA kernels: the same per-thread phase
functions, in the same order, with loops for the threads of a block and the warp shuffles replayed. These
tests compare it with an independent float64 oracle (einsum over the flattened positions, gradients from
autograd). GPU tests compare the real kernels with the emulation.
"""

from __future__ import annotations

import pytest
import torch
from extension import built_extension

_C = built_extension()

fwd = _C.soft_region_pool_forward
bwd = _C.soft_region_pool_backward


def oracle(logits, feats, scale):
    """``einsum('bkn,bcn->bkc', softmax(scale * logits), feats)`` over the flattened positions."""
    b, k = logits.shape[:2]
    probs = torch.softmax(scale * logits.reshape(b, k, -1), dim=-1)
    return torch.einsum("bkn,bcn->bkc", probs, feats.reshape(b, feats.shape[1], -1))


def make(batch, classes, channels, h, w, dtype=torch.float64, channels_last=False, seed=0, offset=0.0, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (offset + spread * torch.randn(batch, classes, h, w, generator=gen, dtype=torch.float64)).to(dtype)
    feats = torch.randn(batch, h, w, channels, generator=gen).to(dtype).permute(0, 3, 1, 2)
    return logits, feats if channels_last else feats.contiguous()


def grad_buffers(logits, feats):
    return torch.empty_like(logits), torch.empty_like(feats)


def kernels(logits, feats, scale, grad, splits=0):
    """Forward and backward through the extension: (out, dlogits, dfeats, stats, out_acc)."""
    out, stats, out_acc = fwd(logits, feats, scale, splits)
    dlogits, dfeats = bwd(
        grad, logits, feats, out if out_acc is None else out_acc, stats, scale, *grad_buffers(logits, feats)
    )
    return out, dlogits, dfeats, stats, out_acc


def exact(logits, feats, scale, grad):
    """The oracle's output and gradients in float64."""
    logits, feats = (x.detach().double().requires_grad_() for x in (logits, feats))
    out = oracle(logits, feats, scale)
    return out, *torch.autograd.grad(out, (logits, feats), grad.double())


def low_precision(logits, feats, scale, grad):
    """The oracle run in the inputs' dtype (the yardstick of the 2x rule)."""
    logits, feats = (x.detach().clone().requires_grad_() for x in (logits, feats))
    out = oracle(logits, feats, scale)
    return out, *torch.autograd.grad(out, (logits, feats), grad)


def assert_close(actual, expected, atol, what):
    err = (actual.double() - expected.double()).abs()
    assert err.max().item() <= atol, f"{what}: max abs error {err.max().item():.3e} > {atol:.1e}"


NAMES = ("out", "dlogits", "dfeats")
GEOMETRIES = [
    # batch, classes, channels, H, W, channels_last, scale, splits
    pytest.param(3, 124, 70, 5, 7, False, 1.0, 0, id="vspw-classes-odd-channels-B3"),
    pytest.param(2, 1, 1, 1, 1, False, 1.0, 0, id="one-of-everything"),
    pytest.param(2, 37, 65, 11, 13, True, -2.0, 3, id="channels-last-negative-scale-3-splits"),
    pytest.param(1, 33, 97, 9, 20, False, 0.5, 2, id="several-class-tiles-2-splits"),
    pytest.param(2, 5, 3, 1, 40, True, 0.0, 0, id="scale-zero-one-row"),
    pytest.param(1, 256, 33, 3, 7, False, 1.0, 0, id="most-classes"),
]


@pytest.mark.parametrize("batch, classes, channels, h, w, channels_last, scale, splits", GEOMETRIES)
def test_float64_matches_oracle(batch, classes, channels, h, w, channels_last, scale, splits):
    logits, feats = make(batch, classes, channels, h, w, channels_last=channels_last)
    grad = torch.randn(batch, classes, channels, dtype=torch.float64)
    out, dlogits, dfeats, stats, out_acc = kernels(logits, feats, scale, grad, splits)
    assert out_acc is None and stats.dtype == torch.float64 and stats.shape == (batch, classes, 2)
    assert dfeats.stride() == feats.stride()  # written in the buffer's (channels-last) layout
    for name, got, want in zip(NAMES, (out, dlogits, dfeats), exact(logits, feats, scale, grad), strict=True):
        assert_close(got, want, 1e-12 * max(1.0, want.abs().max().item()), name)


def test_stats_are_the_maximum_and_the_log_denominator():
    logits, feats = make(2, 3, 4, 5, 6)
    for scale in (2.0, -0.5):
        _, stats, _ = fwd(logits, feats, scale)
        x = (1.0 if scale > 0 else -1.0) * logits.flatten(2)
        m = x.amax(-1)
        assert torch.equal(stats[..., 0], m)
        assert_close(stats[..., 1], torch.log(torch.exp(abs(scale) * (x - m[..., None])).sum(-1)), 1e-13, "log S")


def test_non_contiguous_logits_and_strided_gradient_buffers():
    logits, feats = make(2, 6, 9, 8, 5)
    logits = logits[:, ::2]  # class stride 2 * H * W
    feats_t = feats.transpose(2, 3).contiguous().transpose(2, 3)  # H and W do not merge: copied first
    grad = torch.randn(2, 3, 9, dtype=torch.float64).transpose(1, 2).contiguous().transpose(1, 2)  # strided
    out, stats, _ = fwd(logits, feats_t, 1.5)
    dlogits = torch.empty(2, 8, 5, 3, dtype=torch.float64).permute(0, 3, 1, 2)  # classes last
    dfeats = torch.empty(2, 9, 8, 5, dtype=torch.float64)
    got_l, got_f = bwd(grad, logits, feats_t, out, stats, 1.5, dlogits, dfeats)
    assert got_l.data_ptr() == dlogits.data_ptr() and got_f.data_ptr() == dfeats.data_ptr()
    for name, got, want in zip(NAMES, (out, got_l, got_f), exact(logits, feats, 1.5, grad), strict=True):
        assert_close(got, want, 1e-12, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("splits", [0, 3])
def test_low_precision_within_twice_the_oracles_error(dtype, splits):
    logits, feats = make(2, 124, 70, 9, 7, dtype=dtype, channels_last=True, spread=3.0)
    grad = torch.randn(2, 124, 70).to(dtype)
    out, dlogits, dfeats, _, out_acc = kernels(logits, feats, 1.0, grad, splits)
    assert (out_acc is None) == (dtype == torch.float32)
    if out_acc is not None:
        assert out_acc.dtype == torch.float32 and torch.equal(out_acc.to(dtype), out)
    for name, got, low, want in zip(
        NAMES,
        (out, dlogits, dfeats),
        low_precision(logits, feats, 1.0, grad),
        exact(logits, feats, 1.0, grad),
        strict=True,
    ):
        low_err = (low.double() - want).abs().max().item()
        floor = (1e-5 if dtype == torch.float32 else 1e-6) * want.abs().max().item()
        assert_close(got, want, 2 * low_err + floor, f"{dtype} {name} (oracle in {dtype}: {low_err:.2e})")


def test_large_logits_with_scale_100():
    logits, feats = make(2, 5, 40, 6, 7, dtype=torch.float32, offset=1e4, spread=0.01)
    grad = torch.randn(2, 5, 40)
    got = kernels(logits, feats, 100.0, grad)[:3]
    for name, g, want in zip(NAMES, got, exact(logits, feats, 100.0, grad), strict=True):
        assert torch.isfinite(g).all()
        assert_close(g, want, 1e-4 * want.abs().max().item(), name)


def test_deterministic_and_gradients_not_requested():
    logits, feats = make(2, 19, 40, 6, 7, dtype=torch.float32)
    grad = torch.randn(2, 19, 40)
    first, second = kernels(logits, feats, 1.0, grad, 2), kernels(logits, feats, 1.0, grad, 2)
    for a, b in zip(first[:3], second[:3], strict=True):
        assert torch.equal(a, b)
    out, _, _, stats, _ = first
    only_l = bwd(grad, logits, feats, out, stats, 1.0, torch.empty_like(logits), None)
    only_f = bwd(grad, logits, feats, out, stats, 1.0, None, torch.empty_like(feats))
    assert only_l[1] is None and torch.equal(only_l[0], first[1])
    assert only_f[0] is None and torch.equal(only_f[1], first[2])
    assert bwd(grad, logits, feats, out, stats, 1.0) == (None, None)


def test_module_attributes():
    assert _C.SOFT_REGION_POOL_MAX_CLASSES == 256


# ------------------------------------------------------------------------------------------------
# Input checks (TORCH_CHECK): the message names the argument and its shape
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "logits, feats, scale, message",
    [
        (
            torch.randn(2, 3, 4),
            torch.randn(2, 5, 3, 4),
            1.0,
            r"logits must be 4-D \(B, K, H, W\), got shape \[2, 3, 4\]",
        ),
        (
            torch.randn(2, 3, 4, 5),
            torch.randn(5, 4, 5),
            1.0,
            r"feats must be 4-D \(B, C, H, W\), got shape \[5, 4, 5\]",
        ),
        (
            torch.randn(2, 3, 4, 5),
            torch.randn(1, 6, 4, 5),
            1.0,
            r"batch and spatial sizes of logits \[2, 3, 4, 5\], "
            r"got \[1, 6, 4, 5\]",
        ),
        (torch.randn(2, 3, 4, 5), torch.randn(2, 6, 4, 4), 1.0, r"got \[2, 6, 4, 4\]"),
        (torch.randn(2, 3, 4, 5), torch.randn(2, 6, 4, 5).double(), 1.0, r"feats must have the dtype of logits"),
        (torch.randn(2, 3, 4, 5).int(), torch.randn(2, 6, 4, 5).int(), 1.0, r"must be float32, float16 or bfloat16"),
        (torch.randn(2, 0, 4, 5), torch.randn(2, 6, 4, 5), 1.0, r"logits must not be empty, got shape \[2, 0, 4, 5\]"),
        (torch.randn(2, 3, 4, 5), torch.randn(2, 6, 4, 5), float("inf"), r"scale must be finite"),
    ],
)
def test_bad_forward_inputs(logits, feats, scale, message):
    with pytest.raises(RuntimeError, match=message):
        fwd(logits, feats, scale)


def test_bad_backward_inputs():
    logits, feats = make(2, 3, 6, 4, 5, dtype=torch.float32)
    out, stats, _ = fwd(logits, feats, 1.0)
    grad = torch.randn_like(out)
    bufs = grad_buffers(logits, feats)
    cases = [
        (
            (grad[:, :2], logits, feats, out, stats),
            r"grad_out must have shape \(B, K, C\) = \[2, 3, 6\], got \[2, 2, 6\]",
        ),
        ((grad, logits, feats, out.half(), stats), r"out must be Float \(or the forward's out_acc\)"),
        ((grad, logits, feats, out, stats.double()), r"stats must be Float"),
        ((grad, logits, feats, out, stats[:, :, :1]), r"stats must have shape \(B, K, 2\) = \(2, 3, 2\)"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            bwd(*args, 1.0, *bufs)
    with pytest.raises(RuntimeError, match=r"dfeats must have strides that merge H and W"):
        bwd(grad, logits, feats, out, stats, 1.0, None, torch.empty(2, 6, 5, 4).transpose(2, 3))
    with pytest.raises(RuntimeError, match=r"dlogits must have shape \[2, 3, 4, 5\], got \[2, 3, 4, 4\]"):
        bwd(grad, logits, feats, out, stats, 1.0, torch.empty(2, 3, 4, 4), None)
    many, many_feats = make(1, 257, 2, 2, 2, dtype=torch.float32)
    many_out, many_stats, _ = fwd(many, many_feats, 1.0)  # the forward takes any number of classes
    with pytest.raises(RuntimeError, match=r"at most 256 classes, got logits of shape \[1, 257, 2, 2\]"):
        bwd(torch.randn_like(many_out), many, many_feats, many_out, many_stats, 1.0, torch.empty_like(many), None)


# ------------------------------------------------------------------------------------------------
# GPU: the kernels against their emulation (skipped without a GPU)
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 0])
def test_gpu_matches_emulation(dtype, splits):
    logits, feats = make(2, 124, 160, 30, 30, dtype=dtype, channels_last=True)
    grad = torch.randn(2, 124, 160).to(dtype)
    cpu = kernels(logits, feats, 1.0, grad, splits)
    gpu = kernels(logits.cuda(), feats.cuda(), 1.0, grad.cuda(), splits)
    for name, a, b in zip((*NAMES, "stats"), gpu[:4], cpu[:4], strict=True):
        tol = (1e-5 if dtype == torch.float32 else 2e-2) * max(1.0, b.abs().max().item())
        assert_close(a.cpu(), b, tol, f"gpu vs emulation {name}")
    again = kernels(logits.cuda(), feats.cuda(), 1.0, grad.cuda(), splits)
    assert all(torch.equal(a, b) for a, b in zip(gpu[:3], again[:3], strict=True))
