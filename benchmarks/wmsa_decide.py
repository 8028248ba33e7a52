"""Decide the window attention's default backend and Triton launch configurations on one GPU.

    python benchmarks/wmsa_decide.py [--full] [--write-configs] [--sections ceilings,gate,peers,sweep,counters]
                                     [--no-save] [--results-dir DIR] [--cpu]

The measurements that decide the defaults, in one run (``--full``: about 8 minutes on an H100/H200):

    ceilings  measured peaks every "% of floor" uses: device-to-device copy bandwidth, a bf16 GEMM, the exp2
              rate of a Triton microkernel (the special-function unit's real ceiling); clocks and versions
    gate      correctness and determinism: backends triton and cuda on large, large-shift, stride4 and an odd
              padded shape; out, dq, dk, dv and dtable within twice the bf16 reference's own error of an fp32
              reference, finite, and a second backward bit-identical
    peers     ours against eager, torch.compile (large and stride4), SDPA with the memory-efficient kernel
              (bias gradient) and with cuDNN (forward only), FlexAttention with default and 64x64 blocks, on
              the six shapes of benchmarks/stt_window_attn.py, fwd and fwd+bwd, with peak memory
    sweep     every configuration of every Triton kernel (CONFIG_SETS) and every choice of the kernels' variants
              (VARIANTS: the bias tile's dtype, owner-written dS sums with each dbias configuration, the
              two-stage reduction), compiled first in parallel processes into the Triton cache, timed on large
              and stride4 with the rest at the defaults; the winners together timed twice (noise)
    counters  Nsight Compute counters of the kernels on large, where ncu runs here (tried once, skipped else)

and, last, the decision table: the default backend (the faster in fwd+bwd on at least 4 of the 6 shapes
within the 2x-reference-error rule; CUDA stays only if it wins large or stride4), each kernel's winning
configuration (``--write-configs``: written with the backend into the shipped
ssltm_kernels/ops/window_attention_3d_configs.json), each shape's bound (time over the measured memory and
exp floors) and the issue's targets.

Without ``--full`` (what ``make gpu-check`` runs with every benchmark): ceilings, the gate on stride16 and
large-shift, and the sweep's default kernel configurations with every variant's choices, within about a
minute; benchmarks/stt_window_attn.py times the peers.
Without a GPU (or with ``--cpu``): the same sections on small fp32 CPU shapes (the Triton kernels only under
TRITON_INTERPRET=1), a smoke run of the code paths, not a decision: nothing is written to the config file.
JSON lines go to benchmarks/results/wmsa_decide.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

import ssltm_kernels.ops.window_attention_3d as op
from benchmarks import harness
from benchmarks.stt_window_attn import (
    GPU_SHAPES,
    Partition,
    Shape,
    _flex_provider,
    build_providers,
    evaluate_targets,
    exact_attention,
    make_inputs,
    split_qkv,
    window_attention_work,
)
from ssltm_kernels._device import device_arch, device_shared_memory, device_sm_count
from ssltm_kernels.numerics import twice_reference_bound
from ssltm_kernels.ops.window_attention_3d import (
    CONFIG_SETS,
    KERNELS,
    VARIANTS,
    LaunchConfigs,
    config_key,
    default_configs,
    forced_launch_configs,
    window_attention_3d,
    window_attention_3d_reference,
)

BENCHMARK = "wmsa_decide"
SECTIONS = ("ceilings", "gate", "peers", "sweep", "counters")
QUICK_SECTIONS = ("ceilings", "gate", "sweep")
ODD = Shape("odd", B=1, T=5, H=37, W=45, C=96, heads=3, shift=(2, 3, 3))  # pads every axis, 3 heads
SHAPES = {**GPU_SHAPES, ODD.name: ODD}
GATE_SHAPES, QUICK_GATE_SHAPES = ("large", "large-shift", "stride4", "odd"), ("stride16", "large-shift")
PEER_SHAPES = tuple(GPU_SHAPES)
COMPILE_SHAPES = ("large", "stride4")  # torch.compile is the slow peer: two shapes only
SWEEP_SHAPES = ("large", "stride4")
# What the sweep chooses, one after another: each kernel's configuration (dbias: with the owner-written dS sums
# too) and the variants that are not a kernel's
KNOBS = (*KERNELS, *(name for name in VARIANTS if name != "dbias_sum"))
CPU_GATE = Shape("cpu-gate", B=1, T=3, H=8, W=9, C=16, heads=1, window=(2, 5, 7), shift=(1, 2, 3))
BACKENDS = ("triton", "cuda")
NCU_METRICS = (
    "gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,"
    "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum,"
    "smsp__inst_executed_pipe_xu.sum,sm__inst_executed_pipe_fma.sum,"
    "sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,"
    "launch__occupancy_limit_registers"
)


class Run:
    """The run's device, dtype, timing and records (appended to the results file at the end)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.on_gpu = torch.cuda.is_available() and not args.cpu
        self.device = torch.device("cuda" if self.on_gpu else "cpu")
        self.dtype = torch.bfloat16 if self.on_gpu else torch.float32
        self.full = args.full
        note = None if self.on_gpu else "cpu smoke run: small shapes, not a decision"
        self.harness = harness.Harness(
            BENCHMARK,
            device=self.device,
            quick=not args.full,
            save=not args.no_save,
            results_dir=args.results_dir,
            note=note,
        )
        self.records: list[dict] = []

    def bench(self, fn, warmup_ms: float = 10, rep_ms: float = 40) -> float:
        """Median ms of ``fn`` (do_bench on a GPU, which flushes L2); on the CPU one call (the smoke run
        times code paths, not kernels)."""
        if self.on_gpu:
            from triton.testing import do_bench

            return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    def record(self, section: str, **fields) -> dict:
        self.records.append(record := {"section": section, **fields})
        return record


