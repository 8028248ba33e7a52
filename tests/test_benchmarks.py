"""The benchmark harness on the CPU (device table and roofline on known numbers, modes, failure rows,
JSON lines and their provenance, the correctness gate on deliberately wrong peers, the CUDA-graph timing
with a stand-in capture, target checks and the closing summary on hand-made rows) and the window-attention
benchmark: its work formulas on hand-computed shapes, its sdpa / flex / flex-dense peers and torchvision's
module against the op's reference, the SDPA kernel record, its targets, and a CPU smoke run."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from benchmark_runs import run_cpu_benchmark

from benchmarks import harness
from benchmarks import stt_window_attn as bench
from benchmarks.harness import Case, Exact, Harness, Impl, Row, Unavailable, Work

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"

PROVENANCE = ("benchmark", "date", "commit", "torch", "triton", "cuda", "python", "device", "gpu", "run_note")


# --------------------------------------------------------------------------------- device table, roofline
def test_device_table_and_roofline():
    sxm = harness.match_device_spec("NVIDIA H100 80GB HBM3")
    assert sxm is harness.DEVICE_SPECS["H100 SXM"]
    for name, key in (
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200 SXM"),
        ("NVIDIA H200 NVL", "H200 NVL"),
    ):
        assert harness.match_device_spec(name) is harness.DEVICE_SPECS[key]
    assert harness.match_device_spec("NVIDIA A100-SXM4-80GB") is None and harness.match_device_spec(None) is None
    # dense bf16 peak = SMs x 4096 FLOP/clk x clock; MUFU exp = SMs x 16/clk x clock (3.9e12/s on H100 SXM)
    assert sxm.flops[torch.bfloat16] == pytest.approx(132 * 4096 * 1.83e9, rel=1e-3)
    assert sxm.flops[torch.float32] == 67e12 and sxm.bytes_per_s == 3.35e12
    assert sxm.exp_per_s == pytest.approx(3.865e12, rel=1e-3)

    # 1 ms of bf16 compute, 2 ms of memory traffic, 0.5 ms of exps at H100 SXM peaks: memory-bound, 2 ms
    work = Work(flops=989.5e9, bytes=6.7e9, exps=0.5e-3 * sxm.exp_per_s)
    assert harness.roofline(work, sxm, torch.bfloat16) == (pytest.approx(2.0), "memory")
    assert harness.roofline(Work(exps=3e-3 * sxm.exp_per_s), sxm, torch.bfloat16) == (pytest.approx(3.0), "exp")
    # fp32 uses the non-tensor peak: 67 GFLOP take 1 ms, not 0.07 ms
    assert harness.roofline(Work(flops=67e9), sxm, torch.float32) == (pytest.approx(1.0), "compute")
    assert harness.roofline(work, None, torch.bfloat16) is None


# -------------------------------------------------------------------------------- timing and the modes
def test_cpu_timer_quantiles():
    calls = []
    median, p20, p80 = harness.cpu_bench(lambda: calls.append(time.sleep(1e-3)), rep_ms=20)
    assert 3 <= len(calls) <= 100
    assert 1.0 <= p20 <= median <= p80


def test_modes():
    x = torch.randn(3, requires_grad=True)
    grad = torch.ones(3)
    forwards = []

    def forward():
        forwards.append(1)
        return x * 2

    run = harness.mode_runner(forward, "bwd", grad)  # builds one graph, replays its backward
    for _ in range(3):
        x.grad = None
        run()
    assert len(forwards) == 1 and torch.equal(x.grad, torch.full((3,), 2.0))
    x.grad = None
    harness.mode_runner(forward, "fwd+bwd", grad)()
    assert len(forwards) == 2 and torch.equal(x.grad, torch.full((3,), 2.0))
    assert harness.mode_runner(forward, "fwd", grad) is forward
    with pytest.raises(ValueError, match="mode must be one of"):
        harness.mode_runner(forward, "backward", grad)


# ------------------------------------------------------------------- rows, failures, JSON with provenance
def test_harness_rows_failures_and_jsonl(tmp_path, capsys):
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)

    def good():
        return torch.tanh(x @ w)

    def broken():
        raise RuntimeError("kernel exploded")

    providers = {
        "ref": good,
        "same": Impl(lambda: torch.tanh(x @ w), note="a note"),
        "wrong": lambda: torch.tanh(x @ w) + 1.0,  # without an Exact yardstick the reference's results are it
        "broken": broken,
        "absent": Unavailable("needs a GPU"),
        "fwd-only": Impl(good, modes=("fwd",), reason="no backward here"),
    }
    case = Case("toy", {"n": 4}, torch.float32, {m: Work(flops=1e6, bytes=1e3) for m in harness.MODES})
    h = Harness("toy", device="cpu", quick=True, results_dir=tmp_path, note="cpu test")
    rows = h.run_case(case, providers, leaves=[x, w], reference="ref")

    by = {(r.provider, r.mode): r for r in rows}
    assert len(rows) == len(providers) * len(harness.MODES)
    for mode in harness.MODES:
        for name in ("ref", "same"):
            assert by[(name, mode)].ok and by[(name, mode)].ms > 0 and by[(name, mode)].correct is True
        assert by[(name, mode)].ms_p20 <= by[(name, mode)].ms <= by[(name, mode)].ms_p80
        assert by[("wrong", mode)].ok and by[("wrong", mode)].correct is False  # marked, still timed
        assert by[("wrong", mode)].max_err == pytest.approx(1.0)
        assert by[("broken", mode)].error == "RuntimeError: kernel exploded"
        assert by[("absent", mode)].error == "unavailable: needs a GPU"
    assert by[("fwd-only", "fwd")].ok
    assert by[("fwd-only", "bwd")].error == "unavailable: no backward here"
    assert by[("same", "fwd")].note == "a note"
    ref_fwd = by[("ref", "fwd")]
    assert ref_fwd.tflops == pytest.approx(1e6 / (ref_fwd.ms * 1e-3) / 1e12)
    assert ref_fwd.gbps == pytest.approx(1e3 / (ref_fwd.ms * 1e-3) / 1e9)
    assert ref_fwd.roofline_pct is None and ref_fwd.peak_mib is None  # no GPU: no peaks, no memory stats
    assert x.grad is None and w.grad is None  # gradients are reset after every measurement

    out = capsys.readouterr()
    assert "WRONG (out)" in out.out and "FAILED: RuntimeError: kernel exploded" in out.out
    assert "kernel exploded" in out.err  # the traceback of a real failure goes to stderr

    lines = [json.loads(line) for line in (tmp_path / "toy.jsonl").read_text().splitlines()]
    assert len(lines) == len(rows)
    for key in (
        *PROVENANCE,
        "case",
        "provider",
        "mode",
        "shape",
        "dtype",
        "ms",
        "ms_p20",
        "ms_p80",
        "tflops",
        "gbps",
        "roofline_pct",
        "limiter",
        "peak_mib",
        "graph_ms",
        "graph_error",
        "max_err",
        "correct",
        "errors",
        "info",
        "error",
    ):
        assert key in lines[0], key
    first = lines[0]
    assert (first["benchmark"], first["device"], first["gpu"], first["run_note"]) == ("toy", "cpu", None, "cpu test")
    assert first["torch"] == torch.__version__ and first["commit"] != ""
    assert first["date"].endswith("+00:00")  # UTC


def _scaled_gradient(y: torch.Tensor, factor: float) -> torch.Tensor:
    """``y`` itself, whose backward multiplies the upstream gradient by ``factor``."""
    return y * factor - (y * (factor - 1.0)).detach()


def test_correctness_gate_marks_wrong_outputs_and_gradients_and_they_are_not_ranked(capsys):
    gen = torch.Generator().manual_seed(0)  # the float32 rounding error below depends on the values
    x = torch.randn(6, 16, generator=gen).requires_grad_()
    w = torch.randn(16, 8, generator=gen).requires_grad_()
    exact = Exact(lambda x, w: torch.tanh(x @ w))  # float64 copies of the leaves for a float32 case
    providers = {
        "ref": lambda: torch.tanh(x @ w),
        "wider": lambda: torch.tanh(x.double() @ w.double()).float(),  # closer to exact than the reference
        "scaled": lambda: torch.tanh(x @ w) * 1.01,
        "bad-grad": lambda: _scaled_gradient(torch.tanh(x @ w), 1.01),  # right output, gradients 1% off
        "no-grad": lambda: torch.tanh(x @ w.detach()),  # w gets no gradient
        "fwd-only": Impl(lambda: torch.tanh(x @ w), modes=("fwd",)),
    }
    h = Harness("toy", device="cpu", quick=True, save=False)
    rows = h.run_case(
        Case("toy", {}, torch.float32),
        providers,
        leaves={"x": x, "w": w},
        modes=("fwd", "fwd+bwd"),
        reference="ref",
        exact=exact,
    )
    by = {(r.provider, r.mode): r for r in rows}
    for mode in ("fwd", "fwd+bwd"):
        assert [by[(p, mode)].correct for p in providers] == [True, True, False, False, False, True]
    ref, wider, scaled, bad_grad, no_grad, fwd_only = (by[(p, "fwd")] for p in providers)
    assert set(ref.errors) == {"out", "grad x", "grad w"} and set(fwd_only.errors) == {"out"}
    exact_out = torch.tanh(x.double() @ w.double())
    for row in (ref, wider):
        assert all(err <= bound for err, bound in row.errors.values())
        # the bound: twice the float32 reference's own error + 1e-4 of the exact output's magnitude
        assert row.errors["out"][1] == pytest.approx(2 * ref.errors["out"][0] + 1e-4 * exact_out.abs().max().item())
    # float32 rounding of outputs within [-1, 1]: a few ulps; the 1% error is three orders above it
    assert ref.max_err == ref.errors["out"][0] < 1e-5 and scaled.max_err > 1e-3
    assert scaled.errors["grad x"][0] > scaled.errors["grad x"][1]
    assert bad_grad.errors["out"][0] <= bad_grad.errors["out"][1]
    assert bad_grad.errors["grad w"][0] > bad_grad.errors["grad w"][1]
    assert no_grad.errors["grad w"][0] == float("inf")
    assert all(r.ok for r in rows if r.provider != "fwd-only" or r.mode == "fwd")  # wrong ones too: marked
    table = harness.format_rows(rows)
    assert "WRONG (out, grad x, grad w)" in table and "WRONG (grad x, grad w)" in table
    assert "WRONG (grad w)" in table

    # not ranked: "wrong" in the speed-up table, left out of a speed-up target even when it is the fastest
    speedups = harness.format_speedups(rows, "ref", ["wider", "scaled"])
    assert speedups.count("wrong") == 2 and "x" in speedups.split("\n")[2].split()[3]
    fast_wrong = Row("toy", "scaled", "fwd", {}, "float32", ms=1e-6, ms_p20=1e-6, ms_p80=1e-6, correct=False)
    check = harness.speedup_check("t", ref, [fast_wrong, wider], 0.0, own_why="o", peer_why="p")
    assert check.value.endswith("vs wider") and check.ok
    assert (
        harness.speedup_check("t", ref, [fast_wrong], 0.0, own_why="o", peer_why="p").why
        == "p; incorrect, not ranked: scaled"
    )
    harness.print_summary(rows, list(providers), ["ref"], None, "toy")
    assert "!!! INCORRECT" in capsys.readouterr().out


def test_gate_without_exact_in_low_precision_and_with_a_tolerance():
    # bf16 against an fp32 yardstick: the reference's own rounding bounds the others
    x = torch.randn(32, 64, dtype=torch.bfloat16, requires_grad=True)
    h = Harness("toy", device="cpu", quick=True, save=False)
    rows = h.run_case(
        Case("toy", {}, torch.bfloat16),
        {"ref": lambda: x.square(), "same": lambda: x * x, "off": lambda: x.square() * 1.05},
        leaves=[x],
        modes=("fwd",),
        reference="ref",
        exact=Exact(lambda x: x.square()),
    )
    assert [r.correct for r in rows] == [True, True, False]
    assert rows[0].errors["out"][1] > 0 and set(rows[0].errors) == {"out"}  # fwd only: no gradient checked
    # a tolerance replaces the rule (e.g. class maps): no gradients, its own verdict
    labels = Harness("toy", device="cpu", quick=True, save=False).run_case(
        Case("toy", {}, torch.float32),
        {"ref": lambda: x.float().argmax(1), "other": lambda: x.float().argmin(1)},
        leaves=[],
        modes=("fwd",),
        reference="ref",
        tolerance=lambda name, out, ref: ((out != ref).float().mean().item(), torch.equal(out, ref)),
    )
    assert [(r.correct, r.errors) for r in labels] == [(True, None), (False, None)]


def test_cuda_graph_timing_logic_with_a_stand_in_capture():
    """The graph path on the CPU: a stand-in capture calls the run once (as a capture does) and returns it
    as the replay; a provider that syncs with the host fails its capture and keeps its eager time."""
    x = torch.randn(3, requires_grad=True)
    capturing = []

    def capture(run):
        capturing.append(True)
        try:
            run()
        finally:
            capturing.pop()
        return run

    def syncs():
        if capturing:
            raise RuntimeError("operation not permitted when stream is capturing")
        return x * 2

    h = Harness("toy", device="cpu", quick=True, save=False)
    assert h.graph_capture is None  # the CPU times no graphs by default
    providers = {
        "plain": lambda: x * 2,
        "syncs": syncs,
        "opted-out": Impl(lambda: x * 2, graphs=False, note="allocates per call"),
    }
    plain_rows = h.run_case(Case("toy", {}, torch.float32), providers, leaves=[x])
    assert all(r.graph_ms is None and r.graph_error is None for r in plain_rows)
    h.graph_capture, h.graph_below_ms = capture, 1e9
    by = {(r.provider, r.mode): r for r in h.run_case(Case("toy", {}, torch.float32), providers, leaves=[x])}
    for mode in harness.GRAPH_MODES:
        assert by[("plain", mode)].graph_ms > 0 and by[("plain", mode)].graph_error is None
        assert by[("syncs", mode)].ok and by[("syncs", mode)].graph_ms is None
        assert (
            by[("syncs", mode)].graph_error
            == "capture failed: RuntimeError: operation not permitted when stream is capturing"
        )
        assert by[("opted-out", mode)].graph_error == "not capturable: allocates per call"
    assert by[("plain", "bwd")].graph_ms is None and by[("plain", "bwd")].graph_error is None
    assert "failed" in harness.format_rows(list(by.values()))
    h.graph_below_ms = 0.0  # only calls faster than the threshold are replayed
    rows = h.run_case(Case("toy", {}, torch.float32), {"plain": lambda: x * 2}, leaves=[x])
    assert all(r.graph_ms is None for r in rows)


def test_slow_provider_skips_its_remaining_modes_without_interrupting_it():
    x = torch.randn(3, requires_grad=True)
    h = Harness("toy", device="cpu", quick=True, save=False, slow_ms=5.0)

    def slow():
        time.sleep(0.01)  # every call runs to the end: nothing interrupts it
        return x * 2

    rows = h.run_case(Case("toy", {}, torch.float32), {"fast": lambda: x * 2, "slow": slow}, leaves=[x])
    by = {(r.provider, r.mode): r for r in rows}
    assert all(by[("fast", m)].ok for m in harness.MODES)
    assert by[("slow", "fwd")].ok and by[("slow", "fwd")].ms >= 10.0
    assert by[("slow", "bwd")].error.startswith("skipped: fwd took")
    assert "FAILED" not in harness.format_rows(rows)


def test_shape_set_chooses_the_requested_the_quick_gpu_or_the_cpu_shapes():
    shapes = harness.ShapeSet({"a": 1, "b": 2, "c": 3}, {"x": 9}, quick=("c", "a"))
    args = lambda quick=False, requested=None: type("A", (), {"quick": quick, "shapes": requested})()
    assert shapes(args(), on_gpu=True) == [1, 2, 3] and shapes(args(quick=True), on_gpu=True) == [3, 1]
    assert shapes(args(quick=True), on_gpu=False) == [9] and shapes(args(requested=["x", "b"]), on_gpu=True) == [9, 2]
    assert harness.ShapeSet({"a": 1}, {"x": 9})(args(quick=True), on_gpu=True) == [1]  # no quick subset: all
    assert shapes.all == {"a": 1, "b": 2, "c": 3, "x": 9}


def test_git_commit_outside_a_repository(tmp_path):
    assert harness.git_commit(tmp_path) == "unknown"
    assert harness.git_commit().split("+")[0] != "unknown"


# --------------------------------------------------------------------- window attention: work and shapes
def test_attention_flops_and_exps():
    # 2 (batch*heads) x 3 queries x 5 keys x head_dim 7: QK^T and PV are 3*5*7 FMAs each
    assert bench.attention_flops(2, 3, 5, 7, "fwd") == 2 * 2 * (2 * 3 * 5 * 7) == 840
    assert bench.attention_flops(2, 3, 5, 7, "bwd") == 2100  # 2.5x
    assert bench.attention_flops(2, 3, 5, 7, "fwd+bwd") == 2940  # 3.5x
    assert [bench.attention_exps(2, 3, 5, m) for m in harness.MODES] == [30, 30, 60]


def test_window_attention_work_small_shape():
    # B=1, T=4, 14x14, C=64, 2 heads, window 4x7x7: 1*2*2 = 4 windows of N = 196 tokens, head_dim 32
    shape = bench.Shape("t", B=1, T=4, H=14, W=14, C=64, heads=2)
    assert (shape.geom.num_windows, shape.geom.tokens_per_window, shape.head_dim) == (4, 196, 32)
    fwd = bench.window_attention_work(shape, torch.bfloat16, "fwd")
    assert fwd.flops == 4 * (1 * 4 * 2) * 196 * 196 * 32 == 39_337_984
    assert fwd.exps == 8 * 196 * 196 == 307_328
    m = 4 * 14 * 14  # 784 tokens
    assert fwd.bytes == 8 * m * 64 == 401_408  # bf16: q, k, v read + out written
    bwd = bench.window_attention_work(shape, torch.bfloat16, "bwd")
    assert bwd.flops == 2.5 * fwd.flops
    assert bwd.bytes == 16 * m * 64 + 4 * m * 2 == 809_088  # 8 tensors of M*C bf16 + fp32 lse
    both = bench.window_attention_work(shape, torch.bfloat16, "fwd+bwd")
    assert both.bytes == fwd.bytes + bwd.bytes and both.exps == 2 * fwd.exps
    assert bench.window_attention_work(shape, torch.float32, "fwd").bytes == 2 * fwd.bytes


def test_window_attention_work_padded_and_shrunk():
    padded = bench.Shape("p", B=2, T=6, H=10, W=10, C=64, heads=2, shift=(2, 3, 3))
    g = padded.geom
    assert (g.padded, g.num_windows, g.shift) == ((8, 14, 14), 8, (2, 3, 3))
    assert bench.window_attention_work(padded, torch.bfloat16, "fwd").flops == 4 * (2 * 8 * 2) * 196**2 * 32
    # an axis not larger than the window shrinks it and drops its shift (Video Swin's get_window_size)
    shrunk = bench.Shape("s", B=1, T=2, H=7, W=9, C=32, heads=1, shift=(1, 3, 3))
    g = shrunk.geom
    assert (g.window, g.shift, g.tokens_per_window, g.num_windows, g.padded) == (
        (2, 7, 7),
        (0, 0, 3),
        98,
        2,
        (2, 7, 14),
    )
    record = shrunk.record()
    assert (record["nW"], record["N"], record["effective_window"], record["head_dim"]) == (2, 98, (2, 7, 7), 32)


def test_stt_shapes_match_the_model():
    # strides 4..32 of a 480x480 input, dims 32..256, head dim 32, two 4-frame clips
    for name, hw, c in (("stride4", 120, 32), ("stride8", 60, 64), ("stride16", 30, 128), ("stride32", 15, 256)):
        s = bench.GPU_SHAPES[name]
        assert (s.B, s.T, s.H, s.W, s.C, s.head_dim, s.window) == (2, 4, hw, hw, c, 32, (4, 7, 7))
    assert bench.GPU_SHAPES["stride4"].geom.num_windows == 18 * 18  # 120 pads to 126
    # T = 4 is not larger than the temporal window: Video Swin drops that axis's shift
    assert bench.GPU_SHAPES["large-shift"].geom.shift == (0, 3, 3)


@pytest.mark.parametrize(
    "shape",
    [
        bench.Shape("shrunk-shift", B=2, T=2, H=9, W=11, C=32, heads=2, window=(4, 5, 5), shift=(1, 2, 2)),
        bench.Shape("odd", B=1, T=5, H=6, W=13, C=24, heads=3, window=(2, 3, 5), shift=(1, 1, 2)),
    ],
)
def test_sdpa_and_flex_peers_match_the_reference(shape):
    """The peers' partition (from the op's geometry), bias index (table gather and dense bias) and shift
    regions, on shrunk windows, padding on every axis and odd sizes; the forward and the sdpa peer's
    gradients (FlexAttention has no CPU backward)."""
    qkv, table = bench.make_inputs(shape, torch.float64, torch.device("cpu"))
    providers = bench.build_providers(["eager", "sdpa", "flex", "flex-dense"], shape, qkv, table)
    assert providers["flex-dense"].modes == ("fwd",)
    ref = providers["eager"].fn()
    for name in ("sdpa", "flex", "flex-dense"):
        out = providers[name].fn()
        assert out.shape == ref.shape and (out - ref).abs().max().item() < 1e-10, name
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (qkv, table), grad)
    sdpa_grads = torch.autograd.grad(providers["sdpa"].fn(), (qkv, table), grad)
    for a, b in zip(ref_grads, sdpa_grads, strict=True):
        assert (a - b).abs().max().item() < 1e-10
    assert torch.equal(
        bench.Partition(shape, qkv.device).dense_bias(table)[1, 5, 7],
        table[bench.Partition(shape, qkv.device).rel_index[5, 7], 1],
    )
    round_trip = bench.Partition(shape, qkv.device)
    q, _, _ = round_trip(qkv.detach())
    assert q.shape == (shape.B * shape.geom.num_windows, shape.heads, shape.geom.tokens_per_window, shape.head_dim)
    assert torch.equal(round_trip.reverse(q), bench.split_qkv(qkv.detach(), shape.heads)[0])


@pytest.mark.parametrize(
    "shape",
    [
        bench.Shape("pad-shift", B=2, T=5, H=9, W=10, C=24, heads=2, window=(2, 3, 5), shift=(1, 1, 2)),
        bench.Shape("shrunk", B=1, T=2, H=4, W=11, C=16, heads=2, window=(4, 5, 5), shift=(2, 2, 2)),
    ],
)
def test_torchvision_module_peer_matches_ours(shape):
    """torchvision's ShiftedWindowAttention3d on our module's parameters: the same output and gradients as
    our WindowAttention3D (reference backend) and the gate's yardstick, padded, shifted and shrunk."""
    x, module = bench.make_module(shape, torch.float64, torch.device("cpu"))
    providers = bench.module_providers(["torchvision", "eager"], shape, x, module)
    assert set(providers) == {"torchvision", "module-reference"}
    leaves = (x, *module.parameters())
    grad = torch.randn_like(x)
    results = {}
    for name, impl in providers.items():
        out = impl.fn()
        results[name] = (out, *torch.autograd.grad(out, leaves, grad))
    exact = bench.exact_module(shape, module).fn(*leaves)
    results["exact"] = (exact, *torch.autograd.grad(exact, leaves, grad))
    assert len(results["torchvision"]) == 1 + 1 + 5  # x, qkv weight and bias, table, proj weight and bias
    for theirs, ours, yardstick in zip(*results.values(), strict=True):
        assert (theirs - ours).abs().max().item() < 1e-10 and (ours - yardstick).abs().max().item() < 1e-10


