"""dwconv3x3 / MixFFN: reference semantics, Triton kernels (interpreter on CPU) against the reference,
custom-op registration and torch.compile, MixFFN against SegFormer's order of operations, input errors,
dispatch, and the benchmark's CPU smoke run. GPU tests run only with a GPU."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from benchmark_runs import run_cpu_benchmark
from numerics import assert_close, assert_within_twice_low_precision_error, upcast
from torch import nn

import ssltm_kernels
import ssltm_kernels.ops.dwconv3x3 as op
from ssltm_kernels import BackendUnavailableError, MixFFN, dwconv3x3, dwconv3x3_reference


def make_inputs(shape, dtype=torch.float32, device="cpu", bias=True, seed=0, channel_stride=1):
    """x of ``shape`` (a strided view when ``channel_stride`` > 1), weight ``(C, 1, 3, 3)``, bias ``(C,)``."""
    gen = torch.Generator().manual_seed(seed)
    channels = shape[-1]
    x = torch.randn(*shape[:-1], channels * channel_stride, generator=gen)[..., ::channel_stride]
    weight = torch.randn(channels, 1, 3, 3, generator=gen) / 2
    b = torch.randn(channels, generator=gen) if bias else None
    return tuple(None if t is None else t.to(device, dtype).requires_grad_() for t in (x, weight, b))


def run(fn, x, weight, bias, activation, grad_seed=1, **kwargs):
    """Forward + backward; the output and the gradients of x, weight (and bias)."""
    out = fn(x, weight, bias, activation, **kwargs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out)
    leaves = [t for t in (x, weight, bias) if t is not None]
    return out, torch.autograd.grad(out, leaves, grad)


def grad_names(bias):
    return ("out", "dx", "dweight") + (("dbias",) if bias else ())


# ------------------------------------------------------------------------------------------------------
# Reference semantics
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, activation, bias", [((1, 2, 3, 4, 3), "gelu", True), ((2, 1, 5, 2), None, False)])
def test_reference_gradcheck_float64(shape, activation, bias):
    inputs = upcast(make_inputs(shape, bias=bias))
    leaves = [t for t in inputs if t is not None]
    assert torch.autograd.gradcheck(
        lambda *t: dwconv3x3_reference(*t, *([None] if not bias else []), activation), leaves
    )


def test_reference_is_a_per_frame_depthwise_conv_and_gelu():
    """Independent of the reference's reshapes: nn.Conv2d(groups=C) and nn.GELU on each frame in turn."""
    x, weight, bias = upcast(make_inputs((2, 3, 4, 5, 6)))
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=6).double()
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    out = dwconv3x3_reference(x, weight, bias, "gelu")
    for b in range(2):
        for t in range(3):
            frame = nn.GELU()(conv(x[b, t].permute(2, 0, 1)[None]))[0].permute(1, 2, 0)
            assert_close(out[b, t], frame, 1e-12, f"frame ({b}, {t})")


# ------------------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU) against the reference: forward and every gradient
# ------------------------------------------------------------------------------------------------------
TRITON_CASES = [
    # shape, activation, bias, channel stride (> 1: a non-contiguous x)
    pytest.param((2, 5, 13, 33), "gelu", True, 1, id="frames-5x13-C33-gelu-bias"),
    pytest.param((1, 4, 1, 1, 1), None, False, 1, id="T4-1x1-C1"),
    pytest.param((1, 1, 5, 13, 33), "gelu", False, 1, id="T1-5x13-C33-gelu"),
    pytest.param((2, 4, 3, 7, 33), "gelu", True, 2, id="T4-non-contiguous-gelu-bias"),
    pytest.param((1, 2, 6, 5, 8), None, True, 1, id="T2-no-activation-bias"),
]


