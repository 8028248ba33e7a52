"""What every ``ssltm_kernels`` op benchmark shares (``stt_window_attn.py`` shows the use: a script declares a
:class:`BenchmarkSpec`, :func:`run_benchmark` runs it): ``do_bench``
quantiles (a CPU loop without a GPU), the modes fwd / bwd / fwd+bwd, CUDA-graph replays of the calls that
take little time, peak memory and kernel launches per call, the GPUs' peaks, the roofline bound of a
:class:`Work` (each benchmark brings its op's formulas), the correctness gate (every provider's output and
gradients against an :class:`Exact` yardstick under the 2x-reference-error rule, before it is timed; a wrong
provider is marked and never ranked), speed-up tables, target checks and the summary that ends a run, the
compiled peers' settings, command-line helpers, and JSON lines with provenance appended to
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
import os
import platform
import subprocess
import time
import traceback
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ssltm_kernels._device import DEVICE_SPECS, DeviceSpec, match_device_spec  # noqa: F401 (re-exported)
from ssltm_kernels.numerics import exact_dtype, twice_reference_bound

MODES = ("fwd", "bwd", "fwd+bwd")
GRAPH_MODES = ("fwd", "fwd+bwd")  # the modes replayed as CUDA graphs (bwd replays a retained graph already)
GRAPH_BELOW_MS = 2.0  # calls faster than this are also timed as CUDA-graph replays: their host overhead shows
QUANTILES = (0.5, 0.2, 0.8)  # median first (the reported ms), then the spread
RESULTS_DIR = Path(__file__).resolve().parent / "results"
UNAVAILABLE, SKIPPED = "unavailable: ", "skipped: "  # rows without a time that are not failures
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COMPILE_NOTE = "donated buffers off"


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
    seconds = {
        "memory": work.bytes / spec.bytes_per_s,
        "compute": work.flops / peak if peak else 0.0,
        "exp": work.exps / spec.exp_per_s,
    }
    limiter = max(seconds, key=seconds.get)
    return seconds[limiter] * 1e3, limiter


def git_commit(root: Path = RESULTS_DIR.parent.parent) -> str:
    """Short HEAD sha, "+dirty" when the tree (results aside) differs from it; "unknown" outside git."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=20
        ).stdout.strip()

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
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


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
    graph_ms: float | None = None  # median of CUDA-graph replays of the call (calls under GRAPH_BELOW_MS)
    graph_error: str | None = None  # why the call has no graph time although it qualified
    max_err: float | None = None  # the output's largest absolute error against the exact yardstick
    correct: bool | None = None  # output and gradients within the 2x-reference-error rule; None: not checked
    errors: dict | None = None  # each checked tensor ("out", "grad <leaf>"): [error, bound]
    info: dict | None = None  # what the provider reports about itself (e.g. the SDPA kernel that ran)
    error: str | None = None
    note: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.ms is not None


def text_table(header: Sequence[str], body: Sequence[Sequence], left: int = 2) -> str:
    """First ``left`` columns left-aligned, the others right-aligned but the last (free text)."""
    widths = [max(len(str(line[i])) for line in (header, *body)) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(
            [
                *(
                    str(c).ljust(w) if i < left else str(c).rjust(w)
                    for i, (c, w) in enumerate(zip(line, widths, strict=False))
                ),
                str(line[-1]),
            ]
        ).rstrip()
        for line in (header, *body)
    )


def format_rows(rows: Sequence[Row]) -> str:
    f = lambda value, spec: "-" if value is None else format(value, spec)
    body = []
    for r in sorted(rows, key=lambda r: MODES.index(r.mode)):  # mode-major: providers side by side
        if not r.ok:  # a row without a time always says why
            why = r.error if r.error.startswith((UNAVAILABLE, SKIPPED)) else f"FAILED: {r.error}"
            body.append((r.provider, r.mode, *"-" * 11, why))
            continue
        graph = f(r.graph_ms, ".3f") if r.graph_error is None else "failed"
        body.append(
            (
                r.provider,
                r.mode,
                f"{r.ms:.3f}",
                f"{r.ms_p20:.3f}-{r.ms_p80:.3f}",
                graph,
                f(r.tflops, ".3g"),
                f(r.gbps, ".3g"),
                f(r.roofline_pct, ".1f"),
                r.limiter or "-",
                f(r.peak_mib, ".1f"),
                f(r.items_per_s, ".3g"),
                f(r.launches, "d"),
                f(r.max_err, ".1e") + _verdict(r),
                r.note or "",
            )
        )
    return text_table(
        (
            "provider",
            "mode",
            "ms",
            "p20-p80",
            "graph ms",
            "TFLOP/s",
            "GB/s",
            "%roof",
            "bound",
            "peak MiB",
            "items/s",
            "launches",
            "max|err|",
            "note",
        ),
        body,
    )