def test_sdpa_kernel_record():
    """The SDPA provider reports the kernel its aten op names (on the CPU with a differentiable float mask:
    the math kernel) and what each sdpa_kernel backend does with the shape."""
    shape = bench.CPU_SHAPES["cpu-small"]
    qkv, table = bench.make_inputs(shape, torch.float32, torch.device("cpu"))
    info = bench.build_providers(["sdpa"], shape, qkv, table)["sdpa"].describe()
    assert info["sdpa_kernel"] == "math" and info["sdpa_ops"] == ["aten::_scaled_dot_product_attention_math"]
    assert list(info["sdpa_backends"]) == list(bench.SDPA_BACKENDS) and info["sdpa_backends"]["math"] == "fwd+bwd"
    assert info["sdpa_backends"]["efficient"].startswith("no: ")  # a CUDA kernel
    assert qkv.grad is not None  # the record ran a backward; the harness resets the gradients after it


# ------------------------------------------------------------------------------------------- targets
def _row(case, provider, mode, ms, **kw):
    return Row(case, provider, mode, {}, "bfloat16", ms=ms, ms_p20=ms, ms_p80=ms, **kw)


def _untimed(case, provider, mode, error):
    return Row(case, provider, mode, {}, "bfloat16", error=error)


TARGET_ROWS = [
    _row("c", "eager", "fwd+bwd", 6.0, peak_mib=400.0),
    _row("c", "sdpa", "fwd+bwd", 4.5),
    _row("c", "flex", "fwd+bwd", 3.0),
    _untimed("c", "compile", "fwd+bwd", "unavailable: no compiler"),
    _row("c", "ours", "fwd+bwd", 2.0, peak_mib=100.0, correct=True),
    _row("c", "ours", "fwd", 1.0, gbps=2400.0, roofline_pct=40.0, limiter="memory", correct=True),
    _row("d", "eager", "fwd+bwd", 5.0),
    _row("d", "ours", "fwd+bwd", 1.0, correct=False),
    _untimed("d", "broken", "fwd", "RuntimeError: boom"),
    _untimed("d", "broken", "fwd+bwd", "RuntimeError: boom"),
]


