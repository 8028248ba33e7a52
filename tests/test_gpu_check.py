"""scripts/gpu_check.sh, the one run a lent GPU machine gets: its CPU rehearsal (a fresh virtual environment
that installs from the wheelhouse offline, an injected failing stage, every stage in summary.md), the
summariser's statuses and targets on GPU-like records, the test selection of its correctness stages, and the
package importing with torch, triton and numpy alone (the GPU machine lacks some of the model's needs)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STAGES = ("install", "a", "b", "c", "d", "e", "f")
OP_TESTS = [
    "tests/test_window_attention_3d.py",
    "tests/test_dwconv3x3.py",
    "tests/test_gcc_assign.py",
    "tests/test_soft_region_pool.py",
]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SSLTM_BACKEND", "OUT")}
    return {**env, **extra}


def _stage_rows(summary: str) -> dict[str, list[str]]:
    """The Stages table of summary.md: stage -> its cells."""
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[0] in STAGES:
            rows[cells[0]] = cells
    return rows


def test_ssltm_kernels_imports_with_torch_triton_and_numpy_alone():
    """Every module of the package imports with the model's other dependencies blocked."""
    blocked = ["einops", "omegaconf", "yaml", "cv2", "PIL", "tqdm", "torchvision", "ssltm"]
    code = (
        f"import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
        "import importlib, pkgutil, ssltm_kernels\n"
        "names = [m.name for m in pkgutil.walk_packages(ssltm_kernels.__path__, 'ssltm_kernels.')]\n"
        "for name in names:\n    importlib.import_module(name)\n"
        f"leaked = [n for n in {blocked!r} if sys.modules.get(n) is not None]\n"
        "assert not leaked, leaked\nprint(len(names))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_env(PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) >= 8  # the ops, dispatch, env, compile_check...


def test_correctness_stages_select_every_op_in_every_dtype():
    """Stage b's selection (-m gpu_quick -k triton) holds each op's SSLTM shape in bf16/fp16/fp32 and an odd
    shape; stage f's (-k cuda) the same tests on the CUDA backend."""
    selected = {}
    for backend in ("triton", "cuda"):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "--collect-only",
                "-q",
                "-p",
                "no:cacheprovider",
                "-m",
                "gpu_quick",
                "-k",
                backend,
                *OP_TESTS,
            ],
            cwd=ROOT,
            env=_env(PYTHONPATH=str(ROOT)),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-3000:]
        selected[backend] = [line for line in proc.stdout.splitlines() if "::" in line]
    triton = selected["triton"]
    assert triton and all(line.endswith("-triton]") for line in triton)
    assert sorted(line.replace("-triton]", "-cuda]") for line in triton) == sorted(selected["cuda"])
    for path in OP_TESTS:
        ids = [line.split("[", 1)[1] for line in triton if line.startswith(path)]
        assert len(ids) >= 4, (path, ids)
        text = " ".join(ids)
        assert all(re.search(dtype, text) for dtype in (r"dtype0|bf16", r"dtype1|fp16", r"dtype2|fp32")), ids
    assert len(triton) <= 24  # the 90-second budget: one compile set per op, dtype and shape


