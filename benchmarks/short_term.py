"""Benchmark: the short-term modules of Table 5 (paper §4.4.2) in one training step each, and their optical flow.

    python benchmarks/short_term.py [--quick] [--cases baseline,stt,netwarp_dis,netwarp_raft,st_ocr]
                                    [--raft-weights PATH] [--steps N] [--warmup N] [--cpu] [--threads N]
                                    [--no-save] [--results-dir DIR]

Cases: the image baseline (``short_term: none``, the query alone), STT (query + 3 adjacent frames), NetWarp
with OpenCV DIS flow and with torchvision RAFT flow (query + 1 adjacent frame) and Spatial-Temporal OCR
(query + 3 adjacent frames), each on the model of configs/table5 (RFCE and GCC off). On a GPU: ResNet-101,
124 classes (VSPW), B = 2 clips at 479x479, bf16 autocast, the kernels as dispatched in training. The RAFT case
needs a local ``raft_large`` state dict (``--raft-weights``, e.g. raft_large_C_T_V1-22a6c225.pth): without one
it is skipped with the reason recorded; nothing is ever downloaded.

Per case:

    step_ms           median of ``--steps`` forward+backward calls (the total loss, dropout as in training; no
                      optimizer step) after ``--warmup`` untimed ones, each ended by a CUDA synchronize. NetWarp
                      is given its flow, as with ``data.flow_in_loader``: the flow is timed apart
    peak_mib          torch.cuda.max_memory_allocated over the warm-up and timed steps, reset per case (weights,
                      gradients, activations); null on the CPU
    flow_ms_per_pair  NetWarp: the flow provider alone (query -> adjacent, B pairs per call, the model's
                      ``optical_flow``), median over ``--steps`` calls after one warm-up, divided by B

One JSON line per case (device, GPU, torch/triton versions, the settings and the figures; a skipped or failed
case says why) is appended to benchmarks/results/short_term.jsonl as soon as the case ends. ``--quick``
(scripts/gpu_check.sh, stage e) takes 1 warm-up and 3 timed steps; the default 3 and 10.

Without a GPU (or with ``--cpu``): a tiny case, labelled ``"tiny": true`` with ``"device": "cpu"``: ResNet-18
with configs/demo.yaml's narrow widths (ST-OCR 64 channels, keys 32), 6 classes, B = 2 at 48x48 (the
baseline's pooling branch needs 2 values per channel in training), fp32, 1 warm-up and 1 timed step. Its
times show that every case runs, not the modules' cost on a GPU.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.ssltm_model import positive_int
from ssltm import SSLTM
from ssltm.flow import make_flow_provider
from ssltm.precision import autocast

BENCHMARK = "short_term"


@dataclass(frozen=True)
class Case:
    """A Table 5 row: the short-term module, its flow provider (None: reads no flow) and its adjacent frames."""

    short_term: str
    flow: str | None
    adjacent: int


CASES = {
    "baseline": Case("none", None, 0),
    "stt": Case("stt", None, 3),
    "netwarp_dis": Case("netwarp", "dis", 1),
    "netwarp_raft": Case("netwarp", "raft", 1),
    "st_ocr": Case("st_ocr", None, 3),
}


@dataclass(frozen=True)
class Setup:
    """One device's model and input: the paper's on a GPU, a tiny one on the CPU."""

    backbone: str
    classes: int
    size: int
    batch: int
    dtype: str
    tiny: bool
    model: dict = field(default_factory=dict)
    short_term_args: dict = field(default_factory=dict)  # per module (``SSLTM(short_term_args=...)``)


GPU = Setup(backbone="resnet101", classes=124, size=479, batch=2, dtype="bf16", tiny=False)
TINY = Setup(
    backbone="resnet18",
    classes=6,
    size=48,
    batch=2,
    dtype="fp32",
    tiny=True,
    model=dict(
        fpn_dim=64,
        ppm_dim=64,
        stt_dims=(16, 16, 32, 32),
        head_dim=16,
        context_dim=64,
        head_channels=64,
        aux_channels=64,
    ),
    short_term_args={"st_ocr": dict(channels=64, key_channels=32)},
)
DTYPES = {"bf16": torch.bfloat16, "fp32": None}  # autocast dtype; None: full precision


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, steps: int) -> float:
    """Median milliseconds of ``steps`` calls of ``fn`` after ``warmup`` untimed ones, each synchronized."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def build_model(setup: Setup, case: Case, raft_weights: Path | None, device: torch.device) -> SSLTM:
    torch.manual_seed(0)
    model = SSLTM(
        setup.classes,
        backbone=setup.backbone,
        num_adjacent=case.adjacent,
        use_rfce=False,
        use_gcc=False,
        short_term=case.short_term,
        short_term_args=setup.short_term_args.get(case.short_term),
        **setup.model,
    )
    if case.flow is not None:
        model.set_flow_provider(make_flow_provider(case.flow, raft_weights))
    return model.to(device).train()


