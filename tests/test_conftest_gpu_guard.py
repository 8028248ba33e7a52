"""The test setup itself: on a machine with a GPU, a ``gpu``-marked test that would run the Triton
kernels in the interpreter fails (errors in setup) instead of passing."""

import subprocess
import sys
import textwrap
from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py")


def test_gpu_marked_test_fails_under_the_interpreter(tmp_path):
    # the suite's own conftest, on a machine that reports a GPU but was told to interpret Triton
    (tmp_path / "conftest.py").write_text(
        "import torch\ntorch.cuda.is_available = lambda: True\n" + CONFTEST.read_text()
    )
    (tmp_path / "test_inner.py").write_text(
        textwrap.dedent("""
        import pytest

        @pytest.mark.gpu
        def test_on_gpu():
            pass

        def test_on_cpu():
            pass
    """)
    )
    env = {"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 1, report  # the run fails ...
    assert "1 passed, 1 error" in result.stdout, report  # ... on the GPU test, which never runs
    assert "ERROR test_inner.py::test_on_gpu" in result.stdout and "TRITON_INTERPRET=1" in result.stdout, report