def test_row_index():
    index = harness.RowIndex(TARGET_ROWS)
    assert index.timed("c", "ours", "fwd+bwd") is TARGET_ROWS[4] and index.own("c", "ours") is TARGET_ROWS[4]
    assert index.get("c", "compile", "fwd+bwd") is TARGET_ROWS[3] and index.timed("c", "compile", "fwd+bwd") is None
    assert index.get("c", "ours", "bwd") is None and index.own("c", "nobody") is None
    assert index.own("d", "broken") is TARGET_ROWS[9]  # fwd+bwd first, else fwd
    assert harness.RowIndex(TARGET_ROWS[8:9]).own("d", "broken") is TARGET_ROWS[8]
    assert index.ran(["x", "d", "c"]) == ["d", "c"]  # the order asked for, only cases that ran
    assert harness.untimed(TARGET_ROWS[9]) == "broken: RuntimeError: boom"
    assert harness.untimed(Row("c", "p", "fwd", {}, "bfloat16"), "no forward time") == "p: no forward time"


def test_target_checks_and_their_statuses():
    index = harness.RowIndex(TARGET_ROWS)
    fb, fwd, eager = (index.timed("c", p, m) for p, m in (("ours", "fwd+bwd"), ("ours", "fwd"), ("eager", "fwd+bwd")))
    fused = [index.timed("c", p, "fwd+bwd") for p in ("sdpa", "flex")]
    checks = [
        *harness.peer_speedup_checks(index, "c", fb, {"eager": 3.0, "compile": 1.5}, own_why="ours: no time"),
        harness.speedup_check("faster of sdpa/flex", fb, fused, 1.6, own_why="ours: no time", peer_why="no peer"),
        harness.speedup_check("vs sdpa", fb, fused[:1], 2.25, own_why="ours: no time", peer_why="no peer"),
        harness.bandwidth_check("bandwidth", fwd, 4.8e12, 50.0, own_why="no forward time", peak_why="no peak"),
        harness.bandwidth_check("bandwidth", fwd, None, 50.0, own_why="no forward time", peak_why="no peak"),
        harness.roofline_check("roofline", fwd, 40.5, own_why="ours: no forward time"),
        harness.roofline_check("roofline", _row("c", "ours", "fwd", 1.0), 40.5, own_why="ours: no forward time"),
        harness.peak_memory_check("memory", fb, eager, 0.25),
        harness.peak_memory_check("memory", fb, eager, 0.3, mib_digits=1),
        harness.peak_memory_check("memory", fwd, eager, 0.3),  # the forward row has no peak memory
    ]
    results = harness.target_results("c", "ours", checks, correct=True)
    assert [(r.case, r.provider) for r in results] == [("c", "ours")] * len(checks)
    assert [(r.target, r.value, r.status) for r in results] == [
        ("fwd+bwd >= 3x eager", "3.00x", "PASS"),  # 6 ms / 2 ms: the factor itself passes
        ("fwd+bwd >= 1.5x compile", "-", "n/a (compile has no time)"),
        ("faster of sdpa/flex", "1.50x vs flex", "FAIL"),  # the fastest peer counts and is named
        ("vs sdpa", "2.25x", "PASS"),
        ("bandwidth", "50.0% (2400 GB/s)", "PASS"),
        ("bandwidth", "-", "n/a (no peak)"),
        ("roofline", "40.0% (memory-bound)", "FAIL"),
        ("roofline", "-", "n/a (no roofline for this device)"),
        ("memory", "0.25x (100 / 400 MiB)", "PASS"),
        ("memory", "0.25x (100.0 / 400.0 MiB)", "PASS"),
        ("memory", "-", "n/a (no memory measurement)"),
    ]
    # a provider that failed the correctness gate fails every target that was measured; one that was not stays n/a
    statuses = [r.status for r in harness.target_results("c", "ours", checks, correct=False)]
    assert statuses == [r.status if r.status.startswith("n/a") else "FAIL (incorrect)" for r in results]
    assert statuses.count("FAIL (incorrect)") == 7
    # no reference ran (correct None): nothing to fail on
    assert harness.target_results("c", "ours", checks, correct=None) == results
    # a row without a time (or none at all) is n/a with the reason given for it
    broken = index.get("d", "broken", "fwd+bwd")
    assert harness.speedup_check(
        "t", broken, [index.timed("d", "eager", "fwd+bwd")], 1.0, own_why=harness.untimed(broken), peer_why="-"
    ) == harness.Check("t", "-", None, "broken: RuntimeError: boom")
    assert harness.speedup_check("t", None, [], 1.0, own_why="o", peer_why="p").why == "o"
    assert harness.speedup_check("t", fb, [None, broken], 1.0, own_why="o", peer_why="p").why == "p"
    assert harness.bandwidth_check("t", broken, 4.8e12, 1.0, own_why="o", peak_why="p").why == "o"
    assert harness.roofline_check("t", None, 1.0, own_why="o").why == "o"
    assert harness.peak_memory_check("t", fb, None, 1.0).why == "no memory measurement"