def _verdict(row: Row) -> str:
    """ " WRONG (what)" for an incorrect row, naming the tensors beyond their bound; "" otherwise."""
    if row.correct is not False:
        return ""
    wrong = [name for name, (err, bound) in (row.errors or {}).items() if not err <= bound]
    return f" WRONG ({', '.join(wrong)})" if wrong else " WRONG"


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
            f.write(
                json.dumps(
                    {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()},
                    default=str,
                )
                + "\n"
            )


class Unavailable(Exception):
    """A provider that cannot run here; the message is the reason its rows show."""


@dataclass
class Impl:
    """A no-argument forward of the case's leaves, the modes it supports (others: ``reason``), a row note,
    whether its calls may be captured as CUDA graphs, and ``describe``: called once after the correctness
    gate, its dict (what the provider reports about itself, e.g. the kernel that ran) goes into every row."""

    fn: Callable[[], torch.Tensor]
    modes: tuple = MODES
    reason: str = "mode not supported by this provider"
    note: str | None = None
    graphs: bool = True
    describe: Callable[[], dict] | None = None


@dataclass
class Exact:
    """The yardstick of the correctness gate: ``fn(*leaves)`` computes the case's output from detached copies
    of its leaves in :func:`~ssltm_kernels.numerics.exact_dtype` of the case dtype (float64 for float32 cases,
    float32 for 16-bit ones); inputs that are not leaves it widens itself. ``grads``: the gradients of the
    leaves are checked too (else the output only)."""

    fn: Callable[..., torch.Tensor]
    grads: bool = True


@dataclass(frozen=True)
class Verdict:
    """The correctness gate's finding on one provider: the output's error, whether every checked tensor is
    within its bound, and each tensor's ``[error, bound]``."""

    max_err: float | None = None
    correct: bool | None = None
    errors: dict | None = None


def gate_verdict(results: dict, low: dict, exact: dict, dtype: torch.dtype) -> Verdict:
    """The 2x-reference-error rule on each tensor of ``results`` (name -> tensor, None: no gradient) that the
    exact yardstick and the reference run in ``dtype`` (``low``) both have: error against ``exact`` at most
    :func:`~ssltm_kernels.numerics.twice_reference_bound`. A shape that differs, a missing gradient or a
    non-finite error fails."""
    errors = {}
    for name, want in exact.items():
        if name not in results or want is None or low.get(name) is None:
            continue
        got = results[name]
        same = got is not None and got.shape == want.shape
        err = (got.double() - want.double()).abs().max().item() if same and want.numel() else 0.0 if same else math.inf
        errors[name] = [err, twice_reference_bound(low[name], want, dtype)]
    correct = all(err <= bound for err, bound in errors.values())  # NaN compares False: incorrect
    return Verdict(errors["out"][0] if "out" in errors else None, correct, errors)


