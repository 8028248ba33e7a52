"""Tests of the benchmark harness (formulas, device table, failure handling) and a CPU smoke run of
the window-attention benchmark, which also checks its sdpa / flex peers against the reference."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import harness  # noqa: E402
import stt_window_attn as bench  # noqa: E402
from harness import Harness, Impl, Row, Unavailable, Work  # noqa: E402


# --------------------------------------------------------------------------------------------------
# Formulas on hand-computed cases
# --------------------------------------------------------------------------------------------------
def test_attention_flops_and_exps():
    # 2 (batch*heads) x 3 queries x 5 keys x head_dim 7: QK^T and PV are 3*5*7 FMAs each
    assert harness.attention_flops(2, 3, 5, 7, "fwd") == 2 * 2 * (2 * 3 * 5 * 7) == 840
    assert harness.attention_flops(2, 3, 5, 7, "bwd") == 2100  # 2.5x
    assert harness.attention_flops(2, 3, 5, 7, "fwd+bwd") == 2940  # 3.5x
    assert harness.attention_exps(2, 3, 5, "fwd") == 30
    assert harness.attention_exps(2, 3, 5, "bwd") == 30
    assert harness.attention_exps(2, 3, 5, "fwd+bwd") == 60


def test_window_attention_work_small_shape():
    # B=1, T=4, 14x14, C=64, 2 heads, window 4x7x7: 1*2*2 = 4 windows of N = 196 tokens, head_dim 32
    shape = bench.Shape("t", B=1, T=4, H=14, W=14, C=64, heads=2)
    assert (shape.windows, shape.tokens, shape.head_dim) == (4, 196, 32)
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
    assert padded.padded == (8, 14, 14) and padded.windows == 8 and padded.eff_shift == (2, 3, 3)
    assert bench.window_attention_work(padded, torch.bfloat16, "fwd").flops == 4 * (2 * 8 * 2) * 196**2 * 32
    # an axis not larger than the window shrinks it and drops its shift (Video Swin get_window_size)
    shrunk = bench.Shape("s", B=1, T=2, H=7, W=9, C=32, heads=1, shift=(1, 3, 3))
    assert shrunk.eff_window == (2, 7, 7) and shrunk.eff_shift == (0, 0, 3)
    assert (shrunk.tokens, shrunk.windows, shrunk.padded) == (98, 2, (2, 7, 14))


def test_stt_shapes_match_the_model():
    # strides 4..32 of a 480x480 input, dims 32..256, head dim 32, two 4-frame clips
    for name, hw, c in (("stride4", 120, 32), ("stride8", 60, 64), ("stride16", 30, 128), ("stride32", 15, 256)):
        s = bench.GPU_SHAPES[name]
        assert (s.B, s.T, s.H, s.W, s.C, s.head_dim, s.window) == (2, 4, hw, hw, c, 32, (4, 7, 7))
    assert bench.GPU_SHAPES["stride4"].windows == 18 * 18  # 120 pads to 126
    # T = 4 is not larger than the temporal window: Video Swin drops that axis's shift
    assert bench.GPU_SHAPES["large-shift"].eff_shift == (0, 3, 3)


def test_device_table_and_roofline():
    sxm = harness.match_device_spec("NVIDIA H100 80GB HBM3")
    assert sxm is harness.DEVICE_SPECS["H100 SXM"]
    assert harness.match_device_spec("NVIDIA H100 PCIe") is harness.DEVICE_SPECS["H100 PCIe"]
    assert harness.match_device_spec("NVIDIA H100 NVL") is harness.DEVICE_SPECS["H100 NVL"]
    assert harness.match_device_spec("NVIDIA H200") is harness.DEVICE_SPECS["H200 SXM"]
    assert harness.match_device_spec("NVIDIA H200 NVL") is harness.DEVICE_SPECS["H200 NVL"]
    assert harness.match_device_spec("NVIDIA A100-SXM4-80GB") is None
    # dense bf16 peak = SMs x 4096 FLOP/clk x clock; MUFU exp = SMs x 16/clk x clock
    assert sxm.bf16_flops == pytest.approx(132 * 4096 * 1.83e9, rel=1e-3)
    assert sxm.exp_per_s == pytest.approx(132 * 16 * 1.83e9)

    # 1 ms of compute, 2 ms of memory traffic, 0.5 ms of exps at H100 SXM bf16 peaks
    work = Work(flops=989.4e9, bytes=6.7e9, exps=0.5e-3 * sxm.exp_per_s)
    bound = harness.roofline(work, sxm, torch.bfloat16)
    assert bound.limiter == "memory"
    assert (bound.ms, bound.compute_ms, bound.exp_ms) == pytest.approx((2.0, 1.0, 0.5))
    exp_bound = harness.roofline(Work(exps=3e-3 * sxm.exp_per_s), sxm, torch.bfloat16)
    assert exp_bound.limiter == "exp" and exp_bound.ms == pytest.approx(3.0)
    fp32 = harness.roofline(Work(flops=67e9), sxm, torch.float32)  # fp32 uses the non-tensor peak
    assert fp32.limiter == "compute" and fp32.ms == pytest.approx(1.0)
    assert harness.roofline(work, None, torch.bfloat16) is None

    tflops, gbps = harness.throughput(Work(flops=2e12, bytes=3e9), ms=1000.0)
    assert (tflops, gbps) == pytest.approx((2.0, 3.0))


def test_quantiles_and_cpu_timer():
    assert harness._quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.2) == pytest.approx(1.8)
    assert harness._quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    calls = []
    median, p20, p80 = harness.cpu_bench(lambda: calls.append(1), warmup_ms=0, rep_ms=1, min_reps=5, max_reps=5)
    assert len(calls) == 5
    assert 0 <= p20 <= median <= p80


# --------------------------------------------------------------------------------------------------
# Harness behaviour: modes, failure rows, mismatch flags, JSON lines
# --------------------------------------------------------------------------------------------------
def test_harness_rows_failures_and_jsonl(tmp_path):
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)

    def good():
        return torch.tanh(x @ w)

    def broken():
        raise RuntimeError("kernel exploded")

    providers = {
        "ref": good,
        "same": Impl(lambda: torch.tanh(x @ w), note="a note"),
        "wrong": lambda: torch.tanh(x @ w) + 1.0,
        "broken": broken,
        "absent": Unavailable("needs a GPU"),
        "fwd-only": Impl(good, modes=("fwd",), reason="no backward here"),
    }
    case = harness.Case("toy", {"n": 4}, torch.float32, {m: Work(flops=1e6, bytes=1e3) for m in harness.MODES})
    h = Harness("toy", device="cpu", quick=True, save=True, results_dir=tmp_path, note="cpu test",
                rep_ms=1, verbose=False)
    rows = h.run_case(case, providers, leaves=[x, w], reference="ref")

    by = {(r.provider, r.mode): r for r in rows}
    assert len(rows) == len(providers) * len(harness.MODES)
    for mode in harness.MODES:
        for name in ("ref", "same"):
            assert by[(name, mode)].ok and by[(name, mode)].ms > 0 and by[(name, mode)].match is True
        assert by[("wrong", mode)].ok and by[("wrong", mode)].match is False
        assert by[("wrong", mode)].max_abs_err == pytest.approx(1.0)
        assert "kernel exploded" in by[("broken", mode)].error
        assert by[("absent", mode)].error == "unavailable: needs a GPU"
    assert by[("fwd-only", "fwd")].ok
    assert by[("fwd-only", "bwd")].error == "unavailable: no backward here"
    assert by[("same", "fwd")].note == "a note"
    assert by[("ref", "fwd")].tflops == pytest.approx(1e6 / (by[("ref", "fwd")].ms * 1e-3) / 1e12)
    assert x.grad is None and w.grad is None  # gradients are reset after every measurement

    table = harness.format_rows(rows)
    assert "MISMATCH" in table and "FAILED: RuntimeError: kernel exploded" in table

    lines = [json.loads(line) for line in (tmp_path / "toy.jsonl").read_text().splitlines()]
    assert len(lines) == len(rows)
    first = lines[0]
    for key in ("gpu", "torch", "triton", "cuda", "commit", "date", "shape", "dtype", "provider", "mode", "ms",
                "ms_p20", "ms_p80", "tflops", "gbps", "roofline_pct", "peak_mib"):
        assert key in first
    assert first["device"] == "cpu" and first["run_note"] == "cpu test" and first["benchmark"] == "toy"


def test_bwd_mode_replays_a_retained_graph():
    x = torch.randn(3, requires_grad=True)
    grad = torch.ones(3)
    forwards = []

    def forward():
        forwards.append(1)
        return x * 2

    run = harness.mode_runner(forward, "bwd", grad)
    for _ in range(3):
        x.grad = None
        run.fn()
    assert len(forwards) == 1 and torch.equal(x.grad, torch.full((3,), 2.0))


def _row(case, provider, mode, ms, **kw):
    return Row(case, provider, mode, {}, "bfloat16", ms=ms, ms_p20=ms, ms_p80=ms, **kw)


def test_targets_from_measured_numbers():
    rows = [
        _row("large", "eager", "fwd+bwd", 30.0, peak_mib=1000.0),
        _row("large", "compile", "fwd+bwd", 15.0),
        _row("large", "sdpa", "fwd+bwd", 13.0),
        _row("large", "flex", "fwd+bwd", 12.0),
        _row("large", "triton", "fwd+bwd", 9.0, peak_mib=250.0, match=True),
        _row("large", "triton", "fwd", 3.0, roofline_pct=55.0, limiter="exp", match=True),
        Row("large", "cuda", "fwd+bwd", {}, "bfloat16", error="unavailable: not built"),
        _row("stride16", "eager", "fwd+bwd", 10.0, peak_mib=100.0),
        _row("stride16", "triton", "fwd+bwd", 5.0, peak_mib=40.0, match=False),
    ]
    results = {(r.case, r.provider, r.target): r for r in bench.evaluate_targets(rows)}
    large = {t: r for (c, p, t), r in results.items() if (c, p) == ("large", "triton")}
    assert [r.status for r in large.values()] == ["PASS"] * 5
    assert large["fwd+bwd >= 3x eager"].value == "3.33x"
    assert large["fwd+bwd >= 1.5x compile"].value == "1.67x"
    assert large["fwd+bwd >= 1.3x faster of sdpa/flex"].value == "1.33x vs flex"
    assert large["fwd+bwd peak memory <= 0.3x eager"].value.startswith("0.25x")
    assert all(r.status.startswith("n/a") for (c, p, _), r in results.items() if (c, p) == ("large", "cuda"))
    # stride16: 2x eager fails; output mismatch marks every measured target as failed
    assert results[("stride16", "triton", "fwd+bwd >= 3x eager")].status == "FAIL (output mismatch)"
    assert results[("stride16", "triton", "fwd+bwd >= 1.5x compile")].status.startswith("n/a")
    assert "PASS" in bench.format_targets(bench.evaluate_targets(rows))


# --------------------------------------------------------------------------------------------------
# CPU smoke run of the benchmark
# --------------------------------------------------------------------------------------------------
def test_stt_window_attn_cpu_quick(tmp_path):
    pytest.importorskip("einops")
    results_file = BENCH_DIR / "results" / f"{bench.BENCHMARK}.jsonl"
    before = results_file.stat().st_size if results_file.exists() else None
    rows_out = tmp_path / "rows.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(BENCH_DIR / "stt_window_attn.py"), "--cpu", "--quick", "--no-save",
         "--providers", "eager,sdpa,flex", "--rows-out", str(rows_out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CPU comparison" in proc.stdout
    assert (results_file.stat().st_size if results_file.exists() else None) == before  # --no-save

    rows = [json.loads(line) for line in rows_out.read_text().splitlines()]
    cases = set(bench.CPU_SHAPES)
    assert {r["case"] for r in rows} == cases
    by = {(r["case"], r["provider"], r["mode"]): r for r in rows}
    for case in cases:
        for provider in ("eager", "sdpa"):
            for mode in harness.MODES:
                r = by[(case, provider, mode)]
                assert r["error"] is None, r
                assert r["ms"] is not None and math.isfinite(r["ms"]) and r["ms"] > 0
                assert r["match"] is True, r
        # the peers agree with the reference (padding, shift mask and bias index included)
        assert by[(case, "sdpa", "fwd")]["max_abs_err"] < 1e-4
        flex = by[(case, "flex", "fwd")]
        assert flex["error"] is None and flex["match"] is True and flex["max_abs_err"] < 1e-4, flex
        assert by[(case, "flex", "bwd")]["error"].startswith("unavailable")


def test_time_box_turns_a_hung_provider_into_a_row():
    import time

    x = torch.randn(3, requires_grad=True)

    def slow():
        time.sleep(5)
        return x * 2

    case = harness.Case("toy", {}, torch.float32, {})
    h = Harness("toy", device="cpu", quick=True, save=False, rep_ms=1, verbose=False, first_call_timeout_s=0.2)
    start = time.perf_counter()
    rows = h.run_case(case, {"ref": lambda: x * 2, "slow": slow}, leaves=[x], modes=["fwd"], reference="ref")
    assert time.perf_counter() - start < 4
    by = {r.provider: r for r in rows}
    assert by["ref"].ok and "time box" in by["slow"].error