# ------------------------------------------------------------------------------------------------ ceilings
if op.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _exp2_chain_kernel(X, Y, ITERS: tl.constexpr, BLOCK: tl.constexpr):
        """``ITERS`` dependent exp2 per element (8 independent chains per thread): the exp2 issue rate."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + offs)
        for _ in range(ITERS):
            x = tl.math.exp2(x * -0.25)
        tl.store(Y + offs, x)


def _copy_rate(run: Run, elements: int) -> float:
    """Device-to-device bytes/s of a bf16 copy (read and write)."""
    src = torch.empty(elements, dtype=torch.bfloat16, device=run.device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / (run.bench(lambda: dst.copy_(src)) * 1e-3)


def _gemm_rate(run: Run, n: int) -> float:
    """FLOP/s of an n x n x n bf16 GEMM."""
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=run.device) for _ in range(2))
    return 2 * n**3 / (run.bench(lambda: a @ b) * 1e-3)


def _exp_rate(run: Run, blocks: int, block: int = 1024, iters: int = 512) -> float:
    """exp2/s of the microkernel."""
    x = torch.rand(blocks * block, device=run.device)
    y = torch.empty_like(x)
    ms = run.bench(lambda: _exp2_chain_kernel[(blocks,)](x, y, ITERS=iters, BLOCK=block, num_warps=4))
    return x.numel() * iters / (ms * 1e-3)


def measure_ceilings(run: Run) -> dict:
    """Copy bandwidth, GEMM rate, exp2 rate (None without a GPU), clocks and versions."""
    if not run.on_gpu:
        print("ceilings: measured on a GPU only")
        return run.record("ceilings", copy_bytes_per_s=None, gemm_flops=None, exp_per_s=None)
    sms = device_sm_count(run.device)
    ceilings = {
        "copy_bytes_per_s": _copy_rate(run, 2**30 if run.full else 2**27),  # bf16: 2 GiB (quick 256 MiB)
        "gemm_flops": _gemm_rate(run, 8192 if run.full else 4096),
        "exp_per_s": _exp_rate(run, 64 * sms),
    }
    smi = shutil.which("nvidia-smi")
    clocks = (
        subprocess.run([smi, "-q", "-d", "CLOCK,POWER"], capture_output=True, text=True, timeout=20).stdout
        if smi
        else None
    )
    print(
        f"ceilings: copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 GEMM "
        f"{ceilings['gemm_flops'] / 1e12:.0f} TFLOP/s, exp2 {ceilings['exp_per_s'] / 1e12:.2f} T/s"
    )
    return run.record("ceilings", **ceilings, cudnn=torch.backends.cudnn.version(), nvidia_smi=clocks)


# ---------------------------------------------------------------------------------------------------- gate
def _forward_backward(shape: Shape, qkv: torch.Tensor, table: torch.Tensor, backend: str | None, grad: torch.Tensor):
    """out and the gradients of qkv and the table (q, k, v views of qkv); backend None: the reference."""
    qkv, table = (x.detach().requires_grad_() for x in (qkv, table))
    kwargs = dict(
        window_size=shape.window, rel_pos_bias_table=table, shift_size=shape.shift, scale=shape.head_dim**-0.5
    )
    fn = window_attention_3d_reference if backend is None else partial(window_attention_3d, backend=backend)
    out = fn(*split_qkv(qkv, shape.heads), **kwargs)
    return (out, *torch.autograd.grad(out, (qkv, table), grad.to(out.dtype)))


def gate(run: Run, shape: Shape, backend: str) -> dict:
    """The 2x-reference-error rule on out, dq, dk, dv, dtable, finiteness, and a bit-identical second backward."""
    qkv, table = make_inputs(shape, run.dtype, run.device)
    grad = torch.randn(
        shape.B,
        shape.T,
        shape.H,
        shape.W,
        shape.heads,
        shape.head_dim,
        device=run.device,
        generator=torch.Generator(run.device).manual_seed(1),
    )
    try:
        ours = _forward_backward(shape, qkv, table, backend, grad)
    except Exception as error:  # a backend that cannot run here is a row, not a crash
        return run.record("gate", case=shape.name, backend=backend, ok=None, error=f"{type(error).__name__}: {error}")
    again = _forward_backward(shape, qkv, table, backend, grad)
    low = _forward_backward(shape, qkv, table, None, grad)
    exact = torch.float64 if not run.on_gpu else torch.float32
    ref = _forward_backward(shape, qkv.to(exact), table.to(exact), None, grad.to(exact))

    def parts(result):
        out, dqkv, dtable = result
        return {
            "out": out,
            **dict(zip(("dq", "dk", "dv"), dqkv.unflatten(-1, (3, -1)).unbind(-2), strict=True)),
            "dtable": dtable,
        }

    errors, ok = {}, True
    mine, lows, refs = parts(ours), parts(low), parts(ref)
    for name, a in mine.items():
        err = (a.double() - refs[name].double()).abs().max().item()
        bound = twice_reference_bound(lows[name], refs[name], run.dtype)
        errors[name] = {"err": err, "bound": bound, "rel": err / max(refs[name].abs().max().item(), 1e-30)}
        ok &= bool(torch.isfinite(a).all()) and err <= bound
    deterministic = all(torch.equal(x, y) for x, y in zip(ours[1:], again[1:], strict=True))
    return run.record(
        "gate", case=shape.name, backend=backend, ok=ok and deterministic, errors=errors, deterministic=deterministic
    )


# --------------------------------------------------------------------------------------------------- peers
def peer_providers(run: Run, shape: Shape, qkv: torch.Tensor, table: torch.Tensor) -> dict:
    """stt_window_attn's providers; on a GPU SDPA per backend and Flex with 64x64 blocks added and compile
    only on the shapes COMPILE_SHAPES."""
    names = ["eager", "sdpa", "flex", "triton", "cuda"]
    if run.on_gpu and shape.name in COMPILE_SHAPES:
        names.insert(1, "compile")
    providers = build_providers(names, shape, qkv, table)
    if not run.on_gpu:
        return providers
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa = providers.pop("sdpa")
    for name, backend, modes in (
        ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION, ("fwd", "fwd+bwd")),
        ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION, ("fwd",)),
    ):

        def forward(backend=backend):
            with sdpa_kernel(backend):
                return sdpa.fn()

        providers[name] = harness.Impl(
            forward, modes=modes, reason="cuDNN SDPA returns no bias gradient", note=backend.name
        )
    providers["flex-64"] = _flex_provider(
        Partition(shape, qkv.device),
        qkv,
        table,
        shape.head_dim**-0.5,
        compiled=True,
        kernel_options={"BLOCK_M": 64, "BLOCK_N": 64},
    )
    return providers


def peers(run: Run, shapes: Sequence[Shape]) -> list[harness.Row]:
    rows = []
    for shape in shapes:
        qkv, table = make_inputs(shape, run.dtype, run.device)
        case = harness.Case(
            shape.name,
            shape.record(),
            run.dtype,
            {m: window_attention_work(shape, run.dtype, m) for m in ("fwd", "fwd+bwd")},
            title=shape.title(run.dtype),
        )
        rows += run.harness.run_case(
            case,
            peer_providers(run, shape, qkv, table),
            leaves=[qkv, table],
            modes=("fwd", "fwd+bwd"),
            reference="eager",
            exact=harness.Exact(partial(exact_attention, shape)),
        )
    return rows


# --------------------------------------------------------------------------------------------------- sweep
def _compile_unit(
    arch: int, dtype: torch.dtype, shape: Shape, configs: LaunchConfigs, ints: dict, shared: int, index: int
) -> str:
    """Compile kernel ``index`` of the shape's launch with ``configs`` (a worker process; fills the cache)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    specs = list(
        op.triton_compile_specs(
            dtype,
            shape.geom.window,
            shape.head_dim,
            shape.geom.shift,
            pad=False,
            int_arg=lambda name: ints.get(name, 16),
            shared_memory=shared,
            configs=configs,
        )
    )
    name, kernel, signature, constexprs, attrs, options = specs[index]
    try:
        triton.compile(
            ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=options
        )
    except Exception as error:  # the launch compiles it again and reports
        return f"FAIL {name}: {type(error).__name__}: {error}"
    return f"ok {name}"


