"""Benchmark: every compared system's config (Tables 2, 5 and 7, supplementary Table 1) in one training step and in
streaming inference, and the Swin-S trunk alone against ResNet-101.

    python benchmarks/baselines.py [--quick] [--configs table5/upernet,vspw_r101,...] [--no-trunks]
                                   [--steps N] [--warmup N] [--cpu] [--threads N] [--no-save] [--results-dir DIR]

Configs: configs/table5/*.yaml, configs/table2/*.yaml, configs/swin_s/*.yaml, configs/vspw_r101.yaml and
configs/table7/*.yaml (the rows of the README's "Compared systems" table, and any other file there). Each is loaded
as ``ssltm train`` loads it (``ssltm.config.load_config``, with ``model.pretrained=null``: no checkpoint is read)
and built into its model, objectives and ``TrainStep`` (see benchmarks/train_steps.py), so that what is timed is
what training runs: a config with objectives (Temporal Loss, IFR, Mean Teacher) runs their passes, on a synthetic
micro-batch with every key they read. A config that does not load (a missing file, a key this checkout does not
know) is a row marked skipped, with the reason.

On a GPU: 124 classes (VSPW), B = 2 clips at 479x479, bf16 autocast. Per config:

    step_ms     median of ``--steps`` forward+backward calls (the total loss; no optimizer step) after
                ``--warmup`` untimed ones, each ended by a CUDA synchronize
    peak_mib    torch.cuda.max_memory_allocated over those steps, reset per config; null on the CPU
    stream_fps  streaming inference (``ssltm.VideoPredictor.step``, the model inference uses: Mean Teacher's teacher)
                on 480x854 frames once its cache is full, bf16: 1000 / the median ms of ``--steps`` calls
    params      the trained model's parameters

The trunks (``--no-trunks`` leaves them out): ``ssltm.model.backbone.build_trunk`` of swin_s (torchvision's
shifted-window attention) and of resnet101 alone, forward+backward of the mean of their four levels, on the same
B = 2 479x479 bf16 input: step_ms, peak_mib and params.

One JSON line per config and per trunk (``"trunk"`` instead of ``"config"``) is appended to
benchmarks/results/baselines.jsonl as soon as it ends. ``--quick`` (scripts/gpu_check.sh, stage e, 40 s): the
configs table5/upernet, vspw_r101, table2/ocrnet and swin_s/upernet and the trunks, 1 warm-up and 2 timed steps; the
full run, every config, 3 warm-up and 10 timed steps, is a second call (under 8 minutes).

Without a GPU (or with ``--cpu``): a tiny case, labelled ``"tiny": true`` with ``"device": "cpu"``: each config's
modules narrowed as the configs' smoke test narrows them (``ssltm.smoke.reduced_overrides``: a ResNet becomes
ResNet-18, or ResNet-50 under the OCRNet decoder; Swin-S keeps its widths with one block per stage; narrow heads),
the trunks whole; 6 classes, B = 2 at 48x48, streaming at 48x64, fp32, 1 warm-up and 1 timed step. Its times show
that every config runs, not what it costs on a GPU.
"""

from __future__ import annotations

import argparse

import torch
from omegaconf import DictConfig

from benchmarks import harness
from benchmarks.ssltm_model import positive_int, streaming_step
from benchmarks.train_steps import (
    DTYPES,
    GPU,
    GPU_MEMORY,
    TINY,
    Setup,
    build_train_step,
    guarded,
    median_ms,
    parameter_count,
    peak_tracking,
    step_figures,
    synthetic_batch,
)
from ssltm.config import CONFIG_DIR, ConfigError, load_config
from ssltm.model.backbone import build_trunk
from ssltm.precision import autocast
from ssltm.smoke import reduced_overrides