def test_check_targets_per_case_and_provider():
    def judge(index, case, provider, own):
        fb = index.timed(case, provider, "fwd+bwd")
        checks = harness.peer_speedup_checks(index, case, fb, {"eager": 3.0}, own_why=harness.untimed(own))
        return harness.target_results(case, provider, checks, own.correct)

    table = lambda results: [(r.case, r.target, r.provider, r.value, r.status) for r in results]
    results = harness.check_targets(TARGET_ROWS, ["d", "c", "absent"], ["ours", "broken", "nobody"], judge)
    assert table(results) == [
        ("d", "fwd+bwd >= 3x eager", "ours", "5.00x", "FAIL (incorrect)"),
        ("d", "all targets", "broken", "-", "n/a (broken: RuntimeError: boom)"),  # nothing timed: one line
        ("c", "fwd+bwd >= 3x eager", "ours", "3.00x", "PASS"),
    ]
    results = harness.check_targets(TARGET_ROWS, ["d"], ["broken"], judge, one_line_when_untimed=False)
    assert table(results) == [("d", "fwd+bwd >= 3x eager", "broken", "-", "n/a (broken: RuntimeError: boom)")]


def test_print_summary(capsys):
    rows = [
        _row("c", "eager", "fwd", 4.0),
        _row("c", "ours", "fwd", 2.0, correct=False),
        _row("c-module", "module-eager", "fwd", 9.0),
        _row("c-module", "module-ours", "fwd", 3.0, correct=True),
    ]
    targets = [harness.TargetResult("c", "fwd >= 1x eager", "ours", "2.00x", "PASS")]
    labels = {"eager": "module-eager", "ours": "module-ours"}
    harness.print_summary(rows, ["eager", "ours"], ["ours", "theirs"], targets, "c", labels=[labels])
    conv, module = (
        harness.format_speedups(rows, "ours", ["eager"]),
        harness.format_speedups(rows, "module-ours", ["module-eager"]),
    )
    assert "2.00x" not in conv and "2.000 WRONG" in conv and "wrong" in conv  # an incorrect row is not ranked
    assert "3.00x" in module and "module" not in conv
    assert capsys.readouterr().out == (
        f"\n{conv}\n\n{module}\n\n!!! INCORRECT (output or gradients beyond twice the reference's error; not "
        f"ranked): ours on c\n{harness.format_targets(targets, 'c')}\n"
    )
    harness.print_summary(rows[:1], ["eager", "ours"], ["ours"], None, "c")
    assert capsys.readouterr().out == "\ntargets: defined for bf16 on a GPU; not evaluated on this CPU run\n"