def graph_replay(run: Callable[[], object], warmup: int = 3) -> Callable[[], None]:
    """``run`` captured as a CUDA graph (after ``warmup`` calls on a side stream, as capture requires); returns
    the replay. Raises what the capture raises (a call that syncs with the host, a pageable copy...)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


class Harness:
    """Prints the provenance, runs cases on ``device`` (CUDA: ``do_bench``, CPU: :func:`cpu_bench`), prints
    their rows and, with ``save``, appends them to ``results_dir / f"{name}.jsonl"``. Calls of the modes
    GRAPH_MODES faster than ``graph_below_ms`` are also timed as replays of ``graph_capture(run)`` (CUDA
    graphs on a GPU; None, the CPU's default, times none)."""

    def __init__(
        self,
        name: str,
        *,
        device: torch.device | str | None = None,
        quick: bool = False,
        save: bool = True,
        results_dir: Path = RESULTS_DIR,
        note: str | None = None,
        slow_ms: float = 2000.0,
        graph_below_ms: float = GRAPH_BELOW_MS,
    ) -> None:
        self.name, self.save, self.slow_ms, self.graph_below_ms = name, save, slow_ms, graph_below_ms
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device is None else device)
        self.path = Path(results_dir) / f"{name}.jsonl"
        on_gpu = self.device.type == "cuda"
        self.graph_capture: Callable[[Callable[[], object]], Callable[[], object]] | None = (
            graph_replay if on_gpu else None
        )
        # do_bench's defaults are 25 / 100 ms; the CPU loop needs no warm-up of its own (see _measure)
        self.warmup_ms, self.rep_ms = ((10, 40) if quick else (25, 100)) if on_gpu else (0, 100 if quick else 300)
        self.env = {**environment(self.device), "run_note": note}
        self.spec = match_device_spec(self.env["gpu"])
        peaks = f"{self.spec.name} datasheet" if self.spec else "none for this device"
        print(
            "  ".join(f"{k} {v}" for k, v in self.env.items() if v is not None),
            f"roofline peaks: {peaks}; rows {f'appended to {self.path}' if save else 'not saved'}",
            sep="\n",
        )

    def run_case(
        self,
        case: Case,
        providers: dict,
        leaves: Sequence[torch.Tensor] | dict[str, torch.Tensor],
        modes: Sequence[str] = MODES,
        reference: str | None = None,
        exact: Exact | None = None,
        tolerance: Callable | None = None,
    ) -> list[Row]:
        """The correctness gate, then the timings. ``providers``: name -> forward, :class:`Impl` or the exception
        saying why it cannot run; ``leaves`` (a list, or names -> tensors): what the backward differentiates.

        Gate: each provider runs once (it compiles), and so does its backward (upstream gradient: one seeded
        random tensor) where it has a backward mode among ``modes``. Its output and leaf gradients are judged
        against ``exact`` (:func:`gate_verdict`: at most twice the error of the ``reference`` provider's own run in the
        case dtype, plus a floor); without ``exact``, the reference's results are the yardstick. ``tolerance(name,
        out, reference_out) -> (max_err, correct)`` replaces the rule for outputs that are not differentiable
        (e.g. class maps). Every provider is then timed in each mode; an incorrect one is marked, not ranked."""
        print(f"\n== {case.name}  {case.title}", flush=True)
        impls = {n: p if isinstance(p, (Impl, BaseException)) else Impl(p) for n, p in providers.items()}
        named = dict(leaves) if isinstance(leaves, dict) else {str(i): x for i, x in enumerate(leaves)}
        leaves = list(named.values())
        backward = bool(leaves) and any(m != "fwd" for m in modes) and (exact is None or exact.grads)
        skip, verdicts, infos = {}, {}, {}
        grad_out = low = yardstick = None
        for name in sorted(impls, key=lambda n: n != reference):  # the reference first: it bounds the others
            impl = impls[name]
            try:
                if isinstance(impl, BaseException):
                    raise impl
                grads = backward and tolerance is None and any(m in impl.modes for m in MODES[1:])
                results, grad_out = self._results(impl.fn, named, grad_out, grads)
                if name == reference:
                    low = results
                    yardstick = self._exact(exact, named, case.dtype, grad_out, grads) if exact else results
                if tolerance is not None and low is not None:
                    verdicts[name] = Verdict(*tolerance(name, results["out"], low["out"]))
                elif yardstick is not None:
                    verdicts[name] = gate_verdict(results, low, yardstick, case.dtype)
                del results
                if impl.describe is not None:
                    infos[name] = impl.describe()
                    print(f"{name}: {json.dumps(infos[name], default=str)}")
            except Exception as error:  # a broken provider must not stop the run
                skip[name] = self._failure(error)
            self._release(leaves)
        if reference and low is None:
            print(f"!!! {case.name}: the reference {reference!r} did not run: results are NOT checked")
        del low, yardstick

        rows = []
        for name, impl in impls.items():
            for mode in modes:
                verdict = verdicts.get(name, Verdict())
                rows.append(
                    row := Row(
                        case.name,
                        name,
                        mode,
                        case.shape,
                        str(case.dtype).removeprefix("torch."),
                        max_err=verdict.max_err,
                        correct=verdict.correct,
                        errors=verdict.errors,
                        info=infos.get(name),
                        note=getattr(impl, "note", None),
                    )
                )
                if name in skip or mode not in impl.modes:
                    row.error = skip.get(name) or UNAVAILABLE + impl.reason
                    continue
                try:
                    self._measure(row, impl, mode, leaves, grad_out, case)
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
    def _results(
        forward: Callable[[], torch.Tensor],
        named: dict,
        grad_out: torch.Tensor | None,
        grads: bool,
        autograd: bool = True,
    ) -> tuple[dict, torch.Tensor | None]:
        """``{"out": output, "grad <leaf>": gradient or None}`` (gradients with ``grads`` only, and only of a
        floating output) and the upstream gradient (made from the first output: the same for every provider).
        The forward runs with autograd on, as in the timed modes, unless ``autograd`` is False."""
        with torch.set_grad_enabled(autograd):
            out = forward()
        results = {"out": out.detach()}
        if not out.is_floating_point():  # e.g. a predicted class map: nothing to differentiate
            return results, grad_out
        if grad_out is None:
            grad_out = torch.randn(
                out.shape, dtype=out.dtype, device=out.device, generator=torch.Generator(out.device).manual_seed(0)
            )
        if grads:
            got = (
                torch.autograd.grad(out, list(named.values()), grad_out, allow_unused=True)
                if out.requires_grad
                else (None,) * len(named)
            )
            results |= {f"grad {n}": None if g is None else g.detach() for n, g in zip(named, got, strict=True)}
        return results, grad_out

    def _exact(self, exact: Exact, named: dict, dtype: torch.dtype, grad_out: torch.Tensor | None, grads: bool) -> dict:
        """The yardstick's results: ``exact.fn`` on widened copies of the leaves (without autograd when no
        gradient is checked: a model's leaves are its parameters, whose graph would only cost memory)."""
        wide = exact_dtype(dtype)
        copies = {n: x.detach().to(wide).requires_grad_(grads) for n, x in named.items()}
        results, _ = self._results(
            lambda: exact.fn(*copies.values()),
            copies,
            None if grad_out is None else grad_out.to(wide),
            grads,
            autograd=grads,
        )
        return results

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

    def _bench(self, run: Callable[[], object], leaves: Sequence[torch.Tensor]) -> list[float]:
        """QUANTILES (ms) of ``run``: ``do_bench`` on a GPU, :func:`cpu_bench` on the CPU."""
        if self.device.type == "cuda":
            from triton.testing import do_bench  # here: a CPU-only install may lack triton

            return do_bench(
                run, warmup=self.warmup_ms, rep=self.rep_ms, grad_to_none=list(leaves), quantiles=list(QUANTILES)
            )
        return cpu_bench(run, self.rep_ms, leaves)

    def _measure(self, row: Row, impl: Impl, mode: str, leaves, grad_out, case: Case) -> None:
        on_gpu = self.device.type == "cuda"
        base = torch.cuda.memory_allocated(self.device) if on_gpu else 0  # inputs and the upstream gradient
        run = mode_runner(impl.fn, mode, grad_out)
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
        row.ms, row.ms_p20, row.ms_p80 = self._bench(run, leaves)
        if case.items:
            row.items_per_s = case.items * 1e3 / row.ms
        work = case.work.get(mode)
        if work is not None:
            row.tflops, row.gbps = work.flops / row.ms / 1e9, work.bytes / row.ms / 1e6
            bound = roofline(work, self.spec, case.dtype)
            if bound is not None:
                row.roofline_ms, row.limiter = bound
                row.roofline_pct = 100.0 * bound[0] / row.ms
        if self.graph_capture is not None and mode in GRAPH_MODES and row.ms < self.graph_below_ms:
            self._release(leaves)
            self._graph_time(row, impl, run, leaves)

    def _graph_time(self, row: Row, impl: Impl, run: Callable[[], object], leaves: Sequence[torch.Tensor]) -> None:
        """``row.graph_ms``: the median replay of the captured call (the GPU time without the host's launch
        overhead), else ``row.graph_error`` saying why there is none. The replays write the gradients into the
        graph's own memory, so they are not reset between them."""
        if not impl.graphs:
            row.graph_error = "not capturable: " + (impl.note or "the provider says so")
            return
        try:
            row.graph_ms = self._bench(self.graph_capture(run), ())[0]
        except Exception as error:  # a call that cannot be captured keeps its eager time
            row.graph_error = f"capture failed: {type(error).__name__}: {error}".splitlines()[0][:300]


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
    """``peer ms / ours ms`` per case and mode (> 1: ours is faster); empty when ours has no time. A row that
    failed the correctness gate is not ranked: "wrong" stands in its place."""
    ms = {(r.case, r.mode, r.provider): r.ms for r in rows if r.ok}
    wrong = {(r.case, r.mode, r.provider) for r in rows if r.correct is False}

    def ratio(case: str, mode: str, peer: str) -> str:
        if (case, mode, peer) not in ms:
            return "-"
        if (case, mode, ours) in wrong or (case, mode, peer) in wrong:
            return "wrong"
        return f"{ms[case, mode, peer] / ms[case, mode, ours]:.2f}x"

    body = [
        (
            case,
            mode,
            f"{ms[case, mode, ours]:.3f}" + (" WRONG" if (case, mode, ours) in wrong else ""),
            *(ratio(case, mode, p) for p in peers),
            "",
        )
        for case in dict.fromkeys(r.case for r in rows)
        for mode in MODES
        if (case, mode, ours) in ms
    ]
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