def launch_ints(shape: Shape) -> dict:
    """The integer arguments a launch on ``shape`` passes the Triton kernels (those it specialises them on)."""
    q = split_qkv(torch.empty(shape.B, shape.T, shape.H, shape.W, 3 * shape.C, device="meta"), shape.heads)[0]
    return op.launch_integers(q, shape.B * shape.geom.num_windows, 1, packed_grad=False)


def precompile(run: Run, work: Sequence[tuple[Shape, LaunchConfigs]]) -> None:
    """The kernels of each (shape, configurations) compiled in parallel processes into the Triton cache that
    the launches then hit, specialised on the shape's launch integers (best effort: a launch whose
    specialisation differs compiles itself); a kernel several configurations share (configurations that
    differ in one kernel or variant) is compiled once."""
    if not run.on_gpu:
        return
    import multiprocessing

    arch, shared = device_arch(run.device), device_shared_memory(run.device)
    units, seen = [], set()
    for shape, configs in dict.fromkeys(work):
        ints = launch_ints(shape)
        specs = op.triton_compile_specs(
            run.dtype,
            shape.geom.window,
            shape.head_dim,
            shape.geom.shift,
            pad=False,
            int_arg=lambda name, ints=ints: ints.get(name, 16),
            shared_memory=shared,
            configs=configs,
        )
        for index, spec in enumerate(specs):
            if op.spec_key(spec) not in seen:
                seen.add(op.spec_key(spec))
                units.append((arch, run.dtype, shape, configs, ints, shared, index))
    start = time.perf_counter()
    with ProcessPoolExecutor(min(12, os.cpu_count() or 1), mp_context=multiprocessing.get_context("spawn")) as pool:
        reports = list(pool.map(_compile_unit, *zip(*units, strict=True)))
    failed = [line for line in reports if line.startswith("FAIL")]
    print(
        f"precompiled {len(units)} kernels in {time.perf_counter() - start:.0f} s, {len(failed)} failed",
        *failed,
        sep="\n",
    )