@pytest.mark.parametrize("shape, activation, bias, channel_stride", TRITON_CASES)
def test_triton_matches_reference_fp32(shape, activation, bias, channel_stride):
    inputs = make_inputs(shape, bias=bias, channel_stride=channel_stride)
    assert inputs[0].is_contiguous() == (channel_stride == 1)
    out, grads = run(dwconv3x3, *inputs, activation, backend="triton")
    ref_out, ref_grads = run(dwconv3x3_reference, *upcast(inputs), activation)
    assert out.dtype == torch.float32 and out.shape == shape and out.is_contiguous()
    for name, g, r in zip(grad_names(bias), (out, *grads), (ref_out, *ref_grads), strict=True):
        assert_close(g, r, 1e-5 * max(1.0, r.abs().max().item()), name)


@pytest.mark.parametrize("shape, activation, bias, channel_stride", [TRITON_CASES[0], TRITON_CASES[3]])
def test_triton_matches_reference_fp16(shape, activation, bias, channel_stride):
    """Kernel error vs the fp32 reference is at most 2x the fp16 reference's own error."""
    inputs = make_inputs(shape, dtype=torch.float16, bias=bias, channel_stride=channel_stride)
    out, grads = run(dwconv3x3, *inputs, activation, backend="triton")
    low_out, low_grads = run(dwconv3x3_reference, *inputs, activation)
    ref_out, ref_grads = run(dwconv3x3_reference, *upcast(inputs, torch.float32), activation)
    assert out.dtype == torch.float16 and [g.dtype for g in grads] == [torch.float16] * len(grads)
    assert_within_twice_low_precision_error(
        grad_names(bias), (out, *grads), (low_out, *low_grads), (ref_out, *ref_grads), torch.float16, "triton fp16"
    )


@pytest.mark.parametrize(
    "shape, activation",
    [((1, 1, 5, 17, 40), "gelu"), ((2, 5, 17, 33), None)],
    ids=["gelu-kernel-partials", "dx-kernel-partials"],
)
def test_triton_gpu_block_configuration_in_interpreter(monkeypatch, shape, activation):
    """The interpreter normally runs whole frames per program; here the GPU's tiles (several per frame,
    partial tiles at the frame's edges, several channel blocks) and several programs of partial sums run
    instead, and the backward is bitwise deterministic."""
    monkeypatch.setattr(op, "triton_interpreting", lambda: False)
    monkeypatch.setattr(op, "_partial_groups", lambda num_tiles, *_: min(3, num_tiles))
    frames = torch.empty(shape) if len(shape) == 5 else torch.empty(shape).unsqueeze(1)
    cfg = op._launch_config(frames)
    assert cfg.block_h < shape[-3] and cfg.block_w < shape[-2] and cfg.block_c < shape[-1]
    inputs = make_inputs(shape)
    out, grads = run(dwconv3x3, *inputs, activation, backend="triton")
    ref_out, ref_grads = run(dwconv3x3_reference, *upcast(inputs), activation)
    for name, g, r in zip(grad_names(True), (out, *grads), (ref_out, *ref_grads), strict=True):
        assert_close(g, r, 1e-5 * max(1.0, r.abs().max().item()), name)
    again = run(dwconv3x3, *inputs, activation, backend="triton")[1]
    assert all(torch.equal(a, b) for a, b in zip(grads, again, strict=True))


def test_backward_saves_only_the_inputs():
    """The GELU's input is recomputed in the backward: autograd keeps x, weight and bias, nothing else."""
    x, weight, bias = make_inputs((1, 2, 3, 4, 8))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = dwconv3x3(x, weight, bias, "gelu", backend="triton")
    assert len(saved) == 3 and {t.data_ptr() for t in saved} == {x.data_ptr(), weight.data_ptr(), bias.data_ptr()}
    assert out.grad_fn is not None


