"""gcc_assign: reference semantics (float64 gradcheck, a hand-computed case), the Triton kernels
(interpreter on CPU) and the CUDA backend's Python side (CPU emulation) against the reference, the
empty-mask and tie rules, custom-op registration, torch.compile, autocast, input errors, the benchmark's
CPU smoke run. GPU tests run only with a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from benchmark_runs import run_cpu_benchmark
from numerics import assert_close

import ssltm_kernels
import ssltm_kernels.ops.gcc_assign as op
from ssltm_kernels import BackendUnavailableError, gcc_assign, gcc_assign_reference

ROOT = Path(__file__).resolve().parent.parent


def make_inputs(batch, categories, clusters, dim, dtype=torch.float32, device="cpu", seed=0, noise=0.5):
    """feats near a random cluster of their category (clear margins: no near-ties that summation order
    could flip), centers requiring grad, a mask with valid and invalid entries."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, categories, dim, generator=gen)
    assign = torch.randint(clusters, (batch, categories), generator=gen)
    feats = centers[assign, torch.arange(categories)] + noise * torch.randn(batch, categories, dim, generator=gen)
    valid = torch.rand(batch, categories, generator=gen) > 0.3
    valid[0, 0] = True
    return (feats.to(device, dtype).requires_grad_(), centers.to(device, dtype).requires_grad_(), valid.to(device))


def run(fn, feats, centers, valid, grad_seed=1, **kwargs):
    """Forward, and the gradient of centers for ``1.7 * loss + sum(nearest * g)`` (both outputs' gradients)."""
    index, nearest, loss = fn(feats, centers, valid, **kwargs)
    g = torch.randn(nearest.shape, generator=torch.Generator().manual_seed(grad_seed)).to(nearest)
    (dcenters,) = torch.autograd.grad(1.7 * loss + (nearest * g).sum(), centers)
    return index, nearest, loss, dcenters


def upcast(feats, centers, valid, dtype=torch.float64):
    return feats.detach().to(dtype), centers.detach().to(dtype).requires_grad_(), valid


def assert_matches_reference(result, ref, what, atol=1e-5):
    index, nearest, loss, dcenters = result
    ref_index, ref_nearest, ref_loss, ref_dcenters = ref
    assert index.dtype == torch.int64 and torch.equal(index, ref_index), f"{what}: index"
    assert_close(nearest, ref_nearest, 0.0, f"{what}: nearest")  # a copy of the same centres
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, ref_loss, atol * max(1.0, ref_loss.abs().item()), f"{what}: loss")
    assert_close(dcenters, ref_dcenters, atol * max(1.0, ref_dcenters.abs().max().item()), f"{what}: dcenters")


def pretend_cuda_backend_runs_on_cpu(monkeypatch):
    """Let dispatch take the 'cuda' backend for CPU tensors: the extension runs its CPU emulation of the
    CUDA kernels there, so the custom op -> _C path runs as on a GPU."""
    if not ssltm_kernels.HAS_CUDA_EXT:
        pytest.fail("ssltm_kernels._C is not built: pip install -e . --no-build-isolation")
    monkeypatch.setattr(op, "cuda_unavailable_reason", lambda feats: None)


# ------------------------------------------------------------------------------------------------------
# Reference semantics
# ------------------------------------------------------------------------------------------------------
def test_reference_by_hand():
    feats = torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[3.0, 0.0], [0.0, 0.0]]])  # (B=2, K=2, D=2)
    centers = torch.tensor([[[1.0, 0.0], [2.0, 2.0]], [[3.0, 1.0], [0.0, 1.0]]], requires_grad=True)  # (T=2, K, D)
    valid = torch.tensor([[True, True], [True, False]])
    index, nearest, loss = gcc_assign_reference(feats, centers, valid)
    # (0,0): d = 1 vs 10 -> 0; (0,1): 2 vs 1 -> 1; (1,0): 4 vs 1 -> 1; (1,1): 8 vs 1 -> 1 (invalid, still assigned)
    assert index.tolist() == [[0, 1], [1, 1]]
    assert torch.equal(nearest, torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[3.0, 1.0], [0.0, 1.0]]]))
    assert loss.item() == pytest.approx((1 + 1 + 1) / (3 * 2))  # valid squared distances / (n_valid * D)
    (grad,) = torch.autograd.grad(loss, centers)
    expected = torch.zeros(2, 2, 2)
    expected[0, 0] = torch.tensor([2.0, 0.0]) / 6  # 2 (c - f) / (n_valid * D)
    expected[1, 1] = torch.tensor([-2.0, 0.0]) / 6
    expected[1, 0] = torch.tensor([0.0, 2.0]) / 6
    assert torch.allclose(grad, expected)