def _time_kernel(run: Run, shape: Shape, configs: LaunchConfigs, kernel: str, inputs) -> float:
    """ms of the forward (kernel "fwd") or of the backward (the others) of the triton backend."""
    qkv, table, grad = inputs
    kwargs = dict(
        window_size=shape.window,
        rel_pos_bias_table=table,
        shift_size=shape.shift,
        scale=shape.head_dim**-0.5,
        backend="triton",
    )
    with forced_launch_configs(configs):
        if kernel == "fwd":
            with torch.no_grad():
                return run.bench(lambda: window_attention_3d(*split_qkv(qkv, shape.heads), **kwargs))
        out = window_attention_3d(*split_qkv(qkv, shape.heads), **kwargs)
        return run.bench(lambda: torch.autograd.grad(out, (qkv, table), grad, retain_graph=True))


def candidates(knob: str, defaults: LaunchConfigs, every: bool) -> list[dict]:
    """The choices the sweep times for ``knob``, as ``replace`` arguments of the defaults: a kernel's
    configurations (``every``: its whole set, else its default), for dbias each also with the owner-written dS
    sums (one group: its blocks set its parallelism), or a variant's choices."""
    if knob in VARIANTS:
        return [{knob: choice} for choice in VARIANTS[knob]]
    configs = CONFIG_SETS[knob] if every else (getattr(defaults, knob),)
    choices = [{knob: cfg} for cfg in configs]
    if knob == "dbias":
        choices += [{knob: cfg, "dbias_sum": "owner"} for cfg in configs if cfg.group_mult == 1]
    return choices


