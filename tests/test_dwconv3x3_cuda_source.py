"""Tests of the CUDA depthwise-conv kernels' code (csrc/dwconv3x3_core.cuh).

On CPU tensors ``ssltm_kernels._C`` runs the CPU emulation of the CUDA kernels: the same per-thread
functions, block after block, thread after thread. These tests compare it with an independent float64
implementation of the contract (zero padding, the 9 shifted frames summed, erf GELU), with gradients from
autograd. GPU tests compare the real kernels with the emulation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from extension import built_extension

_C = built_extension()

fwd = _C.dwconv3x3_forward
bwd = _C.dwconv3x3_backward


def oracle(x, weight, bias, activation):
    """Zero-pad H and W, sum the 9 shifted frames times their taps (tap 3i+j: offset (i-1, j-1)), add the
    bias, apply 0.5 z (1 + erf(z / sqrt 2))."""
    height, width = x.shape[-3:-1]
    padded = F.pad(x, (0, 0, 1, 1, 1, 1))
    z = sum(padded[..., i : i + height, j : j + width, :] * weight[:, 0, i, j] for i in range(3) for j in range(3))
    if bias is not None:
        z = z + bias
    return 0.5 * z * (1 + torch.erf(z / 2**0.5)) if activation == "gelu" else z


def make_problem(shape, *, bias=True, channel_stride=1, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    channels = shape[-1]
    x = torch.randn(*shape[:-1], channels * channel_stride, generator=gen, dtype=torch.float64)[..., ::channel_stride]
    weight = torch.randn(channels, 1, 3, 3, generator=gen, dtype=torch.float64) / 2
    b = torch.randn(channels, generator=gen, dtype=torch.float64) if bias else None
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    return tuple(None if t is None else t.to(dtype) for t in (x, weight, b, grad))


def run_kernel(x, weight, bias, grad, activation, num_groups=0):
    out = fwd(x, weight, bias, activation)
    dx, dweight, dbias = bwd(grad, x, weight, bias, activation, num_groups)
    return out, dx, dweight, dbias


def run_oracle(x, weight, bias, grad, activation):
    leaves = [t.detach().double().requires_grad_() for t in (x, weight) + ((bias,) if bias is not None else ())]
    out = oracle(*leaves[:2], leaves[2] if bias is not None else None, activation)
    grads = torch.autograd.grad(out, leaves, grad.double())
    return out, *grads, *([None] if bias is None else [])


def assert_close(name, got, want, atol):
    err = (got.double() - want.double()).abs().max().item()
    assert err <= atol, f"{name}: max abs error {err:.3e} > {atol:.1e}"


SHAPES = {
    "1x1-C1": ((1, 1, 1, 1), True, 1),
    "T4-1x1-C1": ((2, 4, 1, 1, 1), False, 1),
    "5x13-C33": ((2, 5, 13, 33), True, 1),
    "T1-5x13-C33-strided": ((1, 1, 5, 13, 33), True, 3),
    "T4-odd-C40": ((1, 4, 3, 7, 40), False, 2),
    "rows-1": ((1, 2, 1, 9, 5), True, 1),
}


@pytest.mark.parametrize("activation", ["gelu", ""])
@pytest.mark.parametrize("name", list(SHAPES))
def test_float64_matches_oracle(name, activation):
    shape, bias, stride = SHAPES[name]
    x, weight, b, grad = make_problem(shape, bias=bias, channel_stride=stride)
    got = run_kernel(x, weight, b, grad, activation)
    want = run_oracle(x, weight, b, grad, activation)
    assert got[0].shape == shape and got[0].is_contiguous() and got[1].is_contiguous()
    assert got[2].shape == (shape[-1], 1, 3, 3) and (got[3] is None) == (not bias)
    for what, g, w in zip(("out", "dx", "dweight", "dbias"), got, want, strict=True):
        if w is None:
            continue
        assert_close(what, g, w, 1e-12 * max(1.0, w.abs().max().item()))


@pytest.mark.parametrize("num_groups", [1, 2, 7, 1000])
def test_pixel_groups_of_the_weight_gradient(num_groups):
    """Any number of pixel groups (more than pixels included) gives the same sums."""
    x, weight, b, grad = make_problem((2, 3, 5, 6, 35))
    got = run_kernel(x, weight, b, grad, "gelu", num_groups)
    want = run_oracle(x, weight, b, grad, "gelu")
    for what, g, w in zip(("dweight", "dbias"), got[2:], want[2:], strict=True):
        assert_close(what, g, w, 1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_within_twice_the_reference_error(dtype):
    """Error vs float64 at most 2x that of PyTorch's own conv + GELU run in ``dtype`` (plus a floor)."""
    x, weight, b, grad = make_problem((2, 2, 5, 13, 33), channel_stride=2, dtype=dtype)
    got = run_kernel(x, weight, b, grad, "gelu")
    want = run_oracle(x, weight, b, grad, "gelu")
    leaves = [t.detach().requires_grad_() for t in (x, weight, b)]
    low_out = (
        F.gelu(F.conv2d(leaves[0].flatten(0, 1).permute(0, 3, 1, 2), leaves[1], leaves[2], padding=1, groups=33))
        .permute(0, 2, 3, 1)
        .reshape(x.shape)
    )
    low = (low_out, *torch.autograd.grad(low_out, leaves, grad))
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert got[2].dtype == got[3].dtype == (torch.float32)
    for what, g, lo, w in zip(("out", "dx", "dweight", "dbias"), got, low, want, strict=True):
        low_err = (lo.double() - w).abs().max().item()
        assert_close(
            f"{what} ({dtype}, reference error {low_err:.2e})", g, w, 2 * low_err + 1e-6 * w.abs().max().item()
        )