def test_reference_and_op_gradcheck_float64():
    feats, centers, valid = upcast(*make_inputs(3, 4, 3, 5))

    def f(fn):
        return lambda centers: fn(feats, centers, valid)[1:]  # nearest and loss (index is an integer)

    assert torch.autograd.gradcheck(f(gcc_assign_reference), (centers,))
    # the op's own backward formula (reference backend): custom op, float64
    assert torch.autograd.gradcheck(f(lambda *a: gcc_assign(*a, backend="reference")), (centers,))
    # stop-gradient: nothing reaches feats (the loss depends on it, but only optimises the centres)
    feats.requires_grad_()
    for fn in (gcc_assign_reference, lambda *a: gcc_assign(*a, backend="reference")):
        _, nearest, loss = fn(feats, centers, valid)
        assert torch.autograd.grad(loss + nearest.sum(), feats, allow_unused=True) == (None,)


# ------------------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU) against the reference
# ------------------------------------------------------------------------------------------------------
SHAPES = [
    pytest.param(3, 5, 3, 37, id="B3-D37"),
    pytest.param(2, 1, 3, 16, id="K1"),
    pytest.param(2, 124, 3, 8, id="K124"),
    pytest.param(4, 3, 2, 1, id="D1"),
    pytest.param(3, 4, 1, 20, id="T1"),
    pytest.param(17, 2, 5, 600, id="B17-D600"),  # two programs per category, D beyond one block
]


@pytest.mark.parametrize("batch, categories, clusters, dim", SHAPES)
def test_triton_matches_reference_fp32(batch, categories, clusters, dim):
    inputs = make_inputs(batch, categories, clusters, dim)
    result = run(gcc_assign, *inputs, backend="triton")
    assert_matches_reference(result, run(gcc_assign_reference, *upcast(*inputs)), "triton")


def test_triton_small_blocks_and_non_contiguous_inputs(monkeypatch):
    """Blocks smaller than the problem in every loop (frames, features, programs' shares, clusters of
    the backward), on strided views of feats, centers, valid and of the gradient of nearest."""
    small = dict(fwd=dict(BLOCK_B=2, BLOCK_D=16, BLOCK_P=4), bwd=dict(BLOCK_T=4, BLOCK_D=16, BLOCK_B=2))
    monkeypatch.setattr(op, "triton_blocks", lambda *_: small)
    feats, centers, valid = make_inputs(5, 6, 3, 37)
    feats_t = feats.detach().transpose(0, 1).contiguous().transpose(0, 1)  # (B, K, D) with K outermost
    centers_t = torch.stack([centers.detach()] * 2, -1)[..., 0].requires_grad_()  # stride 2 along D
    valid_t = valid.t().contiguous().t()
    assert not (feats_t.is_contiguous() or centers_t.is_contiguous() or valid_t.is_contiguous())
    index, nearest, loss = gcc_assign(feats_t, centers_t, valid_t, backend="triton")
    g = torch.randn(nearest.shape, generator=torch.Generator().manual_seed(1)).expand(2, *nearest.shape)[1]
    (dcenters,) = torch.autograd.grad(1.7 * loss + (nearest * g).sum(), centers_t)
    ref = run(gcc_assign_reference, *upcast(feats, centers, valid))  # the same gradient of nearest
    assert_matches_reference((index, nearest, loss, dcenters), ref, "triton small blocks")
    assert op._ticket_counter(feats.device).item() == 0  # reset by the last program


def test_triton_matches_reference_fp16():
    """2x rule: the kernel's error against the fp32 reference is at most twice the fp16 reference's."""
    inputs = make_inputs(3, 5, 3, 37, dtype=torch.float16)
    result = run(gcc_assign, *inputs, backend="triton")
    low = run(gcc_assign_reference, *inputs)
    ref = run(gcc_assign_reference, *upcast(*inputs, dtype=torch.float32))
    assert result[1].dtype == torch.float16 and result[3].dtype == torch.float16
    assert_within_twice_low_precision_error(result, low, ref, torch.float16, "triton fp16")