def candidate_label(choice: dict) -> str:
    return " ".join(value.label if name in KERNELS else f"{name}={value}" for name, value in choice.items())


def _time_knob(run: Run, shape: Shape, configs: LaunchConfigs, knob: str, inputs, timed: dict) -> float:
    """ms of what ``knob`` changes: the forward (fwd), forward plus backward (the bias tile's dtype, which
    every kernel reads), else the backward. ``timed``: the shape's times so far by (configurations, forward),
    so that a configuration several knobs share (the defaults) is timed once."""
    total = 0.0
    for forward in (True, False) if knob == "bias_dtype" else (knob == "fwd",):
        if (configs, forward) not in timed:
            timed[configs, forward] = _time_kernel(run, shape, configs, "fwd" if forward else "bwd", inputs)
        total += timed[configs, forward]
    return total


def sweep_plans(run: Run, shapes: Sequence[Shape]) -> dict:
    """{shape: (its default configurations, {knob: the choices to time})} of the shapes Triton runs here."""
    plans = {}
    for shape in shapes:
        if not op.can_run_triton(
            *split_qkv(torch.empty(1, *shape.geom.sizes, 3 * shape.C, device=run.device, dtype=run.dtype), shape.heads),
            window_size=shape.window,
        ):
            print(f"sweep: triton cannot run {shape.name} here")
            continue
        defaults = default_configs(shape.geom.tokens_per_window, shape.head_dim, run.dtype)
        plans[shape] = defaults, {knob: candidates(knob, defaults, run.full) for knob in KNOBS}
    return plans


def sweep_work(plans: dict) -> list[tuple[Shape, LaunchConfigs]]:
    """Every (shape, configurations) the sweep of ``plans`` launches, for ``precompile``."""
    return [
        (shape, replace(defaults, **choice))
        for shape, (defaults, plan) in plans.items()
        for choices in plan.values()
        for choice in choices
    ]


