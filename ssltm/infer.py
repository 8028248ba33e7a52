"""Inference on a video file, a folder of frames, a camera or a stream: streaming prediction frame by frame
(:func:`load_predictor` for Python code, :func:`infer` for the ``ssltm infer`` command), label PNGs,
colourised overlays, an overlay video and the frame rate."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from . import distributed as dist
from .build import load_model
from .data import IMAGENET_MEAN, IMAGENET_STD, natural_order
from .model import VideoPredictor
from .model.predictor import MIN_SIZE
from .outputs import check_replaceable_folder, staged_folder
from .precision import amp_dtype, autocast
from .visualize import overlay, save_label_png

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_FPS = 10.0
OUTPUTS = ("labels", "overlays", "overlay.mp4")  # what infer writes into its output folder


@dataclass
class FrameSource:
    """Frames in temporal order: ``frames`` yields ``(name, RGB uint8 (H, W, 3))``; ``live`` for a camera or
    stream (no frame count, may not end by itself); ``close()`` releases a camera, stream or video file."""

    frames: Iterator[tuple[str, np.ndarray]]
    fps: float | None
    count: int | None
    live: bool = False
    close: Callable[[], None] = lambda: None


def open_frames(source: str | Path, max_frames: int | None = None) -> FrameSource:
    """The frames of ``source``, its first ``max_frames`` (at least 1) if given:

    - a folder of images, in the natural order of their names (``f_2`` before ``f_10``);
    - a camera index (a string of digits, ``"0"``; a folder named ``0`` is ``./0``);
    - a URL OpenCV opens (anything with ``://``: ``rtsp://``, ``http://``, ...), given to OpenCV as it is;
    - a video file OpenCV decodes.

    A video, camera or stream is opened and its first frame read here, so a source that gives no frame fails
    before any work.

    Raises:
        FileNotFoundError: nothing at ``source``, or a folder without images.
        ValueError: OpenCV cannot open the video file, camera or stream, or reads no frame from it.
    """
    text = str(source)
    if text.isdigit():
        return _open_capture(int(text), f"camera {text}", max_frames, live=True)
    if "://" in text:
        return _open_capture(text, f"the stream {text}", max_frames, live=True)
    path = Path(source)
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
    return _open_capture(str(path), f"the video file {path}", max_frames, live=False)


def _folder_frames(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    for file in files:
        bgr = cv2.imread(str(file), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"--input: cannot read the image {file}")
        yield file.stem, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _open_capture(target: int | str, what: str, max_frames: int | None, live: bool) -> FrameSource:
    with _quiet_native_stderr():  # OpenCV and FFmpeg print their own lines about a source they cannot open
        capture = cv2.VideoCapture(target)
        ok, bgr = capture.read() if capture.isOpened() else (False, None)
    if not ok:
        opened = capture.isOpened()
        capture.release()
        if not opened:
            raise ValueError(f"--input: OpenCV cannot open {what}")
        raise ValueError(f"--input: OpenCV opens {what} but reads no frame from it (empty, truncated or not a video)")
    fps = capture.get(cv2.CAP_PROP_FPS)
    count = None if live else int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    count = count if count and count > 0 else None
    if count is not None and max_frames is not None:
        count = min(count, max_frames)
    frames = _capture_frames(capture, bgr, max_frames)
    return FrameSource(frames, fps if fps > 0 else None, count, live, capture.release)


def _capture_frames(
    capture: cv2.VideoCapture, first: np.ndarray, max_frames: int | None
) -> Iterator[tuple[str, np.ndarray]]:
    index, bgr = 0, first
    try:
        while max_frames is None or index < max_frames:
            if bgr is None:
                ok, bgr = capture.read()
                if not ok:  # the end of the video or stream
                    break
            yield f"frame_{index:06d}", cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            index, bgr = index + 1, None
    finally:
        capture.release()


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence what C libraries write to the process's stderr (file descriptor 2) inside the block."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _resize(rgb: np.ndarray, size: int | None) -> np.ndarray:
    if size is None:
        return rgb
    h, w = rgb.shape[:2]
    scale = size / min(h, w)
    shape = (max(1, round(w * scale)), max(1, round(h * scale)))
    if shape == (w, h):  # already that size (a frame resized before)
        return rgb
    return cv2.resize(rgb, shape, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def to_input(rgb: np.ndarray, device: torch.device) -> torch.Tensor:
    """RGB uint8 ``(H, W, 3)`` as the model's ImageNet-normalised float ``(3, H, W)``."""
    x = torch.from_numpy(rgb).to(device).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
    return (x - mean) / std


class Predictor:
    """Streaming segmentation of a video's RGB frames with a trained SSLTM, one frame at a time; made by
    :func:`load_predictor`.

    ``step(frame)`` takes the next frame, RGB ``uint8`` ``(H, W, 3)`` (as PIL gives it; OpenCV's BGR frames
    need ``cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)``), and returns its class map, ``int64`` ``(H, W)``, the
    size of the frame. Inside, the frame is resized to the shorter side ``size`` (if set), normalised,
    predicted under the config's ``train.amp`` autocast without gradients, and the class map resized back
    by nearest neighbour. Prediction is causal: the first frame is the reference, and each frame sees the
    earlier ones it needs (cached: one backbone pass per frame). ``reset()`` starts a new video.

    Attributes:
        classes: class names; ``classes[k]`` is class id ``k``.
        palette: RGB colour per class (see :func:`ssltm.visualize.overlay` and ``save_label_png``).
        size: the shorter side frames are resized to before the model, or None (as they come).
        device, model, config: where it runs, the ``SSLTM`` (eval mode) and its run config.
    """

    def __init__(self, model: torch.nn.Module, config, meta: dict, device: torch.device, size: int | None) -> None:
        self.model, self.config, self.device, self.size = model, config, device, size
        self.classes: tuple[str, ...] = tuple(meta["classes"])
        self.palette: tuple[tuple[int, int, int], ...] = tuple(tuple(int(c) for c in rgb) for rgb in meta["palette"])
        self._dtype = amp_dtype(config.train.amp, device)
        self._predictor = VideoPredictor(model, tuple(config.data.offsets))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def reset(self) -> None:
        """Start a new video: forget the cached frames and the reference."""
        self._predictor.reset()

    def resize(self, frame: np.ndarray) -> np.ndarray:
        """``frame`` as the model sees it: resized to the shorter side ``size`` (unchanged when ``size`` is None);
        a frame this returns goes through :meth:`step` without resizing."""
        return _resize(_check_frame(frame), self.size)

    def step(self, frame: np.ndarray) -> np.ndarray:
        """The class map of the video's next ``frame``: int64 ``(H, W)`` for RGB uint8 ``(H, W, 3)``.

        Raises:
            ValueError: ``frame`` is not a uint8 array of shape ``(H, W, 3)``, or smaller than the model's smallest
                input (32 pixels high and wide) once resized.
        """
        height, width = _check_frame(frame).shape[:2]
        rgb = np.require(self.resize(frame), requirements=("C", "W"))  # torch wants writable memory
        if min(rgb.shape[:2]) < MIN_SIZE:
            resized = f" after resizing to size {self.size}" if rgb.shape[:2] != (height, width) else ""
            raise ValueError(
                f"frame must be at least {MIN_SIZE} pixels high and wide, got {rgb.shape[0]}x{rgb.shape[1]}{resized}"
            )
        with torch.no_grad(), autocast(self.device, self._dtype):
            pred = self._predictor.step(to_input(rgb, self.device))
        if pred.shape != (height, width):
            pred = F.interpolate(pred[None, None].float(), size=(height, width), mode="nearest")[0, 0].long()
        return pred.cpu().numpy()


def _check_frame(frame: np.ndarray) -> np.ndarray:
    if not isinstance(frame, np.ndarray):
        raise ValueError(f"frame must be a numpy array, RGB uint8 (H, W, 3), got {type(frame).__name__}")
    if frame.dtype != np.uint8:
        raise ValueError(f"frame must be RGB uint8 (H, W, 3), got dtype {frame.dtype}")
    if frame.ndim != 3 or frame.shape[2] != 3 or 0 in frame.shape:
        raise ValueError(f"frame must be RGB uint8 of shape (H, W, 3), got shape {tuple(frame.shape)}")
    return frame


def load_predictor(
    checkpoint: str | Path,
    device: str | torch.device | None = None,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    size: int | None = None,
) -> Predictor:
    """The streaming :class:`Predictor` of a checkpoint.

    Args:
        checkpoint: a training run's checkpoint (``.pt``).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``; None: the GPU if there is one.
        config: a YAML file whose keys override the checkpoint's config; ``overrides``: ``key=value`` over both.
        size: the shorter side frames are resized to before the model; None: the config's ``data.eval_size``
            (``overrides=["data.eval_size=null"]`` for frames as they come).

    Raises:
        FileNotFoundError, ValueError: no checkpoint file, not a checkpoint, weights that do not fit the config,
            a bad device or size; ConfigError (a ValueError) for bad config keys.
    """
    if size is not None and size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    dev = dist.resolve_device("auto" if device is None else str(device))
    model, cfg, meta = load_model(checkpoint, dev, config, overrides)
    return Predictor(model, cfg, meta, dev, size if size is not None else cfg.data.eval_size)


def check_infer_args(
    out: str | Path, size: int | None = None, max_frames: int | None = None, fps: float | None = None
) -> None:
    """Raise a ValueError naming the option for a value :func:`infer` cannot use, before any work."""
    for name, value in (("--size", size), ("--max-frames", max_frames)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if fps is not None and not fps > 0:
        raise ValueError(f"--fps must be positive, got {fps}")
    check_replaceable_folder(out, "--out", lambda p: p.name in OUTPUTS, "an earlier inference's")


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
    overlays: bool = True,
    video: bool = True,
) -> dict:
    """Segment every frame of ``input_path`` (see :func:`open_frames`: a video file, a folder of frames, a camera
    index or a URL) with the :class:`Predictor` of the checkpoint.

    Frames are resized to the shorter side ``size`` (default: the config's ``data.eval_size``, else as they
    are), and the outputs have that size. The config is the checkpoint's, with ``config`` (a YAML file) and
    ``overrides`` over it.

    Writes ``out/labels/<frame>.png`` (class ids, palette PNG), with ``overlays`` ``out/overlays/<frame>.jpg``,
    with ``video`` ``out/overlay.mp4`` (H.264 through PyAV when it is installed, else OpenCV's mp4v), into a
    folder beside ``out`` that replaces ``out`` (an earlier inference's) only when the frames are done. A
    camera or stream ends at ``max_frames``, at its end, or at Ctrl-C, which then ends the input (the
    frames so far are written); a second Ctrl-C, or one on a file or folder, leaves ``out`` as it was.
    Prints and returns the frame rates.
    """
    check_infer_args(out, size, max_frames, fps)
    dev = dist.resolve_device(device)
    source = open_frames(input_path, max_frames=max_frames)
    try:
        predictor = load_predictor(checkpoint, dev, config, overrides, size)
        frames, model_seconds, start = 0, 0.0, time.perf_counter()
        with staged_folder(out) as staging, _ctrl_c_ends_input(source.live) as ended:
            (staging / "labels").mkdir()
            if overlays:
                (staging / "overlays").mkdir()
            writer = None
            try:
                progress = tqdm(source.frames, total=source.count, desc="infer", unit="frame", leave=False)
                for name, rgb in progress:
                    rgb = predictor.resize(rgb)
                    tick = time.perf_counter()
                    pred = predictor.step(rgb)
                    model_seconds += time.perf_counter() - tick
                    save_label_png(staging / "labels" / f"{name}.png", pred, predictor.palette)
                    if overlays or video:
                        blended = overlay(rgb, pred, predictor.palette)
                    if overlays:
                        Image.fromarray(blended).save(staging / "overlays" / f"{name}.jpg", quality=90)
                    if video and frames == 0:
                        try:
                            writer = VideoWriter(staging / "overlay.mp4", fps or source.fps or DEFAULT_FPS, rgb.shape)
                        except OSError as err:
                            print(f"note: no overlay video: {err}")
                    if writer is not None:
                        writer.write(blended)
                    frames += 1
                    if ended():
                        break
            finally:
                if writer is not None:
                    writer.close()
    finally:
        source.close()
    total = time.perf_counter() - start
    rates = {"frames": frames, "model_fps": frames / max(model_seconds, 1e-9), "total_fps": frames / max(total, 1e-9)}
    print(
        f"{frames} frames{' (the input ended by Ctrl-C)' if ended() else ''}: {rates['model_fps']:.2f} frames/s "
        f"(model), {rates['total_fps']:.2f} frames/s (with reading and writing); written to {out}"
    )
    return rates


@contextlib.contextmanager
def _ctrl_c_ends_input(live: bool) -> Iterator[Callable[[], bool]]:
    """For a live input (and in the main thread, where signals arrive): the first Ctrl-C only marks the input as
    ended, so the frame at hand is finished and the output kept; the function yielded says whether it came. A
    second Ctrl-C interrupts as usual."""
    pressed: list[bool] = []
    if not live or threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.getsignal(signal.SIGINT)
    previous = signal.default_int_handler if previous is None else previous

    def end_input(signum, frame) -> None:
        pressed.append(True)
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, end_input)
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous)