def _rankable(row: Row | None) -> bool:
    """A peer row that may be compared with: timed and not failed by the correctness gate."""
    return _has_time(row) and row.correct is not False


def untimed(row: Row, otherwise: str = "no time") -> str:
    """Why ``row`` has no time, as an n/a reason: "provider: error" (``otherwise`` without an error)."""
    return f"{row.provider}: {row.error or otherwise}"


def speedup_check(
    target: str, own: Row | None, peers: Sequence[Row | None], factor: float, *, own_why: str, peer_why: str
) -> Check:
    """``peer ms / own ms >= factor`` against the fastest of ``peers`` with a time that passed the correctness
    gate (the value names it when there are several). n/a: ``own_why`` when ``own`` has no time, else
    ``peer_why`` when no peer has one (naming the peers left out as incorrect)."""
    timed = [row for row in peers if _rankable(row)]
    if not _has_time(own) or not timed:
        wrong = [row.provider for row in peers if _has_time(row) and row.correct is False]
        why = peer_why + (f"; incorrect, not ranked: {', '.join(wrong)}" if wrong else "")
        return Check(target, why=why if _has_time(own) else own_why)
    best = min(timed, key=lambda row: row.ms)
    speedup = best.ms / own.ms
    return Check(target, f"{speedup:.2f}x" + (f" vs {best.provider}" if len(peers) > 1 else ""), speedup >= factor)