BENCHMARK = "baselines"
# The compared rows (README "Compared systems"), then any other file of these folders.
COMPARED = (
    "table5/upernet",
    "table5/stt",
    "table5/netwarp",
    "table5/temporal_loss",
    "table5/st_ocr",
    "table5/cffm",
    "table5/ifr",
    "vspw_r101",
    "table7/ssltm_mt",
    "table2/ocrnet",
    "table2/netwarp_ocr",
    "table2/etc_ocr",
    "table2/tcb_ocr",
    "swin_s/upernet",
    "swin_s/ocrnet",
    "swin_s/etc_ocr",
    "swin_s/netwarp_ocr",
    "swin_s/tcb_ocr",
    "swin_s/ssltm",
    "swin_s/ssltm_mt",
)
FOLDERS = ("table5/*.yaml", "table2/*.yaml", "swin_s/*.yaml", "vspw_r101.yaml", "table7/*.yaml")
QUICK = ("table5/upernet", "vspw_r101", "table2/ocrnet", "swin_s/upernet")  # stage e's 40 s, with the trunks
TRUNKS = ("swin_s", "resnet101")
FILES = ["model.pretrained=null"]  # no checkpoint is read (the weights' values do not change the cost)
STREAM_SIZE = {False: (480, 854), True: (48, 64)}  # by Setup.tiny


def config_names() -> list[str]:
    """:data:`COMPARED`, then the other config files of :data:`FOLDERS`, by name (``"table5/stt"``)."""
    found = sorted(p.relative_to(CONFIG_DIR).with_suffix("").as_posix() for g in FOLDERS for p in CONFIG_DIR.glob(g))
    return [*COMPARED, *(name for name in found if name not in COMPARED)]


def tiny_overrides(cfg: DictConfig, setup: Setup) -> list[str]:
    """What narrows ``cfg``'s model on the tiny setup, as the configs' smoke test narrows it
    (:func:`ssltm.smoke.reduced_overrides`); nothing on the GPU setup."""
    return reduced_overrides(cfg) if setup.tiny else []


