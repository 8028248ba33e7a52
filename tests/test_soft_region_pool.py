"""soft_region_pool / SpatialGather: reference semantics (OCRNet), Triton kernels (interpreter on CPU), the
CUDA backend's Python side (through the extension's CPU emulation), custom-op registration, torch.compile,
input errors and dispatch. GPU tests run only with a GPU. The CUDA kernels' own code is tested in
test_soft_region_pool_cuda_source.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from benchmark_runs import run_cpu_benchmark
from numerics import assert_close, assert_within_twice_low_precision_error, upcast

import ssltm_kernels
import ssltm_kernels.ops.soft_region_pool as op
from ssltm_kernels import BackendUnavailableError, SpatialGather, soft_region_pool, soft_region_pool_reference

# the kernels start their running maximum at -FLT_MAX; |scale| > 1 times it overflows to -inf on purpose
# (exp(-inf) = 0), which numpy, under the Triton interpreter, reports
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


def make_inputs(
    batch,
    classes,
    channels,
    h,
    w,
    dtype=torch.float32,
    device="cpu",
    seed=0,
    channels_last=False,
    magnitude=1.0,
    offset=0.0,
):
    """logits (B, K, H, W) and feats (B, C, H, W), both requiring grad; channels_last: feats is a permuted
    (B, H, W, C) tensor."""
    gen = torch.Generator().manual_seed(seed)
    logits = offset + magnitude * torch.randn(batch, classes, h, w, generator=gen, dtype=torch.float64)
    feats = torch.randn(batch, h, w, channels, generator=gen).permute(0, 3, 1, 2)
    if not channels_last:
        feats = feats.contiguous()
    return logits.to(device, dtype).requires_grad_(), feats.to(device, dtype).requires_grad_()


def run(fn, logits, feats, scale=1.0, grad_seed=1, **kwargs):
    """Forward + backward; the output and the gradients of logits and feats."""
    out = fn(logits, feats, scale, **kwargs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out)
    return out, torch.autograd.grad(out, (logits, feats), grad)


def ocrnet_spatial_gather(feats, probs, scale):
    """OCRNet's SpatialGather_Module.forward (HRNet-OCR), verbatim in its steps: the oracle of the module."""
    batch_size, c = probs.size(0), probs.size(1)
    probs = probs.view(batch_size, c, -1)
    feats = feats.reshape(batch_size, feats.size(1), -1)
    feats = feats.permute(0, 2, 1)  # batch x hw x c
    probs = F.softmax(scale * probs, dim=2)  # batch x k x hw
    return torch.matmul(probs, feats).permute(0, 2, 1).unsqueeze(3)  # batch x c x k x 1


NAMES = ("out", "dlogits", "dfeats")


# ------------------------------------------------------------------------------------------------------
# Reference semantics
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, -2.5])
def test_reference_gradcheck_float64(scale):
    logits, feats = upcast(make_inputs(2, 3, 4, 3, 5))
    assert torch.autograd.gradcheck(lambda a, b: soft_region_pool_reference(a, b, scale), (logits, feats))


def test_reference_is_the_softmax_weighted_sum():
    logits, feats = upcast(make_inputs(2, 3, 4, 3, 5))
    out = soft_region_pool_reference(logits, feats, 0.5)
    for b, k in ((0, 0), (1, 2)):
        weights = torch.softmax(0.5 * logits[b, k].flatten(), 0)
        assert_close(out[b, k], (weights[None, :] * feats[b].flatten(1)).sum(1), 1e-12, f"out[{b}, {k}]")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_module_is_ocrnet_spatial_gather(backend):
    logits, feats = make_inputs(2, 5, 6, 4, 3, channels_last=True)
    module = SpatialGather(scale=2.0, backend=backend)
    out = module(feats, logits)
    assert out.shape == (2, 6, 5, 1) and "scale=2.0" in repr(module)
    assert_close(out, ocrnet_spatial_gather(*upcast((feats, logits)), 2.0), 2e-6, f"{backend} vs OCRNet")
    assert list(module.parameters()) == [] and module.state_dict() == {}


