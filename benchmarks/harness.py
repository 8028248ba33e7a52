"""What every ``ssltm_kernels`` op benchmark shares (``stt_window_attn.py`` shows the use): ``do_bench``
quantiles (a CPU loop without a GPU), the modes fwd / bwd / fwd+bwd, peak memory and kernel launches per
call, the GPUs' peaks, the roofline bound of a :class:`Work` (each benchmark brings its op's formulas), the
low-precision output check, speed-up tables, target checks and the summary that ends a run, the compiled
peers' settings, command-line helpers, and JSON lines with provenance appended to
``benchmarks/results/<name>.jsonl``. A provider that fails or cannot run becomes a row saying why. No call is
interrupted (a signal could land inside torch.compile or an autotuner): a provider slower than ``slow_ms`` per
call has its remaining modes skipped."""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import math
import platform
import subprocess
import time
import traceback
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
QUANTILES = (0.5, 0.2, 0.8)  # median first (the reported ms), then the spread
RESULTS_DIR = Path(__file__).resolve().parent / "results"
UNAVAILABLE, SKIPPED = "unavailable: ", "skipped: "  # rows without a time that are not failures
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COMPILE_NOTE = "donated buffers off"


@dataclass(frozen=True)
class DeviceSpec:
    """Dense peaks of one GPU: FLOP/s per dtype, DRAM bytes/s, ``exp``/s of the special-function unit."""

    name: str
    flops: dict  # torch.dtype -> FLOP/s; fp32 is the non-tensor-core peak (torch's default, no TF32)
    bytes_per_s: float
    exp_per_s: float


def _hopper(name: str, sparse_tflops: float, fp32_tflops: float, tb_per_s: float, sms: int, mhz: int) -> DeviceSpec:
    # NVIDIA H100 / H200 datasheets quote tensor FLOP/s "with sparsity": dense is half. MUFU ex2 does
    # 16/clk/SM on sm_90 (CUDA C++ Programming Guide throughput table) at the clock the dense peak implies
    # (4096 bf16 FLOP/clk/SM): 132 SMs x 16 x 1.83 GHz = 3.9e12 exp/s on H100 SXM, FlashAttention-3's figure.
    tensor = sparse_tflops / 2 * 1e12
    flops = {torch.bfloat16: tensor, torch.float16: tensor, torch.float32: fp32_tflops * 1e12}
    return DeviceSpec(name, flops, tb_per_s * 1e12, sms * 16 * mhz * 1e6)


DEVICE_SPECS = {s.name: s for s in (
    _hopper("H100 SXM", 1979, 67, 3.35, 132, 1830),
    _hopper("H100 PCIe", 1513, 51, 2.0, 114, 1620),
    _hopper("H100 NVL", 1671, 60, 3.9, 132, 1545),
    _hopper("H200 SXM", 1979, 67, 4.8, 132, 1830),
    _hopper("H200 NVL", 1671, 60, 4.8, 132, 1545),
)}


def match_device_spec(gpu_name: str | None) -> DeviceSpec | None:
    """Spec for a ``torch.cuda.get_device_name`` ("NVIDIA H100 80GB HBM3" is the SXM board), else None."""
    name = (gpu_name or "").upper()
    for gpu in ("H200", "H100"):
        if gpu in name:
            return DEVICE_SPECS.get(f"{gpu} {'NVL' if 'NVL' in name else 'PCIe' if 'PCIE' in name else 'SXM'}")
    return None


@dataclass(frozen=True)
class Work:
    """The least one call must do: FLOPs (an FMA is 2), DRAM bytes, transcendental ``exp``s."""

    flops: float = 0.0
    bytes: float = 0.0
    exps: float = 0.0


def roofline(work: Work, spec: DeviceSpec | None, dtype: torch.dtype) -> tuple[float, str] | None:
    """``(ms, limiter)``: the slowest of bytes / bandwidth, FLOPs / peak(dtype), exps / exp rate."""
    if spec is None:
        return None
    peak = spec.flops.get(dtype)
    seconds = {"memory": work.bytes / spec.bytes_per_s, "compute": work.flops / peak if peak else 0.0,
               "exp": work.exps / spec.exp_per_s}
    limiter = max(seconds, key=seconds.get)
    return seconds[limiter] * 1e3, limiter