class _H264Writer:
    """An H.264 MP4 (yuv420p, which browsers play) through PyAV."""

    def __init__(self, av, path: Path, fps: float, size: tuple[int, int]) -> None:
        self.av = av
        self.container = av.open(str(path), mode="w")
        self.stream = self.container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        self.stream.width, self.stream.height = size
        self.stream.pix_fmt = "yuv420p"

    def write(self, rgb: np.ndarray) -> None:
        self.container.mux(self.stream.encode(self.av.VideoFrame.from_ndarray(rgb, format="rgb24")))

    def close(self) -> None:
        self.container.mux(self.stream.encode())  # what the encoder still holds
        self.container.close()


class _Mp4vWriter:
    """An MPEG-4 Part 2 (mp4v) MP4 through OpenCV: plays in video players, not in web browsers."""

    def __init__(self, writer: cv2.VideoWriter) -> None:
        self.writer = writer

    def write(self, rgb: np.ndarray) -> None:
        self.writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        self.writer.release()


class VideoWriter:
    """RGB uint8 frames of one ``(H, W)`` into the MP4 file ``path``: H.264 through PyAV (the ``video`` extra)
    when it is installed with libx264, else OpenCV's mp4v. Both code yuv420p, which needs an even width and
    height: an odd one gets one more column or row, a copy of the last (a note says so).

    Raises:
        OSError: neither PyAV nor OpenCV can write the file.
    """

    def __init__(self, path: Path, fps: float, shape: tuple[int, ...]) -> None:
        height, width = shape[:2]
        self.pad = ((0, height % 2), (0, width % 2), (0, 0))  # rows, columns, channels
        size = (width + width % 2, height + height % 2)
        try:
            import av
        except ImportError:
            av = None
        if av is not None and "libx264" in av.codecs_available:
            self.writer = _H264Writer(av, path, fps, size)
        else:
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
            if not writer.isOpened():
                raise OSError(f"OpenCV cannot write {path} (no mp4v encoder), and PyAV is not installed")
            print(
                f"note: {path.name} is mp4v (MPEG-4 Part 2), which web browsers do not play; "
                "pip install 'ssltm[video]' (PyAV) makes it H.264"
            )
            self.writer = _Mp4vWriter(writer)
        if size != (width, height):
            print(
                f"note: {path.name} is {size[0]}x{size[1]}, the frames {width}x{height}: its coding needs an even "
                "width and height, so the last column or row is repeated"
            )

    def write(self, rgb: np.ndarray) -> None:
        self.writer.write(np.pad(rgb, self.pad, mode="edge"))

    def close(self) -> None:
        self.writer.close()
