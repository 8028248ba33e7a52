"""Evaluation with the paper's inference: whole videos, each labelled frame predicted from its clip with the
farthest frame of the video as the reference; mIoU, FWIoU, mVC8/16, TC and per-class IoU.

Under ``torchrun`` each process evaluates a share of the videos and the results are merged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from . import distributed as dist
from .data import IMAGENET_MEAN, IMAGENET_STD, ClipDataset
from .metrics import VideoMetrics, format_table
from .visualize import save_label_png


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` on ``device``, or nothing when ``dtype`` is None (full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def to_uint8_rgb(frame: torch.Tensor) -> np.ndarray:
    """An ImageNet-normalised ``(3, H, W)`` frame back to RGB uint8 ``(H, W, 3)`` (the optical flow's input)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (frame.float().cpu() * std + mean).mul(255).round().clamp(0, 255)
    return rgb.to(torch.uint8).permute(1, 2, 0).numpy()


def video_shares(dataset: ClipDataset, indices: Sequence[int], world_size: int) -> list[list[int]]:
    """``indices`` split between ``world_size`` processes by whole videos (the metrics need each video's
    frames in order on one process), round robin in video order."""
    videos: dict[int, list[int]] = {}
    for i in indices:
        videos.setdefault(dataset.queries[i][0], []).append(i)
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for n, video in enumerate(videos.values()):
        shares[n % world_size].extend(video)
    return shares


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: ClipDataset,
    indices: Sequence[int],
    num_classes: int,
    env: dist.DistEnv,
    *,
    mvc_lengths: Sequence[int] = (8, 16),
    tc: bool = True,
    amp_dtype: torch.dtype | None = None,
    num_workers: int = 0,
    palette: Sequence[Sequence[int]] | None = None,
    save_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Predict every clip of ``dataset[indices]`` (ordered by video, then frame) and score the predictions.

    Args:
        model: an SSLTM (``model.predict(frames, reference) -> (B, H, W)``); evaluated in eval mode and
            left in the mode it was in.
        dataset: clips with ``reference="farthest"`` for the paper's inference.
        save_dir: if given, each prediction is written to ``save_dir/<video>/<frame>.png`` (VSPW's
            submission layout; pixel values are class ids, 255 nowhere) with ``palette`` as colours.

    Returns:
        :meth:`VideoMetrics.compute`'s dict (fractions), the same on every process.
    """
    share = video_shares(dataset, indices, env.world_size)[env.rank]
    loader = DataLoader(Subset(dataset, share), batch_size=1, num_workers=num_workers)
    metrics = VideoMetrics(num_classes, mvc_lengths=tuple(mvc_lengths), tc=tc)
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(loader, desc="eval", unit="frame", disable=not (progress and env.is_main), leave=False)
        for batch in bar:
            frames = batch["frames"].to(env.device, non_blocking=True)
            reference = batch["reference"].to(env.device, non_blocking=True)
            with autocast(env.device, amp_dtype):
                pred = model.predict(frames, reference)
            pred = pred[0].cpu().numpy()
            video, frame = batch["video"][0], batch["frame"][0]
            image = to_uint8_rgb(batch["frames"][0, 0]) if tc else None
            metrics.update(video, pred, batch["label"][0].numpy(), image)
            if save_dir is not None:
                save_label_png(Path(save_dir) / video / f"{frame}.png", pred, palette or [])
    finally:
        model.train(was_training)
    merged = None
    for other in dist.all_gather_object(metrics):
        if merged is None:
            merged = other
        else:
            merged.merge(other)
    return merged.compute()


def _percent(value: float) -> float | None:
    return None if math.isnan(value) else round(100 * float(value), 2)


def results_json(results: dict, classes: Sequence[str]) -> dict:
    """The metrics file's content (ARCHITECTURE.md §3.4): percent with two decimals, ``null`` for a metric
    with nothing to average; ``per_class`` maps class names to IoU."""
    out = {k: _percent(v) for k, v in results.items() if k != "per_class"}
    out["per_class"] = {name: _percent(v) for name, v in zip(classes, results["per_class"], strict=True)}
    return out


def results_table(results: dict, classes: Sequence[str]) -> str:
    return format_table(results, class_names=list(classes))