def load(name: str, setup: Setup) -> DictConfig:
    """Config ``name`` as a run loads it, with :data:`FILES` and the tiny setup's narrowing.

    Raises:
        ConfigError: the file is missing or does not load (its message names the key)."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no config file {path.relative_to(CONFIG_DIR.parent)}")
    cfg = load_config(path, FILES)
    narrow = tiny_overrides(cfg, setup)
    return load_config(path, [*FILES, *narrow]) if narrow else cfg


def run_config_case(name: str, setup: Setup, args: argparse.Namespace, device: torch.device) -> dict:
    """The JSON record of config ``name``: settings, then the figures or why there are none."""
    record = {
        "config": name,
        **setup.record(),
        "backbone": None,
        "decoder": None,
        "short_term": None,
        "objectives": None,
        "frames": None,
        "stream_size": list(STREAM_SIZE[setup.tiny]),
        "warmup": args.warmup,
        "steps": args.steps,
        "memory_measure": GPU_MEMORY if device.type == "cuda" else None,
        "status": "ok",
        "reason": None,
        "step_ms": None,
        "peak_mib": None,
        "stream_ms": None,
        "stream_fps": None,
        "params": None,
    }
    try:
        cfg = load(name, setup)
    except ConfigError as err:
        return {**record, "status": "skipped", "reason": f"does not load: {str(err).splitlines()[0][:300]}"}
    model = cfg.model
    record.update(
        backbone=model.backbone,
        decoder=model.get("decoder", "upernet"),
        short_term=model.short_term or "stt",
        objectives=list(cfg.train.objectives),
        frames=1 + len(cfg.data.offsets),
    )

    def figures() -> dict:
        train_step = build_train_step(cfg, setup.classes, device)
        batch = synthetic_batch(train_step, cfg, setup, device)
        out = step_figures(train_step, batch, setup, device, args.warmup, args.steps)
        del batch
        step = streaming_step(
            train_step.eval_model(),
            tuple(cfg.data.offsets),
            STREAM_SIZE[setup.tiny],
            device,
            DTYPES[setup.dtype],
        )
        stream_ms = median_ms(step, device, args.warmup, args.steps)
        return {**out, "stream_ms": stream_ms, "stream_fps": 1e3 / stream_ms, "params": parameter_count(train_step)}

    return guarded(record, figures, device)


def run_trunk(name: str, setup: Setup, args: argparse.Namespace, device: torch.device) -> dict:
    """The JSON record of trunk ``name`` alone: forward+backward of the mean of its four levels."""
    record = {
        "trunk": name,
        **setup.record(),
        "warmup": args.warmup,
        "steps": args.steps,
        "memory_measure": GPU_MEMORY if device.type == "cuda" else None,
        "status": "ok",
        "reason": None,
        "step_ms": None,
        "peak_mib": None,
        "params": None,
    }

    def figures() -> dict:
        torch.manual_seed(0)
        trunk = build_trunk(name).to(device).train()
        gen = torch.Generator(device=device).manual_seed(0)
        images = torch.randn(setup.batch, 3, setup.size, setup.size, generator=gen, device=device)

        def step() -> None:
            with autocast(device, DTYPES[setup.dtype]):
                loss = sum(level.float().mean() for level in trunk(images))
            loss.backward()
            trunk.zero_grad(set_to_none=True)

        peak = peak_tracking(device)
        step_ms = median_ms(step, device, args.warmup, args.steps)
        return {"step_ms": step_ms, "peak_mib": peak(), "params": parameter_count(trunk)}

    return guarded(record, figures, device)


def table(records: list[dict]) -> str:
    f = lambda value, spec: "-" if value is None else format(value, spec)
    body = [
        (
            r.get("config") or f"trunk {r['trunk']}",
            r.get("backbone") or r.get("trunk") or "-",
            r.get("decoder") or "-",
            r.get("short_term") or "-",
            ",".join(r.get("objectives") or []) or "-",
            f(r["step_ms"], ".1f"),
            f(r["peak_mib"], ".0f"),
            f(r.get("stream_fps"), ".1f"),
            r["reason"] if r["status"] != "ok" else "",
        )
        for r in records
    ]
    header = ("config", "backbone", "decoder", "short_term", "objectives", "fwd+bwd ms", "peak MiB", "frames/s", "note")
    return harness.text_table(header, body, left=5)


def parse_args(argv=None) -> argparse.Namespace:
    names = config_names()
    p = harness.script_parser(__doc__)
    p.add_argument("--quick", action="store_true", help="a few configs, 1 warm-up and 2 timed steps (gpu_check.sh)")
    p.add_argument(
        "--configs",
        type=harness.csv_choices(names, "config"),
        help=f"comma-separated subset of {','.join(names)} (default: all; --quick: {','.join(QUICK)})",
    )
    p.add_argument("--no-trunks", action="store_true", help="leave the Swin-S / ResNet-101 trunk comparison out")
    p.add_argument("--steps", type=positive_int, help="timed steps per config (default 10, --quick 2, CPU 1)")
    p.add_argument("--warmup", type=positive_int, help="untimed steps first (default 3, --quick and CPU 1)")
    p.add_argument("--threads", type=positive_int, default=1, help="CPU runs: torch threads (default 1)")
    harness.output_arguments(p, BENCHMARK, cpu_help="run the tiny CPU case even when a GPU is present")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if on_gpu else "cpu")
    setup = GPU if on_gpu else TINY
    if args.steps is None:
        args.steps = 10 if on_gpu and not args.quick else 2 if on_gpu else 1
    if args.warmup is None:
        args.warmup = 3 if on_gpu and not args.quick else 1
    if args.configs is None:
        args.configs = list(QUICK if args.quick else config_names())
    if not on_gpu:
        torch.set_num_threads(args.threads)
    env = harness.environment(device)
    h, w = STREAM_SIZE[setup.tiny]
    print(
        f"{BENCHMARK}: {setup.classes} classes, B={setup.batch} at {setup.size}x{setup.size}, streaming {h}x{w}, "
        f"{setup.dtype}, {args.warmup} warm-up + {args.steps} timed steps per config on {env['gpu'] or 'cpu'}"
        + ("" if on_gpu else " (tiny CPU case: no GPU figures)"),
        flush=True,
    )
    path = args.results_dir / f"{BENCHMARK}.jsonl"
    work = [(run_config_case, name) for name in args.configs]
    work += [] if args.no_trunks else [(run_trunk, name) for name in TRUNKS]
    records = []
    for run, name in work:
        records.append(run(name, setup, args, device))
        r = records[-1]
        print(f"{name}: {r['status']}" + (f" ({r['reason']})" if r["reason"] else ""), flush=True)
        if not args.no_save:  # at once: a run cut short keeps what it finished
            harness.append_records(path, [r], env, BENCHMARK)
    print(table(records))
    if not args.no_save:
        print(f"records appended to {path}")
    return records


if __name__ == "__main__":
    main()