def sweep(run: Run, plans: dict) -> dict:
    """Per shape of ``plans`` (``sweep_plans``): each knob's choices timed (the rest at the defaults), the
    winners together timed twice. Returns {shape: LaunchConfigs of the winners}."""
    winners = {}
    for shape, (defaults, plan) in plans.items():
        qkv, table = make_inputs(shape, run.dtype, run.device)
        grad = torch.randn(
            shape.B,
            shape.T,
            shape.H,
            shape.W,
            shape.heads,
            shape.head_dim,
            device=run.device,
            dtype=run.dtype,
            generator=torch.Generator(run.device).manual_seed(2),
        )
        best, timed = {}, {}
        for knob, choices in plan.items():
            times = []
            for choice in choices:
                label = candidate_label(choice)
                try:
                    ms = _time_knob(run, shape, replace(defaults, **choice), knob, (qkv, table, grad), timed)
                except Exception as error:  # a configuration that fails is reported, not chosen
                    print(f"sweep: {shape.name} {knob} {label}: {type(error).__name__}: {error}")
                    ms = math.inf
                times.append((choice, label, ms))
                run.record("sweep", case=shape.name, kernel=knob, config=label, ms=ms)
            fastest = min(times, key=lambda entry: entry[2])[0]
            best.update(fastest)
            print(
                harness.text_table(
                    ("case", "kernel", "config", "ms", ""),
                    [
                        (shape.name, knob, label, f"{ms:.4f}", "<- best" if choice is fastest else "")
                        for choice, label, ms in times
                    ],
                )
            )
        winners[shape.name] = chosen = replace(defaults, **best)
        twice = [_time_kernel(run, shape, chosen, kernel, (qkv, table, grad)) for kernel in ("fwd", "dq") * 2]
        noise = abs(twice[1] - twice[3]) / max(twice[1], 1e-9)
        print(
            f"sweep: {shape.name} winners fwd {twice[0]:.4f}/{twice[2]:.4f} ms, bwd {twice[1]:.4f}/"
            f"{twice[3]:.4f} ms (noise {100 * noise:.1f}%)"
        )
        run.record("sweep-best", case=shape.name, configs=chosen.to_json(), fwd_ms=twice[::2], bwd_ms=twice[1::2])
    return winners


