"""Shared benchmark harness for the ``ssltm_kernels`` ops.

What every op benchmark needs, in one place:

* timing: ``triton.testing.do_bench`` (median with p20/p80, L2 flushed between runs) on a GPU, a
  ``time.perf_counter`` median of repeats on the CPU;
* the three modes ``fwd``, ``bwd`` and ``fwd+bwd``: ``bwd`` replays the backward of one retained
  graph with a fixed upstream gradient, and the leaf gradients are reset to ``None`` before every run
  so that no run accumulates into the previous one;
* peak memory: ``torch.cuda.max_memory_allocated`` above what was allocated before the run (the
  inputs and the upstream gradient), per provider and mode;
* a table of the peak numbers of the GPUs we run on, matched by ``torch.cuda.get_device_name``;
* the roofline bound ``max(bytes / bandwidth, flops / peak, exps / exp rate)`` and the fraction of it
  achieved;
* a plain-text table on stdout and JSON lines appended to ``benchmarks/results/<name>.jsonl`` with
  the provenance (GPU, torch / triton / CUDA versions, git commit, UTC date).

A provider that fails, is unavailable or exceeds its time box becomes a row with the reason; it never
stops the run.

Usage sketch (see ``stt_window_attn.py``)::

    bench = Harness("my_op", quick=args.quick)
    case = Case("s16", {"B": 2, ...}, torch.bfloat16, work={"fwd": Work(...), ...})
    bench.run_case(case, {"eager": fn_or_exception, ...}, leaves=[x, w], reference="eager")
    bench.finish()
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
QUANTILES = (0.5, 0.2, 0.8)  # median first: what we report as "ms", then the p20 / p80 spread
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 2.0**20

# Flash-attention convention: the backward of attention does 5 matmuls of the forward's size
# (recompute S = QK^T, dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q) against the forward's 2.
ATTENTION_BWD_FLOP_RATIO = 2.5


# --------------------------------------------------------------------------------------------------
# Device peak numbers
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceSpec:
    """Peak throughputs of one GPU model (dense, no sparsity), all in base units per second.

    ``exp_per_s``: throughput of the special-function unit (MUFU ``ex2``, one per softmax ``exp``):
    16 results per clock per SM on compute capability 9.0 (CUDA C++ Programming Guide, "Arithmetic
    Instructions" throughput table, row "base-2 exponential"), times the SM count and clock below.
    """

    name: str
    bf16_flops: float  # dense tensor-core bf16 FLOP/s
    fp16_flops: float  # dense tensor-core fp16 FLOP/s
    fp32_flops: float  # non-tensor fp32 FLOP/s (FMA = 2 FLOPs)
    hbm_bytes_per_s: float
    exp_per_s: float
    sm_count: int
    clock_mhz: int  # the boost clock the tensor-core peak is quoted at (peak / (SMs * 4096 FLOP/clk))
    source: str

    def peak_flops(self, dtype: torch.dtype) -> float:
        if dtype == torch.bfloat16:
            return self.bf16_flops
        if dtype == torch.float16:
            return self.fp16_flops
        return self.fp32_flops


MUFU_EXP_PER_CLK_PER_SM = 16  # sm_90, CUDA C++ Programming Guide throughput table


def _mufu_rate(sm_count: int, clock_mhz: int) -> float:
    return float(sm_count * MUFU_EXP_PER_CLK_PER_SM * clock_mhz * 1e6)


# Sources: "NVIDIA H100 Tensor Core GPU" datasheet (H100 SXM / PCIe / NVL columns) and "NVIDIA H200
# Tensor Core GPU" datasheet (H200 SXM / NVL). The datasheets quote tensor-core FLOP/s "with
# sparsity"; the dense numbers below are half of them. SM counts: "NVIDIA H100 Tensor Core GPU
# Architecture" whitepaper (132 SMs on SXM5 and NVL/H200 boards, 114 on PCIe). Clocks are the ones the
# dense tensor peak implies at 4096 dense bf16 FLOP/clk/SM (4 tensor cores x 512 FMA). The resulting
# MUFU rate for H100 SXM, 132 * 16 * 1.83 GHz = 3.9e12/s, matches the "3.9 TFLOPS of special
# functions" quoted in the FlashAttention-3 paper (Shah et al., 2024, section 3.1).
DEVICE_SPECS: dict[str, DeviceSpec] = {
    "H100 SXM": DeviceSpec(
        "H100 SXM", bf16_flops=989.4e12, fp16_flops=989.4e12, fp32_flops=67e12, hbm_bytes_per_s=3.35e12,
        exp_per_s=_mufu_rate(132, 1830), sm_count=132, clock_mhz=1830,
        source="NVIDIA H100 datasheet (SXM): 1979 TFLOPS bf16 sparse, 67 TFLOPS fp32, 3.35 TB/s HBM3",
    ),
    "H100 PCIe": DeviceSpec(
        "H100 PCIe", bf16_flops=756.5e12, fp16_flops=756.5e12, fp32_flops=51e12, hbm_bytes_per_s=2.0e12,
        exp_per_s=_mufu_rate(114, 1620), sm_count=114, clock_mhz=1620,
        source="NVIDIA H100 datasheet (PCIe): 1513 TFLOPS bf16 sparse, 51 TFLOPS fp32, 2 TB/s HBM2e",
    ),
    "H100 NVL": DeviceSpec(
        "H100 NVL", bf16_flops=835.5e12, fp16_flops=835.5e12, fp32_flops=60e12, hbm_bytes_per_s=3.9e12,
        exp_per_s=_mufu_rate(132, 1545), sm_count=132, clock_mhz=1545,
        source="NVIDIA H100 datasheet (NVL): 1671 TFLOPS bf16 sparse, 60 TFLOPS fp32, 3.9 TB/s HBM3",
    ),
    "H200 SXM": DeviceSpec(
        "H200 SXM", bf16_flops=989.5e12, fp16_flops=989.5e12, fp32_flops=67e12, hbm_bytes_per_s=4.8e12,
        exp_per_s=_mufu_rate(132, 1830), sm_count=132, clock_mhz=1830,
        source="NVIDIA H200 datasheet (SXM): 1979 TFLOPS bf16 sparse, 67 TFLOPS fp32, 4.8 TB/s HBM3e",
    ),
    "H200 NVL": DeviceSpec(
        "H200 NVL", bf16_flops=835.5e12, fp16_flops=835.5e12, fp32_flops=60e12, hbm_bytes_per_s=4.8e12,
        exp_per_s=_mufu_rate(132, 1545), sm_count=132, clock_mhz=1545,
        source="NVIDIA H200 datasheet (NVL): 1671 TFLOPS bf16 sparse, 60 TFLOPS fp32, 4.8 TB/s HBM3e",
    ),
}


def match_device_spec(device_name: str) -> DeviceSpec | None:
    """The peak numbers for a ``torch.cuda.get_device_name`` string, or None for an unknown GPU.

    Names seen in practice: "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA H100 NVL",
    "NVIDIA H200", "NVIDIA H200 NVL".
    """
    name = device_name.upper()
    for gpu in ("H200", "H100"):
        if gpu not in name:
            continue
        if "NVL" in name:
            return DEVICE_SPECS[f"{gpu} NVL"]
        if "PCIE" in name:
            return DEVICE_SPECS[f"{gpu} PCIe"] if gpu == "H100" else None
        return DEVICE_SPECS[f"{gpu} SXM"]
    return None


# --------------------------------------------------------------------------------------------------
# Work counts and the roofline
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Work:
    """What one call must do at least: FLOPs (an FMA is 2), DRAM bytes, and transcendental ``exp``s."""

    flops: float = 0.0
    bytes: float = 0.0
    exps: float = 0.0

    def __add__(self, other: Work) -> Work:
        return Work(self.flops + other.flops, self.bytes + other.bytes, self.exps + other.exps)


def attention_flops(batch_heads: int, n_q: int, n_k: int, head_dim: int, mode: str = "fwd") -> float:
    """FLOPs of softmax attention: forward = 2 matmuls (QK^T and PV) of 2*n_q*n_k*head_dim each,
    i.e. ``4 * batch_heads * n_q * n_k * head_dim``; backward = 2.5x forward; fwd+bwd = 3.5x."""
    fwd = 4.0 * batch_heads * n_q * n_k * head_dim
    return fwd * {"fwd": 1.0, "bwd": ATTENTION_BWD_FLOP_RATIO, "fwd+bwd": 1.0 + ATTENTION_BWD_FLOP_RATIO}[mode]


def attention_exps(batch_heads: int, n_q: int, n_k: int, mode: str = "fwd") -> float:
    """``exp`` evaluations: one per score in the forward; a recomputing (flash-style) backward
    evaluates them once more."""
    return float(batch_heads * n_q * n_k) * {"fwd": 1, "bwd": 1, "fwd+bwd": 2}[mode]


@dataclass(frozen=True)
class Roofline:
    ms: float  # the bound: the slowest of the three resources at peak
    limiter: str  # "memory", "compute" or "exp"
    memory_ms: float
    compute_ms: float
    exp_ms: float


def roofline(work: Work, spec: DeviceSpec | None, dtype: torch.dtype) -> Roofline | None:
    """``max(bytes / bandwidth, flops / peak(dtype), exps / exp rate)`` in ms; None without a spec."""
    if spec is None:
        return None
    times = {
        "memory": work.bytes / spec.hbm_bytes_per_s * 1e3,
        "compute": work.flops / spec.peak_flops(dtype) * 1e3,
        "exp": work.exps / spec.exp_per_s * 1e3,
    }
    limiter = max(times, key=times.get)
    return Roofline(times[limiter], limiter, times["memory"], times["compute"], times["exp"])


def throughput(work: Work, ms: float) -> tuple[float, float]:
    """(TFLOP/s, GB/s) achieved when ``work`` takes ``ms`` milliseconds."""
    seconds = ms * 1e-3
    return work.flops / seconds / 1e12, work.bytes / seconds / 1e9


# --------------------------------------------------------------------------------------------------
# Environment and provenance
# --------------------------------------------------------------------------------------------------
def git_commit(root: Path = REPO_ROOT) -> str:
    """Short sha of HEAD, with "+dirty" when tracked or untracked files (outside the results folder)
    differ from it; "unknown" outside a repository or before the first commit."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True,
                              timeout=20).stdout.strip()

    try:
        sha = git("rev-parse", "--short", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    try:
        dirty = bool(git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results"))
    except (OSError, subprocess.SubprocessError):
        dirty = False
    return sha + ("+dirty" if dirty else "")


def environment(device: torch.device) -> dict:
    """Provenance recorded with every JSON line."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": device.type,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["sm_count"] = torch.cuda.get_device_properties(device).multi_processor_count
        spec = match_device_spec(env["gpu"])
        env["device_spec"] = spec.name if spec else None
    else:
        env["gpu"] = None
        env["cpu"] = platform.processor() or platform.machine()
        env["cpu_threads"] = torch.get_num_threads()
    return env


# --------------------------------------------------------------------------------------------------
# Timing, modes and memory
# --------------------------------------------------------------------------------------------------
class TimeBoxExceeded(BaseException):
    """Raised inside a time-boxed call. A BaseException so that library code that catches
    ``Exception`` (compilers falling back, autotuners skipping a config) cannot swallow it."""


@contextlib.contextmanager
def time_box(seconds: float | None):
    """Interrupt the body after ``seconds`` (SIGALRM; main thread on POSIX only, else no limit)."""
    usable = (seconds is not None and seconds > 0 and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise TimeBoxExceeded(f"exceeded its time box of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_grads(leaves: Sequence[torch.Tensor]) -> None:
    for x in leaves:
        x.grad = None


def cpu_bench(fn: Callable[[], object], *, warmup_ms: float, rep_ms: float, grad_to_none=(),
              min_reps: int = 3, max_reps: int = 100, quantiles: Sequence[float] = QUANTILES) -> list[float]:
    """Wall-clock quantiles (ms) of ``fn`` over repeats filling about ``rep_ms``; CPU fallback."""
    def once() -> float:
        _reset_grads(grad_to_none)
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    estimate = once()  # also the first sample: slow providers (interpreters) are run as few times as possible
    for _ in range(int(warmup_ms / max(estimate, 1e-3))):
        once()
    reps = min(max_reps, max(min_reps, int(rep_ms / max(estimate, 1e-3))))
    times = sorted([estimate, *(once() for _ in range(reps - 1))])
    return [_quantile(times, q) for q in quantiles]


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of already sorted values."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def fixed_grad(shape: Sequence[int], dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.Tensor:
    """The upstream gradient used by every provider of a case: same values for the same shape."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(tuple(shape), generator=gen, device=device, dtype=dtype)



def _output_spec(out: torch.Tensor) -> tuple:
    return tuple(out.shape), out.dtype, out.device


@dataclass
class ModeRun:
    """A callable to time for one mode; ``state`` keeps the retained graph alive for ``bwd``."""

    fn: Callable[[], object]
    state: list = field(default_factory=list)


def mode_runner(forward: Callable[[], torch.Tensor], mode: str, grad_out: torch.Tensor) -> ModeRun:
    """``fwd``: call the forward (autograd on, as in training). ``bwd``: run the forward once and
    replay the backward of that retained graph with ``grad_out``. ``fwd+bwd``: both, fresh graph."""
    if mode == "fwd":
        return ModeRun(forward)
    if mode == "bwd":
        out = forward()
        return ModeRun(lambda: out.backward(grad_out, retain_graph=True), [out])
    if mode == "fwd+bwd":
        return ModeRun(lambda: forward().backward(grad_out))
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


# --------------------------------------------------------------------------------------------------
# Rows, the table and the JSON lines
# --------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One problem: a shape (free-form dict, recorded as is), a dtype and the work of each mode."""

    name: str
    shape: dict
    dtype: torch.dtype
    work: dict[str, Work]
    title: str = ""


@dataclass
class Row:
    case: str
    provider: str
    mode: str
    shape: dict
    dtype: str
    ms: float | None = None
    ms_p20: float | None = None
    ms_p80: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    roofline_ms: float | None = None
    roofline_pct: float | None = None
    limiter: str | None = None
    peak_mib: float | None = None
    max_abs_err: float | None = None
    match: bool | None = None
    error: str | None = None
    note: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.ms is not None


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def text_table(header: Sequence[str], body: Sequence[Sequence[str]], left: int = 2, free_last: bool = False) -> str:
    """Aligned plain-text table: the first ``left`` columns left-aligned, the others right-aligned;
    with ``free_last`` the last column is not padded (free text)."""
    fixed = len(header) - 1 if free_last else len(header)
    widths = [max(len(str(line[i])) for line in (header, *body)) for i in range(fixed)]
    out = []
    for line in (header, *body):
        cells = [str(c).ljust(w) if i < left else str(c).rjust(w)
                 for i, (c, w) in enumerate(zip(line[:fixed], widths, strict=True))]
        if free_last:
            cells.append(str(line[-1]))
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def format_rows(rows: Sequence[Row]) -> str:
    """Plain-text table of one case's rows."""
    header = ("provider", "mode", "ms", "p20-p80", "TFLOP/s", "GB/s", "%roof", "bound", "peak MiB",
              "max|err|", "note")
    body = []
    for r in rows:
        if r.ok:
            err = _fmt(r.max_abs_err, ".1e") + (" MISMATCH" if r.match is False else "")
            body.append((r.provider, r.mode, f"{r.ms:.3f}", f"{r.ms_p20:.3f}-{r.ms_p80:.3f}",
                         _fmt(r.tflops, ".3g"), _fmt(r.gbps, ".3g"), _fmt(r.roofline_pct, ".1f"),
                         r.limiter or "-", _fmt(r.peak_mib, ".1f"), err, r.note or ""))
        else:
            error = r.error or "no time"
            shown = error if error.startswith(UNAVAILABLE) else f"FAILED: {error}"
            body.append((r.provider, r.mode, *("-",) * 8, shown))
    return text_table(header, body, free_last=True)


def format_speedups(rows: Sequence[Row], ours: Sequence[str], peers: Sequence[str]) -> str:
    """``peer ms / our ms`` for every case and mode in ``rows`` (> 1: ours is faster)."""
    by_key = {(r.case, r.mode, r.provider): r for r in rows if r.ok}
    cases = list(dict.fromkeys(r.case for r in rows))
    modes = [m for m in MODES if any(r.mode == m for r in rows)]
    blocks = []
    for name in ours:
        others = [p for p in peers if p != name]
        body = []
        for case in cases:
            for mode in modes:
                mine = by_key.get((case, mode, name))
                if mine is None:
                    continue
                peer_rows = [by_key.get((case, mode, p)) for p in others]
                body.append((case, mode, f"{mine.ms:.3f}",
                             *("-" if r is None else f"{r.ms / mine.ms:.2f}x" for r in peer_rows)))
        if body:
            header = ("case", "mode", f"{name} ms", *(f"vs {p}" for p in others))
            blocks.append(f"speedup of {name} (peer ms / {name} ms; > 1 means {name} is faster)\n"
                          + text_table(header, body))
    return "\n\n".join(blocks)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def append_jsonl(path: Path, rows: Iterable[Row], env: dict, benchmark: str, extra: dict | None = None) -> int:
    """Append one JSON object per row (row fields + provenance); returns the number written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("a", encoding="utf-8") as f:
        for row in rows:
            record = {"benchmark": benchmark, **env, **asdict(row), **(extra or {})}
            f.write(json.dumps(_json_safe(record), sort_keys=False) + "\n")
            n += 1
    return n


UNAVAILABLE = "unavailable: "


def _short_error(error: BaseException) -> str:
    """One line: "unavailable: <reason>" for a provider that cannot run here (``Unavailable`` or a
    library's ``...UnavailableError``), else "<ExceptionType>: <message>"."""
    if "Unavailable" in type(error).__name__:
        text = UNAVAILABLE + str(error).strip()
    else:
        text = f"{type(error).__name__}: {error}".strip()
    first = text.splitlines()[0] if text else type(error).__name__
    return first if len(first) <= 240 else first[:237] + "..."


# --------------------------------------------------------------------------------------------------
# The harness
# --------------------------------------------------------------------------------------------------
class Unavailable(Exception):
    """A provider that cannot run here; the message is the reason shown in its row."""


@dataclass
class Impl:
    """One provider of a case: a no-argument forward returning a tensor that depends on the case's
    leaves. ``modes`` it supports (the others get a row with ``reason``), and a note for its rows."""

    fn: Callable[[], torch.Tensor]
    modes: tuple[str, ...] = MODES
    reason: str = "mode not supported by this provider"
    note: str | None = None

    def __call__(self) -> torch.Tensor:
        return self.fn()


Provider = Impl | Callable[[], torch.Tensor]


class Harness:
    """Runs cases, collects :class:`Row` s, prints them and appends them to the results file.

    Args:
        name: benchmark name; results go to ``results_dir / f"{name}.jsonl"``.
        device: where the inputs live; CUDA uses ``do_bench`` and memory stats, CPU the fallback.
        quick: shorter warm-up and repetition budgets.
        save: append JSON lines (``--no-save`` turns it off).
        note: recorded as ``run_note`` in every JSON line and printed once (e.g. why this is a CPU run).
        first_call_timeout_s: time box for each provider's first call (the one that compiles), and
            for the first call of each mode; None for no limit.
    """

    def __init__(self, name: str, *, device: torch.device | str | None = None, quick: bool = False,
                 save: bool = True, results_dir: Path = RESULTS_DIR, note: str | None = None,
                 first_call_timeout_s: float | None = None, warmup_ms: float | None = None,
                 rep_ms: float | None = None, verbose: bool = True) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.name = name
        self.device = torch.device(device)
        self.quick = quick
        self.save = save
        self.path = results_dir / f"{name}.jsonl"
        self.note = note
        self.first_call_timeout_s = first_call_timeout_s
        on_gpu = self.device.type == "cuda"
        budgets = {(True, True): (10, 40), (True, False): (25, 100), (False, True): (0, 150), (False, False): (50, 500)}
        default_warmup, default_rep = budgets[(on_gpu, quick)]  # ms of warm-up, ms of timed runs
        self.warmup_ms = default_warmup if warmup_ms is None else warmup_ms
        self.rep_ms = default_rep if rep_ms is None else rep_ms
        self.verbose = verbose
        self.env = environment(self.device)
        if note:
            self.env["run_note"] = note
        self.spec = match_device_spec(self.env["gpu"]) if on_gpu else None
        self.rows: list[Row] = []
        self._out_like: tuple | None = None  # (shape, dtype, device) of the current case's output

    # -- reporting --------------------------------------------------------------------------------
    def print(self, text: str = "") -> None:
        if self.verbose:
            print(text, flush=True)

    def header(self) -> str:
        e = self.env
        if self.device.type == "cuda":
            peaks = self.spec.source if self.spec else "unknown GPU: no roofline"
            where = f"GPU {e['gpu']} ({e['sm_count']} SMs; peaks from {peaks})"
        else:
            where = f"CPU ({e['cpu']}, {e['cpu_threads']} threads)"
        lines = [f"{self.name}: {where}",
                 f"torch {e['torch']}  triton {e['triton']}  CUDA {e['cuda']}  commit {e['commit']}  {e['date']}"]
        if self.note:
            lines.append(f"note: {self.note}")
        return "\n".join(lines)

    # -- timing -----------------------------------------------------------------------------------
    def time(self, fn: Callable[[], object], leaves: Sequence[torch.Tensor]) -> list[float]:
        """[median, p20, p80] in ms."""
        if self.device.type == "cuda":
            import triton.testing

            return list(triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms,
                                                grad_to_none=list(leaves), quantiles=list(QUANTILES)))
        return cpu_bench(fn, warmup_ms=self.warmup_ms, rep_ms=self.rep_ms, grad_to_none=leaves,
                         max_reps=10 if self.quick else 50)

    def peak_mib(self, run: Callable[[], object], base_bytes: int) -> float | None:
        """Peak allocation during ``run`` above ``base_bytes`` (allocated before the mode was set up)."""
        if self.device.type != "cuda":
            return None
        synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        run()
        synchronize(self.device)
        return (torch.cuda.max_memory_allocated(self.device) - base_bytes) / MIB

    def _release(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- one case ---------------------------------------------------------------------------------
    def check(self, case: Case, providers: dict[str, Provider | BaseException], reference: str,
              tolerance: Callable[[str, torch.Tensor, torch.Tensor], tuple[float, bool]] | None = None,
              ) -> dict[str, tuple[float | None, bool | None, BaseException | None]]:
        """Run every provider's forward once (this is also its warm-up / compilation) and compare it
        with ``reference``'s output. Returns ``{provider: (max_abs_err, match, error)}``.

        ``tolerance(provider, out, ref_out) -> (max_abs_err, match)`` decides what matches; default:
        max abs error at most 1e-2 for 16-bit dtypes and 1e-4 otherwise.
        """
        results: dict[str, tuple[float | None, bool | None, BaseException | None]] = {}
        outputs: dict[str, torch.Tensor] = {}
        self._out_like = None
        for name, fn in providers.items():
            if isinstance(fn, BaseException):
                results[name] = (None, None, fn)
                continue
            try:
                with time_box(self.first_call_timeout_s), torch.enable_grad():
                    outputs[name] = fn().detach()
                synchronize(self.device)
                if self._out_like is None:
                    self._out_like = _output_spec(outputs[name])
                results[name] = (None, None, None)
            except (Exception, TimeBoxExceeded) as error:  # a broken provider must not stop the run
                results[name] = (None, None, error)
                if os.environ.get("SSLTM_BENCH_TRACEBACK"):
                    traceback.print_exc()
                self._release()
        ref = outputs.get(reference)
        if ref is None:
            self.print(f"!!! {case.name}: the reference {reference!r} did not run: outputs are NOT checked")
        for name, out in outputs.items():
            if ref is None:
                continue
            if tolerance is not None:
                err, match = tolerance(name, out, ref)
            else:
                err = (out.float() - ref.float()).abs().max().item() if out.shape == ref.shape else math.inf
                atol = 1e-2 if out.element_size() <= 2 else 1e-4
                match = out.shape == ref.shape and err <= atol
            results[name] = (err, match, None)
            if not match:
                self.print(f"!!! {case.name}: {name} does NOT match {reference}: max abs err {err:.3e}")
        del outputs, ref
        self._release()
        return results

    def run_case(self, case: Case, providers: dict[str, Provider | BaseException],
                 leaves: Sequence[torch.Tensor], modes: Sequence[str] = MODES, reference: str | None = None,
                 tolerance=None, notes: dict[str, str] | None = None) -> list[Row]:
        """Check, then time every provider in every mode; returns (and records) the rows.

        ``providers`` maps a name to a no-argument forward returning a tensor that depends on
        ``leaves`` (the tensors whose gradients the backward produces), or to the exception that
        says why it is unavailable.
        """
        self.print(f"\n== {case.name}  {case.title}")
        self._out_like = None
        providers = {name: fn if isinstance(fn, (Impl, BaseException)) else Impl(fn)
                     for name, fn in providers.items()}
        checks = self.check(case, providers, reference, tolerance) if reference else {
            name: (None, None, fn if isinstance(fn, BaseException) else None) for name, fn in providers.items()}
        rows: list[Row] = []
        grad_out: torch.Tensor | None = None
        for mode in modes:
            for name, fn in providers.items():
                err, match, failure = checks[name]
                row = Row(case.name, name, mode, case.shape, str(case.dtype).replace("torch.", ""),
                          max_abs_err=err, match=match, note=self._row_note(fn, name, notes))
                if failure is None and mode not in fn.modes:
                    failure = Unavailable(fn.reason)
                if failure is not None:
                    row.error = _short_error(failure)
                    rows.append(row)
                    continue
                try:
                    if grad_out is None and mode != "fwd":
                        if self._out_like is None:  # no check ran: one forward gives the shape
                            with time_box(self.first_call_timeout_s):
                                self._out_like = _output_spec(fn())
                        grad_out = fixed_grad(*self._out_like)
                    self._measure(row, fn, mode, leaves, grad_out, case)
                except (Exception, TimeBoxExceeded) as error:
                    row.error = _short_error(error)
                    if os.environ.get("SSLTM_BENCH_TRACEBACK"):
                        traceback.print_exc()
                finally:
                    _reset_grads(leaves)
                    self._release()
                rows.append(row)
        self.rows.extend(rows)
        self.print(format_rows(rows))
        if self.save:
            append_jsonl(self.path, rows, self.env, self.name)
        return rows

    def _row_note(self, impl, provider: str, notes: dict[str, str] | None) -> str | None:
        own = impl.note if isinstance(impl, Impl) else None
        parts = [p for p in (own, (notes or {}).get(provider)) if p]
        return "; ".join(parts) or None

    def _measure(self, row: Row, forward: Callable[[], torch.Tensor], mode: str, leaves: Sequence[torch.Tensor],
                 grad_out: torch.Tensor | None, case: Case) -> None:
        _reset_grads(leaves)
        self._release()
        synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        # warm-up: compiles the backward of compiled providers, fills the caching allocator
        with time_box(self.first_call_timeout_s):
            run = mode_runner(forward, mode, grad_out)
            run.fn()
            synchronize(self.device)
        _reset_grads(leaves)
        row.peak_mib = self.peak_mib(run.fn, base)
        _reset_grads(leaves)
        row.ms, row.ms_p20, row.ms_p80 = self.time(run.fn, leaves)
        work = case.work.get(mode)
        if work is not None:
            row.tflops, row.gbps = throughput(work, row.ms)
            bound = roofline(work, self.spec, case.dtype)
            if bound is not None:
                row.roofline_ms, row.limiter = bound.ms, bound.limiter
                row.roofline_pct = 100.0 * bound.ms / row.ms
        del run

    def finish(self) -> None:
        if self.save and self.rows:
            self.print(f"\nappended {len(self.rows)} rows to {self.path}")
