"""Every Triton kernel configuration the dispatch launches compiles, within the shared memory a block
may take, for sm_90 (H100/H200), sm_80 (A100) and sm_86 (RTX 30xx), without a GPU."""

import os
import subprocess
import sys

import pytest

from ssltm_kernels.compile_check import window_attention_configs


@pytest.mark.parametrize("arch", [90, 80, 86])
def test_every_triton_kernel_compiles_for(arch):
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-m", "ssltm_kernels.compile_check", "--arch", str(arch)], env=env,
                            capture_output=True, text=True, timeout=1800)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    compiled = [line for line in result.stdout.splitlines() if line.startswith(f"ok   sm_{arch} ")]
    assert len(compiled) == 3 * len(list(window_attention_configs(arch))), report  # 3 kernels each
    assert result.stdout.rstrip().endswith("0 failed"), report
