"""Benchmark: peak memory of SSLTM training steps (forward, backward, optimizer step) per backbone, crop, batch,
activation checkpointing and precision.

    python benchmarks/train_memory.py [--backbone NAME] [--crop N] [--batch 1,2] [--checkpointing off,on]
                                      [--amp off|bf16] [--classes K] [--steps N] [--cpu] [--threads N]
                                      [--no-save] [--results-dir DIR]

Each setting runs in a fresh process: SSLTM with its defaults (the paper's model) for ``--classes`` classes,
SGD with momentum and weight decay as ``ssltm train`` builds it, ``--batch`` clips (the query frame, 3 adjacent
frames and a reference frame) at ``--crop`` x ``--crop`` with random labels, and ``--steps`` training steps,
after a first step on one 32x32 clip that creates the optimizer's momentum buffers (held from then on, as in a
run). ``--batch`` is the micro-batch of one process: with ``train.grad_accum`` a run's memory is that of its
micro-batch. What is measured, by device:

    cuda   torch.cuda.max_memory_allocated over the steps: the peak of the tensors (weights, gradients,
           optimizer state, activations), without the caching allocator's reserve or the CUDA context
    cpu    the peak resident set of the process (getrusage's ru_maxrss) less the peak before the model was
           built (the interpreter, torch and the libraries): an upper bound of the tensors' peak, as the
           allocator may keep memory it freed

The ops dispatch as in training (on a GPU the kernels, on the CPU their PyTorch references).

One row per setting (peak MiB, the last step's seconds) is printed and appended as a JSON line to
benchmarks/results/train_memory.jsonl; a setting that runs out of memory or fails is a row saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from benchmarks import harness
from benchmarks.ssltm_model import positive_int
from ssltm.model.backbone import RESNETS

BENCHMARK = "train_memory"
SWITCH = {"off": False, "on": True}
AMP = {"off": None, "bf16": torch.bfloat16}
ADJACENT = 3  # the paper's clip: the query and 3 adjacent frames
WARMUP = 32  # side of the first step's crop: it creates the optimizer's momentum buffers at little memory
MEASURES = {
    "cuda": "torch.cuda.max_memory_allocated",
    "cpu": "peak RSS less the peak before the model (getrusage)",
}


def measure(setting: dict) -> dict:
    """Peak memory and the last step's seconds of ``setting``'s training steps, in this process."""
    from ssltm import SSLTM
    from ssltm.precision import autocast

    device = torch.device(setting["device"])
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.max_memory_allocated(device)
    else:
        torch.set_num_threads(setting["threads"])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    torch.manual_seed(0)
    model = SSLTM(setting["classes"], backbone=setting["backbone"], checkpointing=setting["checkpointing"])
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9, weight_decay=1e-4)
    b, crop, k = setting["batch"], setting["crop"], setting["classes"]
    gen = torch.Generator(device=device).manual_seed(0)
    frames = torch.randn(b, 1 + ADJACENT, 3, crop, crop, generator=gen, device=device)
    reference = torch.randn(b, 3, crop, crop, generator=gen, device=device)
    labels = torch.randint(0, k, (b, crop, crop), generator=gen, device=device)

    def step(frames: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> float:
        start = time.perf_counter()
        with autocast(device, AMP[setting["amp"]]):
            loss = model(frames, reference, labels)["losses"]["total"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    step(frames[:1, ..., :WARMUP, :WARMUP], reference[:1, ..., :WARMUP, :WARMUP], labels[:1, :WARMUP, :WARMUP])
    seconds = [step(frames, reference, labels) for _ in range(setting["steps"])][-1]
    if on_gpu:
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"peak_mib": peak / 2**20, "step_s": seconds, "params": sum(p.numel() for p in model.parameters())}


def run_setting(setting: dict) -> dict:
    """:func:`measure` in a fresh process (so that every setting starts from the same memory); a failure or an
    out-of-memory kill becomes the row's ``error``."""
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--setting", json.dumps(setting)],
        capture_output=True,
        text=True,
    )
    row = {**setting, "measure": MEASURES[torch.device(setting["device"]).type]}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return {**row, **json.loads(lines[-1]), "error": None}
    tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
    if proc.returncode < 0:
        tail = [f"killed by signal {-proc.returncode} (out of memory?)"]
    elif "OutOfMemoryError" in proc.stderr:
        tail = ["out of memory"]
    return {**row, "peak_mib": None, "step_s": None, "params": None, "error": tail[0][:300]}


def table(rows: list[dict]) -> str:
    body = [
        (
            r["backbone"],
            f"{r['crop']}x{r['crop']}",
            r["batch"],
            "on" if r["checkpointing"] else "off",
            r["amp"],
            "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}",
            "-" if r["step_s"] is None else f"{r['step_s']:.2f}",
            r["error"] or "",
        )
        for r in rows
    ]
    header = ("backbone", "crop", "batch", "checkpointing", "amp", "peak MiB", "step s", "error")
    return harness.text_table(header, body, left=5)


def positive_ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = harness.script_parser(__doc__)
    p.add_argument("--backbone", choices=tuple(RESNETS), default="resnet101", help="the ResNet (default resnet101)")
    p.add_argument("--crop", type=positive_int, default=479, help="square crop side (default 479)")
    p.add_argument("--batch", type=positive_ints, default=[1, 2], help="comma-separated clips per step (default 1,2)")
    p.add_argument(
        "--checkpointing",
        type=harness.csv_choices(tuple(SWITCH), "checkpointing"),
        default=list(SWITCH),
        help="comma-separated subset of off,on (default both)",
    )
    p.add_argument("--amp", choices=tuple(AMP), default="off", help="autocast: off (fp32, default) or bf16")
    p.add_argument("--classes", type=positive_int, default=124, help="classes (default 124, VSPW)")
    p.add_argument("--steps", type=positive_int, default=1, help="measured training steps (default 1)")
    p.add_argument("--threads", type=positive_int, default=2, help="CPU runs: torch threads")
    harness.output_arguments(p, BENCHMARK, cpu_help="measure on the CPU even when a GPU is present")
    p.add_argument("--setting", help=argparse.SUPPRESS)  # one setting, in the fresh process
    args = p.parse_args(argv)
    if args.crop < 32:
        p.error(f"--crop must be at least 32 (the ResNet's stride), got {args.crop}")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.setting:
        print(json.dumps(measure(json.loads(args.setting))))
        return []
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    print(
        f"{BENCHMARK}: {args.backbone}, crop {args.crop}, {args.amp if args.amp != 'off' else 'fp32'}, "
        f"{args.steps} training step(s) per setting on {device}; peak memory as {MEASURES[device]}; each setting "
        "in a fresh process"
    )
    rows = []
    for batch in args.batch:
        for switch in args.checkpointing:
            setting = {
                "device": device,
                "backbone": args.backbone,
                "crop": args.crop,
                "batch": batch,
                "checkpointing": SWITCH[switch],
                "amp": args.amp,
                "classes": args.classes,
                "steps": args.steps,
                "threads": args.threads,
            }
            rows.append(run_setting(setting))
            row = rows[-1]
            done = row["error"] or f"{row['peak_mib']:.0f} MiB, {row['step_s']:.2f} s a step"
            print(f"batch {batch}, checkpointing {switch}: {done}", flush=True)
    print(table(rows))
    if not args.no_save:
        path = args.results_dir / f"{BENCHMARK}.jsonl"
        harness.append_records(path, rows, harness.environment(torch.device(device)), BENCHMARK)
        print(f"rows appended to {path}")
    return rows


if __name__ == "__main__":
    main()
