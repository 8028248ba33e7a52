"""Tests of the CUDA GCC-assignment kernels' code (csrc/gcc_assign_core.cuh).

On CPU tensors ``ssltm_kernels._C`` runs the CPU emulation of the CUDA kernels: the same per-thread
phase functions, in the same order, with loops for the threads of a block. These tests compare it with
an independent float64 implementation of the contract (loops over frames and categories, a first-minimum
scan), and check the input errors of the bindings. GPU tests compare the real kernels with the emulation.
"""

from __future__ import annotations

import pytest
import torch
from extension import built_extension

_C = built_extension()

fwd = _C.gcc_assign_forward
bwd = _C.gcc_assign_backward
ROWS_PER_BLOCK, SHARE_THREADS = 8, 256  # kRows, kFwdThreads of the forward kernel


def oracle(feats, centers, valid, grad_nearest, grad_loss):
    """float64, frame by frame: the first cluster at the least squared distance, the masked MSE, and
    dcenters = sum over assigned frames of grad_nearest + valid * 2 grad_loss (c - f) / (n_valid * D)."""
    f, c = feats.double(), centers.double()
    batch, categories, dim = f.shape
    index = torch.zeros(batch, categories, dtype=torch.int64)
    for b in range(batch):
        for j in range(categories):
            dist = ((f[b, j] - c[:, j]) ** 2).sum(-1).tolist()
            index[b, j] = min(range(len(dist)), key=lambda i: (dist[i], i))
    nearest = c[index, torch.arange(categories)]
    n_valid = int(valid.sum())
    norm = 1.0 / (n_valid * dim) if n_valid else 0.0
    loss = ((nearest - f) ** 2)[valid].sum() * norm
    dcenters = torch.zeros_like(c)
    for b in range(batch):
        for j in range(categories):
            g = torch.zeros(dim, dtype=torch.float64)
            if grad_nearest is not None:
                g += grad_nearest[b, j].double()
            if grad_loss is not None and valid[b, j]:
                g += 2 * float(grad_loss) * norm * (nearest[b, j] - f[b, j])
            dcenters[index[b, j], j] += g
    return index, nearest, loss, norm, dcenters


