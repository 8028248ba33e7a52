"""Benchmark: the short-term modules of Table 5 (paper §4.4.2) in one training step each, and their optical flow.

    python benchmarks/short_term.py [--quick] [--cases baseline,stt,netwarp_dis,netwarp_raft,st_ocr,cffm,sparse_tt,
                                                       cffm_keys,sparse_tt_gather]
                                    [--raft-weights PATH] [--steps N] [--warmup N] [--cpu] [--threads N]
                                    [--no-save] [--results-dir DIR]

Cases: the image baseline (``short_term: none``, the query alone), STT (query + 3 adjacent frames), NetWarp with
OpenCV DIS flow and with torchvision RAFT flow (query + 1 adjacent frame) and Spatial-Temporal OCR (query + 3
adjacent frames), CFFM (query + 3 adjacent frames, configs/table5/cffm.yaml's offsets 3, 6, 9) and the Sparse
Temporal Transformer (query + 6 adjacent frames at offsets 1..6, as configs/sparse_tt/vspw_r101.yaml), each on the
model of configs/table5 (RFCE and GCC off). On a GPU: ResNet-101, 124 classes (VSPW), B = 2 clips at 479x479, bf16
autocast, the kernels as dispatched in training. The RAFT case needs a local ``raft_large`` state dict
(``--raft-weights``, e.g. raft_large_C_T_V1-22a6c225.pth): without one it is skipped with the reason recorded;
nothing is ever downloaded.

Per case:

    step_ms           median of ``--steps`` forward+backward calls (the total loss, dropout as in training; no
                      optimizer step) after ``--warmup`` untimed ones, each ended by a CUDA synchronize. NetWarp
                      is given its flow, as with ``data.flow_in_loader``: the flow is timed apart
    peak_mib          torch.cuda.max_memory_allocated over the warm-up and timed steps, reset per case (weights,
                      gradients, activations); null on the CPU
    flow_ms_per_pair  NetWarp: the flow provider alone (query -> adjacent, B pairs per call, the model's
                      ``optical_flow``), median over ``--steps`` calls after one warm-up, divided by B

Two micro-benchmarks time one block's key/value gathering alone on stride-8 maps, B = 2, inputs in bf16 on a GPU:
``cffm_keys`` (``ssltm.model.cffm.cffm_keys`` for the keys and for the values: four rolls and four unfolds, 289
keys per 7x7 window) on a 60x60 map of 256 channels (zero-padded to 63x63) with 4 frames' pooled maps, and
``sparse_tt_gather`` (``SparseTemporalBlock.gather``: 527 keys per query, offsets 1..6, s = 1, e = 5, eps = 1)
of the 1,800 queries (TR = 0.5) of a 60x60 map of 1024 channels (the fused feature) over 7 frames. Each: the
median of ``--steps`` forward calls (``fwd_ms``) and of as many forward+backward ones (``fwd_bwd_ms``, all-ones
output gradients) after ``--warmup`` untimed ones, and the peak memory over both (``peak_mib``).

One JSON line per case and per micro-benchmark (``"micro"`` instead of ``"case"``; device, GPU, torch/triton
versions, the settings and the figures; a skipped or failed case says why) is appended to
benchmarks/results/short_term.jsonl as soon as the case ends. ``--quick`` (scripts/gpu_check.sh, stage e, 30 s)
takes 1 warm-up and 3 timed steps and leaves the cffm and sparse_tt training steps out (the micro-benchmarks stay):
the full run, every case, 3 warm-up and 10 timed steps, is a second call.

Without a GPU (or with ``--cpu``): a tiny case, labelled ``"tiny": true`` with ``"device": "cpu"``: ResNet-18 with
configs/demo.yaml's narrow widths (ST-OCR 64 channels, keys 32; CFFM 32 wide), 6 classes, B = 2 at 48x48 (the
baseline's pooling branch needs 2 values per channel in training), fp32, 1 warm-up and 1 timed step; the
micro-benchmarks on 12x12 maps of 32 channels. Its times show that every case runs, not the modules' cost on a GPU.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.ssltm_model import positive_int
from benchmarks.train_steps import DTYPES, guarded, median_ms
from ssltm import SSLTM
from ssltm.flow import make_flow_provider
from ssltm.model.cffm import NUM_FRAMES, NUM_KEYS, SEGMENTS, WINDOW, cffm_keys
from ssltm.model.sparse_tt import SparseTemporalBlock
from ssltm.precision import autocast

BENCHMARK = "short_term"


@dataclass(frozen=True)
class Case:
    """A Table 5 row: the short-term module, its flow provider (None: reads no flow) and its adjacent frames."""

    short_term: str
    flow: str | None
    adjacent: int
    offsets: tuple[int, ...] | None = None  # the adjacent frames' offsets, where the module reads them


CASES = {
    "baseline": Case("none", None, 0),
    "stt": Case("stt", None, 3),
    "netwarp_dis": Case("netwarp", "dis", 1),
    "netwarp_raft": Case("netwarp", "raft", 1),
    "st_ocr": Case("st_ocr", None, 3),
    "cffm": Case("cffm", None, 3),  # configs/table5/cffm.yaml: offsets [3, 6, 9] (the module reads only their order)
    "sparse_tt": Case("sparse_tt", None, 6, offsets=(1, 2, 3, 4, 5, 6)),  # configs/sparse_tt/vspw_r101.yaml
}
# The token assembly of one block alone: CFFM's key/value gathering (``cffm_keys``, for keys and values) and
# Sparse-TT's (``SparseTemporalBlock.gather``, 527 keys per query with offsets 1..6, s = 1, e = 5, eps = 1).
MICRO = ("cffm_keys", "sparse_tt_gather")
QUICK = ("baseline", "stt", "netwarp_dis", "netwarp_raft", "st_ocr", *MICRO)  # stage e's 30 s


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
    micro_size: int = 60  # the micro-benchmarks' stride-8 map side
    micro_channels: dict = field(default_factory=lambda: {"cffm_keys": 256, "sparse_tt_gather": 1024})


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
    short_term_args={"st_ocr": dict(channels=64, key_channels=32), "cffm": dict(dim=32)},
    micro_size=12,
    micro_channels={"cffm_keys": 32, "sparse_tt_gather": 32},
)
SETUP_ONLY = ("tiny", "model", "short_term_args", "micro_size", "micro_channels")  # not in a case's record


def module_args(setup: Setup, case: Case) -> dict | None:
    """The case's ``short_term_args``: the setup's for its module, and its offsets where the module reads them."""
    args = setup.short_term_args.get(case.short_term)
    if case.offsets is not None:
        args = {**(args or {}), "offsets": case.offsets}
    return args


def build_model(setup: Setup, case: Case, raft_weights: Path | None, device: torch.device) -> SSLTM:
    torch.manual_seed(0)
    model = SSLTM(
        setup.classes,
        backbone=setup.backbone,
        num_adjacent=case.adjacent,
        use_rfce=False,
        use_gcc=False,
        short_term=case.short_term,
        short_term_args=module_args(setup, case),
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
        **{k: v for k, v in asdict(setup).items() if k not in SETUP_ONLY},
        **asdict(case),
        "frames": 1 + case.adjacent,
        "model_kwargs": setup.model,
        "short_term_args": module_args(setup, case),
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

    def figures() -> dict:
        step_ms, peak, flow_ms, params = measure(setup, case, args.raft_weights, device, args.warmup, args.steps)
        return {"step_ms": step_ms, "peak_mib": peak, "flow_ms_per_pair": flow_ms, "params": params}

    return guarded(record, figures, device)


def micro_work(name: str, setup: Setup, device: torch.device) -> tuple[dict, Callable[[], tuple[torch.Tensor, ...]]]:
    """The settings and the tensors-returning call of micro-benchmark ``name`` on ``setup.micro_size`` stride-8
    maps of ``setup.micro_channels[name]`` channels, B = ``setup.batch``, inputs in the setup's dtype (as the
    blocks' linear layers give them under autocast) and needing gradients."""
    torch.manual_seed(0)
    b, side, c = setup.batch, setup.micro_size, setup.micro_channels[name]
    dtype = DTYPES[setup.dtype] or torch.float32
    rand = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)  # noqa: E731
    if name == "cffm_keys":
        n = -(-side // WINDOW)  # windows per side of the zero-padded map
        pooled = [[rand(b, n * per, n * per, c) for _, _, per in SEGMENTS] for _ in range(2)]
        k, v = rand(b, n * WINDOW, n * WINDOW, c), rand(b, n * WINDOW, n * WINDOW, c)
        settings = {"frames": NUM_FRAMES, "windows": n * n, "keys": NUM_KEYS, "queries": n * n * WINDOW**2}
        return settings, lambda: (cffm_keys(k, pooled[0])[0], cffm_keys(v, pooled[1])[0])
    offsets = CASES["sparse_tt"].offsets
    block = SparseTemporalBlock(c, (0, *offsets)).to(device)  # s = 1, e = 5, eps = 1, tr = 0.5
    keys, values = (rand(b, 1 + len(offsets), side, side, c) for _ in range(2))
    k = math.floor(block.tr * side * side)
    selected = torch.rand(b, side * side, device=device).topk(k, dim=1).indices  # as block.select gives them
    settings = {"frames": 1 + len(offsets), "offsets": offsets, "keys": block.num_keys, "queries": k}
    return settings, lambda: block.gather(keys, values, selected)[:2]


def run_micro(name: str, setup: Setup, args: argparse.Namespace, device: torch.device) -> dict:
    """The JSON record of micro-benchmark ``name``: the median of ``args.steps`` forward calls and of as many
    forward+backward ones (the backward of all-ones gradients) after ``args.warmup`` each, peak memory over both."""
    record = {
        "micro": name,
        "tiny": setup.tiny,
        "batch": setup.batch,
        "size": setup.micro_size,
        "channels": setup.micro_channels[name],
        "dtype": setup.dtype,
        "warmup": args.warmup,
        "steps": args.steps,
        "memory_measure": "torch.cuda.max_memory_allocated" if device.type == "cuda" else None,
        "status": "ok",
        "reason": None,
        "fwd_ms": None,
        "fwd_bwd_ms": None,
        "peak_mib": None,
    }

    def figures() -> dict:
        settings, work = micro_work(name, setup, device)
        grads = tuple(torch.ones_like(t) for t in work())

        def fwd_bwd() -> None:
            torch.autograd.backward(work(), grads)

        on_gpu = device.type == "cuda"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            fwd_ms = median_ms(work, device, args.warmup, args.steps)
        fwd_bwd_ms = median_ms(fwd_bwd, device, args.warmup, args.steps)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if on_gpu else None
        return {**settings, "fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms, "peak_mib": peak}

    return guarded(record, figures, device)


def micro_table(records: list[dict]) -> str:
    f = lambda value, spec: "-" if value is None else format(value, spec)
    body = [
        (
            r["micro"],
            f"{r['size']}x{r['size']}",
            r["channels"],
            f(r.get("keys"), "d"),
            f(r.get("queries"), "d"),
            f(r["fwd_ms"], ".2f"),
            f(r["fwd_bwd_ms"], ".2f"),
            f(r["peak_mib"], ".0f"),
            r["reason"] if r["status"] != "ok" else "",
        )
        for r in records
    ]
    header = ("micro", "map", "channels", "keys", "queries", "fwd ms", "fwd+bwd ms", "peak MiB", "note")
    return harness.text_table(header, body, left=1)


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
        type=harness.csv_choices((*CASES, *MICRO), "case"),
        help=f"comma-separated subset of {','.join((*CASES, *MICRO))} (default: all; --quick: {','.join(QUICK)})",
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
    if args.cases is None:
        args.cases = list(QUICK if args.quick else (*CASES, *MICRO))
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
        records.append((run_micro if name in MICRO else run_case)(name, setup, args, device))
        r = records[-1]
        print(f"{name}: {r['status']}" + (f" ({r['reason']})" if r["reason"] else ""), flush=True)
        if not args.no_save:  # at once: a run cut short keeps the cases it finished
            harness.append_records(path, [r], env, BENCHMARK)
    cases, micro = [r for r in records if "case" in r], [r for r in records if "micro" in r]
    if cases:
        print(table(cases))
    if micro:
        print(micro_table(micro))
    if not args.no_save:
        print(f"records appended to {path}")
    return records


if __name__ == "__main__":
    main()
