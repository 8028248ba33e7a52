"""``python -m ssltm_kernels.env`` tells the truth about the compiled extension and Triton's mode."""

import os
import subprocess
import sys
import types

import pytest

from ssltm_kernels import _ext
from ssltm_kernels.env import env_report


def _line(report: str, key: str) -> str:
    return next(line for line in report.splitlines() if line.startswith(key))


def test_report_states_this_build_of_the_extension():
    line = _line(env_report(), "cuda extension")
    if not _ext.HAS_CUDA_EXT:
        assert "not available" in line and _ext.CUDA_EXT_IMPORT_ERROR in line
    elif _ext._C.WITH_CUDA:
        assert "built with CUDA kernels" in line
    else:
        assert "built without CUDA kernels" in line


@pytest.mark.parametrize(
    ("extension", "expected"),
    [
        (None, "not available: no module named _C"),
        (types.SimpleNamespace(WITH_CUDA=False), "built without CUDA kernels (CPU emulation only)"),
        (types.SimpleNamespace(WITH_CUDA=True), "built with CUDA kernels"),
        (
            types.SimpleNamespace(WITH_CUDA=True, CUDA_ARCHS=("sm_80", "sm_90")),
            "built with CUDA kernels for sm_80, sm_90",
        ),
    ],
)
def test_report_follows_the_extension(monkeypatch, extension, expected):
    monkeypatch.setattr(_ext, "HAS_CUDA_EXT", extension is not None)
    monkeypatch.setattr(_ext, "CUDA_EXT_IMPORT_ERROR", None if extension else "no module named _C")
    monkeypatch.setattr(_ext, "_C", extension)
    assert _line(env_report(), "cuda extension").split(None, 2)[2] == expected


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_command_reports_triton_mode(interpret):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET=interpret)
    result = subprocess.run(
        [sys.executable, "-m", "ssltm_kernels.env"], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    line = _line(result.stdout, "triton")
    assert ("CPU interpreter" in line) == (interpret == "1"), result.stdout
    assert ("compiled kernels" in line) == (interpret == "0"), result.stdout
    assert _line(result.stdout, "cuda extension") == _line(env_report(), "cuda extension")


def test_report_gives_each_gpu_its_arch_memory_sms_and_l2(monkeypatch):
    props = types.SimpleNamespace(
        name="NVIDIA H100 80GB HBM3",
        major=9,
        minor=0,
        total_memory=80 * 2**30,
        multi_processor_count=132,
        L2_cache_size=50 * 2**20,
    )
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    monkeypatch.setattr("torch.cuda.get_device_properties", lambda index: props)
    assert _line(env_report(), "gpu 0").split(None, 2)[2] == "NVIDIA H100 80GB HBM3 (sm_90, 80 GiB, 132 SMs, L2 50 MiB)"