def test_targets_from_measured_numbers():
    rows = [
        _row("large", "eager", "fwd+bwd", 30.0, peak_mib=1000.0),
        _row("large", "compile", "fwd+bwd", 15.0),
        _row("large", "sdpa", "fwd+bwd", 13.0),
        _row("large", "flex", "fwd+bwd", 12.0),
        _row("large", "flex-dense", "fwd+bwd", 2.0, correct=False),  # the fastest, but wrong: not compared with
        _row("large", "triton", "fwd+bwd", 9.0, peak_mib=250.0, correct=True),
        _row("large", "triton", "fwd", 3.0, roofline_pct=55.0, limiter="exp", correct=True),
        Row("large", "cuda", "fwd+bwd", {}, "bfloat16", error="unavailable: not built"),
        _row("stride16", "eager", "fwd+bwd", 10.0, peak_mib=100.0),
        _row("stride16", "triton", "fwd+bwd", 5.0, peak_mib=40.0, correct=False),
    ]
    results = {(r.case, r.provider, r.target): r for r in bench.evaluate_targets(rows)}
    large = {t: r for (c, p, t), r in results.items() if (c, p) == ("large", "triton")}
    assert [r.status for r in large.values()] == ["PASS"] * 5
    assert large["fwd+bwd >= 3x eager"].value == "3.33x"
    assert large["fwd+bwd >= 1.5x compile"].value == "1.67x"
    assert large["fwd+bwd >= 1.3x faster of sdpa/flex"].value == "1.33x vs flex"
    assert large["fwd >= 50% of roofline"].value == "55.0% (exp-bound)"
    assert large["fwd+bwd peak memory <= 0.3x eager"].value.startswith("0.25x")
    assert all(r.status.startswith("n/a") for (c, p, _), r in results.items() if (c, p) == ("large", "cuda"))
    # stride16: 2x eager would fail, but an incorrect provider fails every measured target as failed
    assert results[("stride16", "triton", "fwd+bwd >= 3x eager")].status == "FAIL (incorrect)"
    assert results[("stride16", "triton", "fwd+bwd >= 1.5x compile")].status.startswith("n/a")
    assert "5/" in harness.format_targets(bench.evaluate_targets(rows), "large")
    speedups = harness.format_speedups(rows, "triton", ["eager", "flex-dense", "cuda"])
    assert speedups.split("\n")[3].split() == ["large", "fwd+bwd", "9.000", "3.33x", "wrong", "-"]
    assert speedups.split("\n")[4].split() == ["stride16", "fwd+bwd", "5.000", "WRONG", "wrong", "-", "-"]


