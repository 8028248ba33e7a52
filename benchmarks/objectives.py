"""Benchmark: the training objectives of Tables 5 and 7 (paper §4.4.2, §4.5) in one training step each.

    python benchmarks/objectives.py [--quick] [--cases baseline,temporal_loss_dis,temporal_loss_raft,ifr,ssltm,
                                                        mean_teacher]
                                    [--raft-weights PATH] [--steps N] [--warmup N] [--cpu] [--threads N]
                                    [--no-save] [--results-dir DIR]

Cases, each a run config (``ssltm.config.load_config`` of the defaults with the case's overrides) built as ``ssltm
train`` builds it (``ssltm.build.build_model``, then ``ssltm.objectives.build_objectives`` and their
``TrainStep``), so that what is timed is what training runs:

    baseline            the image baseline (configs/table5/upernet.yaml: short_term none, RFCE and GCC off, the
                        query alone)
    temporal_loss_dis   the baseline with ETC's temporal loss (train.objectives [temporal_loss], one adjacent frame
                        at offset 1): both frames segmented in one pass, the query -> adjacent flow from OpenCV DIS
                        computed within the step (as without data.flow_in_loader)
    temporal_loss_raft  the same with torchvision RAFT flow (model.flow raft): needs a local ``raft_large`` state dict
                        (``--raft-weights``), else skipped with the reason recorded; nothing is ever downloaded
    ifr                 the baseline with IFR (train.objectives [ifr], unlabelled clips on): 6 backbone passes (the
                        labelled query, its reference and the reference's strong copy; the same on an unlabelled
                        clip)
    ssltm               SSLTM (configs/vspw_r101.yaml's model: STT, RFCE, GCC, offsets 3, 6, 9)
    mean_teacher        SSLTM + Mean Teacher (train.objectives [mean_teacher]): the student's labelled pass, the
                        teacher's no-grad pass on the clean unlabelled clip and the student's on its distorted copy

On a GPU: ResNet-101, 124 classes (VSPW), B = 2 clips (and as many unlabelled ones where an objective reads them) at
479x479, bf16 autocast (``train.amp: auto``), data.mode sf. The micro-batch is synthetic and carries every key the
trainer's loader gives the case's objectives (``reference_strong``; ``batch["unlabeled"]`` with ``frames``,
``frames_strong``, ``reference``, ``reference_strong``, an all-255 ``label`` and ``labeled`` False).

Per case:

    step_ms     median of ``--steps`` forward+backward calls of the TrainStep (its total loss; no optimizer step)
                after ``--warmup`` untimed ones, each ended by a CUDA synchronize
    peak_mib    torch.cuda.max_memory_allocated over the warm-up and timed steps, reset per case (weights, a
                teacher's weights, gradients, activations); null on the CPU
    ema_ms      mean_teacher: the teacher's EMA update alone (TrainStep.after_step), median over as many calls
    params      the trained model's parameters

One JSON line per case (device, GPU, torch/triton versions, the settings and the figures; a skipped or failed case
says why) is appended to benchmarks/results/objectives.jsonl as soon as the case ends. ``--quick``
(scripts/gpu_check.sh, stage e, 30 s) takes 1 warm-up and 2 timed steps; the full run, 3 warm-up and 10 timed steps,
is a second call (under 5 minutes).

Without a GPU (or with ``--cpu``): a tiny case, labelled ``"tiny": true`` with ``"device": "cpu"``: ResNet-18 with
configs/demo.yaml's narrow widths, 6 classes, B = 2 at 48x48, fp32, 1 warm-up and 1 timed step. Its times show that
every case runs, not what it costs on a GPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.ssltm_model import positive_int
from benchmarks.train_steps import (
    GPU,
    GPU_MEMORY,
    TINY,
    Setup,
    build_train_step,
    guarded,
    median_ms,
    parameter_count,
    step_figures,
    synthetic_batch,
)
from ssltm.config import ConfigError, load_config

BENCHMARK = "objectives"
DATA = ["data.dataset=synthetic", "data.mode=sf"]  # unlabelled training frames, as VSPW-SF has
IMAGE = ["model.short_term=none", "model.use_rfce=false", "model.use_gcc=false", "data.offsets=[]"]
TEMPORAL = [*IMAGE, "data.offsets=[1]", "train.objectives=[temporal_loss]"]
CASES = {
    "baseline": IMAGE,
    "temporal_loss_dis": [*TEMPORAL, "model.flow=dis"],
    "temporal_loss_raft": [*TEMPORAL, "model.flow=raft"],  # model.flow_weights: --raft-weights
    "ifr": [*IMAGE, "train.objectives=[ifr]"],
    "ssltm": [],
    "mean_teacher": ["train.objectives=[mean_teacher]"],
}
BACKBONE_PASSES = {"ifr": 6}  # IFR: query, reference and its strong copy, labelled and unlabelled, one pass each
NO_RAFT = "no --raft-weights file (RAFT weights are never downloaded)"


def case_overrides(name: str, setup: Setup, raft_weights: Path | None) -> list[str]:
    """The ``--set`` items of case ``name``'s run config on ``setup`` (the tiny model's narrowing included)."""
    raft = raft_weights is not None and name == "temporal_loss_raft"
    return [*DATA, *CASES[name], *([f"model.flow_weights={raft_weights}"] if raft else []), *setup.overrides]


def run_case(name: str, setup: Setup, args: argparse.Namespace, device: torch.device) -> dict:
    """The JSON record of case ``name``: settings, then the figures or why there are none."""
    record = {
        "case": name,
        **setup.record(),
        "backbone": None,
        "objectives": None,
        "short_term": None,
        "frames": None,
        "flow": None,
        "backbone_passes": BACKBONE_PASSES.get(name),
        "overrides": case_overrides(name, setup, args.raft_weights),
        "warmup": args.warmup,
        "steps": args.steps,
        "memory_measure": GPU_MEMORY if device.type == "cuda" else None,
        "status": "ok",
        "reason": None,
        "step_ms": None,
        "peak_mib": None,
        "ema_ms": None,
        "params": None,
    }
    # without weights RAFT's config does not load (model.flow_weights): the settings are those of the DIS case's
    skip = name == "temporal_loss_raft" and args.raft_weights is None
    try:
        cfg = load_config(None, case_overrides("temporal_loss_dis" if skip else name, setup, args.raft_weights))
    except ConfigError as err:
        return {**record, "status": "failed", "reason": f"ConfigError: {str(err).splitlines()[0][:300]}"}
    model = cfg.model
    record.update(
        backbone=model.backbone,
        objectives=list(cfg.train.objectives),
        short_term=model.short_term or "stt",
        frames=1 + len(cfg.data.offsets),
        flow=model.flow if "temporal_loss" in cfg.train.objectives else None,
    )
    if skip:
        return {**record, "flow": "raft", "status": "skipped", "reason": NO_RAFT}

    def figures() -> dict:
        train_step = build_train_step(cfg, setup.classes, device)
        batch = synthetic_batch(train_step, cfg, setup, device)
        out = step_figures(train_step, batch, setup, device, args.warmup, args.steps)
        if "mean_teacher" in cfg.train.objectives:
            out["ema_ms"] = median_ms(lambda: train_step.after_step(0), device, args.warmup, args.steps)
        return {**out, "params": parameter_count(train_step.model)}

    return guarded(record, figures, device)


def table(records: list[dict]) -> str:
    f = lambda value, spec: "-" if value is None else format(value, spec)
    body = [
        (
            r["case"],
            ",".join(r["objectives"] or []) or "-",
            f(r["frames"], "d"),
            f(r["step_ms"], ".1f"),
            f(r["peak_mib"], ".0f"),
            f(r["ema_ms"], ".2f"),
            r["reason"] if r["status"] != "ok" else "",
        )
        for r in records
    ]
    header = ("case", "objectives", "frames", "fwd+bwd ms", "peak MiB", "EMA ms", "note")
    return harness.text_table(header, body, left=2)


def parse_args(argv=None) -> argparse.Namespace:
    p = harness.script_parser(__doc__)
    p.add_argument("--quick", action="store_true", help="1 warm-up and 2 timed steps (scripts/gpu_check.sh)")
    p.add_argument(
        "--cases",
        type=harness.csv_choices(tuple(CASES), "case"),
        default=list(CASES),
        help=f"comma-separated subset of {','.join(CASES)} (default: all)",
    )
    p.add_argument("--raft-weights", type=Path, help="local raft_large state dict file for the temporal_loss_raft case")
    p.add_argument("--steps", type=positive_int, help="timed steps per case (default 10, --quick 2, CPU 1)")
    p.add_argument("--warmup", type=positive_int, help="untimed steps first (default 3, --quick and CPU 1)")
    p.add_argument("--threads", type=positive_int, default=1, help="CPU runs: torch threads (default 1)")
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
        args.steps = 10 if on_gpu and not args.quick else 2 if on_gpu else 1
    if args.warmup is None:
        args.warmup = 3 if on_gpu and not args.quick else 1
    if not on_gpu:
        torch.set_num_threads(args.threads)
    env = harness.environment(device)
    print(
        f"{BENCHMARK}: {'resnet18 (tiny widths)' if setup.tiny else 'resnet101'}, {setup.classes} classes, "
        f"B={setup.batch} at {setup.size}x{setup.size}, {setup.dtype}, {args.warmup} warm-up + {args.steps} timed "
        f"steps per case on {env['gpu'] or 'cpu'}" + ("" if on_gpu else " (tiny CPU case: no GPU figures)"),
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
