"""benchmarks/wmsa_decide.py: its decision rules on hand-made measurements, and a CPU smoke run of every
section's code path (the Triton kernels in the interpreter) that writes JSON lines and leaves the shipped
configuration file alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch
from benchmark_runs import run_cpu_benchmark

import ssltm_kernels.ops.window_attention_3d as op
from benchmarks import wmsa_decide as decide
from benchmarks.harness import Row

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"


def _row(case, provider, ms, correct=True):
    return Row(case, provider, "fwd+bwd", {}, "bfloat16", ms=ms, ms_p20=ms, ms_p80=ms, correct=correct)


SHAPES = ("stride4", "stride8", "stride16", "stride32", "large", "large-shift")


def _rows(triton_wins, mismatch=()):
    """fwd+bwd rows: triton 1 ms on ``triton_wins``, else 3 ms; cuda 2 ms everywhere."""
    return [_row(c, "triton", 1.0 if c in triton_wins else 3.0, correct=c not in mismatch) for c in SHAPES] + [
        _row(c, "cuda", 2.0) for c in SHAPES
    ]


def test_default_backend_rule():
    assert decide.default_backend(_rows(SHAPES), [])[0] == "triton"
    # CUDA keeps its place when it wins large or stride4, however many other shapes Triton wins
    backend, why = decide.default_backend(_rows(set(SHAPES) - {"large"}), [])
    assert backend == "cuda" and "large" in why
    # Triton must win 4 of the 6; a result that failed the gate or the output check does not count
    assert decide.default_backend(_rows({"stride4", "large", "stride8"}), [])[0] == "cuda"
    four = {"stride4", "large", "stride8", "stride16"}
    assert decide.default_backend(_rows(four), [])[0] == "triton"
    assert decide.default_backend(_rows(four), [{"case": "stride8", "backend": "triton", "ok": False}])[0] == "cuda"
    assert decide.default_backend(_rows(four, mismatch={"stride8"}), [])[0] == "cuda"
    assert decide.default_backend([], [])[0] is None


def test_bounds_use_the_measured_floors():
    run = type("R", (), {"dtype": torch.bfloat16})()
    shape = decide.SHAPES["large"]
    work = decide.window_attention_work(shape, torch.bfloat16, "fwd")
    rows = [Row("large", "triton", "fwd", {}, "bfloat16", ms=1.0, ms_p20=1.0, ms_p80=1.0)]
    ceilings = {"copy_bytes_per_s": work.bytes / 0.5e-3, "exp_per_s": work.exps / 0.25e-3}  # floors 0.5, 0.25 ms
    assert decide.bounds(run, rows, ceilings) == [("large", "triton", "fwd", "1.0000", "0.5000", "memory", "2.00x")]


def test_cpu_smoke_run_writes_records_not_configs(tmp_path):
    shipped = op.CONFIG_FILE.read_bytes()
    proc, records = run_cpu_benchmark(
        "wmsa_decide", "--write-configs", results_dir=tmp_path, interpret=True, timeout=600
    )
    assert "CPU smoke run" in proc.stdout and "not written: a CPU run decides nothing" in proc.stdout
    assert op.CONFIG_FILE.read_bytes() == shipped
    sections = {r["section"] for r in records}
    assert {"ceilings", "gate", "sweep", "sweep-best", "decision"} <= sections
    assert all(r["benchmark"] == "wmsa_decide" and r["device"] == "cpu" and r["commit"] for r in records)
    gates = {r["backend"]: r for r in records if r["section"] == "gate"}
    assert gates["triton"]["ok"] is True and gates["triton"]["deterministic"] is True  # the interpreter's kernels
    assert gates["cuda"]["ok"] is None and "cannot run" in gates["cuda"]["error"]
    sweeps = [r for r in records if r["section"] == "sweep"]
    assert {r["kernel"] for r in sweeps} == set(decide.KNOBS) and all(r["ms"] > 0 for r in sweeps)
    # every variant's every choice timed (the owner-written dS sums with dbias's configuration)
    labels = {(r["kernel"], r["config"]) for r in sweeps}
    defaults = op.default_configs(70, 16, torch.float32)  # the CPU gate shape's 70-token windows, fp32
    dbias = defaults.dbias.label
    assert {
        ("bias_dtype", "bias_dtype=input"),
        ("reduce_stages", "reduce_stages=2"),
        ("dbias", f"{dbias} dbias_sum=owner"),
        ("dbias", dbias),
    } <= labels
    best = op.LaunchConfigs.from_json(next(r for r in records if r["section"] == "sweep-best")["configs"])
    # the CPU run times only the default kernel configurations; the variants' winners are whichever ran faster
    assert best == replace(defaults, **{name: getattr(best, name) for name in op.VARIANTS})


def test_write_configs_records_the_winners_per_device_and_shape(tmp_path, monkeypatch):
    """The winners go into the config file under the device's keys (the dispatch then takes them on that
    device), with the default backend and the run's provenance; other entries stay."""
    path = tmp_path / "configs.json"
    path.write_text(op.CONFIG_FILE.read_text())
    monkeypatch.setattr(op, "CONFIG_FILE", path)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")
    env = {"commit": "abc", "torch": "t", "triton": "3", "cuda": "c"}
    run = type(
        "R",
        (),
        {"dtype": torch.bfloat16, "full": True, "device": torch.device("cuda"), "harness": type("H", (), {"env": env})},
    )()
    winner = op.LaunchConfigs(
        *(op.KernelConfig(32, 64, 4, 2) for _ in op.KERNELS), bias_dtype="input", dbias_sum="owner"
    )
    decide.write_configs(run, {"large": winner}, "triton")
    doc = json.loads(path.read_text())
    key = op.config_key("GPU X", 196, 32, 8, torch.bfloat16, False)
    assert op.LaunchConfigs.from_json(doc["configs"][key]) == winner
    assert doc["default_backend"] == {"GPU X": "triton"} and doc["measured"][key]["commit"] == "abc"
    assert set(json.loads(op.CONFIG_FILE.read_text())["configs"]) >= set(
        json.loads((ROOT / "ssltm_kernels/ops/window_attention_3d_configs.json").read_text())["configs"]
    )
    monkeypatch.setattr(op.tuning, "_config_file", lambda read=op.tuning._config_file.__wrapped__: read(path))
    monkeypatch.setattr(op.tuning, "launch_configs", op.tuning.launch_configs.__wrapped__)  # uncached
    assert op.tuning.launch_configs(196, 32, 8, torch.bfloat16, False, "GPU X") == winner


def test_precompile_unit_compiles_the_launch_specialisation_without_a_gpu():
    """A sweep's compile unit builds the kernel as the shape's launch specialises it (here the reduction,
    the quickest to compile) for sm_90, in a process without the interpreter."""
    code = (
        "import torch; from benchmarks import wmsa_decide as d; s = d.SHAPES['stride16']; "
        "c = d.default_configs(196, 32, torch.bfloat16); "
        "n = len(list(d.op.triton_compile_specs(torch.bfloat16, s.geom.window, 32, s.geom.shift, pad=False, "
        "configs=c))); print(d._compile_unit(90, torch.bfloat16, s, c, d.launch_ints(s), 227 * 1024, n - 1))"
    )
    env = dict(
        os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok _window_attn_bwd_reduce_kernel", (
        proc.stdout[-2000:] + proc.stderr[-2000:]
    )