# ------------------------------------------------------------------------------------------------ counters
def counters(run: Run) -> None:
    """Nsight Compute metrics of the Triton kernels on large, where ncu can read counters here."""
    ncu = shutil.which("ncu")
    if not run.on_gpu or ncu is None:
        print("counters: skipped (" + ("no GPU" if not run.on_gpu else "ncu not found") + ")")
        return
    command = [
        ncu,
        "--clock-control",
        "none",
        "--csv",
        "--metrics",
        NCU_METRICS,
        "-k",
        "regex:window_attn",
        sys.executable,
        __file__,
        "--ncu-target",
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        print("counters: ncu took over 90 s, skipped")
        return
    lines = [line for line in result.stdout.splitlines() if line.startswith('"')]
    print(f"counters: ncu exit {result.returncode}, {len(lines)} metric lines", *lines[:40], sep="\n")
    run.record("counters", returncode=result.returncode, csv=lines, stderr=result.stderr[-2000:])


def ncu_target() -> None:
    """One forward and backward of the large shape (what ``counters`` profiles)."""
    shape = GPU_SHAPES["large"]
    qkv, table = make_inputs(shape, torch.bfloat16, torch.device("cuda"))
    out = window_attention_3d(
        *split_qkv(qkv, shape.heads), window_size=shape.window, rel_pos_bias_table=table, backend="triton"
    )
    out.float().sum().backward()
    torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ decision
def default_backend(rows: Sequence[harness.Row], gates: Sequence[dict]) -> tuple[str | None, str]:
    """The faster of triton and cuda in fwd+bwd on at least 4 of the 6 shapes (only a backend that passed
    the gate on the shape counts); CUDA stays the default only if it wins large or stride4."""
    failed = {(g["case"], g["backend"]) for g in gates if g.get("ok") is False}
    ms = {
        (r.case, r.provider): r.ms
        for r in rows
        if r.ok and r.mode == "fwd+bwd" and r.correct is not False and (r.case, r.provider) not in failed
    }
    wins = {"triton": [], "cuda": []}
    for case in dict.fromkeys(r.case for r in rows):
        timed = {b: ms[case, b] for b in BACKENDS if (case, b) in ms}
        if timed:
            wins[min(timed, key=timed.get)].append(case)
    if not wins["triton"] and not wins["cuda"]:
        return None, "no fwd+bwd time of either backend"
    why = f"triton wins {wins['triton']}, cuda wins {wins['cuda']}"
    if any(case in wins["cuda"] for case in ("large", "stride4")):
        return "cuda", why + ": cuda wins large or stride4"
    return ("triton" if len(wins["triton"]) >= 4 else "cuda"), why


def bounds(run: Run, rows: Sequence[harness.Row], ceilings: dict) -> list[tuple]:
    """Per shape and mode, our time over the measured memory and exp floors."""
    body = []
    for r in rows:
        if r.provider not in BACKENDS or not r.ok or r.case not in SHAPES:
            continue
        work = window_attention_work(SHAPES[r.case], run.dtype, r.mode)
        floors = {
            "memory": work.bytes / ceilings["copy_bytes_per_s"] if ceilings.get("copy_bytes_per_s") else None,
            "exp": work.exps / ceilings["exp_per_s"] if ceilings.get("exp_per_s") else None,
        }
        floors = {k: v * 1e3 for k, v in floors.items() if v}
        if floors:
            limiter = max(floors, key=floors.get)
            body.append(
                (
                    r.case,
                    r.provider,
                    r.mode,
                    f"{r.ms:.4f}",
                    f"{floors[limiter]:.4f}",
                    limiter,
                    f"{r.ms / floors[limiter]:.2f}x",
                )
            )
    return body


def write_configs(run: Run, winners: dict, backend: str | None) -> Path:
    """The winners (per device and shape key) and the default backend into the shipped config file."""
    path = op.CONFIG_FILE
    doc = json.loads(path.read_text()) if path.exists() else {"configs": {}}
    name = torch.cuda.get_device_name(run.device)
    stamp = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **{k: run.harness.env[k] for k in ("commit", "torch", "triton", "cuda")},
    }
    for case, configs in winners.items():
        shape = SHAPES[case]
        key = config_key(name, shape.geom.tokens_per_window, shape.head_dim, shape.heads, run.dtype, shape.geom.shifted)
        doc.setdefault("configs", {})[key] = configs.to_json()
        doc.setdefault("measured", {})[key] = {**stamp, "case": case}
    if backend is not None:
        doc.setdefault("default_backend", {})[name] = backend
        doc.setdefault("measured", {})[f"default_backend|{name}"] = stamp
    path.write_text(json.dumps(doc, indent=1) + "\n")
    op._config_file.cache_clear()  # this process's later launches take what was written
    op.launch_configs.cache_clear()
    return path


