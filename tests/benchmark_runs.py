"""Running a benchmark script as its users do (``python benchmarks/<name>.py --cpu ...``), in a subprocess on this
checkout's packages (also where another checkout is installed), with its JSON lines written to a temporary folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cpu_benchmark(
    name: str, *args: str, results_dir: Path, interpret: bool = False, timeout: int = 240, unset: tuple[str, ...] = ()
) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """``benchmarks/<name>.py --cpu *args --results-dir results_dir`` (``interpret``: the Triton kernels in the
    interpreter; ``unset``: environment variables it must not see); asserts it succeeds and returns it with the
    records it wrote."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", *unset)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--cpu", *args, "--results-dir", str(results_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, [json.loads(line) for line in (results_dir / f"{name}.jsonl").read_text().splitlines()]
