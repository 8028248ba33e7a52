"""Every shipped Triton kernel configuration compiles for sm_90 (H100/H200) without a GPU."""

import os
import subprocess
import sys

from ssltm_kernels.compile_check import LARGEST_WINDOW_CONFIGS, WINDOW_ATTENTION_CONFIGS


def test_every_triton_kernel_compiles_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-m", "ssltm_kernels.compile_check", "--arch", "90"], env=env,
                            capture_output=True, text=True, timeout=1800)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    compiled = [line for line in result.stdout.splitlines() if line.startswith("ok   sm_90")]
    # 3 kernels x (3 dtypes x tuned configurations + the largest windows the dispatch accepts)
    assert len(compiled) == 3 * (3 * len(WINDOW_ATTENTION_CONFIGS) + len(LARGEST_WINDOW_CONFIGS)), report
    assert result.stdout.rstrip().endswith("0 failed"), report


def test_env_report_runs():
    result = subprocess.run([sys.executable, "-m", "ssltm_kernels.env"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "torch" in result.stdout and "cuda extension" in result.stdout