def test_triton_backward_is_deterministic():
    inputs = make_inputs(17, 2, 5, 600)
    first = run(gcc_assign, *inputs, backend="triton")
    second = run(gcc_assign, *inputs, backend="triton")
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------------
# Rules every backend keeps: no valid entry, ties, gradients of one output only
# ------------------------------------------------------------------------------------------------------
BACKENDS = ["reference", "triton", "cuda"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_valid_entry_gives_zero_loss_and_zero_gradient(monkeypatch, backend):
    if backend == "cuda":
        pretend_cuda_backend_runs_on_cpu(monkeypatch)
    feats, centers, valid = make_inputs(3, 4, 2, 9)
    index, nearest, loss = gcc_assign(feats, centers, torch.zeros_like(valid), backend=backend)
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss, centers)
    assert torch.isfinite(grad).all() and torch.equal(grad, torch.zeros_like(grad))
    ref_index, ref_nearest, _ = gcc_assign_reference(feats, centers, valid)
    assert torch.equal(index, ref_index) and torch.equal(nearest, ref_nearest)  # assigned all the same


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_ties_take_the_lowest_cluster(monkeypatch, backend):
    if backend == "cuda":
        pretend_cuda_backend_runs_on_cpu(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    categories, dim = 3, 40
    base = torch.randn(categories, dim, generator=gen)
    centers = torch.stack([base + 3, base, -base, base])  # clusters 1 and 3 equal
    feats = torch.zeros(2, categories, dim)  # equally far from base and -base (clusters 1, 2, 3)
    feats[1] = base  # at cluster 1 and 3
    index, nearest, _ = gcc_assign(feats, centers, torch.ones(2, categories, dtype=torch.bool), backend=backend)
    assert index.tolist() == [[1] * categories, [1] * categories]
    assert torch.equal(nearest, base.expand(2, categories, dim))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "name, value",
    [("centers", float("nan")), ("feats", float("nan")), ("centers", float("inf")), ("feats", -float("inf"))],
)
def test_non_finite_inputs_are_an_error_in_every_backend(monkeypatch, backend, name, value):
    """A NaN centre used to give a finite loss in the kernels (a NaN distance is never the minimum there) and a
    NaN loss in the reference: every backend, the reference and a compiled graph now refuse it before the work."""
    if backend == "cuda":
        pretend_cuda_backend_runs_on_cpu(monkeypatch)
    args = dict(zip(("feats", "centers", "valid"), make_inputs(3, 4, 2, 9), strict=True))
    args[name] = args[name].detach().clone()
    args[name][1, 2, 3] = value
    match = rf"{name} must be finite, got 1 NaN or infinite values of {args[name].numel()} \(shape"
    with pytest.raises(ValueError, match=match):
        gcc_assign(**args, backend=backend)
    with pytest.raises(ValueError, match=match):
        gcc_assign_reference(**args)
    if backend == "reference" and name == "centers" and value != value:  # once: the check is in the compiled graph
        compiled = torch.compile(lambda f, c, v: gcc_assign(f, c, v, backend)[2], fullgraph=True, backend="aot_eager")
        with pytest.raises(ValueError, match=match):
            compiled(args["feats"], args["centers"], args["valid"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_of_one_output_only(monkeypatch, backend):
    """Only the loss, or only nearest, carries a gradient (the kernels skip the other one)."""
    if backend == "cuda":
        pretend_cuda_backend_runs_on_cpu(monkeypatch)
    feats, centers, valid = make_inputs(3, 5, 3, 21)
    ref_feats, ref_centers, _ = upcast(feats, centers, valid)
    _, nearest, loss = gcc_assign(feats, centers, valid, backend=backend)
    _, ref_nearest, ref_loss = gcc_assign_reference(ref_feats, ref_centers, valid)
    g = torch.randn(nearest.shape, generator=torch.Generator().manual_seed(2))
    for out, ref_out, grad in ((loss, ref_loss, None), (nearest, ref_nearest, g)):
        (dcenters,) = torch.autograd.grad(out, centers, grad, retain_graph=True)
        (expected,) = torch.autograd.grad(
            ref_out, ref_centers, None if grad is None else grad.double(), retain_graph=True
        )
        assert_close(dcenters, expected, 1e-6 * max(1.0, expected.abs().max().item()), f"{backend} dcenters")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_backend_python_side_through_the_cpu_emulation(monkeypatch, dtype):
    pretend_cuda_backend_runs_on_cpu(monkeypatch)
    calls = []
    monkeypatch.setattr(
        op._C,
        "gcc_assign_forward",
        lambda *a, _f=op._C.gcc_assign_forward: calls.append("fwd") or _f(*a),
        raising=False,
    )
    inputs = make_inputs(9, 3, 3, 37, dtype=dtype)
    result = run(gcc_assign, *inputs)  # automatic dispatch: cuda first
    assert calls == ["fwd"]
    ref = run(gcc_assign_reference, *upcast(*inputs, dtype=torch.float32))
    if dtype == torch.float32:
        assert_matches_reference(result, ref, "cuda emulation")
    else:
        assert_within_twice_low_precision_error(result, run(gcc_assign_reference, *inputs), ref, dtype, "cuda fp16")


# ------------------------------------------------------------------------------------------------------
# torch.library registration, torch.compile, autocast
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck_forward_and_backward_ops(backend):
    feats, centers, valid = make_inputs(3, 4, 3, 20)
    torch.library.opcheck(torch.ops.ssltm.gcc_assign_fwd.default, (feats.detach(), centers, valid, backend))
    nearest, loss, index, norm = torch.ops.ssltm.gcc_assign_fwd(feats.detach(), centers.detach(), valid, backend)
    grad = torch.randn_like(nearest)
    for grad_nearest, grad_loss in ((grad, torch.tensor(0.5)), (None, torch.tensor(0.5)), (grad, None)):
        torch.library.opcheck(
            torch.ops.ssltm.gcc_assign_bwd.default,
            (grad_nearest, grad_loss, feats.detach(), centers.detach(), valid, index, norm, backend),
            test_utils=("test_schema", "test_faketensor"),
        )


def test_torch_compile_fullgraph():
    feats, centers, valid = make_inputs(3, 4, 3, 20)

    def step(feats, centers, valid):
        index, nearest, loss = gcc_assign(feats, centers, valid, backend="triton")
        return index, loss + 0.1 * nearest.square().mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    index, out = compiled(feats, centers, valid)
    ref_index, ref_out = step(feats, centers, valid)
    assert torch.equal(index, ref_index)
    assert_close(out, ref_out, 1e-6, "compiled vs eager")
    (grad,) = torch.autograd.grad(out, centers)
    (ref_grad,) = torch.autograd.grad(ref_out, centers)
    assert_close(grad, ref_grad, 1e-6, "compiled grad")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_autocast_promotes_feats_and_centers_to_the_wider_dtype(backend):
    """The SSLTM setting: 16-bit category features (fp16 here: the interpreter has no bf16 dot) meet
    fp32 learnable centres under autocast; both run in fp32, the centres' gradient is fp32."""
    feats, centers, valid = make_inputs(3, 4, 3, 20)
    with pytest.raises(TypeError, match=r"centers must have feats' dtype torch.float16, got torch.float32"):
        gcc_assign(feats.half(), centers, valid, backend=backend)
    with torch.autocast("cpu", dtype=torch.float16):
        result = run(gcc_assign, feats.detach().half(), centers, valid, backend=backend)
    assert result[1].dtype == torch.float32 and result[3].dtype == torch.float32
    assert_matches_reference(result, run(gcc_assign_reference, *upcast(feats.half(), centers, valid)), "autocast")


# ------------------------------------------------------------------------------------------------------
# Bad input, dispatch
# ------------------------------------------------------------------------------------------------------
def _args():
    return dict(feats=torch.randn(2, 3, 4), centers=torch.randn(5, 3, 4), valid=torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: a.update(feats=a["feats"][0]), ValueError, r"feats must be 3-D \(B, K, D\), got shape \(3, 4\)"),
        (lambda a: a.update(centers=a["centers"][0]), ValueError, r"centers must be 3-D .* got shape \(3, 4\)"),
        (
            lambda a: a.update(centers=torch.randn(5, 2, 4)),
            ValueError,
            r"centers must have shape \(T, K, D\) = \(T, 3, 4\) to match feats \(2, 3, 4\), got \(5, 2, 4\)",
        ),
        (lambda a: a.update(centers=torch.randn(5, 3, 6)), ValueError, r"centers .* got \(5, 3, 6\)"),
        (
            lambda a: a.update(valid=torch.ones(3, 3, dtype=torch.bool)),
            ValueError,
            r"valid must have shape \(B, K\) = \(2, 3\) to match feats \(2, 3, 4\), got \(3, 3\)",
        ),
        (lambda a: a.update(valid=torch.ones(2, 3, 1, dtype=torch.bool)), ValueError, r"valid must have shape"),
        (
            lambda a: a.update(valid=torch.ones(2, 3)),
            TypeError,
            r"valid must be a bool tensor, got torch.float32 of shape \(2, 3\)",
        ),
        (
            lambda a: a.update(centers=a["centers"].double()),
            TypeError,
            r"centers must have feats' dtype torch.float32, got torch.float64 \(shape \(5, 3, 4\)\)",
        ),
        (
            lambda a: a.update(feats=torch.ones(2, 3, 4, dtype=torch.int64)),
            TypeError,
            r"feats must be a floating-point tensor, got torch.int64 of shape \(2, 3, 4\)",
        ),
        (
            lambda a: a.update(centers=a["centers"].to("meta")),
            ValueError,
            r"centers must be on feats' device cpu, got meta \(shape \(5, 3, 4\)\)",
        ),
        (lambda a: a.update(valid=a["valid"].to("meta")), ValueError, r"valid must be on feats' device cpu"),
        (
            lambda a: a.update(feats=torch.randn(0, 3, 4), valid=torch.ones(0, 3, dtype=torch.bool)),
            ValueError,
            r"must not be empty, got feats \(0, 3, 4\)",
        ),
        (lambda a: a.update(centers=torch.randn(0, 3, 4)), ValueError, r"must not be empty.*centers \(0, 3, 4\)"),
        (lambda a: a.update(feats=[1.0]), TypeError, r"feats must be a torch.Tensor, got list"),
        (lambda a: a.update(backend="cudnn"), ValueError, r"backend must be one of"),
        (lambda a: a.update(backend="cuda"), BackendUnavailableError, r"gcc_assign: backend 'cuda' cannot run: "),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, error, match):
    args = _args()
    mutate(args)
    with pytest.raises(error, match=match):
        gcc_assign(**args)


def test_backend_checks_and_the_environment_variable(monkeypatch):
    args = _args()
    assert op.can_run_reference(**args) and op.can_run_triton(**args)  # the interpreter runs CPU tensors
    assert not op.can_run_triton(args["feats"].double(), args["centers"].double(), args["valid"])
    with pytest.raises(BackendUnavailableError, match=r"1025 clusters exceed the Triton kernels' 1024"):
        op.can_run_triton(args["feats"], torch.randn(1025, 3, 4), args["valid"], raise_error=True)
    monkeypatch.setenv("SSLTM_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        gcc_assign(**args)
    monkeypatch.setenv("SSLTM_BACKEND", "reference")
    index, nearest, loss = gcc_assign(**args)
    ref = gcc_assign_reference(**args)
    assert torch.equal(index, ref[0]) and torch.equal(nearest, ref[1]) and torch.equal(loss, ref[2])


def test_op_submodule_is_a_module_and_the_package_exports_the_functions():
    import importlib
    import types

    module = importlib.import_module("ssltm_kernels.ops.gcc_assign")
    assert isinstance(module, types.ModuleType) and module is op
    assert ssltm_kernels.gcc_assign is op.gcc_assign and ssltm_kernels.gcc_assign_reference is op.gcc_assign_reference
    assert {"can_run_cuda", "can_run_triton", "can_run_reference", "compile_configs"} <= set(op.__all__)


# ------------------------------------------------------------------------------------------------------
# Benchmark: CPU smoke run
# ------------------------------------------------------------------------------------------------------
def test_benchmark_cpu_smoke(tmp_path):

    proc, rows = run_cpu_benchmark("gcc_assign", "--quick", "--providers", "eager,triton,cuda", results_dir=tmp_path)
    assert "CPU comparison" in proc.stdout and "targets: defined for bf16 on a GPU" in proc.stdout
    by = {(r["provider"], r["mode"]): r for r in rows}
    for mode in ("fwd", "bwd", "fwd+bwd"):
        eager = by[("eager", mode)]
        assert eager["error"] is None and eager["ms"] > 0 and eager["correct"] is True, eager
        assert eager["launches"] is None  # counted on a GPU only
    assert by[("triton", "fwd")]["error"].startswith("unavailable: triton on CPU")
    assert by[("cuda", "fwd")]["error"].startswith("unavailable")


# ------------------------------------------------------------------------------------------------------
# GPU: CUDA and Triton backends in every dtype (skipped without a GPU)
# ------------------------------------------------------------------------------------------------------
def assert_within_twice_low_precision_error(result, low, ref, dtype, what):
    """The 2x-reference-error rule on (nearest, loss, dcenters); the index must equal the fp32 reference's
    (the inputs' margins leave no near-tie)."""
    assert torch.equal(result[0], ref[0]), f"{what}: index"
    for name, g, lo, r in zip(("nearest", "loss", "dcenters"), result[1:], low[1:], ref[1:], strict=True):
        low_err = (lo.float() - r.float()).abs().max().item()
        floor = (1e-5 if dtype == torch.float32 else 1e-6) * max(1.0, r.abs().max().item())
        assert_close(g.float(), r.float(), 2 * low_err + floor, f"{what} {name} (same-precision ref err {low_err:.2e})")


GPU_SHAPES = [
    pytest.param(8, 124, 3, 512, id="ssltm", marks=pytest.mark.gpu_quick),
    pytest.param(3, 19, 5, 100, id="odd", marks=pytest.mark.gpu_quick),
    pytest.param(37, 2, 1, 1000, id="many-frames-T1"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("batch, categories, clusters, dim", GPU_SHAPES)
def test_gpu_backend_matches_fp32_reference(backend, dtype, batch, categories, clusters, dim):
    inputs = make_inputs(batch, categories, clusters, dim, dtype=dtype, device="cuda")
    result = run(gcc_assign, *inputs, backend=backend)
    low = run(gcc_assign_reference, *inputs)
    ref = run(gcc_assign_reference, *upcast(*inputs, dtype=torch.float32))
    assert_within_twice_low_precision_error(result, low, ref, dtype, backend)
    again = run(gcc_assign, *inputs, backend=backend)  # the ticket counter was reset: same numbers
    for a, b in zip(result, again, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_cuda_equals_triton(dtype):
    inputs = make_inputs(8, 124, 3, 512, dtype=dtype, device="cuda")
    cuda = run(gcc_assign, *inputs, backend="cuda")
    triton = run(gcc_assign, *inputs, backend="triton")
    assert torch.equal(cuda[0], triton[0]) and torch.equal(cuda[1], triton[1])
    for name, a, b in zip(("loss", "dcenters"), cuda[2:], triton[2:], strict=True):
        tol = (1e-5 if dtype == torch.float32 else 1e-2) * max(1.0, b.abs().max().item())
        assert_close(a.float(), b.float(), tol, f"cuda vs triton {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_empty_mask_ties_and_streams(backend):
    feats, centers, valid = make_inputs(8, 124, 3, 512, dtype=torch.bfloat16, device="cuda")
    _, _, loss = gcc_assign(feats, centers, torch.zeros_like(valid), backend=backend)
    (grad,) = torch.autograd.grad(loss, centers)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    tied = torch.cat([centers.detach()[:1], centers.detach()[:1], centers.detach()[1:]])  # clusters 0 and 1 equal
    index, _, _ = gcc_assign(feats.detach(), tied, valid, backend=backend)
    assert not (index == 1).any()
    ref = gcc_assign(feats.detach(), centers.detach(), valid, backend=backend)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # another stream: its own ticket counter
        other = gcc_assign(feats.detach(), centers.detach(), valid, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    for a, b in zip(ref, other, strict=True):
        assert torch.equal(a, b)