def measure(setup: Setup, case: Case, raft_weights: Path | None, device: torch.device, warmup: int, steps: int):
    """``(step_ms, peak_mib, flow_ms_per_pair, params)`` of ``case`` on ``device``."""
    on_gpu = device.type == "cuda"
    model = build_model(setup, case, raft_weights, device)
    gen = torch.Generator(device=device).manual_seed(0)
    b, side = setup.batch, setup.size
    frames = torch.randn(b, 1 + case.adjacent, 3, side, side, generator=gen, device=device)
    labels = torch.randint(0, setup.classes, (b, side, side), generator=gen, device=device)
    flow_ms = flow = None
    if case.flow is not None:
        query, adjacent = frames[:, 0], frames[:, 1]
        flow_ms = median_ms(lambda: model.optical_flow(query, adjacent), device, 1, steps) / b
        flow = model.optical_flow(query, adjacent)[:, None]  # (B, 1, 2, H, W): query -> the adjacent frame
    dtype = DTYPES[setup.dtype]

    def step() -> None:
        with autocast(device, dtype):
            loss = model(frames, None, labels, flow=flow)["losses"]["total"]
        loss.backward()
        model.zero_grad(set_to_none=True)

    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    step_ms = median_ms(step, device, warmup, steps)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if on_gpu else None
    return step_ms, peak, flow_ms, sum(p.numel() for p in model.parameters())


def run_case(name: str, setup: Setup, args: argparse.Namespace, device: torch.device) -> dict:
    """The JSON record of case ``name``: settings, then the figures or why there are none."""
    case = CASES[name]
    record = {
        "case": name,
        "tiny": setup.tiny,
        **{k: v for k, v in asdict(setup).items() if k not in ("tiny", "model", "short_term_args")},
        **asdict(case),
        "frames": 1 + case.adjacent,
        "model_kwargs": setup.model,
        "short_term_args": setup.short_term_args.get(case.short_term),
        "warmup": args.warmup,
        "steps": args.steps,
        "memory_measure": "torch.cuda.max_memory_allocated" if device.type == "cuda" else None,
        "status": "ok",
        "reason": None,
        "step_ms": None,
        "peak_mib": None,
        "flow_ms_per_pair": None,
        "params": None,
    }
    if case.flow == "raft" and args.raft_weights is None:
        return {**record, "status": "skipped", "reason": "no --raft-weights file (RAFT weights are never downloaded)"}
    try:
        step_ms, peak, flow_ms, params = measure(setup, case, args.raft_weights, device, args.warmup, args.steps)
    except torch.cuda.OutOfMemoryError:
        return {**record, "status": "failed", "reason": "out of memory"}
    except (RuntimeError, ValueError) as err:
        return {**record, "status": "failed", "reason": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {**record, "step_ms": step_ms, "peak_mib": peak, "flow_ms_per_pair": flow_ms, "params": params}


def table(records: list[dict]) -> str:
    f = lambda value, spec: "-" if value is None else format(value, spec)
    body = [
        (
            r["case"],
            r["short_term"],
            r["flow"] or "-",
            r["frames"],
            f(r["step_ms"], ".1f"),
            f(r["peak_mib"], ".0f"),
            f(r["flow_ms_per_pair"], ".1f"),
            r["reason"] if r["status"] != "ok" else "",
        )
        for r in records
    ]
    header = ("case", "short_term", "flow", "frames", "fwd+bwd ms", "peak MiB", "flow ms/pair", "note")
    return harness.text_table(header, body, left=3)


def parse_args(argv=None) -> argparse.Namespace:
    p = harness.script_parser(__doc__)
    p.add_argument("--quick", action="store_true", help="1 warm-up and 3 timed steps (scripts/gpu_check.sh)")
    p.add_argument(
        "--cases",
        type=harness.csv_choices(tuple(CASES), "case"),
        default=list(CASES),
        help=f"comma-separated subset of {','.join(CASES)}",
    )
    p.add_argument("--raft-weights", type=Path, help="local raft_large state dict file for the netwarp_raft case")
    p.add_argument("--steps", type=positive_int, help="timed steps per case (default 10, --quick 3, CPU 1)")
    p.add_argument("--warmup", type=positive_int, help="untimed steps first (default 3, --quick and CPU 1)")
    p.add_argument("--threads", type=positive_int, default=2, help="CPU runs: torch threads (default 2)")
    harness.output_arguments(p, BENCHMARK, cpu_help="run the tiny CPU case even when a GPU is present")
    args = p.parse_args(argv)
    if args.raft_weights is not None and not args.raft_weights.is_file():
        p.error(f"--raft-weights: no file at {args.raft_weights}")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if on_gpu else "cpu")
    setup = GPU if on_gpu else TINY
    if args.steps is None:
        args.steps = 10 if on_gpu and not args.quick else 3 if on_gpu else 1
    if args.warmup is None:
        args.warmup = 3 if on_gpu and not args.quick else 1
    if not on_gpu:
        torch.set_num_threads(args.threads)
    env = harness.environment(device)
    print(
        f"{BENCHMARK}: {setup.backbone}, {setup.classes} classes, B={setup.batch} at {setup.size}x{setup.size}, "
        f"{setup.dtype}, {args.warmup} warm-up + {args.steps} timed steps per case on {env['gpu'] or 'cpu'}"
        + ("" if on_gpu else " (tiny CPU case: no GPU figures)"),
        flush=True,
    )
    path = args.results_dir / f"{BENCHMARK}.jsonl"
    records = []
    for name in args.cases:
        records.append(run_case(name, setup, args, device))
        r = records[-1]
        print(f"{name}: {r['status']}" + (f" ({r['reason']})" if r["reason"] else ""), flush=True)
        if not args.no_save:  # at once: a run cut short keeps the cases it finished
            harness.append_records(path, [r], env, BENCHMARK)
    print(table(records))
    if not args.no_save:
        print(f"records appended to {path}")
    return records


if __name__ == "__main__":
    main()