def peer_speedup_checks(
    index: RowIndex,
    case: str,
    own: Row | None,
    factors: dict[str, float],
    *,
    own_why: str,
    mode: str = "fwd+bwd",
    prefix: str = "",
) -> list[Check]:
    """One :func:`speedup_check` per peer of ``factors`` (name -> factor): ``own`` (a ``mode`` row on the case)
    at least that many times as fast as the peer in ``mode``. Targets read "``prefix``fwd+bwd >= 3x eager"; n/a
    reasons are ``own_why`` or "eager has no time"."""
    return [
        speedup_check(
            f"{prefix}{mode} >= {factor:g}x {peer}",
            own,
            [index.timed(case, peer, mode)],
            factor,
            own_why=own_why,
            peer_why=f"{peer} has no time",
        )
        for peer, factor in factors.items()
    ]


def peak_memory_check(target: str, own: Row | None, eager: Row | None, at_most: float, *, mib_digits: int = 0) -> Check:
    """Peak memory of ``own`` over that of ``eager`` (the same case and mode) ``<= at_most``."""
    if not (_has_time(own) and own.peak_mib is not None and _rankable(eager) and eager.peak_mib):
        return Check(target, why="no memory measurement")
    ratio = own.peak_mib / eager.peak_mib
    mib = f"{own.peak_mib:.{mib_digits}f} / {eager.peak_mib:.{mib_digits}f} MiB"
    return Check(target, f"{ratio:.2f}x ({mib})", ratio <= at_most)