# ------------------------------------------------------------------------------- CPU smoke run (--quick)
def test_stt_window_attn_cpu_quick(tmp_path):
    repo_results = BENCH_DIR / "results" / f"{bench.BENCHMARK}.jsonl"
    before = repo_results.stat().st_size if repo_results.exists() else None
    # the shape that pads every axis and shifts; the peers test covers shrunk windows and odd sizes
    proc, rows = run_cpu_benchmark(
        "stt_window_attn",
        "--quick",
        "--providers",
        "eager,torchvision,sdpa,flex,flex-dense,triton",
        "--shapes",
        "cpu-pad-shift",
        results_dir=tmp_path,
    )
    assert "CPU comparison" in proc.stdout and "targets: defined for bf16 on a GPU" in proc.stdout
    assert "WRONG" not in proc.stdout and "INCORRECT" not in proc.stdout
    assert (repo_results.stat().st_size if repo_results.exists() else None) == before  # written elsewhere

    assert len(rows) == (5 + 3) * len(harness.MODES)  # the op's providers, then the module case's
    assert all(r["benchmark"] == bench.BENCHMARK and r["device"] == "cpu" and r["run_note"] for r in rows)
    assert all(key in rows[0] for key in PROVENANCE)
    by = {(r["case"], r["provider"], r["mode"]): r for r in rows}
    case, module = "cpu-pad-shift", "cpu-pad-shift-module"
    assert by[(case, "eager", "fwd")]["shape"]["nW"] == bench.CPU_SHAPES[case].geom.num_windows
    # the gate: output and both gradients against the float64 reference, within twice the fp32 reference's error
    for c, provider in ((case, "eager"), (case, "sdpa"), (module, "torchvision"), (module, "module-reference")):
        for mode in harness.MODES:
            r = by[(c, provider, mode)]
            assert r["error"] is None and r["ms"] > 0 and r["correct"] is True, r
            assert all(err <= bound for err, bound in r["errors"].values())
    assert set(by[(case, "sdpa", "fwd")]["errors"]) == {"out", "grad qkv", "grad table"}
    assert by[(case, "sdpa", "fwd")]["max_err"] < 1e-5
    assert set(by[(module, "torchvision", "fwd")]["errors"]) == {
        "out",
        "grad x",
        *(f"grad {n}" for n in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "relative_position_bias_table")),
    }
    # the SDPA kernel that ran, in every sdpa row
    assert all(by[(case, "sdpa", m)]["info"]["sdpa_kernel"] == "math" for m in harness.MODES)
    assert "sdpa: {" in proc.stdout
    for flex in ("flex", "flex-dense"):  # forward only on the CPU: the output is gated
        r = by[(case, flex, "fwd")]
        assert r["error"] is None and r["correct"] is True and set(r["errors"]) == {"out"} and r["max_err"] < 1e-5, r
        assert by[(case, flex, "bwd")]["error"].startswith("unavailable")
    assert by[(case, "triton", "fwd")]["error"].startswith("unavailable: triton on CPU")
    assert by[(module, "module-triton", "fwd")]["error"].startswith("unavailable: triton on CPU")
    assert all(r["graph_ms"] is None and r["graph_error"] is None for r in rows)  # no CUDA graphs on the CPU


