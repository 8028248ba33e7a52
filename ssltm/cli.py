"""The ``ssltm`` command (also ``python -m ssltm``): train, eval, infer, export and demo."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch

from ssltm_kernels._backend import HAS_TRITON, requested_backend, triton_interpreting
from ssltm_kernels._ext import _C, BUILD_HINT, HAS_CUDA_EXT

from .checkpoint import load_checkpoint
from .config import ConfigError, load_config
from .distributed import resolve_device, slurm_environment
from .outputs import check_output_file, check_replaceable_folder, staged_folder

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
    p.add_argument(
        "config",
        nargs="?",
        help="config file (YAML), or the name of one in configs/ (e.g. camvid); with --work-dir and --resume "
        "it defaults to the run's WORK_DIR/config.yaml",
    )
    _add_set(p)
    p.add_argument("--work-dir", help="folder for checkpoints and logs (default: the config's work_dir)")
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="PATH",
        help="continue from a checkpoint (default: WORK_DIR/latest.pt)",
    )
    start.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in a work dir that holds an earlier run's checkpoints, moving its files to "
        "WORK_DIR/old-<time>/ first",
    )

    p = commands.add_parser("eval", help="evaluate a checkpoint on whole videos (mIoU, FWIoU, mVC, TC)")
    p.add_argument(
        "config",
        nargs="?",
        help="config file (YAML) or the name of one in configs/, whose keys override the checkpoint's config "
        "(default: the checkpoint's config alone)",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint file (.pt)")
    p.add_argument("--split", help="split to evaluate (default: the config's data.val_split)")
    p.add_argument("--out", help="write the metrics to this JSON file")
    p.add_argument("--save-predictions", metavar="DIR", help="write label PNGs as DIR/<video>/<frame>.png")
    p.add_argument(
        "--predict-only",
        action="store_true",
        help="predict every frame of the split's videos, which need no labels (e.g. VSPW's test split), into "
        "--save-predictions DIR; no metrics",
    )
    _add_set(p)

    p = commands.add_parser(
        "infer", help="segment a video file, a folder of frames, a camera or a stream, frame by frame"
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint file (.pt)")
    p.add_argument(
        "--input",
        required=True,
        help="a video file (anything OpenCV reads), a folder of frames (in the natural order of their names), "
        "a camera index (0, 1, ...; a folder named 0 is ./0) or a URL OpenCV opens (rtsp://, http://, ...). "
        "A camera or stream runs until --max-frames, its end, or Ctrl-C, which ends it and keeps the output",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder (labels/, overlays/, overlay.mp4: H.264 with PyAV installed, else mp4v, which web "
        "browsers don't play)",
    )
    p.add_argument(
        "--size",
        type=int,
        help="resize frames to this shorter side first (default: the config's data.eval_size, else as they are)",
    )
    p.add_argument("--max-frames", type=int, help="stop after this many frames (at least 1)")
    p.add_argument("--fps", type=float, help="frame rate of overlay.mp4 (default: the input video's, else 10)")
    p.add_argument(
        "--no-overlays",
        action="store_true",
        help="don't write overlays/ (a JPEG per frame); overlay.mp4 is still written",
    )
    p.add_argument("--labels-only", action="store_true", help="write labels/ only: neither overlays/ nor overlay.mp4")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--config", help="config file (YAML) whose keys override the checkpoint's config")
    _add_set(p)

    p = commands.add_parser("export", help="write the streaming predictor as ONNX graphs (encoder, decoder)")
    p.add_argument("--checkpoint", required=True, help="checkpoint file (.pt)")
    p.add_argument("--out", required=True, help="output folder (encoder.onnx, decoder.onnx, export.json)")

    p = commands.add_parser("demo", help="train and evaluate a small model on synthetic videos (no data needed)")
    p.add_argument("--max-minutes", type=float, default=1.5, help="training time (default 1.5)")
    p.add_argument("--out", default="work_dirs/demo", help="output folder (default work_dirs/demo)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _add_set(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # A task srun started gets torchrun's variables now: the first process alone prints, and a launch
        # SLURM cannot place is refused before any work.
        os.environ.update(slurm_environment(os.environ))
        return COMMANDS[args.command](args)
    except (ConfigError, OSError, ValueError) as err:  # bad configs, paths, files and arguments
        print(f"ssltm {args.command}: error: {err}", file=sys.stderr)
        return EXIT_ERROR


def kernel_speed_warning(device: torch.device) -> str | None:
    """What running the model's kernels on ``device`` costs when they cannot run at full speed, and how to
    avoid it: Triton in its CPU interpreter, or a GPU with neither Triton nor the CUDA extension."""
    forced = requested_backend(None)
    if triton_interpreting() and forced in (None, "triton"):
        return (
            "TRITON_INTERPRET=1: the Triton kernels run in the CPU interpreter, which makes the model 5-14x slower; "
            "unset TRITON_INTERPRET (the compiled kernels then run on a GPU, the PyTorch reference on a CPU)"
        )
    if device.type == "cuda" and forced is None and not HAS_TRITON and not (HAS_CUDA_EXT and _C.WITH_CUDA):
        return (
            f"no kernel backend for {device}: triton is not installed and the CUDA extension is not built, so the "
            f"kernels run as their PyTorch reference (slower, more GPU memory); pip install triton, or {BUILD_HINT}"
        )
    return None


def _warn_if_slow(device: str) -> None:
    message = kernel_speed_warning(resolve_device(device))
    if message and os.environ.get("RANK", "0") == "0":  # under torchrun: once, from the first process
        print(f"warning: {message}", file=sys.stderr)


def _train(args: argparse.Namespace) -> int:
    from .train import NonFiniteLossError, train

    config = args.config
    if config is None:
        if not (args.resume and args.work_dir):
            raise ConfigError("give a config file, or --work-dir DIR --resume to continue the run in DIR")
        config = Path(args.work_dir) / "config.yaml"
        if not config.is_file():
            raise FileNotFoundError(f"--resume: {args.work_dir} holds no config.yaml of a run to continue")
    overrides = list(args.overrides) + ([f"work_dir={args.work_dir}"] if args.work_dir else [])
    cfg = load_config(config, overrides)
    resume = args.resume
    if resume is True:
        resume = Path(cfg.work_dir) / "latest.pt"
        if not resume.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint to resume at {resume} (train once first, or give a path)")
    _warn_if_slow(cfg.device)
    try:
        result = train(cfg, resume, overwrite=args.overwrite)
    except NonFiniteLossError as err:
        print(f"ssltm train: {err}", file=sys.stderr)
        return EXIT_FAILED
    if result.stopped == "interrupted":
        launcher = " (launched as this run was: torchrun or srun)" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(
            f"interrupted at iteration {result.iteration}; checkpoint {result.checkpoint}. "
            f"Continue with: ssltm train --work-dir {shlex.quote(str(result.work_dir))} --resume{launcher}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if result.stopped == "time":
        print(f"train.max_minutes reached at iteration {result.iteration}; checkpoint {result.checkpoint}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from . import distributed as dist
    from .build import build_dataset, dataset_info, eval_options, model_from_checkpoint
    from .evaluate import evaluate, predict, results_json, results_table
    from .precision import amp_dtype

    if args.predict_only and args.save_predictions is None:
        raise ConfigError("--predict-only needs --save-predictions DIR, the folder the label PNGs go to")
    if args.predict_only and args.out is not None:
        raise ConfigError("--predict-only computes no metrics for --out to write")
    out = None if args.out is None else check_output_file(args.out, "--out")
    if args.save_predictions is not None:
        check_replaceable_folder(args.save_predictions, "--save-predictions", _is_prediction_folder)
    ckpt = load_checkpoint(args.checkpoint)
    cfg = load_config(args.config, args.overrides, base=ckpt["config"])
    options = {} if args.predict_only else eval_options(cfg)
    info = dataset_info(cfg)
    if ckpt["meta"].get("num_classes") != info.num_classes:
        raise ConfigError(
            f"checkpoint {args.checkpoint} has {ckpt['meta'].get('num_classes')} classes, "
            f"the config's {cfg.data.dataset} data {info.num_classes}"
        )
    split = args.split or cfg.data.val_split
    dataset, indices = build_dataset(cfg, split, train=False, labels=not args.predict_only)
    if not indices:
        raise ValueError(f"split {split!r} of the {cfg.data.dataset} data has no videos")
    _warn_if_slow(cfg.device)
    env = dist.setup(cfg.device)
    try:
        model = model_from_checkpoint(cfg, ckpt, args.checkpoint).to(env.device)
        # The label PNGs appear in --save-predictions whole, once every process has written its videos.
        saving = staged_folder(args.save_predictions, shared=True) if args.save_predictions else nullcontext()
        with saving as save_dir:
            if args.predict_only:
                written = predict(
                    model, dataset, env, save_dir, palette=info.palette, amp_dtype=amp_dtype(cfg.train.amp, env.device)
                )
            else:
                results = evaluate(
                    model,
                    dataset,
                    indices,
                    info.num_classes,
                    env,
                    amp_dtype=amp_dtype(cfg.train.amp, env.device),
                    num_workers=cfg.data.num_workers,
                    palette=info.palette,
                    save_dir=save_dir,
                    **options,
                )
    finally:
        dist.teardown()
    if args.predict_only:
        if env.is_main:
            print(f"{cfg.data.dataset} {split}: {written} frames predicted into {args.save_predictions}")
        return 0
    if env.is_main:
        print(f"{cfg.data.dataset} {split}: {len(indices)} frames, checkpoint {args.checkpoint}")
        if "TC_protocol" in results:
            settings = (results["TC_protocol"], results["TC_flow"], results["TC_videos"])
            print("TC: protocol {}, flow {}, on {} video(s)".format(*settings))
        print(results_table(results, info.classes))
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results_json(results, info.classes), indent=2) + "\n")
            print(f"metrics written to {out}")
    return 0


def _is_prediction_folder(path: Path) -> bool:
    """An entry of an earlier ``--save-predictions`` folder: a video's folder of label PNGs."""
    return path.is_dir() and all(p.suffix == ".png" for p in path.iterdir())


def _infer(args: argparse.Namespace) -> int:
    from .infer import infer

    _warn_if_slow(args.device)
    try:
        infer(
            args.checkpoint,
            args.input,
            args.out,
            size=args.size,
            max_frames=args.max_frames,
            fps=args.fps,
            device=args.device,
            config=args.config,
            overrides=args.overrides,
            overlays=not (args.no_overlays or args.labels_only),
            video=not args.labels_only,
        )
    except KeyboardInterrupt:
        print(f"ssltm infer: interrupted; {args.out} is left as it was", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import check_export_out, export_onnx, require_onnx

    check_export_out(args.out)
    try:
        require_onnx()
    except ImportError as err:
        raise ValueError(str(err)) from None
    export_onnx(args.checkpoint, args.out)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import demo

    _warn_if_slow(args.device)
    demo(max_minutes=args.max_minutes, out=args.out, device=args.device, overrides=args.overrides)
    return 0


COMMANDS = {"train": _train, "eval": _eval, "infer": _infer, "export": _export, "demo": _demo}