def test_deterministic_and_broadcast_gradient():
    x, weight, b, grad = make_problem((1, 3, 6, 7, 33), dtype=torch.float32)
    first = run_kernel(x, weight, b, grad, "gelu")
    second = run_kernel(x, weight, b, grad, "gelu")
    assert all(torch.equal(a, c) for a, c in zip(first, second, strict=True))
    ones = torch.ones(()).expand(x.shape)  # autograd's gradient of sum(): stride 0
    dx, dweight, _ = bwd(ones, x, weight, b, "", 0)
    want = run_oracle(x, weight, b, torch.ones(x.shape), "")
    assert_close("dx of a broadcast gradient", dx, want[1], 1e-5)
    assert_close("dweight of a broadcast gradient", dweight, want[2], 1e-3)


@pytest.fixture
def small():
    x, weight, b, grad = make_problem((1, 2, 3, 4, 8), dtype=torch.float32)
    return dict(x=x, weight=weight, bias=b, activation="gelu"), grad


@pytest.mark.parametrize(
    "override,message",
    [
        (dict(x=torch.randn(3, 4, 8)), r"x must be 4-D \(B, H, W, C\) or 5-D \(B, T, H, W, C\), got shape \[3, 4, 8\]"),
        (
            dict(weight=torch.randn(8, 3, 3)),
            r"weight must have shape \(C, 1, 3, 3\) = \(8, 1, 3, 3\) for x of shape "
            r"\[1, 2, 3, 4, 8\], got \[8, 3, 3\]",
        ),
        (dict(weight=torch.randn(9, 1, 3, 3)), r"weight must have shape .* got \[9, 1, 3, 3\]"),
        (
            dict(weight=torch.randn(8, 1, 3, 3, dtype=torch.float64)),
            r"weight must have the dtype of x \(Float\), got "
            r"Double \(weight shape \[8, 1, 3, 3\]\)",
        ),
        (dict(bias=torch.randn(7)), r"bias must have shape \(C,\) = \(8,\) .* got \[7\]"),
        (dict(bias=torch.randn(8).half()), r"bias must have the dtype of x"),
        (dict(activation="relu"), r"activation must be \"\" \(none\) or \"gelu\", got \"relu\""),
        (dict(x=torch.randn(1, 0, 3, 4, 8)), r"x must not be empty, got shape \[1, 0, 3, 4, 8\]"),
        (dict(x=torch.randn(1, 2, 3, 4, 8).int()), r"x must be float32, float16 or bfloat16 .* got Int"),
    ],
)
def test_bad_inputs(small, override, message):
    args, _ = small
    args.update(override)
    with pytest.raises(RuntimeError, match=message):
        fwd(**args)


def test_bad_backward_inputs(small):
    args, grad = small
    with pytest.raises(RuntimeError, match=r"grad_out must have the shape of x \[1, 2, 3, 4, 8\], got \[1, 2, 3, 4\]"):
        bwd(grad[..., 0], args["x"], args["weight"], args["bias"], "gelu")
    with pytest.raises(RuntimeError, match=r"grad_out must have the dtype of x \(Float\), got Double"):
        bwd(grad.double(), args["x"], args["weight"], args["bias"], "gelu")
    with pytest.raises(RuntimeError, match=r"num_groups must be >= 0"):
        bwd(grad, args["x"], args["weight"], args["bias"], "gelu", -1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["gelu", ""])
def test_gpu_matches_emulation(dtype, activation):
    """The real kernels give the emulation's results (same per-thread code), up to the order of float
    operations that the compilers choose."""
    x, weight, b, grad = make_problem((2, 4, 30, 30, 520), channel_stride=2, dtype=dtype)
    cpu = run_kernel(x, weight, b, grad, activation)
    gpu = run_kernel(*(t.cuda() for t in (x, weight, b, grad)), activation)
    for what, c, g in zip(("out", "dx", "dweight", "dbias"), cpu, gpu, strict=True):
        tol = (1e-2 if dtype != torch.float32 else 1e-4) * max(1.0, c.abs().max().item())
        assert_close(f"gpu vs emulation {what}", g.cpu(), c, tol)
    again = run_kernel(*(t.cuda() for t in (x, weight, b, grad)), activation)
    assert all(torch.equal(a, c) for a, c in zip(gpu, again, strict=True))
