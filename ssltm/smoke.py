"""The smoke run of the shipped configs: every file under ``configs/`` (or those ``--configs`` matches) trains a few
iterations on synthetic videos and is evaluated into the standard metrics JSON, through the ``ssltm train`` and
``ssltm eval`` entry points; one line per config says ``ok`` or the error, and any failure makes the exit status 1.

    python -m ssltm.smoke [--iters 20] [--configs 'table5/*'] [--reduced] [--out work_dirs/smoke]

Each config keeps its model (backbone, decoder, short-term module, RFCE/GCC switches, module settings), its
objectives, optimizer and schedule, and its evaluation metrics; :func:`smoke_overrides` replaces only what needs
data or files: synthetic videos in VSPW-SF form (``data.mode=sf``: one labelled frame per training video, the
others unlabelled), 64-pixel crops, batches of 2, no ``pretrained`` checkpoint, DIS flow. ``--reduced`` also
narrows the model (:func:`reduced_overrides`; the CPU test of every config): the same modules and losses at
small widths on a shallower trunk (ResNet-18/50 for the ResNets, one block per stage for Swin-S).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from .config import CONFIG_DIR, load_config
from .model.backbone import SWIN_S

# Synthetic videos standing in for every dataset: 4 videos of 17 frames (mVC16 needs clips of 16 and more),
# the last held out for evaluation, 64x64, read in the main process.
SMOKE_DATA = [
    "data.dataset=synthetic",
    "data.mode=sf",
    "data.root=null",
    "data.train_split=train",
    "data.val_split=val",
    "data.holdout=null",
    "data.eval_size=null",
    "data.crop_size=64",
    "data.num_workers=0",
    "data.flow_in_loader=false",
    "data.synthetic.num_videos=4",
    "data.synthetic.val_videos=1",
    "data.synthetic.num_frames=17",
    "data.synthetic.size=64",
]
# What needs files: no backbone checkpoint, DIS flow (RAFT needs its weights) for the model and for TC.
SMOKE_FILES = ["model.pretrained=null", "model.flow=dis", "model.flow_weights=null", "eval.flow=dis"]

# --reduced, after tests/test_cli.py's tiny model: the UperNet decoder, STT, RFCE/GCC and the short-term modules
# at narrow widths (one STT block per stride) on ResNet-18.
REDUCED_UPERNET = [
    "model.kwargs.fpn_dim=32",
    "model.kwargs.ppm_dim=32",
    "model.kwargs.stt_dims=[8,8,16,16]",
    "model.kwargs.stt_depths=[1,1,1,1]",
    "model.kwargs.head_dim=8",
    "model.kwargs.context_dim=16",
    "model.kwargs.head_channels=16",
    "model.kwargs.aux_channels=16",
    "model.st_ocr.channels=32",
    "model.st_ocr.key_channels=16",
    "model.cffm.dim=32",
    "model.cffm.heads=2",
    "model.sparse_tt.heads=2",
]
# The OCRNet decoder dilates a bottleneck ResNet (ResNet-18's basic blocks cannot be dilated): ResNet-50, with
# the OCR head's widths narrowed.
REDUCED_OCRNET = ["model.kwargs.ocr_channels=32", "model.kwargs.ocr_key_channels=16"]


def config_files(pattern: str = "**/*.yaml", root: Path = CONFIG_DIR) -> list[Path]:
    """The config files under ``root`` whose path relative to it matches ``pattern`` (a glob), sorted."""
    return sorted(p for p in root.glob(pattern) if p.is_file() and p.suffix == ".yaml")


def config_name(path: Path, root: Path = CONFIG_DIR) -> str:
    """``configs/table5/stt.yaml`` -> ``"table5/stt"``."""
    return path.resolve().relative_to(root.resolve()).with_suffix("").as_posix()


def reduced_overrides(cfg: DictConfig) -> list[str]:
    """The narrowing of ``cfg``'s model for ``--reduced``: a ResNet becomes ResNet-18 (ResNet-50 under the
    OCRNet decoder, which dilates it), Swin-S keeps its widths with one block per stage
    (``model.kwargs.backbone_depths``), and the heads take :data:`REDUCED_UPERNET`'s widths (:data:`REDUCED_OCRNET`'s
    under the OCRNet decoder)."""
    ocrnet = cfg.model.get("decoder", "upernet") == "ocrnet"
    if cfg.model.backbone == SWIN_S:
        trunk = ["model.kwargs.backbone_depths=[1,1,1,1]"]
    else:
        trunk = ["model.backbone=resnet50" if ocrnet else "model.backbone=resnet18"]
    return [*trunk, *(REDUCED_OCRNET if ocrnet else REDUCED_UPERNET)]


def smoke_overrides(cfg: DictConfig, iters: int, work_dir: Path, reduced: bool = False) -> list[str]:
    """The ``--set`` items that turn the config ``cfg`` into its smoke run: :data:`SMOKE_DATA`, :data:`SMOKE_FILES`,
    ``iters`` iterations of batch 2 on the CPU or GPU there is, one checkpoint at the end, no validation during
    training (``ssltm eval`` runs after it), and, with ``reduced``, :func:`reduced_overrides`."""
    run = [
        f"work_dir={work_dir}",
        "train.batch_size=2",
        "train.grad_accum=1",
        f"train.max_iters={iters}",
        "train.epochs=null",
        "train.max_minutes=null",
        f"train.checkpoint_every={iters}",
        f"train.log_every={iters}",
        "train.validate=false",
        "train.progress=false",
        "train.tensorboard=false",
    ]
    return [*SMOKE_DATA, *SMOKE_FILES, *run, *(reduced_overrides(cfg) if reduced else [])]


@dataclass
class SmokeResult:
    name: str
    ok: bool
    seconds: float
    message: str  # "mIoU ..." when ok, else the error
    metrics: dict | None  # the metrics JSON eval wrote
    log: Path  # everything the run printed


def smoke_config(
    path: Path,
    iters: int,
    out: Path,
    reduced: bool = False,
    root: Path = CONFIG_DIR,
    keep_checkpoints: bool = False,
) -> SmokeResult:
    """Train the config file ``path`` for ``iters`` iterations with :func:`smoke_overrides` in ``out/<name>/``
    (an earlier smoke run's files there are replaced), then ``ssltm eval --out out/<name>/metrics.json`` on its
    checkpoint, which is deleted after (a full-width model's is hundreds of MB) unless ``keep_checkpoints``.
    What both print goes to ``out/<name>/smoke.log``; an error is reported, not raised."""
    from .cli import main as ssltm_main  # the entry points load torch and the model with the run

    name = config_name(path, root)
    work_dir = out / name
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    log, metrics_file = work_dir / "smoke.log", work_dir / "metrics.json"
    captured = io.StringIO()
    start = time.perf_counter()
    message, metrics = "", None
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
        try:
            overrides = smoke_overrides(load_config(path), iters, work_dir, reduced)
            status = ssltm_main(["train", str(path), "--set", *overrides])
            if status == 0:
                status = ssltm_main(["eval", "--checkpoint", str(work_dir / "latest.pt"), "--out", str(metrics_file)])
            if status != 0:
                lines = captured.getvalue().strip().splitlines()
                message = lines[-1] if lines else f"exit status {status}"
        except Exception as err:  # noqa: BLE001 - every failure is one config's result, reported with the others
            message = f"{type(err).__name__}: {err}"
    log.write_text(captured.getvalue() + (f"\n{message}\n" if message else ""))
    if not keep_checkpoints:
        for checkpoint in work_dir.glob("*.pt"):
            checkpoint.unlink()
    seconds = time.perf_counter() - start
    if not message:
        metrics = json.loads(metrics_file.read_text())
        message = f"mIoU {metrics['mIoU']:.2f}"
    return SmokeResult(name, metrics is not None, seconds, message, metrics, log)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ssltm.smoke",
        description="train every config under configs/ for a few iterations on synthetic videos and evaluate it",
    )
    parser.add_argument("--iters", type=int, default=20, help="training iterations per config (default 20)")
    parser.add_argument(
        "--configs", default="**/*.yaml", help="glob relative to configs/ (default: every file, '**/*.yaml')"
    )
    parser.add_argument(
        "--reduced",
        action="store_true",
        help="narrow ResNet models to the test's widths (ResNet-18/50 trunk, narrow heads) instead of the configs' own",
    )
    parser.add_argument("--out", default="work_dirs/smoke", help="output folder (default work_dirs/smoke)")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints")
    parser.add_argument("--root", default=str(CONFIG_DIR), help="folder of the configs (default: configs/)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.iters < 1:
        print(f"--iters must be at least 1, got {args.iters}", file=sys.stderr)
        return 2
    root = Path(args.root)
    files = config_files(args.configs, root)
    if not files:
        print(f"--configs {args.configs!r} matches no file under {root}", file=sys.stderr)
        return 2
    failed = 0
    for path in files:
        result = smoke_config(path, args.iters, Path(args.out), args.reduced, root, args.keep_checkpoints)
        failed += not result.ok
        status = "ok   " if result.ok else "ERROR"
        print(f"{status} {result.name:<28} {result.seconds:6.1f} s  {result.message}", flush=True)
    print(f"{len(files) - failed} of {len(files)} configs ok" + (f"; logs under {args.out}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