def make_inputs(batch, categories, clusters, dim, dtype=torch.float32, seed=0):
    """feats near a random cluster of their category (clear margins), a mask, gradients of both outputs."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, categories, dim, generator=gen)
    assign = torch.randint(clusters, (batch, categories), generator=gen)
    feats = centers[assign, torch.arange(categories)] + 0.5 * torch.randn(batch, categories, dim, generator=gen)
    valid = torch.rand(batch, categories, generator=gen) > 0.3
    grad_nearest = torch.randn(batch, categories, dim, generator=gen)
    return feats.to(dtype), centers.to(dtype), valid, grad_nearest.to(dtype), torch.tensor(1.7)


def check_against_oracle(feats, centers, valid, grad_nearest, grad_loss, atol=1e-5):
    index, nearest, loss, norm = fwd(feats, centers, valid)
    dcenters = bwd(grad_nearest, grad_loss, feats, centers, valid, index, norm)
    ref_index, ref_nearest, ref_loss, ref_norm, ref_dcenters = oracle(feats, centers, valid, grad_nearest, grad_loss)
    assert index.dtype == torch.int64 and torch.equal(index, ref_index)
    assert nearest.dtype == centers.dtype and nearest.is_contiguous()
    assert torch.equal(nearest.double(), ref_nearest)  # a copy of the centres
    assert loss.dtype == torch.float32 and norm.dtype == torch.float32 and loss.dim() == 0
    assert norm.item() == pytest.approx(ref_norm, rel=1e-6)
    assert abs(loss.item() - ref_loss.item()) <= atol * max(1.0, ref_loss.item())
    assert dcenters.dtype == centers.dtype and dcenters.shape == centers.shape and dcenters.is_contiguous()
    # 16-bit gradients: rounding of the result
    tol = atol if centers.dtype == torch.float32 else 2.0**-7 if centers.dtype == torch.bfloat16 else 2.0**-10
    err = (dcenters.double() - ref_dcenters).abs().max().item()
    assert err <= tol * max(1.0, ref_dcenters.abs().max().item()), f"dcenters: max abs error {err:.3e}"
    return index, nearest, loss, norm, dcenters


@pytest.mark.parametrize(
    "batch, categories, clusters, dim",
    [
        pytest.param(3, 5, 3, 37, id="D-not-a-multiple-of-the-lanes"),
        pytest.param(17, 2, 4, 5, id="three-row-blocks-D-below-the-lanes"),
        pytest.param(9, 130, 3, 8, id="more-blocks-than-share-threads"),
        pytest.param(2, 3, 1, 300, id="T1-D-beyond-one-backward-block"),
        pytest.param(1, 1, 2, 1, id="one-frame-one-category-D1"),
    ],
)
def test_matches_oracle_fp32(batch, categories, clusters, dim):
    check_against_oracle(*make_inputs(batch, categories, clusters, dim))


def test_share_reduction_covers_every_block():
    """More forward blocks than the last block's threads: each thread sums several blocks' shares."""
    assert 130 * -(-9 // ROWS_PER_BLOCK) > SHARE_THREADS
    feats, centers, valid, _, grad_loss = make_inputs(9, 130, 3, 8)
    valid[:] = False
    valid[-1, -1] = True  # only the last block holds a valid frame
    _, _, loss, norm = fwd(feats, centers, valid)
    assert norm.item() == pytest.approx(1 / 8)
    dist = ((feats[-1, -1] - centers[:, -1]) ** 2).sum(-1).min()
    assert loss.item() == pytest.approx(dist.item() / 8, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    check_against_oracle(*make_inputs(11, 7, 3, 45, dtype=dtype))


def test_gradients_of_one_output_and_strided_inputs():
    feats, centers, valid, grad_nearest, grad_loss = make_inputs(10, 6, 3, 33)
    strided = (
        feats.transpose(0, 1).contiguous().transpose(0, 1),
        torch.stack([centers] * 2, -1)[..., 1],
        valid.t().contiguous().t(),
    )
    assert not any(x.is_contiguous() for x in strided)
    broadcast = grad_nearest[:1, :1].expand_as(grad_nearest)  # stride 0, as autograd hands some gradients
    for grads in ((None, grad_loss), (grad_nearest, None), (broadcast, grad_loss), (None, None)):
        check_against_oracle(*strided, *grads)


def test_no_valid_entry():
    feats, centers, valid, grad_nearest, grad_loss = make_inputs(4, 3, 2, 20)
    index, nearest, loss, norm, dcenters = check_against_oracle(
        feats, centers, torch.zeros_like(valid), None, grad_loss
    )
    assert loss.item() == 0.0 and norm.item() == 0.0 and torch.equal(dcenters, torch.zeros_like(dcenters))


def test_ties_take_the_lowest_cluster():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 40, generator=gen)
    centers = torch.stack([base + 3, base, -base, base])
    feats = torch.stack([torch.zeros(3, 40), base])  # frame 0: clusters 1, 2, 3 tie; frame 1: 1 and 3
    index, _, _, _ = fwd(feats, centers, torch.ones(2, 3, dtype=torch.bool))
    assert index.tolist() == [[1, 1, 1], [1, 1, 1]]


def test_deterministic_and_repeatable():
    inputs = make_inputs(17, 5, 3, 70)
    first = check_against_oracle(*inputs)
    second = check_against_oracle(*inputs)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# Input errors of the bindings
# ------------------------------------------------------------------------------------------------
def _small():
    return dict(feats=torch.randn(2, 3, 4), centers=torch.randn(5, 3, 4), valid=torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(feats=torch.randn(3, 4)), r"feats must be 3-D \(B, K, D\), got shape \[3, 4\]"),
        (dict(centers=torch.randn(3, 4)), r"centers must be 3-D \(T, K, D\), got shape \[3, 4\]"),
        (
            dict(centers=torch.randn(5, 3, 6)),
            r"centers must have shape \(T, K, D\) = \(T, 3, 4\) to match feats "
            r"\[2, 3, 4\], got \[5, 3, 6\]",
        ),
        (dict(valid=torch.ones(2, 4, dtype=torch.bool)), r"valid must have shape \(B, K\) = \(2, 3\) .* got \[2, 4\]"),
        (dict(valid=torch.ones(2, 3)), r"valid must be bool, got Float of shape \[2, 3\]"),
        (
            dict(feats=torch.randn(2, 3, 4).double(), centers=torch.randn(5, 3, 4).double()),
            r"feats must be float32, float16 or bfloat16, got Double on cpu \(shape \[2, 3, 4\]\)",
        ),
        (dict(centers=torch.randn(5, 3, 4).half()), r"centers must have the dtype of feats \(Float\), got Half"),
        (dict(feats=torch.randn(0, 3, 4), valid=torch.ones(0, 3, dtype=torch.bool)), r"must not be empty"),
        (dict(centers=torch.randn(5, 3, 4, device="meta")), r"centers must be on the device of feats \(cpu\)"),
    ],
)
def test_bad_forward_inputs(override, message):
    args = _small() | override
    with pytest.raises(RuntimeError, match=message):
        fwd(**args)


def test_bad_backward_inputs():
    args = _small()
    index, nearest, loss, norm = fwd(**args)
    good = dict(grad_nearest=torch.randn(2, 3, 4), grad_loss=torch.tensor(1.0), index=index, norm=norm, **args)
    for override, message in [
        (
            dict(grad_nearest=torch.randn(2, 3, 5)),
            r"grad_nearest must have the shape of feats \[2, 3, 4\], got \[2, 3, 5\]",
        ),
        (dict(grad_nearest=torch.randn(2, 3, 4).half()), r"grad_nearest must have the dtype of centers \(Float\)"),
        (dict(grad_loss=torch.ones(2)), r"grad_loss must be a 0-dim tensor, got shape \[2\]"),
        (dict(grad_loss=torch.tensor(1.0).double()), r"grad_loss must be float32, got Double"),
        (dict(index=index[:1]), r"index must be the forward's \(B, K\) = \[2, 3\] int64 tensor .* shape \[1, 3\]"),
        (dict(norm=norm.double()), r"norm must be float32"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            bwd(**(good | override))


# ------------------------------------------------------------------------------------------------
# GPU: the real kernels against their emulation
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8, 124, 3, 512), (9, 130, 2, 37), (3, 5, 1, 1000)])
def test_gpu_kernels_match_the_emulation(shape, dtype):
    feats, centers, valid, grad_nearest, grad_loss = make_inputs(*shape, dtype=dtype)
    cpu = fwd(feats, centers, valid)
    cpu_grad = bwd(grad_nearest, grad_loss, feats, centers, valid, cpu[0], cpu[3])
    cuda_args = [x.cuda() for x in (feats, centers, valid)]
    gpu = fwd(*cuda_args)
    gpu_grad = bwd(grad_nearest.cuda(), grad_loss.cuda(), *cuda_args, gpu[0], gpu[3])
    assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])
    assert gpu[3].item() == cpu[3].item()
    assert gpu[2].item() == pytest.approx(cpu[2].item(), rel=1e-5)  # the GPU contracts multiply-adds
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (gpu_grad.cpu().float() - cpu_grad.float()).abs().max().item() <= tol * max(1.0, cpu_grad.abs().max().item())