def bandwidth_check(
    target: str, row: Row | None, bytes_per_s: float | None, at_least_pct: float, *, own_why: str, peak_why: str
) -> Check:
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


def target_results(case: str, provider: str, checks: Sequence[Check], correct: bool | None) -> list[TargetResult]:
    """The checks as results: "n/a (why)" where a number is missing, else "FAIL (incorrect)" where the
    provider failed the correctness gate (``correct`` False), else PASS or FAIL."""
    return [
        TargetResult(
            case,
            c.target,
            provider,
            c.value,
            f"n/a ({c.why})"
            if c.why is not None
            else "FAIL (incorrect)"
            if correct is False
            else "PASS"
            if c.ok
            else "FAIL",
        )
        for c in checks
    ]


def check_targets(
    rows: Sequence[Row],
    cases: Sequence[str],
    ours: Sequence[str],
    judge: Callable[[RowIndex, str, str, Row], list[TargetResult]],
    *,
    one_line_when_untimed: bool = True,
) -> list[TargetResult]:
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


def print_summary(
    rows: Sequence[Row],
    providers: Sequence[str],
    ours: Sequence[str],
    targets: Sequence[TargetResult] | None,
    target_cases: str,
    labels: Sequence[dict[str, str]] = (),
) -> None:
    """What a benchmark prints after its cases: for each of ``ours`` among ``providers``, its speed-up table
    against the other providers (then again under each of ``labels``: the same providers under other names,
    on other cases), the providers that failed the correctness gate, and the targets (None: a CPU run, not
    evaluated)."""
    print()
    for own in (p for p in ours if p in providers):
        for names in ({}, *labels):
            table = format_speedups(rows, names.get(own, own), [names.get(p, p) for p in providers if p != own])
            print(table, end="\n\n" if table else "")
    print_incorrect(rows)
    print(
        format_targets(targets, target_cases)
        if targets is not None
        else "targets: defined for bf16 on a GPU; not evaluated on this CPU run"
    )


def print_incorrect(rows: Sequence[Row]) -> None:
    """The providers that failed the correctness gate, one line, if any."""
    wrong = sorted({(r.case, r.provider) for r in rows if r.correct is False})
    if wrong:
        print(
            "!!! INCORRECT (output or gradients beyond twice the reference's error; not ranked): "
            + ", ".join(f"{p} on {c}" for c, p in wrong)
        )


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


def script_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose help is the script's docstring ``doc``: summary, then usage, then details (the epilog)."""
    summary, details = doc.split("\n\n", 1)
    return argparse.ArgumentParser(
        description=summary, epilog=details.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )


def output_arguments(
    p: argparse.ArgumentParser,
    benchmark: str,
    *,
    what: str = "rows",
    cpu_help: str = "run the CPU comparison even when a GPU is present",
) -> None:
    """``--no-save`` and ``--results-dir`` (where a run's ``what`` go), and ``--cpu``."""
    p.add_argument("--no-save", action="store_true", help=f"do not append the {what} to the results file")
    p.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help=f"where {benchmark}.jsonl is appended to (default: benchmarks/results)",
    )
    p.add_argument("--cpu", action="store_true", help=cpu_help)


