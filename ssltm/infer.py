"""Inference on a video file or a folder of frames: streaming prediction frame by frame, label PNGs,
colourised overlays, an overlay video and the frame rate."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from . import distributed as dist
from .build import load_model
from .data import IMAGENET_MEAN, IMAGENET_STD, natural_order
from .model import VideoPredictor
from .outputs import check_output_folder, staged_folder
from .precision import amp_dtype, autocast
from .visualize import overlay, save_label_png

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_FPS = 10.0
OUTPUTS = ("labels", "overlays", "overlay.mp4")  # what infer writes into its output folder


@dataclass
class FrameSource:
    """Frames in temporal order: ``frames`` yields ``(name, RGB uint8 (H, W, 3))``."""

    frames: Iterator[tuple[str, np.ndarray]]
    fps: float | None
    count: int | None


def open_frames(path: str | Path, max_frames: int | None = None) -> FrameSource:
    """A folder of images in the natural order of their names (``f_2`` before ``f_10``) or a video file OpenCV can
    decode, its first ``max_frames`` (at least 1) frames if given.

    Raises:
        FileNotFoundError: nothing at ``path``, or a folder without images.
        ValueError: OpenCV cannot open the video file.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(
            (p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: natural_order(p.name)
        )
        if not files:
            raise FileNotFoundError(f"--input: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder {path}")
        files = files[:max_frames]
        return FrameSource(_folder_frames(files), None, len(files))
    if not path.is_file():
        raise FileNotFoundError(f"--input: no video file or folder of frames at {path}")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise ValueError(f"--input: OpenCV cannot open the video file {path}")
    fps = capture.get(cv2.CAP_PROP_FPS) or None
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    if count is not None and max_frames is not None:
        count = min(count, max_frames)
    return FrameSource(_video_frames(capture, max_frames), fps, count)


def _folder_frames(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    for file in files:
        bgr = cv2.imread(str(file), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"--input: cannot read the image {file}")
        yield file.stem, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _video_frames(capture: cv2.VideoCapture, max_frames: int | None) -> Iterator[tuple[str, np.ndarray]]:
    index = 0
    try:
        while max_frames is None or index < max_frames:
            ok, bgr = capture.read()
            if not ok:
                break
            yield f"frame_{index:06d}", cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        capture.release()


def _resize(rgb: np.ndarray, size: int | None) -> np.ndarray:
    if size is None:
        return rgb
    h, w = rgb.shape[:2]
    scale = size / min(h, w)
    shape = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(rgb, shape, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def to_input(rgb: np.ndarray, device: torch.device) -> torch.Tensor:
    """RGB uint8 ``(H, W, 3)`` as the model's ImageNet-normalised float ``(3, H, W)``."""
    x = torch.from_numpy(rgb).to(device).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
    return (x - mean) / std


def check_infer_args(
    out: str | Path, size: int | None = None, max_frames: int | None = None, fps: float | None = None
) -> None:
    """Raise a ValueError naming the option for a value :func:`infer` cannot use, before any work."""
    for name, value in (("--size", size), ("--max-frames", max_frames)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if fps is not None and not fps > 0:
        raise ValueError(f"--fps must be positive, got {fps}")
    out = check_output_folder(out, "--out")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS)
        if others:
            raise ValueError(
                f"--out: {out} holds other files than an earlier inference's ({', '.join(others[:3])}"
                f"{', ...' if len(others) > 3 else ''}); give a new or empty folder"
            )


def infer(
    checkpoint: str | Path,
    input_path: str | Path,
    out: str | Path,
    size: int | None = None,
    max_frames: int | None = None,
    fps: float | None = None,
    device: str = "auto",
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> dict:
    """Segment every frame of ``input_path`` (a video file or a folder of frames).

    Frames are resized to the shorter side ``size`` (default: the config's ``data.eval_size``, else as they
    are). The config is the checkpoint's, with ``config`` (a YAML file) and ``overrides`` over it.

    Writes ``out/labels/<frame>.png`` (class ids, palette PNG), ``out/overlays/<frame>.jpg`` and
    ``out/overlay.mp4`` into a folder beside ``out`` that replaces ``out`` (an earlier inference's) only when
    every frame is done; prints and returns the frame rates.
    """
    check_infer_args(out, size, max_frames, fps)
    dev = dist.resolve_device(device)
    source = open_frames(input_path, max_frames=max_frames)
    model, cfg, meta = load_model(checkpoint, dev, config, overrides)
    size = size or cfg.data.eval_size
    palette = meta["palette"]
    # Streaming: one backbone pass per frame; the class maps equal clip prediction on causal clips.
    predictor = VideoPredictor(model, tuple(cfg.data.offsets))
    dtype = amp_dtype(cfg.train.amp, dev)
    frames, model_seconds, start = 0, 0.0, time.perf_counter()
    with staged_folder(out) as staging:
        (staging / "overlays").mkdir()
        (staging / "labels").mkdir()
        writer = None
        try:
            for name, rgb in tqdm(source.frames, total=source.count, desc="infer", unit="frame", leave=False):
                rgb = _resize(rgb, size)
                tick = time.perf_counter()
                with autocast(dev, dtype):
                    pred = predictor.step(to_input(rgb, dev))
                pred = pred.cpu().numpy()
                model_seconds += time.perf_counter() - tick
                save_label_png(staging / "labels" / f"{name}.png", pred, palette)
                blended = overlay(rgb, pred, palette)
                Image.fromarray(blended).save(staging / "overlays" / f"{name}.jpg", quality=90)
                if writer is None:
                    writer = _video_writer(staging / "overlay.mp4", fps or source.fps or DEFAULT_FPS, blended.shape)
                if writer is not None:
                    writer.write(cv2.cvtColor(blended, cv2.COLOR_RGB2BGR))
                frames += 1
        finally:
            if writer is not None:
                writer.release()
    total = time.perf_counter() - start
    rates = {"frames": frames, "model_fps": frames / max(model_seconds, 1e-9), "total_fps": frames / max(total, 1e-9)}
    print(
        f"{frames} frames: {rates['model_fps']:.2f} frames/s (model), {rates['total_fps']:.2f} frames/s "
        f"(with reading and writing); written to {out}"
    )
    return rates


def _video_writer(path: Path, fps: float, shape: tuple[int, ...]) -> cv2.VideoWriter | None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (shape[1], shape[0]))
    if not writer.isOpened():
        print(f"note: OpenCV cannot write {path.name} here (no mp4v encoder); the frames are in overlays/")
        return None
    return writer
