"""The ``ssltm`` command (also ``python -m ssltm``): train, eval, infer and demo."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .checkpoint import load_checkpoint, load_weights
from .config import ConfigError, load_config

EXIT_ERROR = 2  # bad config, path or argument
EXIT_FAILED = 1  # the run itself failed (a non-finite loss)
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C / SIGTERM, after saving a checkpoint


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        nargs="+",
        action="extend",
        default=[],
        help="override config keys, e.g. --set train.lr=0.01 data.crop_size=[512,1024] (values in YAML syntax)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssltm", description="SSLTM video semantic segmentation")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("train", help="train a model (under torchrun: on several GPUs or nodes)")
    p.add_argument("config", help="config file (YAML), or the name of one in configs/ (e.g. camvid)")
    _add_set(p)
    p.add_argument("--work-dir", help="folder for checkpoints and logs (default: the config's work_dir)")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="PATH",
        help="continue from a checkpoint (default: WORK_DIR/latest.pt)",
    )

    p = commands.add_parser("eval", help="evaluate a checkpoint on whole videos (mIoU, FWIoU, mVC, TC)")
    p.add_argument("config", help="config file (YAML), or the name of one in configs/")
    p.add_argument("--checkpoint", required=True, help="checkpoint file (.pt)")
    p.add_argument("--split", help="split to evaluate (default: the config's data.val_split)")
    p.add_argument("--out", help="write the metrics to this JSON file")
    p.add_argument("--save-predictions", metavar="DIR", help="write label PNGs as DIR/<video>/<frame>.png")
    _add_set(p)

    p = commands.add_parser("infer", help="segment a video file or a folder of frames, frame by frame")
    p.add_argument("--checkpoint", required=True, help="checkpoint file (.pt)")
    p.add_argument("--input", required=True, help="a video file (anything OpenCV reads) or a folder of frames")
    p.add_argument("--out", required=True, help="output folder (labels/, overlays/, overlay.mp4)")
    p.add_argument("--size", type=int, help="resize frames to this shorter side first (default: as they are)")
    p.add_argument("--max-frames", type=int, help="stop after this many frames")
    p.add_argument("--fps", type=float, help="frame rate of overlay.mp4 (default: the input video's, else 10)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")

    p = commands.add_parser("demo", help="train and evaluate a small model on synthetic videos (no data needed)")
    p.add_argument("--max-minutes", type=float, default=1.5, help="training time (default 1.5)")
    p.add_argument("--out", default="work_dirs/demo", help="output folder (default work_dirs/demo)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _add_set(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, OSError, ValueError) as err:  # bad configs, paths, files and arguments
        print(f"ssltm {args.command}: error: {err}", file=sys.stderr)
        return EXIT_ERROR


def _train(args: argparse.Namespace) -> int:
    from .train import NonFiniteLossError, train

    overrides = list(args.overrides) + ([f"work_dir={args.work_dir}"] if args.work_dir else [])
    cfg = load_config(args.config, overrides)
    resume = args.resume
    if resume is True:
        resume = Path(cfg.work_dir) / "latest.pt"
        if not resume.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint to resume at {resume} (train once first, or give a path)")
    try:
        result = train(cfg, resume)
    except NonFiniteLossError as err:
        print(f"ssltm train: {err}", file=sys.stderr)
        return EXIT_FAILED
    if result.stopped == "interrupted":
        print(
            f"interrupted at iteration {result.iteration}; checkpoint {result.checkpoint}. "
            f"Continue with: ssltm train {args.config} --resume {result.checkpoint}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if result.stopped == "time":
        print(f"train.max_minutes reached at iteration {result.iteration}; checkpoint {result.checkpoint}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from . import distributed as dist
    from .build import build_dataset, build_model, dataset_info, eval_options
    from .evaluate import evaluate, results_json, results_table
    from .train import amp_dtype

    cfg = load_config(args.config, args.overrides)
    options = eval_options(cfg)
    ckpt = load_checkpoint(args.checkpoint)
    info = dataset_info(cfg)
    if ckpt["meta"].get("num_classes") != info.num_classes:
        raise ConfigError(
            f"checkpoint {args.checkpoint} has {ckpt['meta'].get('num_classes')} classes, "
            f"the config's {cfg.data.dataset} data {info.num_classes}"
        )
    split = args.split or cfg.data.val_split
    dataset, indices = build_dataset(cfg, split, train=False)
    env = dist.setup(cfg.device)
    try:
        model = build_model(cfg, info.num_classes, pretrained=False)
        load_weights(model, ckpt, args.checkpoint)
        model.to(env.device)
        results = evaluate(
            model,
            dataset,
            indices,
            info.num_classes,
            env,
            amp_dtype=amp_dtype(cfg.train.amp, env.device),
            num_workers=cfg.data.num_workers,
            palette=info.palette,
            save_dir=args.save_predictions,
            **options,
        )
    finally:
        dist.teardown()
    if env.is_main:
        print(f"{cfg.data.dataset} {split}: {len(indices)} frames, checkpoint {args.checkpoint}")
        if "TC_protocol" in results:
            settings = (results["TC_protocol"], results["TC_flow"], results["TC_videos"])
            print("TC: protocol {}, flow {}, on {} video(s)".format(*settings))
        print(results_table(results, info.classes))
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results_json(results, info.classes), indent=2) + "\n")
            print(f"metrics written to {out}")
    return 0


def _infer(args: argparse.Namespace) -> int:
    from .infer import infer

    infer(
        args.checkpoint,
        args.input,
        args.out,
        size=args.size,
        max_frames=args.max_frames,
        fps=args.fps,
        device=args.device,
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import demo

    demo(max_minutes=args.max_minutes, out=args.out, device=args.device, overrides=args.overrides)
    return 0


COMMANDS = {"train": _train, "eval": _eval, "infer": _infer, "demo": _demo}