def benchmark_arguments(
    doc: str,
    benchmark: str,
    providers: Sequence[str],
    *,
    quick_help: str = "shorter timing budgets (CI smoke run)",
    dtype_option: bool = True,
    modes_option: bool = True,
    shapes: Collection[str] = (),
) -> argparse.ArgumentParser:
    """The options every benchmark takes (``--quick``, ``--providers``, ``--modes``, ``--dtype`` (these two
    optional), ``--no-save``, ``--results-dir``, ``--cpu``, ``--threads``, and ``--shapes`` when given the
    ``shapes`` names to choose from); ``doc`` is the script's docstring (see :func:`script_parser`). A
    benchmark adds its own options to the returned parser."""
    p = script_parser(doc)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument(
        "--providers",
        type=csv_choices(providers, "provider"),
        default=list(providers),
        help=f"comma-separated subset of {','.join(providers)}",
    )
    if modes_option:
        p.add_argument(
            "--modes",
            type=csv_choices(MODES, "mode"),
            default=list(MODES),
            help=f"comma-separated subset of {','.join(MODES)}",
        )
    if dtype_option:
        p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    output_arguments(p, benchmark)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU runs: torch threads (default 1: spin-waiting threads make timings erratic on a loaded machine)",
    )
    if shapes:
        p.add_argument(
            "--shapes",
            type=csv_choices(tuple(shapes), "shape"),
            default=None,
            help=f"comma-separated subset of {','.join(shapes)} (default: the GPU shapes, or the CPU "
            "shapes without a GPU)",
        )
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
        print(
            f"{why}: {cpu_run} {str(dtype).removeprefix('torch.')} CPU comparison instead of the GPU benchmark "
            "(the times show that the providers run and agree, not kernel performance)"
        )
        note = f"cpu run ({why}): {cpu_run} shapes, not kernel performance"
        torch.set_num_threads(max(1, args.threads))
        # inductor's CPU compile logs a CUDA_HOME guess on a CUDA build of torch without a GPU
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    configure_compile()
    bench = Harness(
        benchmark,
        device="cuda" if on_gpu else "cpu",
        quick=args.quick,
        save=not args.no_save,
        results_dir=args.results_dir,
        note=note,
    )
    return bench, dtype


# ------------------------------------------------------------------------------- a benchmark script
# Each op's script declares a BenchmarkSpec (its shapes, its cases with their providers, work and yardstick,
# its targets) and ends with ``run_benchmark(SPEC)``, which owns the rest.
TRITON_ON_CPU = "triton on CPU runs only under TRITON_INTERPRET=1"


def eager_or_compiled(name: str, fn: Callable, call: Callable[[Callable], torch.Tensor]) -> Impl:
    """The eager peer (``name`` "eager": ``call(fn)``) or its compiled twin (any other ``name``: ``call`` of
    ``torch.compile(fn, dynamic=False)``, its rows noting :data:`COMPILE_NOTE`)."""
    if name == "eager":
        return Impl(lambda: call(fn))
    compiled = torch.compile(fn, dynamic=False)
    return Impl(lambda: call(compiled), note=COMPILE_NOTE)


def triton_unavailable(backend: str, device: torch.device) -> Unavailable | None:
    """Why ``backend`` cannot run on ``device`` when it is triton on the CPU outside the interpreter, else None
    (the op says itself why one of its backends cannot run)."""
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return Unavailable(TRITON_ON_CPU)
    return None


def backend_provider(backend: str, device: torch.device, forward: Callable[[str], torch.Tensor]) -> Impl | Unavailable:
    """One of our backends as a provider: ``forward(backend)``, unless :func:`triton_unavailable`."""
    return triton_unavailable(backend, device) or Impl(lambda: forward(backend))


@dataclass(frozen=True)
class ShapeSet:
    """A benchmark's shapes by name: those of a GPU run (``quick``: the ones ``--quick`` keeps; empty: all), those
    of a CPU run, and whether ``--shapes`` chooses among them all. Called with the parsed arguments and whether
    the run is on a GPU, it returns the shapes to measure."""

    gpu: dict
    cpu: dict
    quick: tuple[str, ...] = ()
    option: bool = True

    @property
    def all(self) -> dict:
        return {**self.gpu, **self.cpu}

    def __call__(self, args: argparse.Namespace, on_gpu: bool) -> list:
        requested = getattr(args, "shapes", None)
        if requested:
            return [self.all[name] for name in requested]
        if on_gpu:
            return [self.gpu[name] for name in (self.quick if args.quick and self.quick else self.gpu)]
        return list(self.cpu.values())