# --------------------------------------------------------------------------- short-term modules (tiny CPU case)
def test_short_term_tiny_cpu_case(tmp_path):
    """Every case and micro-benchmark runs on the tiny CPU setup and is labelled as such; RAFT without weights is
    skipped with its reason recorded; no GPU figure (peak memory) is written on the CPU."""
    from benchmarks import short_term

    proc, records = run_cpu_benchmark("short_term", results_dir=tmp_path, timeout=300)
    assert "tiny CPU case: no GPU figures" in proc.stdout
    micro = {r.pop("micro"): r for r in records if "micro" in r}
    records = [r for r in records if "case" in r]
    assert [r["case"] for r in records] == list(short_term.CASES)
    assert list(micro) == ["cffm_keys", "sparse_tt_gather"]
    for r in micro.values():
        assert r["status"] == "ok" and r["reason"] is None and r["benchmark"] == "short_term", r
        assert r["device"] == "cpu" and r["tiny"] is True and r["peak_mib"] is None and r["memory_measure"] is None
        assert 0 < r["fwd_ms"] < 10_000 and 0 < r["fwd_bwd_ms"] < 10_000 and r["steps"] == 1, r
        assert (r["size"], r["channels"], r["batch"], r["dtype"]) == (12, 32, 2, "fp32"), r
    # 12x12 pads to 2x2 windows of 49 queries, 289 keys each; 72 of 144 queries, 527 keys over 7 frames
    assert (micro["cffm_keys"]["frames"], micro["cffm_keys"]["keys"], micro["cffm_keys"]["queries"]) == (4, 289, 196)
    gather = micro["sparse_tt_gather"]
    assert (gather["frames"], gather["offsets"], gather["keys"], gather["queries"]) == (7, [1, 2, 3, 4, 5, 6], 527, 72)
    assert all(key in r for r in records for key in PROVENANCE[:-1])
    assert all(r["benchmark"] == "short_term" and r["device"] == "cpu" and r["gpu"] is None for r in records)
    assert all(r["tiny"] is True and r["backbone"] == "resnet18" and r["dtype"] == "fp32" for r in records)
    assert all(r["peak_mib"] is None and r["memory_measure"] is None for r in records)
    by = {r["case"]: r for r in records}
    assert {name: (r["short_term"], r["flow"], r["frames"]) for name, r in by.items()} == {
        "baseline": ("none", None, 1),
        "stt": ("stt", None, 4),
        "netwarp_dis": ("netwarp", "dis", 2),
        "netwarp_raft": ("netwarp", "raft", 2),
        "st_ocr": ("st_ocr", None, 4),
        "cffm": ("cffm", None, 4),
        "sparse_tt": ("sparse_tt", None, 7),
    }
    assert by["sparse_tt"]["short_term_args"] == {"offsets": [1, 2, 3, 4, 5, 6]}
    assert by["cffm"]["short_term_args"] == {"dim": 32}
    raft = by.pop("netwarp_raft")
    assert raft["status"] == "skipped" and "--raft-weights" in raft["reason"] and "never downloaded" in raft["reason"]
    assert raft["step_ms"] is None and raft["flow_ms_per_pair"] is None and raft["params"] is None
    for name, r in by.items():
        assert r["status"] == "ok" and r["reason"] is None, r
        assert 0 < r["step_ms"] < 60_000 and r["steps"] == 1 and r["warmup"] == 1, r
        assert (r["flow_ms_per_pair"] is not None) == (name == "netwarp_dis"), r
    assert 0 < by["netwarp_dis"]["flow_ms_per_pair"] < 10_000
    assert all(r["params"] > 11_000_000 for r in by.values())  # the ResNet-18 backbone at least
    assert len({r["params"] for r in by.values()}) == len(by)  # each case its own module


def test_short_term_refuses_a_missing_raft_weights_file(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH_DIR / "short_term.py"), "--cpu", "--raft-weights", str(tmp_path / "raft.pth")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and f"--raft-weights: no file at {tmp_path / 'raft.pth'}" in proc.stderr
    assert not (tmp_path / "short_term.jsonl").exists()