def _summarise(tmp_path: Path, stages: list[tuple], records: list[dict], log: str = "") -> str:
    (tmp_path / "stages.tsv").write_text("".join("\t".join(map(str, s)) + "\n" for s in stages))
    (tmp_path / "log").write_text(log)
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "gpu_check_summary.py"),
            "--stages",
            str(tmp_path / "stages.tsv"),
            "--log",
            str(tmp_path / "log"),
            "--results",
            str(tmp_path / "results.jsonl"),
            "--env",
            str(tmp_path / "missing.txt"),
            "--commit",
            "abc123",
            "--seconds",
            "400",
            "--budget",
            "415",
            "--out",
            str(tmp_path / "summary.md"),
        ],
        cwd=ROOT,
        env=_env(PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert proc.stdout == summary
    return summary


def test_summary_statuses_tests_and_targets_from_gpu_records(tmp_path):
    """Exit statuses become PASS / FAIL / TIMEOUT / not run; failed tests are listed with their reason; the
    targets are judged by each benchmark's own rules on the GPU rows, target cases without rows are not run."""
    log = (
        "### step b pytest (limit 90 s)\n"
        "[gw0] [ 50%] PASSED tests/test_gcc_assign.py::test_gpu_backend_matches_fp32_reference[odd-dtype0-triton]\n"
        "[gw1] [100%] FAILED tests/test_dwconv3x3.py::test_gpu_backend_matches_fp32_reference[x-triton]\n"
        "FAILED tests/test_dwconv3x3.py::test_gpu_backend_matches_fp32_reference[x-triton] - AssertionError: dx\n"
        "### step c gcc_assign (limit 15 s)\n### step c stt_window_attn (limit 55 s)\n### step f build: not run\n"
    )
    stages = [
        ("b", "pytest", 1, 80, 90, ""),
        ("c", "gcc_assign", 0, 10, 15, ""),
        ("c", "stt_window_attn", 124, 55, 55, ""),
        ("f", "build", "-", 0, 0, "no extension built"),
    ]
    env = {
        "benchmark": "gcc_assign",
        "device": "cuda",
        "gpu": "NVIDIA H100 80GB HBM3",
        "case": "ssltm",
        "shape": {},
        "dtype": "bfloat16",
        "mode": "fwd+bwd",
    }
    memory = {
        "benchmark": "train_memory",
        "device": "cuda",
        "gpu": "NVIDIA H100 80GB HBM3",
        "backbone": "resnet101",
        "crop": 479,
        "batch": 2,
        "amp": "bf16",
        "measure": "torch.cuda.max_memory_allocated",
    }
    short_term = {
        "benchmark": "short_term",
        "device": "cuda",
        "gpu": "NVIDIA H100 80GB HBM3",
        "tiny": False,
        "backbone": "resnet101",
        "size": 479,
        "batch": 2,
        "dtype": "bf16",
    }
    step = {**short_term, "memory_measure": "torch.cuda.max_memory_allocated", "classes": 124, "steps": 2}
    step.pop("backbone")
    objectives = {**step, "benchmark": "objectives", "backbone": "resnet101", "status": "ok", "reason": None}
    baselines = {**step, "benchmark": "baselines", "status": "ok", "reason": None, "stream_size": [480, 854]}
    records = [
        {**objectives, "case": "temporal_loss_dis", "objectives": ["temporal_loss"], "flow": "dis", "frames": 2},
        {
            **objectives,
            "case": "temporal_loss_raft",
            "objectives": ["temporal_loss"],
            "flow": "raft",
            "status": "skipped",
        },
        {**objectives, "case": "mean_teacher", "objectives": ["mean_teacher"], "flow": None, "frames": 4},
        {**baselines, "config": "table2/ocrnet", "status": "skipped", "reason": "does not load: no config file"},
        {**baselines, "config": "table7/ssltm_mt", "backbone": "resnet101", "decoder": "upernet", "short_term": "stt"},
        {**baselines, "config": "swin_s/upernet", "backbone": "swin_s", "decoder": "upernet", "short_term": "none"},
        {**baselines, "trunk": "swin_s", "step_ms": 80.04, "peak_mib": 3000.2, "params": 48_838_000},
    ]
    records[0].update(step_ms=150.04, peak_mib=9000.4, ema_ms=None)
    records[1].update(reason="no --raft")
    records[2].update(step_ms=900.44, peak_mib=30000.6, ema_ms=4.321)
    records[4].update(objectives=["mean_teacher"], step_ms=901.0, peak_mib=30001.0, stream_fps=21.34)
    records[5].update(objectives=[], status="failed", reason="out of memory")
    records += [
        {**env, "provider": "eager", "ms": 1.0, "ms_p20": 1.0, "ms_p80": 1.0, "peak_mib": 10.0},
        {**env, "provider": "triton", "ms": 0.1, "ms_p20": 0.1, "ms_p80": 0.1, "correct": True},
        {**env, "provider": "cuda", "ms": 0.4, "ms_p20": 0.4, "ms_p80": 0.4, "correct": True},
        {**env, "benchmark": "ocr_region_pool", "case": "k19-60", "provider": "eager", "ms": 2.0},
        {**env, "benchmark": "ocr_region_pool", "case": "k19-60", "provider": "triton", "ms": 0.5},
        {"benchmark": "wmsa_decide", "section": "gate", "case": "stride16", "backend": "triton", "ok": False},
        {**memory, "checkpointing": False, "peak_mib": 30500.4, "step_s": 0.61, "error": None},
        {**memory, "checkpointing": True, "peak_mib": None, "step_s": None, "error": "out of memory"},
        {**short_term, "case": "netwarp_dis", "short_term": "netwarp", "flow": "dis", "frames": 2, "status": "ok"},
        {**short_term, "case": "netwarp_raft", "short_term": "netwarp", "flow": "raft", "frames": 2},
        {**short_term, "micro": "cffm_keys", "channels": 256, "keys": 289, "queries": 3969, "status": "ok"},
        {**short_term, "micro": "sparse_tt_gather", "channels": 1024, "keys": 527, "queries": 1800},
    ]
    records[-4].update(step_ms=212.34, peak_mib=20480.4, flow_ms_per_pair=31.26, steps=3)
    records[-3].update(status="skipped", reason="no --raft-weights file (RAFT weights are never downloaded)")
    records[-2].update(size=60, fwd_ms=0.456, fwd_bwd_ms=1.234, peak_mib=812.6, steps=3)
    records[-1].update(size=60, status="failed", reason="out of memory")
    summary = _summarise(tmp_path, stages, records, log)
    rows = _stage_rows(summary)
    assert list(rows) == list(STAGES)
    assert rows["b"][2] == "FAIL" and "1 failed, 1 passed" in rows["b"][4]
    assert rows["c"][2] == "TIMEOUT" and "stt_window_attn: TIMEOUT (55 s)" in rows["c"][4]
    assert rows["f"][2] == "not run" and rows["d"][2] == "not run (no step recorded)"
    assert "test_dwconv3x3.py::test_gpu_backend_matches_fp32_reference[x-triton] AssertionError: dx" in summary
    assert "| gcc_assign | ssltm | fwd+bwd >= 5x eager | triton | 10.00x | PASS |" in summary
    assert "| gcc_assign | ssltm | fwd+bwd >= 5x eager | cuda | 2.50x | FAIL |" in summary
    assert "| stt_window_attn | large | all targets | - | - | not run (stage c: TIMEOUT (55 s)) |" in summary
    assert "| ssltm_model | train | all targets | - | - | not run (no GPU rows) |" in summary
    assert "| ocr_region_pool | k124-120 | all targets | - | - | not run (not in this run's cases) |" in summary
    assert "| ocr_region_pool | k19-60 | fwd+bwd >= 2x eager | triton | 4.00x | PASS |" in summary
    assert "- gate stride16 triton: FAIL" in summary
    assert "- gcc_assign ssltm fwd+bwd ms: eager 1 10 MiB, triton 0.1, cuda 0.4" in summary
    setting = "- resnet101 479x479, batch 2, checkpointing {}, amp bf16 on NVIDIA H100 80GB HBM3: "
    assert setting.format("off") + "30500 MiB peak (torch.cuda.max_memory_allocated), 0.61 s a step" in summary
    assert setting.format("on") + "FAILED out of memory" in summary
    module = "- netwarp_{} (netwarp, 2 frames, flow {}): resnet101 479x479, B=2, bf16 on NVIDIA H100 80GB HBM3: "
    assert "## Short-term modules (training step, token assembly)" in summary
    assert module.format("dis", "dis") + "212.3 ms fwd+bwd (median of 3), 20480 MiB peak, flow 31.3 ms/pair" in summary
    assert module.format("raft", "raft") + "SKIPPED no --raft-weights file" in summary
    micro = "- {} (key/value gathering alone, {} keys, {} queries): 60x60 map, {} channels, B=2, bf16 on NVIDIA H100"
    assert (
        micro.format("cffm_keys", 289, 3969, 256)
        + " 80GB HBM3: 0.46 ms fwd, 1.23 ms fwd+bwd (median of 3), 813 MiB peak"
        in summary
    )
    assert micro.format("sparse_tt_gather", 527, 1800, 1024) + " 80GB HBM3: FAILED out of memory" in summary
    h100 = "B=2, bf16 on NVIDIA H100 80GB HBM3"
    assert "## Training objectives (training step, EMA update)" in summary
    assert (
        f"- temporal_loss_dis (temporal_loss, flow dis): resnet101 479x479, {h100}: 150.0 ms fwd+bwd (median of 2), "
        "9000 MiB peak\n" in summary
    )
    assert f"- temporal_loss_raft (temporal_loss, flow raft): resnet101 479x479, {h100}: SKIPPED no --raft\n" in summary
    assert (
        f"- mean_teacher (mean_teacher): resnet101 479x479, {h100}: 900.4 ms fwd+bwd (median of 2), 30001 MiB peak, "
        "EMA update 4.32 ms\n" in summary
    )
    assert "## Compared configs (training step, streaming) and trunks" in summary
    assert "- table2/ocrnet: SKIPPED does not load: no config file\n" in summary
    assert (
        f"- table7/ssltm_mt (resnet101 upernet stt + mean_teacher): 479x479, {h100}: 901.0 ms fwd+bwd (median of 2), "
        "30001 MiB peak, 21.3 frames/s streaming 480x854\n" in summary
    )
    assert f"- swin_s/upernet (swin_s upernet none): 479x479, {h100}: FAILED out of memory\n" in summary
    assert (
        "- trunk swin_s alone: 479x479, B=2, bf16 on NVIDIA H100 80GB HBM3: 80.0 ms fwd+bwd (median of 2), 3000 MiB "
        "peak, 48,838,000 parameters\n" in summary
    )


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--bogus"], {}, "unknown argument '--bogus'"),
        (["--rehearse"], {"GPU_CHECK_FAIL_STAGE": "z"}, "GPU_CHECK_FAIL_STAGE must be one of: install a b c d e f"),
        ([], {"GPU_CHECK_TIMEOUT_SCALE": "0"}, "must be positive integers"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(tmp_path, args, env, message):
    proc = subprocess.run(
        ["bash", str(SCRIPT), *args], env=_env(OUT=str(tmp_path), **env), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and message in proc.stderr
    assert not any(tmp_path.iterdir())


def test_rehearsal_records_an_injected_failure_and_runs_every_later_stage(tmp_path):
    """The CPU rehearsal end to end, with stage b failing: the later stages still run, summary.md lists every
    stage, the results are three files, and omegaconf came from the wheelhouse into the fresh environment."""
    if not list((ROOT / ".whl").glob("omegaconf-*.whl")):
        subprocess.run(
            [shutil.which("make") or "make", "gpu-wheels", f"PYTHON={sys.executable}"],
            cwd=ROOT,
            check=True,
            timeout=300,
        )
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--rehearse"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(OUT=str(out), PYTHON=sys.executable, GPU_CHECK_FAIL_STAGE="b", TMPDIR=str(tmp_path)),
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.jsonl", "gpu_check.log", "summary.md"]
    summary = (out / "summary.md").read_text()
    assert proc.stdout.endswith(summary) and len(summary) < 11000
    rows = _stage_rows(summary)
    assert list(rows) == list(STAGES)
    statuses = {stage: cells[2] for stage, cells in rows.items()}
    assert statuses == {
        "install": "PASS",
        "a": "PASS",
        "b": "FAIL",
        "c": "PASS",
        "d": "PASS",
        "e": "PASS",
        "f": "not run",
    }, summary
    assert "FAIL (injected)" in rows["b"][4] and "not run (no GPU)" in rows["f"][4]
    for benchmark in ("stt_window_attn", "mixffn_dwconv", "ocr_region_pool", "gcc_assign", "ssltm_model"):
        assert f"| {benchmark} |" in summary and "not run" in summary
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("gpu_check.")]  # the work folder is removed

    log = (out / "gpu_check.log").read_text()
    omegaconf = re.search(r"^omegaconf \S+ (\S+)$", log, re.M)
    assert omegaconf and "/venv/" in omegaconf.group(1) and "preinstalled" not in omegaconf.group(1), log[-3000:]
    assert "Processing ./.whl/omegaconf-" in log

    records = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    benchmarks = {r["benchmark"] for r in records}
    assert benchmarks == {
        "stt_window_attn",
        "mixffn_dwconv",
        "ocr_region_pool",
        "gcc_assign",
        "wmsa_decide",
        "ssltm_model",
        "train_memory",
        "short_term",
        "objectives",
        "baselines",
    }
    memory = [r for r in records if r["benchmark"] == "train_memory"]
    assert [(r["checkpointing"], r["device"], r["error"]) for r in memory] == [
        (False, "cpu", None),
        (True, "cpu", None),
    ]
    assert all(r["peak_mib"] > 0 for r in memory) and "## Training-step memory" in summary
    modules = {r["case"]: r for r in records if r["benchmark"] == "short_term"}
    assert list(modules) == ["baseline", "netwarp_dis", "netwarp_raft"]
    assert all(r["device"] == "cpu" and r["tiny"] is True and r["peak_mib"] is None for r in modules.values())
    assert modules["baseline"]["step_ms"] > 0 and modules["netwarp_dis"]["flow_ms_per_pair"] > 0
    assert (
        modules["netwarp_raft"]["status"] == "skipped"
        and "## Short-term modules (training step, token assembly)" in summary
    )
    objectives = {r["case"]: r for r in records if r["benchmark"] == "objectives"}
    assert list(objectives) == ["baseline", "temporal_loss_raft", "mean_teacher"]
    assert all(r["device"] == "cpu" and r["tiny"] is True for r in objectives.values())
    assert objectives["baseline"]["step_ms"] > 0 and objectives["mean_teacher"]["ema_ms"] > 0
    assert objectives["temporal_loss_raft"]["status"] == "skipped"
    configs = {r["config"]: r for r in records if r["benchmark"] == "baselines"}
    assert list(configs) == ["table5/upernet", "table7/ssltm_mt"]
    assert all(r["status"] == "ok" and r["step_ms"] > 0 and r["stream_fps"] > 0 for r in configs.values()), configs
    assert "## Training objectives (training step, EMA update)" in summary
    assert "## Compared configs (training step, streaming) and trunks" in summary
    triton = [r for r in records if r.get("provider") == "triton"]
    assert triton and all(r["ms"] > 0 and r["correct"] is True for r in triton)  # ran in the interpreter
    assert any(r.get("section") == "gate" and r["backend"] == "triton" and r["ok"] is True for r in records)