@dataclass(frozen=True)
class Context:
    """What a benchmark's cases are built with: the parsed arguments, the run's harness and dtype."""

    args: argparse.Namespace
    harness: Harness
    dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        return self.harness.device

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class Measurement:
    """One case as :meth:`Harness.run_case` takes it. ``references``: the reference provider, the first of these
    names among ``providers``; ``modes``: None for those of ``--modes`` (all without the option)."""

    case: Case
    providers: dict
    leaves: Sequence[torch.Tensor] | dict[str, torch.Tensor]
    exact: Exact | None = None
    references: tuple[str, ...] = ("eager",)
    modes: Sequence[str] | None = None
    tolerance: Callable | None = None


@dataclass(frozen=True)
class BenchmarkSpec:
    """What an op's benchmark script declares; :func:`run_benchmark` runs it.

    ``doc``: the script's docstring (its ``--help``); ``providers``: every provider's name (``--providers``);
    ``ours``: those whose speed-ups and targets are reported; ``shapes(args, on_gpu)``: the shapes to measure
    (a :class:`ShapeSet`, whose names ``--shapes`` takes when its ``option`` is set); ``cases(shape,
    context)``: the :class:`Measurement` of each case of a shape, made one at a time (each is dropped once run,
    so that the next is made without its inputs; a generator holding inputs in its locals keeps them until
    it resumes); ``targets(rows, dram_bytes_per_s)``: the targets judged on a GPU run's
    rows, on ``target_cases``; ``labels``: other names of the providers in other cases (their speed-up tables
    are printed too); ``options(parser)``: adds the script's own options; ``cpu_run``: what a CPU run's
    shapes are called."""

    name: str
    doc: str
    providers: tuple[str, ...]
    ours: tuple[str, ...]
    shapes: Callable[[argparse.Namespace, bool], Sequence]
    cases: Callable[[object, Context], Iterable[Measurement]]
    targets: Callable[[Sequence[Row], float | None], list[TargetResult]]
    target_cases: tuple[str, ...]
    labels: Sequence[dict[str, str]] = ()
    options: Callable[[argparse.ArgumentParser], None] | None = None
    quick_help: str = "shorter timing budgets (CI smoke run)"
    dtype_option: bool = True
    modes_option: bool = True
    cpu_run: str = "small"

    def parse_args(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        shapes = self.shapes.all if isinstance(self.shapes, ShapeSet) and self.shapes.option else ()
        p = benchmark_arguments(
            self.doc,
            self.name,
            self.providers,
            quick_help=self.quick_help,
            dtype_option=self.dtype_option,
            modes_option=self.modes_option,
            shapes=shapes,
        )
        if self.options is not None:
            self.options(p)
        return p.parse_args(argv)


def run_benchmark(spec: BenchmarkSpec, argv: Sequence[str] | None = None) -> list[Row]:
    """A benchmark script's run: its arguments, the harness (GPU, or the CPU comparison), every case of every
    chosen shape through the correctness gate and the timings, then the speed-ups, the providers found
    incorrect and, on a GPU, the targets. Returns the rows."""
    args = spec.parse_args(argv)
    bench, dtype = start_run(args, spec.name, cpu_run=spec.cpu_run)
    context = Context(args, bench, dtype)
    rows: list[Row] = []
    for shape in spec.shapes(args, context.on_gpu):
        for measurement in spec.cases(shape, context):
            providers = measurement.providers
            rows += bench.run_case(
                measurement.case,
                providers,
                leaves=measurement.leaves,
                modes=measurement.modes or getattr(args, "modes", MODES),
                reference=next((p for p in measurement.references if p in providers), None),
                exact=measurement.exact,
                tolerance=measurement.tolerance,
            )
            del measurement, providers  # the next case's inputs are made without this one's
    targets = spec.targets(rows, bench.spec.bytes_per_s if bench.spec else None) if context.on_gpu else None
    print_summary(rows, args.providers, spec.ours, targets, ", ".join(spec.target_cases), labels=spec.labels)
    return rows