def decide(run: Run, ceilings: dict, gates: list[dict], rows: list[harness.Row], winners: dict, write: bool) -> dict:
    print("\n==== decision")
    backend, why = default_backend(rows, gates) if rows else (None, "peers not run")
    print(f"default backend: {backend or '-'} ({why})")
    for case, configs in winners.items():
        print(
            f"winning configurations on {case}: "
            + ", ".join(f"{k} {getattr(configs, k).label}" for k in KERNELS)
            + (f", {configs.variant_label}" if configs.variant_label else "")
        )
    table = bounds(run, rows, ceilings)
    if table:
        print(harness.text_table(("case", "backend", "mode", "ms", "floor ms", "bound", "time / floor"), table, left=3))
    gate_failures = [(g["case"], g["backend"]) for g in gates if g.get("ok") is False]
    print("gate: " + ("every backend that ran passed" if not gate_failures else f"FAILED on {gate_failures}"))
    if rows and run.on_gpu:
        print(harness.format_targets(evaluate_targets(rows, cases=("large", "stride4")), "large, stride4"))
    written = None
    if write and run.on_gpu and (winners or backend):
        written = str(write_configs(run, winners, backend if run.full else None))
        print(f"written to {written}")
    elif write:
        print("not written: " + ("a CPU run decides nothing" if not run.on_gpu else "nothing measured"))
    return run.record(
        "decision",
        default_backend=backend,
        why=why,
        bounds=table,
        gate_failures=gate_failures,
        winners={k: v.to_json() for k, v in winners.items()},
        written=written,
    )


# -------------------------------------------------------------------------------------------- command line
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = harness.script_parser(__doc__)
    p.add_argument("--full", action="store_true", help="the whole decision run (about 8 minutes on an H100/H200)")
    p.add_argument(
        "--sections",
        type=harness.csv_choices(SECTIONS, "section"),
        default=None,
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all with --full, else "
        f"{','.join(QUICK_SECTIONS)})",
    )
    p.add_argument(
        "--write-configs",
        action="store_true",
        help="write the winning configurations (and, with --full, the default backend) into the shipped config file",
    )
    harness.output_arguments(p, BENCHMARK, what="records", cpu_help="the CPU smoke run even when a GPU is present")
    p.add_argument("--ncu-target", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.ncu_target:
        ncu_target()
        return {}
    sections = args.sections or (SECTIONS if args.full else QUICK_SECTIONS)
    run = Run(args)
    harness.configure_compile()
    if not run.on_gpu:
        torch.set_num_threads(1)
        print(
            "no GPU" if not args.cpu else "--cpu given",
            "-> CPU smoke run on small fp32 shapes: the code paths, not a decision",
        )
    start = time.perf_counter()
    gate_names = GATE_SHAPES if run.full else QUICK_GATE_SHAPES
    plans = (
        sweep_plans(run, [SHAPES[n] for n in SWEEP_SHAPES] if run.on_gpu else [CPU_GATE]) if "sweep" in sections else {}
    )
    precompile(
        run,
        [
            (SHAPES[n], default_configs(SHAPES[n].geom.tokens_per_window, SHAPES[n].head_dim, run.dtype))
            for n in (*gate_names, *(PEER_SHAPES if "peers" in sections else ()))
        ]
        + sweep_work(plans),
    )
    ceilings = measure_ceilings(run) if "ceilings" in sections else {}
    gates, rows, winners = [], [], {}
    if "gate" in sections:
        shapes = [SHAPES[n] for n in gate_names] if run.on_gpu else [CPU_GATE]
        gates = [gate(run, shape, backend) for shape in shapes for backend in BACKENDS]
        print(
            harness.text_table(
                ("case", "backend", "ok", "errors (max abs / bound of the 2x rule)"),
                [
                    (
                        g["case"],
                        g["backend"],
                        g["ok"],
                        g.get("error")
                        or ", ".join(f"{k} {v['err']:.1e}/{v['bound']:.1e}" for k, v in g["errors"].items()),
                    )
                    for g in gates
                ],
            )
        )
    if "peers" in sections:
        rows = peers(run, [SHAPES[n] for n in PEER_SHAPES] if run.on_gpu else [CPU_GATE])
    if "sweep" in sections:
        winners = sweep(run, plans)
    if "counters" in sections:
        counters(run)
    decision = decide(run, ceilings, gates, rows, winners, args.write_configs)
    print(f"\n{BENCHMARK}: {time.perf_counter() - start:.0f} s")
    if not args.no_save:
        harness.append_records(run.harness.path, run.records, run.harness.env, BENCHMARK)
    return decision


if __name__ == "__main__":
    main()