# ------------------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU) against the float64 reference: forward and both gradients
# ------------------------------------------------------------------------------------------------------
TRITON_CASES = [
    # batch, classes, channels, H, W, scale, channels_last
    pytest.param(3, 124, 37, 5, 7, 1.0, False, id="vspw-classes-odd-channels-B3"),
    pytest.param(2, 1, 1, 1, 1, 1.0, False, id="one-class-one-channel-one-position"),
    pytest.param(2, 19, 5, 1, 1, 3.0, True, id="one-position-channels-last"),
    pytest.param(1, 7, 33, 9, 11, -2.0, True, id="negative-scale-channels-last"),
    pytest.param(2, 5, 20, 3, 4, 0.0, False, id="scale-zero-is-the-mean"),
]


@pytest.mark.parametrize("batch, classes, channels, h, w, scale, channels_last", TRITON_CASES)
def test_triton_matches_reference_fp32(batch, classes, channels, h, w, scale, channels_last):
    inputs = make_inputs(batch, classes, channels, h, w, channels_last=channels_last)
    out, grads = run(soft_region_pool, *inputs, scale, backend="triton")
    ref_out, ref_grads = run(soft_region_pool_reference, *upcast(inputs), scale)
    assert out.dtype == torch.float32 and out.shape == (batch, classes, channels)
    for name, g, r in zip(NAMES, (out, *grads), (ref_out, *ref_grads), strict=True):
        assert_close(g, r, 2e-6 * max(1.0, r.abs().max().item()), name)


@pytest.mark.parametrize("batch, classes, channels, h, w, scale, channels_last", [TRITON_CASES[0], TRITON_CASES[3]])
def test_triton_matches_reference_fp16(batch, classes, channels, h, w, scale, channels_last):
    """Kernel error vs the float64 reference is at most 2x the fp16 reference's own error."""
    inputs = make_inputs(batch, classes, channels, h, w, dtype=torch.float16, channels_last=channels_last)
    out, grads = run(soft_region_pool, *inputs, scale, backend="triton")
    low_out, low_grads = run(soft_region_pool_reference, *inputs, scale)
    ref_out, ref_grads = run(soft_region_pool_reference, *upcast(inputs), scale)
    assert out.dtype == torch.float16 and [g.dtype for g in grads] == [torch.float16] * 2
    assert_within_twice_low_precision_error(
        NAMES, (out, *grads), (low_out, *low_grads), (ref_out, *ref_grads), torch.float16, "triton fp16"
    )


@pytest.mark.parametrize("offset", [1e4, -1e4])
def test_triton_large_logits_and_scale_100_stay_accurate(offset):
    """Logits of magnitude 1e4 with scale 100: scaled logits near 1e6, where float32 is 0.06 apart, yet
    differences of order 1 between positions (a softmax that is not one-hot). The kernels subtract the
    maximum before scaling: finite and much closer to the float64 reference than the float32 reference."""
    inputs = make_inputs(2, 5, 12, 6, 7, offset=offset, magnitude=0.01)
    out, grads = run(soft_region_pool, *inputs, 100.0, backend="triton")
    fp32_out, fp32_grads = run(soft_region_pool_reference, *inputs, 100.0)
    ref_out, ref_grads = run(soft_region_pool_reference, *upcast(inputs), 100.0)
    for name, g, low, r in zip(NAMES, (out, *grads), (fp32_out, *fp32_grads), (ref_out, *ref_grads), strict=True):
        assert torch.isfinite(g).all(), name
        magnitude = r.abs().max().item()
        assert_close(g, r, 1e-4 * magnitude, name)
        assert (low.double() - r).abs().max().item() > 1e-3 * magnitude, f"{name}: the float32 reference is exact?"


def test_triton_gpu_block_configuration_in_interpreter(monkeypatch):
    """The interpreter normally takes whole problems in one block; here small blocks run instead: several
    class blocks (the backward's recomputing path), channel and position loops, and position splits
    reduced by the combine kernel."""
    monkeypatch.setattr(op, "_forward_launch_config", lambda logits, channels: op.ForwardConfig(16, 16, 16, 3, 4, 1))
    monkeypatch.setattr(op, "_backward_launch_config", lambda logits, channels: op.BackwardConfig(16, 16, 16, 4, 1))
    inputs = make_inputs(2, 37, 33, 7, 9, channels_last=True)
    out, grads = run(soft_region_pool, *inputs, 1.5, backend="triton")
    ref_out, ref_grads = run(soft_region_pool_reference, *upcast(inputs), 1.5)
    for name, g, r in zip(NAMES, (out, *grads), (ref_out, *ref_grads), strict=True):
        assert_close(g, r, 2e-6 * max(1.0, r.abs().max().item()), name)