# ------------------------------------------------------------------ training objectives, compared configs (tiny)
def test_objectives_tiny_cpu_case(tmp_path):
    """Every objective's case builds from its run config and takes its training step on the tiny CPU setup; RAFT
    without weights is skipped with its reason; Mean Teacher's EMA update is timed; the objectives add no
    parameters to the trained model."""
    from benchmarks import objectives

    proc, records = run_cpu_benchmark("objectives", results_dir=tmp_path, timeout=300)
    assert "tiny CPU case: no GPU figures" in proc.stdout
    assert [r["case"] for r in records] == list(objectives.CASES)
    assert all(key in r for r in records for key in PROVENANCE[:-1])
    assert all(r["benchmark"] == "objectives" and r["device"] == "cpu" and r["gpu"] is None for r in records)
    assert all(
        (r["tiny"], r["classes"], r["size"], r["batch"], r["dtype"]) == (True, 6, 48, 2, "fp32") for r in records
    )
    assert all(r["peak_mib"] is None and r["memory_measure"] is None for r in records)
    by = {r["case"]: r for r in records}
    raft = by.pop("temporal_loss_raft")
    assert raft["status"] == "skipped" and "--raft-weights" in raft["reason"] and "never downloaded" in raft["reason"]
    assert raft["step_ms"] is None and raft["ema_ms"] is None and raft["params"] is None
    assert (raft["objectives"], raft["flow"], raft["frames"]) == (["temporal_loss"], "raft", 2)
    for name, r in by.items():
        assert r["status"] == "ok" and r["reason"] is None, r
        assert 0 < r["step_ms"] < 60_000 and (r["warmup"], r["steps"]) == (1, 1) and r["backbone"] == "resnet18", r
        assert (r["ema_ms"] is not None) == (name == "mean_teacher"), r
    assert 0 < by["mean_teacher"]["ema_ms"] < 10_000
    assert {name: (r["objectives"], r["short_term"], r["frames"], r["flow"]) for name, r in by.items()} == {
        "baseline": ([], "none", 1, None),
        "temporal_loss_dis": (["temporal_loss"], "none", 2, "dis"),
        "ifr": (["ifr"], "none", 1, None),
        "ssltm": ([], "stt", 4, None),
        "mean_teacher": (["mean_teacher"], "stt", 4, None),
    }
    assert by["ifr"]["backbone_passes"] == 6
    params = {name: r["params"] for name, r in by.items()}
    assert params["baseline"] == params["temporal_loss_dis"] == params["ifr"] > 11_000_000  # ResNet-18 at least
    assert params["ssltm"] == params["mean_teacher"] > params["baseline"]  # the teacher is not trained


def test_objectives_temporal_loss_with_raft_weights(tmp_path, raft_file):
    """With a raft_large file the RAFT case loads it through model.flow_weights and takes its step."""
    _, records = run_cpu_benchmark(
        "objectives", "--cases", "temporal_loss_raft", "--raft-weights", str(raft_file), results_dir=tmp_path
    )
    (r,) = records
    assert r["case"] == "temporal_loss_raft" and r["status"] == "ok" and r["reason"] is None, r
    assert (r["objectives"], r["flow"], r["frames"]) == (["temporal_loss"], "raft", 2) and 0 < r["step_ms"] < 60_000
    assert f"model.flow_weights={raft_file}" in r["overrides"] and "model.flow=raft" in r["overrides"]


def test_objectives_refuses_a_missing_raft_weights_file(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH_DIR / "objectives.py"), "--cpu", "--raft-weights", str(tmp_path / "raft.pth")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and f"--raft-weights: no file at {tmp_path / 'raft.pth'}" in proc.stderr
    assert not (tmp_path / "objectives.jsonl").exists()


def test_baselines_tiny_cpu_case(tmp_path):
    """Compared configs load as a run loads them and take their training step and streaming steps on the tiny CPU
    setup (Mean Teacher's passes included); a config that does not load is skipped with the reason; the Swin-S and
    ResNet-101 trunks are timed alone."""
    from benchmarks import baselines

    chosen = ["table5/upernet", "table7/ssltm_mt", "table2/ocrnet"]
    assert set(chosen) <= set(baselines.config_names())
    proc, records = run_cpu_benchmark("baselines", "--configs", ",".join(chosen), results_dir=tmp_path, timeout=300)
    assert "tiny CPU case: no GPU figures" in proc.stdout
    assert [r.get("config") or r["trunk"] for r in records] == [*chosen, "swin_s", "resnet101"]
    assert all(key in r for r in records for key in PROVENANCE[:-1])
    assert all(r["benchmark"] == "baselines" and r["device"] == "cpu" and r["tiny"] is True for r in records)
    assert all(r["peak_mib"] is None and (r["warmup"], r["steps"]) == (1, 1) for r in records)
    by = {r.get("config") or r["trunk"]: r for r in records}
    for r in by.values():
        assert r["status"] == "ok" and r["reason"] is None and 0 < r["step_ms"] < 60_000, r
        assert r["params"] > 11_000_000, r
    for name in set(by) & set(chosen):
        assert by[name]["stream_size"] == [48, 64] and 0 < by[name]["stream_fps"] < 1e5, by[name]
    assert (by["table5/upernet"]["backbone"], by["table5/upernet"]["short_term"]) == ("resnet18", "none")
    assert by["table5/upernet"]["frames"] == 1 and by["table5/upernet"]["objectives"] == []
    mt = by["table7/ssltm_mt"]
    assert (mt["short_term"], mt["frames"], mt["objectives"]) == ("stt", 4, ["mean_teacher"])
    ocr = by["table2/ocrnet"]
    assert (ocr["backbone"], ocr["decoder"], ocr["short_term"], ocr["frames"]) == ("resnet50", "ocrnet", "none", 1)
    assert by["swin_s"]["params"] != by["resnet101"]["params"]


def test_baselines_skip_a_config_that_does_not_load(tmp_path, monkeypatch):
    """A missing file or a key this checkout does not know: a skipped row saying why, before any model is built."""
    from benchmarks import baselines

    monkeypatch.setattr(baselines, "CONFIG_DIR", tmp_path / "configs")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "new.yaml").write_text("model:\n  decodr: ocrnet\n")
    args = argparse.Namespace(warmup=1, steps=1)
    missing, unknown = (
        baselines.run_config_case(name, baselines.TINY, args, torch.device("cpu")) for name in ("table9/x", "new")
    )
    assert missing["status"] == "skipped" and missing["reason"] == "does not load: no config file configs/table9/x.yaml"
    assert unknown["status"] == "skipped" and "unknown config key 'model.decodr'" in unknown["reason"], unknown
    assert all(r["step_ms"] is None and r["stream_fps"] is None and r["backbone"] is None for r in (missing, unknown))
