"""Evaluation with the paper's inference: whole videos, each labelled frame predicted from its clip with the
farthest frame of the video as the reference; mIoU, FWIoU, mVC8/16, TC and per-class IoU.

TC follows VSPW's ``TC_cal.py`` by default (``tc_protocol="vspw"``); the flow is OpenCV DIS or, as VSPW,
RAFT from a local weights file; ``tc_videos`` scores TC on the first N videos only (VSPW: 100).
Under ``torchrun`` each process evaluates a share of the videos and the results are merged.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import tv_tensors
from tqdm import tqdm

from . import distributed as dist
from .data import ClipDataset
from .flow import make_flow, to_uint8_rgb
from .metrics import VideoMetrics, format_table
from .model import VideoPredictor
from .precision import autocast
from .visualize import save_label_png


def videos_of(dataset: ClipDataset, indices: Sequence[int]) -> dict[int, list[int]]:
    """``indices`` grouped by video, in order of appearance."""
    videos: dict[int, list[int]] = {}
    for i in indices:
        videos.setdefault(dataset.queries[i][0], []).append(i)
    return videos


class _VideoFrames(Sequence):
    """The frames of one video, every one a query, loaded on demand for ``VideoPredictor.predict_video``
    (which reads the last frame first, then walks forward): a few stay cached with their labels (``labels=False``:
    none read). ``sizes`` keeps each loaded frame's stored ``(H, W)``."""

    def __init__(self, dataset: ClipDataset, video: int, length: int, keep: int, labels: bool = True):
        self.dataset, self.video, self.length, self.keep, self.labels = dataset, video, length, keep, labels
        self.cache: OrderedDict[int, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self.sizes: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return self.length

    def load(self, t: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Frame ``t`` as the model's input ``(3, H, W)`` and its label ``(H, W)`` (None without labels), through
        the dataset's transform."""
        if t not in self.cache:
            label = self.dataset.read_label(self.video, t) if self.labels else None
            image = torch.from_numpy(self.dataset.read_frame(self.video, t)).permute(2, 0, 1).contiguous()
            self.sizes[t] = tuple(image.shape[-2:])
            clip = {"frames": tv_tensors.Video(image[None]), "reference": tv_tensors.Image(image)}
            if label is not None:
                clip["label"] = tv_tensors.Mask(torch.from_numpy(label))
            out = self.dataset.transform(clip)
            out_label = out["label"].as_subclass(torch.Tensor) if label is not None else None
            self.cache[t] = (out["frames"][0].as_subclass(torch.Tensor), out_label)
            if len(self.cache) > self.keep:
                self.cache.popitem(last=False)
        return self.cache[t]

    def __getitem__(self, t: int) -> torch.Tensor:
        return self.load(t)[0]


def _keep(dataset: ClipDataset) -> int:
    """Frames :class:`_VideoFrames` keeps for the whole-video predictor: as far back as the farthest offset."""
    return 2 * max(dataset.sampler.offsets, default=0) + 3


def _video_predictions(
    model: nn.Module,
    dataset: ClipDataset,
    video: int,
    indices: list[int],
    env: dist.DistEnv,
    amp_dtype,
    num_workers: int,
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(frame id, input frame (3, H, W), label (H, W), prediction (H, W))`` for the queries ``indices`` of ``video``.

    Where every frame of the video is a query (VSPW, CamVid, synthetic videos), the model's whole-video
    predictor sends each frame through the backbone once; otherwise (Cityscapes: one labelled frame per
    snippet) each query's clip is predicted on its own. Both give the class maps of the paper's inference.
    """
    length = dataset.video_length(video)
    if [dataset.queries[i][1] for i in indices] == list(range(length)):
        frames = _VideoFrames(dataset, video, length, keep=_keep(dataset))
        predictor = VideoPredictor(model, dataset.sampler.offsets)
        with autocast(env.device, amp_dtype):
            for t, pred in enumerate(predictor.predict_video(frames)):
                image, label = frames.load(t)
                yield dataset.frame_id(video, t), image, label, pred
        return
    loader = DataLoader(Subset(dataset, indices), batch_size=1, num_workers=num_workers)
    for batch in loader:
        frames = batch["frames"].to(env.device, non_blocking=True)
        reference = batch["reference"].to(env.device, non_blocking=True)
        with autocast(env.device, amp_dtype):
            pred = model.predict(frames, reference)
        yield batch["frame"][0], batch["frames"][0, 0], batch["label"][0], pred[0]


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
    tc_protocol: str = "vspw",
    flow: str = "dis",
    raft_weights: str | Path | None = None,
    tc_videos: int | None = None,
    amp_dtype: torch.dtype | None = None,
    num_workers: int = 0,
    palette: Sequence[Sequence[int]] | None = None,
    save_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Predict the queries ``dataset[indices]`` with the paper's inference and score the predictions.

    Under ``torchrun`` each process takes every ``world_size``-th video and the results are merged.

    Args:
        model: an SSLTM; evaluated in eval mode and left in the mode it was in.
        dataset: clips with ``reference="farthest"`` and ``causal=False`` (the paper's inference).
        tc: compute TC.
        tc_protocol: ``"vspw"`` (TC_cal.py's sampling) or ``"exact"``, see :func:`ssltm.metrics.tc`.
        flow: TC's optical flow, ``"dis"`` (OpenCV DIS) or ``"raft"`` (torchvision's ``raft_large``, 20
            iterations, on ``env.device``, with the weights of the local file ``raft_weights``).
        tc_videos: compute TC on the first ``tc_videos`` videos of ``indices`` only (VSPW's script: 100);
            ``None``: on all. mIoU, FWIoU and mVC always use every video.
        save_dir: if given, each prediction is written to ``save_dir/<video>/<frame>.png`` (VSPW's
            submission layout; pixel values are class ids) with ``palette`` as colours.

    Returns:
        :meth:`VideoMetrics.compute`'s dict (fractions), the same on every process; with TC also
        ``"TC_protocol"``, ``"TC_flow"`` and ``"TC_videos"`` (the number of videos TC was computed on).
    """
    if tc_videos is not None and (isinstance(tc_videos, bool) or not isinstance(tc_videos, int) or tc_videos < 1):
        raise ValueError(f"tc_videos must be a positive int or None, got {tc_videos!r}")
    all_videos = list(videos_of(dataset, indices).items())
    tc_ids = [dataset.video_name(v) for v, _ in all_videos[:tc_videos]] if tc else []
    flow_fn = make_flow(flow, raft_weights, env.device) if tc else None
    videos = all_videos[env.rank :: env.world_size]
    metrics = VideoMetrics(
        num_classes,
        mvc_lengths=tuple(mvc_lengths),
        tc=tc,
        flow=flow_fn,
        tc_protocol=tc_protocol,
        tc_video_ids=tc_ids,
    )
    bar = tqdm(
        total=sum(len(v) for _, v in videos),
        desc="eval",
        unit="frame",
        leave=False,
        disable=not (progress and env.is_main),
    )
    was_training = model.training
    model.eval()
    try:
        for video, video_indices in videos:
            name = dataset.video_name(video)
            for frame, image, label, pred in _video_predictions(
                model, dataset, video, video_indices, env, amp_dtype, num_workers
            ):
                pred = pred.cpu().numpy()
                metrics.update(name, pred, label.numpy(), to_uint8_rgb(image) if metrics.scores_tc(name) else None)
                if save_dir is not None:
                    save_label_png(Path(save_dir) / name / f"{frame}.png", pred, palette or [])
                bar.update(1)
    finally:
        model.train(was_training)
        bar.close()
    merged = None
    for other in dist.all_gather_object(metrics):
        if merged is None:
            merged = other
        else:
            merged.merge(other)
    results = merged.compute()
    if tc:
        results.update(TC_protocol=tc_protocol, TC_flow=flow, TC_videos=len(tc_ids))
    return results


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: ClipDataset,
    env: dist.DistEnv,
    save_dir: str | Path,
    *,
    palette: Sequence[Sequence[int]] | None = None,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> int:
    """Predict every frame of every video of ``dataset`` with the paper's inference (the whole-video predictor:
    the video's farthest frame as the reference, every frame through the backbone once) and write each class map
    to ``save_dir/<video>/<frame>.png`` (VSPW's submission layout: pixel values are class ids, ``palette`` the
    colours), at the stored frame's size (nearest-neighbour where ``data.eval_size`` resized the input). No label
    is read and no metric computed: for splits without labels, the dataset built with ``labels=False``.

    Under ``torchrun`` each process takes every ``world_size``-th video. Returns the number of frames written,
    over all processes.

    Raises:
        ValueError: ``dataset`` has no videos, or a video whose frames are not all queries.
    """
    all_videos = list(videos_of(dataset, range(len(dataset))).items())
    if not all_videos:
        raise ValueError("no videos to predict")
    for video, indices in all_videos:
        if [dataset.queries[i][1] for i in indices] != list(range(dataset.video_length(video))):
            raise ValueError(
                f"video {dataset.video_name(video)!r}: prediction needs every frame as a query "
                "(a dataset built with labels=False)"
            )
    videos = all_videos[env.rank :: env.world_size]
    bar = tqdm(
        total=sum(len(v) for _, v in videos),
        desc="predict",
        unit="frame",
        leave=False,
        disable=not (progress and env.is_main),
    )
    written = 0
    try:
        for video, indices in videos:
            name = dataset.video_name(video)
            frames = _VideoFrames(dataset, video, len(indices), keep=_keep(dataset), labels=False)
            predictor = VideoPredictor(model, dataset.sampler.offsets)
            with autocast(env.device, amp_dtype):
                for t, pred in enumerate(predictor.predict_video(frames)):
                    size = frames.sizes[t]
                    if tuple(pred.shape) != size:
                        pred = nn.functional.interpolate(pred[None, None].float(), size, mode="nearest")[0, 0]
                    path = Path(save_dir) / name / f"{dataset.frame_id(video, t)}.png"
                    save_label_png(path, pred.cpu().numpy(), palette or [])
                    written += 1
                    bar.update(1)
    finally:
        bar.close()
    return sum(dist.all_gather_object(written))


def _percent(value: float) -> float | None:
    return None if math.isnan(value) else round(100 * float(value), 2)


# evaluate()'s report of how TC was computed: passed to the metrics file as they are.
TC_SETTINGS = ("TC_protocol", "TC_flow", "TC_videos")


def results_json(results: dict, classes: Sequence[str]) -> dict:
    """The metrics file's content: percent with two decimals, ``null`` for a metric
    with nothing to average; ``per_class`` maps class names to IoU; the TC settings as they are."""
    out = {k: v if k in TC_SETTINGS else _percent(v) for k, v in results.items() if k != "per_class"}
    out["per_class"] = {name: _percent(v) for name, v in zip(classes, results["per_class"], strict=True)}
    return out


def results_table(results: dict, classes: Sequence[str]) -> str:
    return format_table(results, class_names=list(classes))