def test_gpu_configurations_split_positions_and_fit_the_accumulators():
    bf16 = torch.bfloat16
    ssltm = op.forward_config(8, 124, 512, 120 * 120, bf16, interpreting=False, sm_count=132)
    assert (ssltm.block_k, ssltm.block_c, ssltm.block_n) == (128, 128, 64)
    assert ssltm.splits > 1 and 8 * 4 * ssltm.splits <= 2 * 132  # about two programs per multiprocessor
    cityscapes = op.forward_config(8, 19, 512, 60 * 60, bf16, interpreting=False, sm_count=132)
    assert (cityscapes.block_k, cityscapes.block_c) == (32, 256)
    assert op.forward_config(8, 124, 512, 3600, torch.float32, interpreting=False).block_n == 32
    small = op.forward_config(1, 3, 8, 20, bf16, interpreting=False)  # too few positions to split
    assert small.splits == 1 and small.num_stages == 3
    assert op.forward_config(1, 3, 8, 20, bf16, interpreting=False, shared_memory=99 * 1024).num_stages == 2
    bwd = op.backward_config(124, 512, 120 * 120, bf16, interpreting=False)
    assert (bwd.block_k, bwd.block_c, bwd.block_n, bwd.num_warps) == (128, 64, 64, 8)
    assert op.backward_config(300, 512, 3600, bf16, interpreting=False).block_k == 128  # several class blocks


def test_triton_backward_is_deterministic_and_skips_unneeded_grads():
    logits, feats = make_inputs(2, 9, 10, 5, 6)
    first = run(soft_region_pool, logits, feats, backend="triton")[1]
    second = run(soft_region_pool, logits, feats, backend="triton")[1]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    for frozen in ("logits", "feats"):
        inputs = {"logits": logits, "feats": feats}
        inputs[frozen] = inputs[frozen].detach()
        live = next(x for name, x in inputs.items() if name != frozen)
        (grad,) = torch.autograd.grad(soft_region_pool(inputs["logits"], inputs["feats"], backend="triton").sum(), live)
        (expected,) = torch.autograd.grad(soft_region_pool_reference(inputs["logits"], inputs["feats"]).sum(), live)
        assert_close(grad, expected, 1e-5, f"gradient with {frozen} frozen")


def test_channels_last_feats_are_read_in_place_and_get_a_channels_last_gradient():
    logits, feats = make_inputs(2, 3, 8, 4, 5, channels_last=True)
    flat = op._flat(feats)
    assert flat.data_ptr() == feats.data_ptr() and flat.stride() == (160, 1, 8)  # a view, no copy
    _, (dlogits, dfeats) = run(soft_region_pool, logits, feats, backend="triton")
    assert dfeats.stride() == feats.stride() and dlogits.stride() == logits.stride()
    transposed = feats.detach().transpose(2, 3)  # H and W do not merge: a contiguous gradient
    assert op._grad_buffer(transposed).is_contiguous()


# ------------------------------------------------------------------------------------------------------
# torch.library registration, torch.compile, autocast
# ------------------------------------------------------------------------------------------------------
def test_opcheck_forward_and_backward_ops():
    logits, feats = make_inputs(2, 3, 5, 3, 4, channels_last=True)
    torch.library.opcheck(torch.ops.ssltm.soft_region_pool_fwd.default, (logits, feats, 2.0, "triton"))
    out, stats, out_acc = torch.ops.ssltm.soft_region_pool_fwd(logits, feats, 2.0, "triton")
    assert stats.shape == (2, 3, 2) and stats.dtype == torch.float32 and out_acc.numel() == 0  # fp32: out is exact
    half = tuple(x.detach().half() for x in (logits, feats))
    torch.library.opcheck(
        torch.ops.ssltm.soft_region_pool_fwd.default,
        (*half, 2.0, "triton"),
        test_utils=("test_schema", "test_faketensor"),
    )
    half_out, _, half_acc = torch.ops.ssltm.soft_region_pool_fwd(*half, 2.0, "triton")
    assert half_acc.dtype == torch.float32 and torch.equal(half_acc.half(), half_out)
    for need in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(
            torch.ops.ssltm.soft_region_pool_bwd.default,
            (torch.randn_like(out), logits.detach(), feats.detach(), out.detach(), stats, 2.0, "triton", *need),
            test_utils=("test_schema", "test_faketensor"),
        )