def git_commit(root: Path = RESULTS_DIR.parent.parent) -> str:
    """Short HEAD sha, "+dirty" when the tree (results aside) differs from it; "unknown" outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True,
                              timeout=20).stdout.strip()
    try:
        dirty = git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    """Provenance written into every JSON line."""
    try:
        from triton import __version__ as triton_version
    except ImportError:
        triton_version = None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "python": platform.python_version(), "device": device.type,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def cpu_bench(fn: Callable[[], object], rep_ms: float, grad_to_none: Sequence[torch.Tensor] = ()) -> list[float]:
    """CPU fallback of ``do_bench``: QUANTILES (ms) of 3 to 100 repeats filling about ``rep_ms``."""
    times: list[float] = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (len(times) < 100 and time.perf_counter() < deadline):
        for x in grad_to_none:
            x.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return torch.tensor(times, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64)).tolist()


def mode_runner(forward: Callable[[], torch.Tensor], mode: str, grad_out: torch.Tensor | None) -> Callable[[], object]:
    """One timed call of ``mode``. fwd: the forward with autograd on, as in training. bwd: the backward
    of one retained graph (built here, once), replayed. fwd+bwd: both, on a fresh graph."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "bwd":
        out = forward()
        return lambda: out.backward(grad_out, retain_graph=True)
    return forward if mode == "fwd" else lambda: forward().backward(grad_out)


@dataclass
class Case:
    """One problem: a shape (a dict, recorded as is), a dtype and the :class:`Work` of each mode."""

    name: str
    shape: dict
    dtype: torch.dtype
    work: dict = field(default_factory=dict)
    title: str = ""
    items: float | None = None  # what one call processes (frames, clips...): rows then report items/s


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
    items_per_s: float | None = None
    launches: int | None = None  # GPU kernels one call launches (count_kernel_launches)
    max_abs_err: float | None = None
    match: bool | None = None
    error: str | None = None
    note: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.ms is not None


def text_table(header: Sequence[str], body: Sequence[Sequence], left: int = 2) -> str:
    """First ``left`` columns left-aligned, the others right-aligned but the last (free text)."""
    widths = [max(len(str(line[i])) for line in (header, *body)) for i in range(len(header) - 1)]
    return "\n".join("  ".join([*(str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w)
                                  in enumerate(zip(line, widths, strict=False))), str(line[-1])]).rstrip()
                     for line in (header, *body))


def format_rows(rows: Sequence[Row]) -> str:
    f = lambda value, spec: "-" if value is None else format(value, spec)
    body = []
    for r in sorted(rows, key=lambda r: MODES.index(r.mode)):  # mode-major: providers side by side
        if not r.ok:  # a row without a time always says why
            why = r.error if r.error.startswith((UNAVAILABLE, SKIPPED)) else f"FAILED: {r.error}"
            body.append((r.provider, r.mode, *"-" * 10, why))
            continue
        body.append((r.provider, r.mode, f"{r.ms:.3f}", f"{r.ms_p20:.3f}-{r.ms_p80:.3f}", f(r.tflops, ".3g"),
                     f(r.gbps, ".3g"), f(r.roofline_pct, ".1f"), r.limiter or "-", f(r.peak_mib, ".1f"),
                     f(r.items_per_s, ".3g"), f(r.launches, "d"),
                     f(r.max_abs_err, ".1e") + (" MISMATCH" if r.match is False else ""), r.note or ""))
    return text_table(("provider", "mode", "ms", "p20-p80", "TFLOP/s", "GB/s", "%roof", "bound", "peak MiB",
                       "items/s", "launches", "max|err|", "note"), body)


def append_jsonl(path: Path, rows: Sequence[Row], env: dict, benchmark: str) -> None:
    """One JSON object per row: ``benchmark``, the provenance, the row; non-finite floats become null."""
    append_records(path, [asdict(row) for row in rows], env, benchmark)


def append_records(path: Path, records: Sequence[dict], env: dict, benchmark: str) -> None:
    """One JSON object per record (any JSON-able dict): ``benchmark``, the provenance, the record; non-finite
    floats become null."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for row in records:
            record = {"benchmark": benchmark, **env, **row}
            f.write(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                                for k, v in record.items()}, default=str) + "\n")


class Unavailable(Exception):
    """A provider that cannot run here; the message is the reason its rows show."""


@dataclass
class Impl:
    """A no-argument forward of the case's leaves, the modes it supports (others: ``reason``), a row note."""

    fn: Callable[[], torch.Tensor]
    modes: tuple = MODES
    reason: str = "mode not supported by this provider"
    note: str | None = None