def test_autocast_runs_the_kernels_in_the_autocast_dtype():
    """As nn.Conv2d: fp32 inputs under torch.autocast run in the autocast dtype (fp16 here), gradients come
    back in the leaves' dtypes, and the numbers follow the reference under the same autocast (2x rule)."""
    inputs = make_inputs((1, 2, 5, 13, 33))

    def conv(fn, **kw):
        with torch.autocast("cpu", dtype=torch.float16):
            assert op.compute_dtype(inputs[0]) == torch.float16
            out = fn(*inputs, "gelu", **kw)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
        return out, torch.autograd.grad(out, inputs, grad)

    out, grads = conv(dwconv3x3, backend="triton")
    assert out.dtype == torch.float16 and [g.dtype for g in grads] == [torch.float32] * 3
    low_out, low_grads = conv(dwconv3x3_reference)
    ref_out, ref_grads = run(dwconv3x3_reference, *inputs, "gelu")
    assert_within_twice_low_precision_error(
        grad_names(True), (out, *grads), (low_out, *low_grads), (ref_out, *ref_grads), torch.float16, "autocast"
    )


# ------------------------------------------------------------------------------------------------------
# torch.library registration and torch.compile
# ------------------------------------------------------------------------------------------------------
def test_opcheck_forward_and_backward_ops():
    x, weight, bias = make_inputs((1, 2, 3, 5, 4))
    torch.library.opcheck(torch.ops.ssltm.dwconv3x3_fwd.default, (x, weight, bias, "gelu", "triton"))
    torch.library.opcheck(
        torch.ops.ssltm.dwconv3x3_fwd.default,
        (x, weight, None, "", "triton"),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
    grad = torch.randn(x.shape)
    torch.library.opcheck(
        torch.ops.ssltm.dwconv3x3_bwd.default,
        (grad, x.detach(), weight.detach(), bias.detach(), "gelu", "triton"),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_torch_compile_fullgraph_traces_mixffn():
    """fullgraph=True: no graph break in the module, for tokens and volumes; aot_eager traces the forward
    and the backward graphs through the custom ops and their fake implementations."""
    torch.manual_seed(0)
    module = MixFFN(8, 32, backend="triton")
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    for x, hw in (
        (torch.randn(2, 3 * 5, 8, requires_grad=True), (3, 5)),
        (torch.randn(1, 2, 3, 5, 8, requires_grad=True), ()),
    ):
        eager = module(x, *hw)
        out = compiled(x, *hw)
        assert_close(out, eager, 1e-6, "compiled vs eager")
        grads = torch.autograd.grad(out.sum(), (x, module.dwconv.dwconv.weight))
        eager_grads = torch.autograd.grad(eager.sum(), (x, module.dwconv.dwconv.weight))
        for name, g, e in zip(("dx", "dweight"), grads, eager_grads, strict=True):
            assert_close(g, e, 1e-6, f"compiled {name}")


def test_compile_specs_follow_the_launches():
    """compile_check's specs: the kernels a launch runs, specialised on the launcher's own integers (SSLTM's
    contiguous channels: channel stride 1 -> a constant), representative configurations among the full set."""
    from ssltm_kernels.compile_check import OP_CONFIGS

    assert OP_CONFIGS["dwconv3x3"] is op.compile_configs
    representative = {c.label for c in op.compile_configs(90, "representative")}
    assert representative <= {c.label for c in op.compile_configs(90, "full")}
    assert any("bfloat16 stride16" in label and "gelu" in label for label in representative)
    for activation, kernels in (
        ("gelu", ["_dwconv_fwd_kernel", "_dwconv_bwd_gelu_kernel", "_dwconv_bwd_dx_kernel"]),
        (None, ["_dwconv_fwd_kernel", "_dwconv_bwd_dx_kernel"]),
    ):
        specs = list(op.triton_compile_specs(torch.bfloat16, op.COMPILE_SHAPES["stride16"], activation))
        assert [name for name, *_ in specs] == kernels
        for _, _, signature, constexprs, _, _ in specs:
            assert signature["sx_c"] == "constexpr" and constexprs["sx_c"] == 1
            assert signature["X"] == "*bf16" and signature.get("PARTIAL", "*fp32") == "*fp32"
    cfg = op.triton_config(30, 30, 512, torch.bfloat16, interpreting=False)
    ints = op.launch_ints(torch.empty(2, 4, 30, 30, 512, device="meta"), cfg)
    assert (ints["tiles_w"], ints["tiles_per_frame"], ints["num_tiles"]) == (2, 16, 128)  # 4x16-pixel tiles


# ------------------------------------------------------------------------------------------------------
# MixFFN: SegFormer's order of operations, state_dict and initialisation
# ------------------------------------------------------------------------------------------------------
def segformer_mix_ffn(module: MixFFN, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """SegFormer's Mlp + DWConv on tokens (B, N, C) with the module's layers: Linear -> transpose to
    (B, C, H, W) -> the nn.Conv2d(groups=C) itself -> flatten back -> GELU -> Linear (dropout off)."""
    h = module.fc1(x)
    batch, tokens, hidden = h.shape
    h = module.dwconv.dwconv(h.transpose(1, 2).reshape(batch, hidden, height, width)).flatten(2).transpose(1, 2)
    return module.fc2(nn.GELU()(h))


def test_mixffn_equals_segformer_order_tokens_and_volumes():
    torch.manual_seed(0)
    module = MixFFN(6, 20, 5, backend="reference").double()
    with torch.no_grad():
        module.dwconv.dwconv.bias.normal_()
    tokens = torch.randn(2, 4 * 7, 6, dtype=torch.float64)
    assert_close(module(tokens, 4, 7), segformer_mix_ffn(module, tokens, 4, 7), 1e-12, "tokens")
    volume = torch.randn(2, 3, 4, 7, 6, dtype=torch.float64)
    per_frame = segformer_mix_ffn(module, volume.reshape(6, 28, 6), 4, 7).reshape(2, 3, 4, 7, 5)
    assert_close(module(volume), per_frame, 1e-12, "volume")
    assert_close(module(volume[:, 0]), per_frame[:, 0], 1e-12, "frames (B, H, W, C)")

    fused = copy.deepcopy(module).float()
    fused.backend = "triton"
    x = tokens.float().requires_grad_()
    out = fused(x, 4, 7)
    expected = segformer_mix_ffn(fused, x, 4, 7)
    assert_close(out, expected, 1e-5, "triton tokens")
    params = [fused.fc1.weight, fused.dwconv.dwconv.weight, fused.dwconv.dwconv.bias, fused.fc2.weight]
    grads = torch.autograd.grad(out.square().sum(), [x, *params])
    ref_grads = torch.autograd.grad(expected.square().sum(), [x, *params])
    for name, g, r in zip(("dx", "dfc1", "dconv_w", "dconv_b", "dfc2"), grads, ref_grads, strict=True):
        assert_close(g, r, 1e-4 * max(1.0, r.abs().max().item()), f"triton {name}")


def test_mixffn_state_dict_and_defaults_match_segformer():
    class DWConv(nn.Module):  # SegFormer's modules, to load from
        def __init__(self, dim):
            super().__init__()
            self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    class Mlp(nn.Module):
        def __init__(self, in_features, hidden_features):
            super().__init__()
            self.fc1 = nn.Linear(in_features, hidden_features)
            self.dwconv = DWConv(hidden_features)
            self.act = nn.GELU()
            self.fc2 = nn.Linear(hidden_features, in_features)
            self.drop = nn.Dropout(0.0)

    segformer = Mlp(8, 32)
    module = MixFFN(8, 32)
    assert set(module.state_dict()) == set(segformer.state_dict())
    module.load_state_dict(segformer.state_dict(), strict=True)
    segformer.load_state_dict(module.state_dict(), strict=True)
    assert torch.equal(module.dwconv.dwconv.weight, segformer.dwconv.dwconv.weight)
    default = MixFFN(16)
    assert (default.fc1.out_features, default.fc2.out_features, default.drop.p) == (16, 16, 0.0)
    assert MixFFN(16, 64, 24, drop=0.1).fc2.out_features == 24
    assert torch.all(default.fc1.bias == 0) and torch.all(default.dwconv.dwconv.bias == 0)
    wide = MixFFN(64, 256)  # SegFormer's init: weights N(0, 0.02) for the linears, N(0, 2 / 9) for the conv
    assert abs(wide.fc1.weight.std().item() - 0.02) < 2e-3 and abs(wide.fc2.weight.std().item() - 0.02) < 2e-3
    assert abs(wide.dwconv.dwconv.weight.std().item() - (2 / 9) ** 0.5) < 0.05


def test_mixffn_dropout_in_training_only():
    torch.manual_seed(0)
    module = MixFFN(8, 16, drop=0.5, backend="triton")
    x = torch.randn(1, 2, 3, 3, 8)
    assert not torch.equal(module(x), module(x))
    module.eval()
    assert torch.equal(module(x), module(x))


# ------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (
            lambda a: a.update(weight=torch.randn(8, 3, 3)),
            ValueError,
            r"weight must have shape \(C, 1, 3, 3\) = \(8, 1, 3, 3\) .* got \(8, 3, 3\)",
        ),
        (
            lambda a: a.update(weight=torch.randn(9, 1, 3, 3)),
            ValueError,
            r"weight must have shape .*8 channels, got \(9, 1, 3, 3\) \(x shape \(2, 3, 4, 5, 8\)\)",
        ),
        (lambda a: a.update(weight=torch.randn(8, 1, 5, 5)), ValueError, r"weight must .* got \(8, 1, 5, 5\)"),
        (lambda a: a.update(bias=torch.randn(7)), ValueError, r"bias must have shape \(C,\) = \(8,\) .* got \(7,\)"),
        (lambda a: a.update(x=torch.randn(4, 5, 8)), ValueError, r"x must be 4-D .* or 5-D .* got shape \(4, 5, 8\)"),
        (lambda a: a.update(x=torch.randn(1, 1, 2, 3, 4, 8)), ValueError, r"x must be 4-D .*\(1, 1, 2, 3, 4, 8\)"),
        (
            lambda a: a.update(weight=a["weight"].double()),
            TypeError,
            r"weight must have x's dtype torch.float32, got torch.float64 \(weight shape \(8, 1, 3, 3\)\)",
        ),
        (lambda a: a.update(bias=a["bias"].half()), TypeError, r"bias must have x's dtype"),
        (lambda a: a.update(weight=a["weight"].to("meta")), ValueError, r"weight must be on x's device cpu, got meta"),
        (lambda a: a.update(activation="relu"), ValueError, r"activation must be one of \(None, 'gelu'\), got 'relu'"),
        (lambda a: a.update(x=torch.zeros(2, 0, 4, 5, 8)), ValueError, r"x must not be empty, got shape \(2, 0, 4"),
        (lambda a: a.update(x=torch.zeros(2, 3, 4, 5, 8, dtype=torch.int32)), TypeError, r"x must be a floating-point"),
        (lambda a: a.update(backend="cudnn"), ValueError, r"backend must be one of"),
        (lambda a: a.update(backend="cuda"), BackendUnavailableError, r"backend 'cuda' cannot run: "),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, error, match):
    args = dict(x=torch.randn(2, 3, 4, 5, 8), weight=torch.randn(8, 1, 3, 3), bias=torch.randn(8), activation="gelu")
    mutate(args)
    with pytest.raises(error, match=match):
        dwconv3x3(**args)
    if "backend" not in args:
        with pytest.raises(error, match=match):
            dwconv3x3_reference(**args)


def test_module_bad_inputs():
    module = MixFFN(8, 16)
    with pytest.raises(ValueError, match=r"x must be \(B, N = H\*W = 12, 8\) tokens for H=3, W=4, got shape \(2, 10"):
        module(torch.randn(2, 10, 8), 3, 4)
    with pytest.raises(ValueError, match=r"give both H and W"):
        module(torch.randn(2, 12, 8), 3)
    with pytest.raises(ValueError, match=r"x must be \(B, H, W, 8\) or \(B, T, H, W, 8\) .* got shape \(2, 12, 8\)"):
        module(torch.randn(2, 12, 8))
    with pytest.raises(ValueError, match=r"got shape \(1, 2, 3, 4, 7\)"):
        module(torch.randn(1, 2, 3, 4, 7))


# ------------------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------------------
def test_backend_predicates_and_env_variable(monkeypatch):
    x, weight, bias = make_inputs((1, 2, 3, 4))
    assert op.can_run_triton(x, weight, bias, "gelu")  # CPU tensors run Triton under the interpreter (conftest)
    assert op.can_run_reference(x, weight)
    check = op.can_run_triton(*upcast((x, weight)))
    assert not check and "float64" in check.reason
    with pytest.raises(BackendUnavailableError, match="float64"):
        op.can_run_triton(*upcast((x, weight)), raise_error=True)
    with pytest.raises(ValueError, match="activation must be"):  # invalid arguments: the input error
        op.can_run_reference(x, weight, activation="silu")
    monkeypatch.setenv("SSLTM_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        dwconv3x3(x, weight, bias)
    monkeypatch.setenv("SSLTM_BACKEND", "reference")
    calls = []
    monkeypatch.setattr(op, "_reference", lambda *a, _f=op._reference: calls.append(1) or _f(*a))
    dwconv3x3(x, weight, bias)
    assert calls == [1]


def test_float64_dispatches_to_the_reference(monkeypatch):
    x, weight, bias = upcast(make_inputs((1, 2, 3, 4)))
    calls = []
    monkeypatch.setattr(op, "_reference", lambda *a, _f=op._reference: calls.append(1) or _f(*a))
    out = dwconv3x3(x, weight, bias, "gelu")
    assert calls == [1] and out.dtype == torch.float64
    assert_close(out, dwconv3x3_reference(x, weight, bias, "gelu"), 0.0, "float64 fallback")


def test_cuda_backend_python_side_through_the_cpu_emulation(monkeypatch):
    """Let dispatch take the 'cuda' backend for CPU tensors: the extension runs its CPU emulation of the
    CUDA kernels there, so the custom op -> _C path runs as on a GPU."""
    if not ssltm_kernels.HAS_CUDA_EXT:
        pytest.fail("ssltm_kernels._C is not built: pip install -e . --no-build-isolation")
    monkeypatch.setattr(op, "cuda_unavailable_reason", lambda x: None)
    inputs = make_inputs((2, 2, 5, 13, 33), dtype=torch.float16, channel_stride=2)
    out, grads = run(dwconv3x3, *inputs, "gelu")  # automatic dispatch: cuda first
    low_out, low_grads = run(dwconv3x3_reference, *inputs, "gelu")
    ref_out, ref_grads = run(dwconv3x3_reference, *upcast(inputs, torch.float32), "gelu")
    assert out.dtype == torch.float16 and [g.dtype for g in grads] == [torch.float16] * 3
    assert_within_twice_low_precision_error(
        grad_names(True), (out, *grads), (low_out, *low_grads), (ref_out, *ref_grads), torch.float16, "cuda emulation"
    )
    without_bias = run(dwconv3x3, inputs[0], inputs[1], None, None)
    expected = run(dwconv3x3_reference, *upcast((inputs[0], inputs[1])), None, None)
    for name, g, r in zip(
        ("out", "dx", "dweight"), (without_bias[0], *without_bias[1]), (expected[0], *expected[1]), strict=True
    ):
        assert_close(g, r, 2e-3 * max(1.0, r.abs().max().item()), f"no bias {name}")


def test_op_submodule_is_a_module_and_the_package_exports():
    assert ssltm_kernels.dwconv3x3 is op.dwconv3x3 and ssltm_kernels.MixFFN is MixFFN
    assert {"can_run_cuda", "can_run_triton", "can_run_reference", "dwconv3x3"} <= set(op.__all__)


# ------------------------------------------------------------------------------------------------------
# Benchmark: work formulas and a CPU smoke run
# ------------------------------------------------------------------------------------------------------
BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def test_benchmark_work_formulas():
    from benchmarks import mixffn_dwconv as bench

    shape = bench.Shape("t", B=2, T=4, H=15, W=15, C=1024)
    elements = 2 * 4 * 15 * 15 * 1024
    assert bench.dwconv_work(shape, torch.bfloat16, "fwd").bytes == 2 * elements * 2  # read x, write y
    assert bench.dwconv_work(shape, torch.bfloat16, "bwd").bytes == 3 * elements * 2  # read x, dy; write dx
    assert bench.dwconv_work(shape, torch.float32, "fwd+bwd").bytes == 5 * elements * 4
    assert bench.dwconv_work(shape, torch.bfloat16, "fwd").flops == 2 * 9 * elements
    # the whole module adds fc1 and fc2 (2 matmuls of M x C_in x 4 C_in each way, 3x that for fwd+bwd)
    module_shape = bench.Shape("m", B=2, T=4, H=15, W=15, C=1024)
    tokens, dim = 2 * 4 * 15 * 15, 256
    assert bench.mixffn_work(module_shape, torch.bfloat16, "fwd").flops == pytest.approx(
        2 * (2 * tokens * dim * 1024) + 2 * 9 * elements
    )
    assert [s.C for s in bench.SSLTM_SHAPES] == [128, 256, 512, 1024]


def test_benchmark_cpu_smoke(tmp_path):
    proc, rows = run_cpu_benchmark("mixffn_dwconv", "--quick", results_dir=tmp_path)
    assert "targets: defined for bf16 on a GPU" in proc.stdout
    by = {(r["case"], r["provider"], r["mode"]): r for r in rows}
    assert all(r["device"] == "cpu" and r["run_note"] for r in rows)
    conv_case, module_case = "cpu-small", "cpu-small-mixffn"
    for provider in ("eager", "eager-channels-last"):
        for mode in ("fwd", "bwd", "fwd+bwd"):
            row = by[(conv_case, provider, mode)]
            assert row["error"] is None and row["ms"] > 0 and row["correct"] is True, row
    assert by[(conv_case, "triton", "fwd")]["error"].startswith("unavailable: triton on CPU")
    assert by[(module_case, "segformer-eager", "fwd")]["correct"] is True
    assert by[(module_case, "mixffn-reference", "fwd+bwd")]["ms"] > 0


# ------------------------------------------------------------------------------------------------------
# GPU: CUDA and Triton backends in low precision (skipped without a GPU)
# ------------------------------------------------------------------------------------------------------
QUICK = pytest.mark.gpu_quick
GPU_CASES = [
    # shape, dtype, activation: SSLTM's hidden activations in every dtype, odd shapes (each a compile)
    pytest.param((2, 4, 30, 30, 512), torch.bfloat16, "gelu", id="ssltm-stride16-bf16-gelu", marks=QUICK),
    pytest.param((2, 4, 30, 30, 512), torch.float16, "gelu", id="ssltm-stride16-fp16-gelu", marks=QUICK),
    pytest.param((2, 4, 30, 30, 512), torch.float32, "gelu", id="ssltm-stride16-fp32-gelu", marks=QUICK),
    pytest.param((2, 4, 15, 15, 1024), torch.bfloat16, "gelu", id="ssltm-stride32-bf16-gelu"),
    pytest.param((1, 3, 1, 1, 1), torch.bfloat16, None, id="1x1-C1-bf16"),
    pytest.param((2, 5, 13, 33), torch.float16, None, id="frames-5x13-C33-fp16"),
    pytest.param((2, 5, 13, 33), torch.bfloat16, "gelu", id="frames-5x13-C33-bf16-gelu", marks=QUICK),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shape, dtype, activation", GPU_CASES)
def test_gpu_backend_matches_fp32_reference(backend, shape, dtype, activation):
    """The 2x rule against the reference in higher precision: fp32 for fp16/bf16, float64 for fp32 (cuDNN
    may run an fp32 conv in TF32)."""
    inputs = make_inputs(shape, dtype=dtype, device="cuda", channel_stride=2 if len(shape) == 4 else 1)
    out, grads = run(dwconv3x3, *inputs, activation, backend=backend)
    again = run(dwconv3x3, *inputs, activation, backend=backend)[1]
    assert all(torch.equal(a, b) for a, b in zip(grads, again, strict=True)), "a second backward differs"
    low_out, low_grads = run(dwconv3x3_reference, *inputs, activation)
    high = torch.float64 if dtype == torch.float32 else torch.float32
    ref_out, ref_grads = run(dwconv3x3_reference, *upcast(inputs, high), activation)
    assert out.dtype == dtype and out.is_contiguous()
    assert_within_twice_low_precision_error(
        grad_names(True), (out, *grads), (low_out, *low_grads), (ref_out, *ref_grads), dtype, backend
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_cuda_equals_triton_and_is_deterministic(dtype):
    inputs = make_inputs((2, 4, 30, 30, 512), dtype=dtype, device="cuda", channel_stride=2)
    cuda_out, cuda_grads = run(dwconv3x3, *inputs, "gelu", backend="cuda")
    triton_out, triton_grads = run(dwconv3x3, *inputs, "gelu", backend="triton")
    for name, a, b in zip(grad_names(True), (cuda_out, *cuda_grads), (triton_out, *triton_grads), strict=True):
        assert_close(a.float(), b.float(), 2e-2 * max(1.0, b.abs().max().item()), f"cuda vs triton {name}")
    for backend, grads in (("cuda", cuda_grads), ("triton", triton_grads)):
        again = run(dwconv3x3, *inputs, "gelu", backend=backend)[1]
        assert all(torch.equal(a, b) for a, b in zip(grads, again, strict=True)), backend


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_mixffn_under_bf16_autocast(backend):
    """The SSLTM training setting: fp32 module, bf16 autocast, volumes, on the GPU."""
    torch.manual_seed(0)
    module = MixFFN(128, 512, backend=backend).cuda()
    with torch.no_grad():
        module.dwconv.dwconv.bias.normal_()
    x = torch.randn(2, 4, 30, 30, 128, device="cuda", requires_grad=True)

    def ffn(m):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(x)
        return out, torch.autograd.grad(
            out.float().square().sum(), (x, m.fc1.weight, m.dwconv.dwconv.weight, m.dwconv.dwconv.bias)
        )

    out, grads = ffn(module)
    assert out.dtype == torch.bfloat16 and [g.dtype for g in grads] == [torch.float32] * 4
    reference = copy.deepcopy(module)
    reference.backend = "reference"
    low_out, low_grads = ffn(reference)
    fp32_out = reference(x)
    fp32_grads = torch.autograd.grad(
        fp32_out.square().sum(), (x, reference.fc1.weight, reference.dwconv.dwconv.weight, reference.dwconv.dwconv.bias)
    )
    assert_within_twice_low_precision_error(
        ("out", "dx", "dfc1", "dconv_w", "dconv_b"),
        (out, *grads),
        (low_out, *low_grads),
        (fp32_out, *fp32_grads),
        torch.bfloat16,
        backend,
    )