def test_torch_compile_fullgraph_traces_module():
    logits, feats = make_inputs(2, 5, 6, 3, 4, channels_last=True)
    module = SpatialGather(scale=1.5, backend="triton")
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    out = compiled(feats, logits)
    eager = module(feats, logits)
    assert_close(out, eager, 0.0, "compiled vs eager")
    grads = torch.autograd.grad(out.square().sum(), (logits, feats))
    eager_grads = torch.autograd.grad(eager.square().sum(), (logits, feats))
    for name, a, b in zip(NAMES[1:], grads, eager_grads, strict=True):
        assert_close(a, b, 0.0, f"compiled {name}")


def test_autocast_runs_the_kernels_in_the_autocast_dtype():
    logits, feats = make_inputs(1, 4, 6, 3, 3)
    with torch.autocast("cpu", dtype=torch.float16):  # the interpreter has no bf16 dot
        out = soft_region_pool(logits, feats.detach().half().requires_grad_(), backend="triton")
    assert out.dtype == torch.float16
    (dlogits,) = torch.autograd.grad(out.float().sum(), logits)
    assert dlogits.dtype == torch.float32  # autocast's cast is differentiated back to the fp32 input
    assert_close(out, soft_region_pool_reference(logits, feats), 1e-2, "fp16 out")


# ------------------------------------------------------------------------------------------------------
# Input errors, dispatch
# ------------------------------------------------------------------------------------------------------
BAD_INPUTS = [
    (
        lambda a: a.update(logits=a["logits"][0]),
        ValueError,
        r"logits must be 4-D \(B, K, H, W\), got shape \(3, 4, 5\)",
    ),
    (
        lambda a: a.update(feats=a["feats"][:, :, 0]),
        ValueError,
        r"feats must be 4-D \(B, C, H, W\), got shape \(2, 6, 5\)",
    ),
    (
        lambda a: a.update(feats=a["feats"][:1]),
        ValueError,
        r"feats must have the batch size of logits \(B = 2.*got shape \(1, 6, 4, 5\)",
    ),
    (
        lambda a: a.update(feats=a["feats"][:, :, :3]),
        ValueError,
        r"spatial size of logits \(\(H, W\) = \(4, 5\).*got shape \(2, 6, 3, 5\)",
    ),
    (lambda a: a.update(feats=a["feats"][..., :4]), ValueError, r"spatial size .*got shape \(2, 6, 4, 4\)"),
    (
        lambda a: a.update(feats=a["feats"].double()),
        TypeError,
        r"feats must have the dtype of logits \(torch.float32\), got torch.float64",
    ),
    (
        lambda a: a.update(feats=a["feats"].to("meta")),
        ValueError,
        r"feats must be on the device of logits \(cpu\), got meta",
    ),
    (
        lambda a: a.update(logits=a["logits"].int()),
        TypeError,
        r"logits must be a floating-point tensor, got torch.int32 \(shape \(2, 3, 4, 5\)\)",
    ),
    (lambda a: a.update(logits=a["logits"][:, :0]), ValueError, r"logits must not be empty, got shape \(2, 0, 4, 5\)"),
    (lambda a: a.update(feats=[1.0]), TypeError, r"feats must be a torch.Tensor, got list"),
    (lambda a: a.update(scale=float("nan")), ValueError, r"scale must be a finite real number, got nan"),
    (lambda a: a.update(scale=torch.tensor(1.0)), ValueError, r"scale must be a finite real number"),
    (lambda a: a.update(backend="cudnn"), ValueError, r"backend must be one of"),
    (lambda a: a.update(backend="cuda"), BackendUnavailableError, r"backend 'cuda' cannot run: .*"),
]