def _default_tolerance(name: str, out: torch.Tensor, ref: torch.Tensor) -> tuple[float, bool]:
    err = (out.float() - ref.float()).abs().max().item() if out.shape == ref.shape else math.inf
    return err, err <= (1e-2 if out.element_size() <= 2 else 1e-4)


class Harness:
    """Prints the provenance, runs cases on ``device`` (CUDA: ``do_bench``, CPU: :func:`cpu_bench`), prints
    their rows and, with ``save``, appends them to ``results_dir / f"{name}.jsonl"``."""

    def __init__(self, name: str, *, device: torch.device | str | None = None, quick: bool = False,
                 save: bool = True, results_dir: Path = RESULTS_DIR, note: str | None = None,
                 slow_ms: float = 2000.0) -> None:
        self.name, self.save, self.slow_ms = name, save, slow_ms
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device is None else device)
        self.path = Path(results_dir) / f"{name}.jsonl"
        on_gpu = self.device.type == "cuda"
        # do_bench's defaults are 25 / 100 ms; the CPU loop needs no warm-up of its own (see _measure)
        self.warmup_ms, self.rep_ms = ((10, 40) if quick else (25, 100)) if on_gpu else (0, 100 if quick else 300)
        self.env = {**environment(self.device), "run_note": note}
        self.spec = match_device_spec(self.env["gpu"])
        peaks = f"{self.spec.name} datasheet" if self.spec else "none for this device"
        print("  ".join(f"{k} {v}" for k, v in self.env.items() if v is not None),
              f"roofline peaks: {peaks}; rows {f'appended to {self.path}' if save else 'not saved'}", sep="\n")

    def run_case(self, case: Case, providers: dict, leaves: Sequence[torch.Tensor], modes: Sequence[str] = MODES,
                 reference: str | None = None, tolerance: Callable | None = None) -> list[Row]:
        """Run each provider's forward once (it compiles), compare it with ``reference``'s by ``tolerance(name,
        out, ref) -> (max_abs_err, match)``, then time it in each mode. ``providers``: name -> forward,
        :class:`Impl` or the exception saying why it cannot run; ``leaves``: what the backward differentiates."""
        print(f"\n== {case.name}  {case.title}", flush=True)
        impls = {n: p if isinstance(p, (Impl, BaseException)) else Impl(p) for n, p in providers.items()}
        skip, outputs = {}, {}
        for name, impl in impls.items():
            try:
                if isinstance(impl, BaseException):
                    raise impl
                with torch.enable_grad():
                    outputs[name] = impl.fn().detach()
            except Exception as error:  # a broken provider must not stop the run
                skip[name] = self._failure(error)
            self._release()
        ref = outputs.get(reference)
        if reference and ref is None:
            print(f"!!! {case.name}: the reference {reference!r} did not run: outputs are NOT checked")
        checks = {n: (tolerance or _default_tolerance)(n, out, ref) for n, out in outputs.items() if ref is not None}
        like = next(iter(outputs.values()), None)  # the upstream gradient: same values for every provider
        differentiable = like is not None and like.is_floating_point()  # not, e.g., a predicted class map
        grad_out = None if not differentiable else torch.randn(like.shape, dtype=like.dtype, device=like.device,
                                                         generator=torch.Generator(like.device).manual_seed(0))
        del outputs, ref, like

        rows = []
        for name, impl in impls.items():
            for mode in modes:
                err, match = checks.get(name, (None, None))
                rows.append(row := Row(case.name, name, mode, case.shape, str(case.dtype).removeprefix("torch."),
                                       max_abs_err=err, match=match, note=getattr(impl, "note", None)))
                if name in skip or mode not in impl.modes:
                    row.error = skip.get(name) or UNAVAILABLE + impl.reason
                    continue
                try:
                    self._measure(row, impl.fn, mode, leaves, grad_out, case)
                except Exception as error:
                    row.error = self._failure(error)
                if row.ms is not None and row.ms > self.slow_ms:  # a cheap time budget that interrupts nothing
                    skip[name] = f"{SKIPPED}{mode} took {row.ms:.0f} ms > {self.slow_ms:.0f} ms per call"
                self._release(leaves)
        print(format_rows(rows), flush=True)
        if self.save:
            append_jsonl(self.path, rows, self.env, self.name)
        return rows

    @staticmethod
    def _failure(error: BaseException) -> str:
        if "Unavailable" in type(error).__name__:  # ours or a library's "cannot run here"
            return (UNAVAILABLE + str(error)).splitlines()[0][:300]
        traceback.print_exception(error)  # the row keeps one line; the whole story goes to stderr
        return f"{type(error).__name__}: {error}".strip().splitlines()[0][:300]

    def _release(self, leaves: Sequence[torch.Tensor] = ()) -> None:
        for x in leaves:  # no call accumulates into the previous one's gradients
            x.grad = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def _measure(self, row: Row, forward, mode: str, leaves, grad_out, case: Case) -> None:
        on_gpu = self.device.type == "cuda"
        base = torch.cuda.memory_allocated(self.device) if on_gpu else 0  # inputs and the upstream gradient
        run = mode_runner(forward, mode, grad_out)
        run()  # warm-up: compiles a compiled provider's backward, once; fills the caching allocator
        self._release(leaves)
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
            run()
            torch.cuda.synchronize(self.device)
            row.peak_mib = (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
            self._release(leaves)  # the counted call starts without gradients, as the timed ones
            row.launches = count_kernel_launches(run)
            self._release(leaves)
            from triton.testing import do_bench  # here: a CPU-only install may lack triton
            times = do_bench(run, warmup=self.warmup_ms, rep=self.rep_ms, grad_to_none=list(leaves),
                             quantiles=list(QUANTILES))
        else:
            times = cpu_bench(run, self.rep_ms, leaves)
        row.ms, row.ms_p20, row.ms_p80 = times
        if case.items:
            row.items_per_s = case.items * 1e3 / row.ms
        work = case.work.get(mode)
        if work is not None:
            row.tflops, row.gbps = work.flops / row.ms / 1e9, work.bytes / row.ms / 1e6
            bound = roofline(work, self.spec, case.dtype)
            if bound is not None:
                row.roofline_ms, row.limiter = bound
                row.roofline_pct = 100.0 * bound[0] / row.ms



def count_kernel_launches(fn: Callable[[], object]) -> int | None:
    """GPU kernels one call of ``fn`` launches (memory copies and fills not counted), from torch.profiler's
    device events; None where the profiler records no device activity (no GPU, no CUPTI)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    device = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    return sum(not e.name.startswith(("Memcpy", "Memset")) for e in device) if device else None


class TwiceReferenceError:
    """``run_case``'s tolerance under the repository's low-precision rule: a provider matches when its
    error against an fp32 run of the reference (``reference_fp32()``, computed once, on first use) is at
    most twice the error of the reference itself run in the benchmark dtype, plus a small floor. The
    reported error is against the reference provider's output in the benchmark dtype."""

    FLOOR = {torch.float32: 1e-4, torch.float64: 1e-9}

    def __init__(self, dtype: torch.dtype, reference_fp32: Callable[[], torch.Tensor]) -> None:
        self.dtype, self.reference_fp32 = dtype, reference_fp32
        self._ref32: torch.Tensor | None = None

    def __call__(self, name: str, out: torch.Tensor, reference_out: torch.Tensor) -> tuple[float, bool]:
        if out.shape != reference_out.shape:
            return math.inf, False
        if self._ref32 is None:
            exact = self.dtype in (torch.float32, torch.float64)
            self._ref32 = reference_out.float() if exact else self.reference_fp32().float()
        err = (out.float() - reference_out.float()).abs().max().item()
        own = (out.float() - self._ref32).abs().max().item()
        base = (reference_out.float() - self._ref32).abs().max().item()
        return err, bool(own <= 2.0 * base + self.FLOOR.get(self.dtype, 1e-3))


def configure_compile() -> None:
    """torch.compile settings for the compiled peers.

    One graph per shape (``dynamic=False``): the recompile limit must exceed the shape count.
    AOTAutograd donates saved activations to the backward by default, which then refuses
    ``retain_graph=True``; the ``bwd`` mode replays one retained graph, so donation is off for the whole
    run (one compilation serves every mode) and rows of compiled providers say so (``COMPILE_NOTE``).
    """
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if hasattr(torch._functorch.config, "donated_buffer"):
        torch._functorch.config.donated_buffer = False


# ----------------------------------------------------------------------------- speed-ups and targets
def format_speedups(rows: Sequence[Row], ours: str, peers: Sequence[str]) -> str:
    """``peer ms / ours ms`` per case and mode (> 1: ours is faster); empty when ours has no time."""
    ms = {(r.case, r.mode, r.provider): r.ms for r in rows if r.ok}
    body = [(case, mode, f"{ms[case, mode, ours]:.3f}",
             *(f"{ms[case, mode, p] / ms[case, mode, ours]:.2f}x" if (case, mode, p) in ms else "-" for p in peers), "")
            for case in dict.fromkeys(r.case for r in rows) for mode in MODES if (case, mode, ours) in ms]
    header = ("case", "mode", f"{ours} ms", *(f"vs {p}" for p in peers), "")
    return f"speedup of {ours} (peer ms / {ours} ms; > 1: {ours} is faster)\n{text_table(header, body)}" if body else ""


@dataclass
class TargetResult:
    case: str
    target: str
    provider: str
    value: str
    status: str  # PASS, FAIL or n/a (...)


def format_targets(results: Sequence[TargetResult], target_cases: str) -> str:
    if not results:
        return f"targets: none of the target cases ({target_cases}) ran with our kernels"
    body = [(r.case, r.target, r.provider, r.value, r.status) for r in results]
    table = text_table(("case", "target", "provider", "measured", "status"), body, left=4)
    passed = sum(r.status == "PASS" for r in results)
    return f"targets (from the measured numbers above)\n{table}\n{passed}/{len(results)} targets pass"


class RowIndex:
    """A run's rows by (case, provider, mode), for judging targets."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self._rows = {(r.case, r.provider, r.mode): r for r in rows}

    def get(self, case: str, provider: str, mode: str) -> Row | None:
        return self._rows.get((case, provider, mode))

    def timed(self, case: str, provider: str, mode: str) -> Row | None:
        """The row if it has a time, else None."""
        row = self.get(case, provider, mode)
        return row if row is not None and row.ok else None

    def own(self, case: str, provider: str) -> Row | None:
        """The provider's fwd+bwd row on the case, else its fwd row: the row whose output check marks its
        targets and whose error says why they are n/a."""
        return self.get(case, provider, "fwd+bwd") or self.get(case, provider, "fwd")

    def ran(self, cases: Sequence[str]) -> list[str]:
        """Those of ``cases`` that have rows, in their order."""
        run = {case for case, _, _ in self._rows}
        return [case for case in cases if case in run]


@dataclass(frozen=True)
class Check:
    """One target judged on measured numbers: the value shown and whether it meets the target, or why it
    cannot be judged (a number is missing: the target is n/a)."""

    target: str
    value: str = "-"
    ok: bool | None = None
    why: str | None = None


def _has_time(row: Row | None) -> bool:
    return row is not None and row.ok


def untimed(row: Row, otherwise: str = "no time") -> str:
    """Why ``row`` has no time, as an n/a reason: "provider: error" (``otherwise`` without an error)."""
    return f"{row.provider}: {row.error or otherwise}"


def speedup_check(target: str, own: Row | None, peers: Sequence[Row | None], factor: float, *, own_why: str,
                  peer_why: str) -> Check:
    """``peer ms / own ms >= factor`` against the fastest of ``peers`` with a time (the value names it when
    there are several). n/a: ``own_why`` when ``own`` has no time, else ``peer_why`` when no peer has one."""
    timed = [row for row in peers if _has_time(row)]
    if not _has_time(own) or not timed:
        return Check(target, why=peer_why if _has_time(own) else own_why)
    best = min(timed, key=lambda row: row.ms)
    speedup = best.ms / own.ms
    return Check(target, f"{speedup:.2f}x" + (f" vs {best.provider}" if len(peers) > 1 else ""), speedup >= factor)


def peer_speedup_checks(index: RowIndex, case: str, own: Row | None, factors: dict[str, float], *, own_why: str,
                        mode: str = "fwd+bwd", prefix: str = "") -> list[Check]:
    """One :func:`speedup_check` per peer of ``factors`` (name -> factor): ``own`` (a ``mode`` row on the case)
    at least that many times as fast as the peer in ``mode``. Targets read "``prefix``fwd+bwd >= 3x eager"; n/a
    reasons are ``own_why`` or "eager has no time"."""
    return [speedup_check(f"{prefix}{mode} >= {factor:g}x {peer}", own, [index.timed(case, peer, mode)], factor,
                          own_why=own_why, peer_why=f"{peer} has no time") for peer, factor in factors.items()]


def peak_memory_check(target: str, own: Row | None, eager: Row | None, at_most: float, *,
                      mib_digits: int = 0) -> Check:
    """Peak memory of ``own`` over that of ``eager`` (the same case and mode) ``<= at_most``."""
    if not (_has_time(own) and own.peak_mib is not None and _has_time(eager) and eager.peak_mib):
        return Check(target, why="no memory measurement")
    ratio = own.peak_mib / eager.peak_mib
    mib = f"{own.peak_mib:.{mib_digits}f} / {eager.peak_mib:.{mib_digits}f} MiB"
    return Check(target, f"{ratio:.2f}x ({mib})", ratio <= at_most)


def bandwidth_check(target: str, row: Row | None, bytes_per_s: float | None, at_least_pct: float, *, own_why: str,
                    peak_why: str) -> Check:
    """``row``'s GB/s (its least traffic over its time) as a share of the device's DRAM bandwidth
    ``bytes_per_s`` ``>= at_least_pct`` %. n/a: ``own_why`` without a time, ``peak_why`` without a peak."""
    if not _has_time(row) or row.gbps is None or not bytes_per_s:
        return Check(target, why=peak_why if _has_time(row) else own_why)
    pct = 100.0 * row.gbps * 1e9 / bytes_per_s
    return Check(target, f"{pct:.1f}% ({row.gbps:.0f} GB/s)", pct >= at_least_pct)


def roofline_check(target: str, row: Row | None, at_least_pct: float, *, own_why: str) -> Check:
    """``row``'s share of its roofline bound ``>= at_least_pct`` %; n/a: ``own_why`` without a time."""
    if not _has_time(row) or row.roofline_pct is None:
        return Check(target, why="no roofline for this device" if _has_time(row) else own_why)
    return Check(target, f"{row.roofline_pct:.1f}% ({row.limiter}-bound)", row.roofline_pct >= at_least_pct)


def target_results(case: str, provider: str, checks: Sequence[Check], match: bool | None) -> list[TargetResult]:
    """The checks as results: "n/a (why)" where a number is missing, else "FAIL (output mismatch)" where the
    provider's output did not match (``match`` False), else PASS or FAIL."""
    return [TargetResult(case, c.target, provider, c.value,
                         f"n/a ({c.why})" if c.why is not None else "FAIL (output mismatch)" if match is False
                         else "PASS" if c.ok else "FAIL") for c in checks]


def check_targets(rows: Sequence[Row], cases: Sequence[str], ours: Sequence[str],
                  judge: Callable[[RowIndex, str, str, Row], list[TargetResult]], *,
                  one_line_when_untimed: bool = True) -> list[TargetResult]:
    """The targets of each of ``ours`` on each of ``cases`` that ran: ``judge(index, case, provider, own)``,
    ``own`` being the provider's :meth:`RowIndex.own` row (providers without one are left out). With
    ``one_line_when_untimed``, a provider with neither a fwd nor a fwd+bwd time gets one "all targets" n/a."""
    index = RowIndex(rows)
    results = []
    for case in index.ran(cases):
        for provider in ours:
            own = index.own(case, provider)
            if own is None:
                continue
            measured = index.timed(case, provider, "fwd+bwd") or index.timed(case, provider, "fwd")
            if one_line_when_untimed and measured is None:
                results.append(TargetResult(case, "all targets", provider, "-", f"n/a ({untimed(own)})"))
            else:
                results += judge(index, case, provider, own)
    return results


def print_summary(rows: Sequence[Row], providers: Sequence[str], ours: Sequence[str],
                  targets: Sequence[TargetResult] | None, target_cases: str,
                  labels: Sequence[dict[str, str]] = ()) -> None:
    """What a benchmark prints after its cases: for each of ``ours`` among ``providers``, its speed-up table
    against the other providers (then again under each of ``labels``: the same providers under other names,
    on other cases), the providers whose output did not match, and the targets (None: a CPU run, not
    evaluated)."""
    print()
    for own in (p for p in ours if p in providers):
        for names in ({}, *labels):
            table = format_speedups(rows, names.get(own, own), [names.get(p, p) for p in providers if p != own])
            print(table, end="\n\n" if table else "")
    mismatched = sorted({(r.case, r.provider) for r in rows if r.match is False})
    if mismatched:
        print("!!! OUTPUT MISMATCH vs eager: " + ", ".join(f"{p} on {c}" for c, p in mismatched))
    print(format_targets(targets, target_cases) if targets is not None
          else "targets: defined for bf16 on a GPU; not evaluated on this CPU run")


# -------------------------------------------------------------------------------------- command line
def csv_choices(choices: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """An argparse ``type``: a comma-separated subset of ``choices``."""
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad or text!r}; choose from {', '.join(choices)}")
        return items

    return parse


def benchmark_arguments(doc: str, benchmark: str, providers: Sequence[str], *,
                        quick_help: str = "shorter timing budgets (CI smoke run)",
                        dtype_option: bool = True, modes_option: bool = True,
                        shapes: Collection[str] = ()) -> argparse.ArgumentParser:
    """The options every benchmark takes (``--quick``, ``--providers``, ``--modes``, ``--dtype`` (these two
    optional), ``--no-save``, ``--results-dir``, ``--cpu``, ``--threads``, and ``--shapes`` when given the
    ``shapes`` names to choose from); ``doc`` is the script's docstring (summary, then usage, then details
    for the epilog). A benchmark adds its own options to the returned parser."""
    summary, details = doc.split("\n\n", 1)
    p = argparse.ArgumentParser(description=summary, epilog=details.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--providers", type=csv_choices(providers, "provider"), default=list(providers),
                   help=f"comma-separated subset of {','.join(providers)}")
    if modes_option:
        p.add_argument("--modes", type=csv_choices(MODES, "mode"), default=list(MODES),
                       help=f"comma-separated subset of {','.join(MODES)}")
    if dtype_option:
        p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--no-save", action="store_true", help="do not append the rows to the results file")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                   help=f"where {benchmark}.jsonl is appended to (default: benchmarks/results)")
    p.add_argument("--cpu", action="store_true", help="run the CPU comparison even when a GPU is present")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU runs: torch threads (default 1: spin-waiting threads make timings erratic on a "
                        "loaded machine)")
    if shapes:
        p.add_argument("--shapes", type=csv_choices(tuple(shapes), "shape"), default=None,
                       help=f"comma-separated subset of {','.join(shapes)} (default: the GPU shapes, or the CPU "
                            "shapes without a GPU)")
    return p


def start_run(args: argparse.Namespace, benchmark: str, *, cpu_run: str = "small") -> tuple[Harness, torch.dtype]:
    """The :class:`Harness` for parsed :func:`benchmark_arguments` and the benchmark dtype (``--dtype``, else
    bf16 on a GPU, fp32 on the CPU). Without a GPU (or with ``--cpu``) it says that the ``cpu_run`` CPU
    comparison replaces the GPU benchmark and notes it in every row. Also applies ``configure_compile``."""
    on_gpu = torch.cuda.is_available() and not args.cpu
    chosen = getattr(args, "dtype", None)
    dtype = DTYPES[chosen] if chosen else (torch.bfloat16 if on_gpu else torch.float32)
    note = None
    if not on_gpu:
        why = "--cpu given" if args.cpu else "no GPU"
        print(f"{why}: {cpu_run} {str(dtype).removeprefix('torch.')} CPU comparison instead of the GPU benchmark "
              "(the times show that the providers run and agree, not kernel performance)")
        note = f"cpu run ({why}): {cpu_run} shapes, not kernel performance"
        torch.set_num_threads(max(1, args.threads))
        # inductor's CPU compile logs a CUDA_HOME guess on a CUDA build of torch without a GPU
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    configure_compile()
    bench = Harness(benchmark, device="cuda" if on_gpu else "cpu", quick=args.quick, save=not args.no_save,
                    results_dir=args.results_dir, note=note)
    return bench, dtype


def chosen_shapes(requested: Sequence[str] | None, *, on_gpu: bool, quick: bool, all_shapes: dict, gpu: dict,
                  quick_gpu: Sequence[str], cpu: dict) -> list:
    """The shapes a run measures: those requested by name, else the GPU shapes (``quick_gpu`` of them with
    ``--quick``), or the CPU shapes without a GPU."""
    if requested:
        return [all_shapes[name] for name in requested]
    if on_gpu:
        return [gpu[name] for name in (quick_gpu if quick else gpu)]
    return list(cpu.values())