@pytest.mark.parametrize("mutate, error, match", BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(mutate, error, match):
    args = dict(logits=torch.randn(2, 3, 4, 5), feats=torch.randn(2, 6, 4, 5), scale=1.0)
    mutate(args)
    with pytest.raises(error, match=match):
        soft_region_pool(**args)


def test_module_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match=r"feats must have the batch size of logits"):
        SpatialGather()(torch.randn(1, 6, 4, 5), torch.randn(2, 3, 4, 5))


def test_env_backend_variable_and_predicates(monkeypatch):
    logits, feats = make_inputs(1, 3, 4, 2, 2)
    monkeypatch.setenv("SSLTM_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        soft_region_pool(logits, feats)
    monkeypatch.setenv("SSLTM_BACKEND", "reference")
    assert_close(soft_region_pool(logits, feats), soft_region_pool_reference(logits, feats), 0.0, "forced reference")
    assert op.can_run_reference(logits, feats) and op.can_run_triton(logits, feats)
    check = op.can_run_cuda(logits, feats)
    assert not check and "CUDA tensors" in check.reason
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run"):
        op.can_run_cuda(logits, feats, raise_error=True)
    monkeypatch.setattr(op, "triton_unavailable_reason", lambda x: "no triton here")
    assert op.can_run_triton(logits, feats).reason == "no triton here"


def test_triton_refuses_batch_items_beyond_int32_indexing():
    huge = torch.empty_strided((2, 3, 4, 5), (2**33, 2**30, 5, 1), device="meta")  # classes 2**30 apart
    assert "beyond int32 indexing" in op._extent_reason(huge, torch.empty(2, 6, 4, 5, device="meta"))
    assert op._extent_reason(torch.empty(2, 3, 4, 5, device="meta"), torch.empty(2, 6, 4, 5, device="meta")) is None


def _pretend_cuda_backend_runs_on_cpu(monkeypatch):
    """Let dispatch take the 'cuda' backend for CPU tensors: the extension runs its CPU emulation of the CUDA
    kernels there, so the custom op -> _C path runs as on a GPU."""
    if not ssltm_kernels.HAS_CUDA_EXT:
        pytest.fail("ssltm_kernels._C is not built: pip install -e . --no-build-isolation")
    monkeypatch.setattr(op, "cuda_unavailable_reason", lambda x: None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_backend_python_side_through_the_cpu_emulation(monkeypatch, dtype):
    _pretend_cuda_backend_runs_on_cpu(monkeypatch)
    inputs = make_inputs(3, 124, 37, 5, 7, dtype=dtype, channels_last=True)
    out, grads = run(soft_region_pool, *inputs, 2.0, backend="cuda")
    low_out, low_grads = run(soft_region_pool_reference, *inputs, 2.0)
    ref_out, ref_grads = run(soft_region_pool_reference, *upcast(inputs), 2.0)
    assert out.dtype == dtype and grads[1].stride() == inputs[1].stride()  # a channels-last dfeats
    assert_within_twice_low_precision_error(
        NAMES, (out, *grads), (low_out, *low_grads), (ref_out, *ref_grads), dtype, "cuda emulation"
    )


def test_dispatch_prefers_triton_over_the_cuda_core_kernels(monkeypatch):
    _pretend_cuda_backend_runs_on_cpu(monkeypatch)
    logits, feats = make_inputs(1, 3, 4, 2, 2)
    calls = []
    monkeypatch.setattr(op, "_fused", lambda *a, _f=op._fused: calls.append(a[3]) or _f(*a))
    soft_region_pool(logits, feats)
    soft_region_pool(logits, feats, backend="cuda")
    monkeypatch.setattr(op, "triton_unavailable_reason", lambda x: "no triton")
    soft_region_pool(logits, feats)  # CUDA cores beat the reference
    assert calls == ["triton", "cuda", "cuda"]
    from ssltm_kernels._ext import _C

    too_many = torch.randn(1, _C.SOFT_REGION_POOL_MAX_CLASSES + 1, 2, 2)
    assert "at most" in op.can_run_cuda(too_many, torch.randn(1, 4, 2, 2)).reason


def test_package_exports():
    assert ssltm_kernels.soft_region_pool is op.soft_region_pool
    assert ssltm_kernels.SpatialGather is SpatialGather
    assert {"can_run_cuda", "can_run_triton", "can_run_reference", "soft_region_pool"} <= set(op.__all__)


# ------------------------------------------------------------------------------------------------------
# GPU: CUDA and Triton backends (skipped without a GPU)
# ------------------------------------------------------------------------------------------------------
GPU_CASES = [
    pytest.param(2, 124, 512, 30, 30, False, id="vspw-30x30", marks=pytest.mark.gpu_quick),
    pytest.param(2, 124, 96, 60, 60, True, id="vspw-60x60-channels-last"),
    pytest.param(3, 19, 77, 13, 11, False, id="cityscapes-odd", marks=pytest.mark.gpu_quick),
    pytest.param(2, 1, 1, 1, 1, False, id="one-of-everything"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch, classes, channels, h, w, channels_last", GPU_CASES)
def test_gpu_backend_matches_fp32_reference(backend, dtype, batch, classes, channels, h, w, channels_last):
    inputs = make_inputs(
        batch, classes, channels, h, w, dtype=dtype, device="cuda", channels_last=channels_last, magnitude=3.0
    )
    out, grads = run(soft_region_pool, *inputs, 1.0, backend=backend)
    again = run(soft_region_pool, *inputs, 1.0, backend=backend)[1]
    assert all(torch.equal(a, b) for a, b in zip(grads, again, strict=True)), "a second backward differs"
    low_out, low_grads = run(soft_region_pool_reference, *inputs, 1.0)
    ref_out, ref_grads = run(soft_region_pool_reference, *upcast(inputs), 1.0)
    assert_within_twice_low_precision_error(
        NAMES, (out, *grads), (low_out, *low_grads), (ref_out, *ref_grads), dtype, backend
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_cuda_equals_triton(dtype):
    inputs = make_inputs(2, 124, 128, 30, 30, dtype=dtype, device="cuda", channels_last=True)
    cuda_out, cuda_grads = run(soft_region_pool, *inputs, backend="cuda")
    triton_out, triton_grads = run(soft_region_pool, *inputs, backend="triton")
    for name, a, b in zip(NAMES, (cuda_out, *cuda_grads), (triton_out, *triton_grads), strict=True):
        assert_close(a, b, 2e-2 * max(1.0, b.abs().max().item()), f"cuda vs triton {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_large_logits_scale_100_and_determinism(backend):
    inputs = make_inputs(2, 19, 64, 30, 30, device="cuda", offset=1e4, magnitude=0.01)
    out, grads = run(soft_region_pool, *inputs, 100.0, backend=backend)
    ref_out, ref_grads = run(soft_region_pool_reference, *upcast(inputs), 100.0)
    for name, g, r in zip(NAMES, (out, *grads), (ref_out, *ref_grads), strict=True):
        assert_close(g, r, 1e-4 * r.abs().max().item(), f"{backend} {name}")
    again = run(soft_region_pool, *inputs, 100.0, backend=backend)[1]
    assert all(torch.equal(a, b) for a, b in zip(grads, again, strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_module_under_bf16_autocast(backend):
    """The SSLTM setting: fp32 tensors, bf16 autocast, channels-last features at stride 4."""
    logits, feats = make_inputs(2, 124, 512, 60, 60, device="cuda", channels_last=True)
    module = SpatialGather(backend=backend)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = module(feats, logits)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 512, 124, 1)
    assert_close(out.float(), ocrnet_spatial_gather(feats.double(), logits.double(), 1.0), 3e-2, f"{backend} autocast")


def test_compile_configs_specialise_as_ssltm_launches():
    """compile_check compiles the kernels as SSLTM launches them: unit strides become constants (positions
    of contiguous feats, channels of channels-last ones, classes of the gradient through SpatialGather)."""
    from ssltm_kernels.compile_check import OP_CONFIGS

    assert OP_CONFIGS["soft_region_pool"] is op.compile_configs
    configs = op.compile_configs(90, "representative")
    assert len(configs) == 3 and {"bf16", "fp32"} <= {c.label.split()[1] for c in configs}
    assert set(c.label for c in configs) <= set(c.label for c in op.compile_configs(90, "full"))
    for config, unit_strides in zip(configs, (("sf_n", "sdo_k"), ("sf_c", "sdo_k"), ("sf_n", "sdo_k")), strict=True):
        specs = {name: (signature, constexprs) for name, _, signature, constexprs, _, _ in config.specs(90)}
        assert set(specs) == {"_srp_fwd_kernel", "_srp_combine_kernel", "_srp_delta_kernel", "_srp_bwd_kernel"}
        signature, constexprs = specs["_srp_bwd_kernel"]
        for name in ("sl_n", "sdl_n", *unit_strides):
            assert signature[name] == "constexpr" and constexprs[name] == 1, (config.label, name)
        assert constexprs["ONE_K_BLOCK"] and specs["_srp_fwd_kernel"][1]["PARTIAL"]


# ------------------------------------------------------------------------------------------------------
# Benchmark (benchmarks/ocr_region_pool.py): work formulas, targets, CPU smoke run
# ------------------------------------------------------------------------------------------------------
def _benchmark_module():
    from pathlib import Path

    from benchmarks import ocr_region_pool

    return ocr_region_pool, Path(ocr_region_pool.__file__).resolve().parent


def test_benchmark_work_and_targets():
    bench, _ = _benchmark_module()
    from benchmarks.harness import Row

    shape = bench.GPU_SHAPES["k124-120"]
    fwd = bench.region_pool_work(shape, torch.bfloat16, "fwd")
    # logits 8*124*14400 + feats 8*512*14400 + out 8*124*512 elements of 2 bytes
    assert fwd.bytes == 2 * (8 * 124 * 14400 + 8 * 512 * 14400 + 8 * 124 * 512)
    assert fwd.flops == 2 * 8 * 124 * 14400 * 512 and fwd.exps == 8 * 124 * 14400
    both = bench.region_pool_work(shape, torch.bfloat16, "fwd+bwd")
    bwd = bench.region_pool_work(shape, torch.bfloat16, "bwd")
    assert both.bytes == fwd.bytes + bwd.bytes and bwd.flops == 2 * fwd.flops

    def row(provider, mode, ms, **kw):
        return Row("k124-120", provider, mode, {}, "bfloat16", ms=ms, ms_p20=ms, ms_p80=ms, **kw)

    rows = [
        row("eager", "fwd", 0.2, peak_mib=60.0),
        row("eager", "fwd+bwd", 1.0),
        row("compile", "fwd+bwd", 0.6),
        row("triton", "fwd", 0.05, gbps=3500.0, peak_mib=12.0, correct=True),
        row("triton", "fwd+bwd", 0.4),
        Row("k124-120", "cuda", "fwd+bwd", {}, "bfloat16", error="unavailable: not built"),
    ]
    results = {(r.provider, r.target): r for r in bench.evaluate_targets(rows, 4.8e12)}
    assert results[("triton", "fwd >= 70% of HBM bandwidth")].value.startswith("72.9%")
    assert results[("triton", "fwd+bwd >= 2x eager")].status == "PASS"
    assert results[("triton", "fwd+bwd >= 1.3x compile")].value == "1.50x"
    assert results[("triton", "fwd peak memory <= 0.5x eager")].value.startswith("0.20x")
    assert [r.status for (p, _), r in results.items() if p == "triton"] == ["PASS"] * 4
    assert results[("cuda", "all targets")].status.startswith("n/a")


def test_benchmark_cpu_smoke(tmp_path):
    bench, _ = _benchmark_module()
    proc, rows = run_cpu_benchmark(
        "ocr_region_pool",
        "--quick",
        "--providers",
        "eager,triton,cuda",
        "--shapes",
        "cpu-k124",
        results_dir=tmp_path,
        interpret=True,
    )
    assert "CPU comparison" in proc.stdout and "targets: defined for bf16 on a GPU" in proc.stdout
    by = {(r["provider"], r["mode"]): r for r in rows}
    assert len(rows) == 3 * 3 and all(r["benchmark"] == bench.BENCHMARK and r["device"] == "cpu" for r in rows)
    for provider in ("eager", "triton"):
        for mode in ("fwd", "bwd", "fwd+bwd"):
            r = by[(provider, mode)]
            assert r["error"] is None and r["ms"] > 0 and r["correct"] is True and "launches" in r, r
    assert by[("triton", "fwd")]["max_err"] < 1e-5
    assert by[("cuda", "fwd")]["error"].startswith("unavailable: the CUDA kernels need a GPU")
