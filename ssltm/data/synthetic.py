"""Procedural videos with exact labels, generated in code: the default data for demos and tests.

Each video is a textured two-class background (a wavy horizon, the textures panning with a moving
camera) with textured shapes of other classes moving over it on smooth periodic paths: they occlude
one another (drawn back to front), and leave the view and come back. Every class has its own colour,
stripe pattern and noise texture, the same in all videos of a seed, so appearance predicts the class.
Only per-video parameters are stored; a frame is rendered when asked for, with whole-image numpy
operations (no per-pixel Python).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import MODES, ClipDataset, Transform

_TILE = 32  # side of each class's repeating noise texture (a power of two: wrapping is a bit mask)
_ELLIPSE, _RECTANGLE, _DIAMOND = 0, 1, 2


@dataclass(frozen=True)
class _Video:
    """One video's parameters; frame ``t`` is a pure function of these and ``t``."""

    top: int  # background class above the horizon
    bottom: int  # and below it
    horizon: np.ndarray  # (4,) float: mean row, amplitude, spatial frequency, phase speed
    pan: float  # background texture shift, pixels per frame
    classes: np.ndarray  # (m,) int: object classes, drawn in this order (later ones in front)
    shapes: np.ndarray  # (m,) int: _ELLIPSE, _RECTANGLE or _DIAMOND
    half_sizes: np.ndarray  # (m, 2) float: half width and height in the object's frame
    paths: np.ndarray  # (m, 2, 4) float: per axis (x, y) centre, amplitude, angular speed, phase
    spin: np.ndarray  # (m, 2) float: angle at t=0 and angular speed (radians per frame)


class SyntheticVideos(ClipDataset):
    """Procedural videos; every frame of every video is a query (``mode="full"``), or only the first frame of
    each (``mode="sf"``, as VSPW-SF: the other frames are unlabelled, see :class:`~ssltm.data.UnlabeledClips`).

    Args:
        num_videos: number of videos.
        num_frames: frames per video.
        size: frame size, an int or ``(H, W)``.
        num_classes: classes (at least 3: two for the background, one or more for objects).
        seed: fixes the videos, the class appearances, and each sample's reference frame and
            augmentation: sample ``i`` is the same whatever the order or worker
            (:meth:`~ssltm.data.ClipDataset.set_epoch` varies the last two).
        objects: inclusive range of the number of moving objects per video.
        query_videos: the videos whose frames are the samples (default: all); the others still exist (a
            split of one seed's videos keeps every class's appearance).
        mode: ``"full"`` or ``"sf"`` (see above).
        offsets, causal, reference, transform, strong_reference, strong_frames: see :class:`~ssltm.data.ClipDataset`.

    Samples as in :class:`~ssltm.data.ClipDataset`; labels are exact class ids in
    ``0..num_classes-1`` (no ignored pixels, except padding added by a transform). Video names
    are ``"synthetic_<v>"``, frame ids ``"<t>"`` (zero-padded to 5 digits).
    """

    def __init__(
        self,
        num_videos: int = 8,
        num_frames: int = 32,
        size: int | Sequence[int] = 128,
        num_classes: int = 6,
        seed: int = 0,
        objects: tuple[int, int] = (2, 5),
        query_videos: Sequence[int] | None = None,
        offsets: Sequence[int] = (3, 6, 9),
        causal: bool = False,
        reference: str = "random",
        transform: Transform | None = None,
        mode: str = "full",
        strong_reference: bool = False,
        strong_frames: bool = False,
    ):
        super().__init__(
            offsets=offsets,
            causal=causal,
            reference=reference,
            transform=transform,
            seed=seed,
            strong_reference=strong_reference,
            strong_frames=strong_frames,
        )
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        if min(num_videos, num_frames, height, width) < 1:
            raise ValueError(
                f"num_videos, num_frames and size must be positive, got {num_videos}, {num_frames}, {size!r}"
            )
        if num_classes < 3 or num_classes > 255:
            raise ValueError(f"num_classes must be in 3..255 (two background classes and objects), got {num_classes}")
        if not 1 <= objects[0] <= objects[1]:
            raise ValueError(f"objects must be a range (low, high) with 1 <= low <= high, got {objects!r}")
        self.num_classes = num_classes
        self.num_frames, self.height, self.width = num_frames, height, width
        rng = np.random.default_rng([seed, 0])
        colours = rng.uniform(40, 215, (num_classes, 1, 3))
        angle = rng.uniform(0, np.pi, num_classes)
        frequency = rng.uniform(0.15, 0.6, num_classes)
        self._stripe_x = (frequency * np.cos(angle)).astype(np.float32)
        self._stripe_y = (frequency * np.sin(angle)).astype(np.float32)
        self._contrast = rng.uniform(15, 45, (num_classes, 3)).astype(np.float32)
        # Colour plus noise, one row per (class, tile row, tile column): one gather gives both.
        noise = rng.uniform(-12, 12, (num_classes, _TILE * _TILE, 3))
        self._texture = (colours + noise).reshape(-1, 3).astype(np.float32)
        self._videos = [self._make_video(np.random.default_rng([seed, 1, v]), objects) for v in range(num_videos)]
        self._grid_y, self._grid_x = np.mgrid[0:height, 0:width].astype(np.float32)
        videos = range(num_videos) if query_videos is None else query_videos
        if any(not 0 <= v < num_videos for v in videos):
            raise ValueError(f"query_videos must be in 0..{num_videos - 1}, got {list(videos)}")
        self.mode = mode
        self.queries = [(v, t) for v in videos for t in (range(num_frames) if mode == "full" else [0])]
        self._last: tuple[tuple[int, int], np.ndarray, np.ndarray] | None = None

    @classmethod
    def metainfo(cls, cfg: Any) -> dict[str, Sequence]:
        return {"classes": tuple(f"class_{k}" for k in range(cfg.data.synthetic.num_classes))}

    @classmethod
    def unlabeled_frames(cls, cfg: Any) -> bool:
        """Only ``data.mode: sf`` leaves frames of the training videos unlabelled."""
        return cfg.data.mode == "sf"

    @classmethod
    def from_config(cls, cfg: Any, split: str, labels: bool = True, **common: Any) -> SyntheticVideos:
        """Split ``"train"``: the first videos of ``data.synthetic``, in ``data.mode``; ``"val"``: its last
        ``val_videos`` (the same seed: it also fixes every class's appearance), every frame a query. ``labels=False``
        makes every frame a query (all frames have labels: they are not read)."""
        s = cfg.data.synthetic
        if split not in ("train", "val"):
            raise ValueError(f"the synthetic dataset has splits 'train' and 'val', got {split!r}")
        first_val = s.num_videos - s.val_videos
        return cls(
            num_videos=s.num_videos,
            num_frames=s.num_frames,
            size=s.size if isinstance(s.size, int) else tuple(s.size),
            num_classes=s.num_classes,
            seed=s.seed,
            objects=tuple(s.objects),
            query_videos=range(first_val) if split == "train" else range(first_val, s.num_videos),
            mode=cfg.data.mode if split == "train" and labels else "full",
            **common,
        )

    def _make_video(self, rng: np.random.Generator, objects: tuple[int, int]) -> _Video:
        h, w, k = self.height, self.width, self.num_classes
        top, bottom = (int(c) for c in rng.choice(k, 2, replace=False))
        object_classes = np.setdiff1d(np.arange(k), [top, bottom])
        m = int(rng.integers(objects[0], objects[1] + 1))
        half_sizes = rng.uniform(0.06, 0.16, (m, 2)) * min(h, w) + 1
        # One period of each path takes about the video's length, so objects cross, leave and return.
        period = rng.uniform(0.6, 1.2, (m, 2)) * max(self.num_frames, 12)
        centre = np.stack([rng.uniform(0.3, 0.7, m) * w, rng.uniform(0.25, 0.75, m) * h], axis=1)
        amplitude = np.stack([rng.uniform(0.2, 0.6, m) * w, rng.uniform(0.05, 0.25, m) * h], axis=1)
        # The first object swings fully out of the view on both sides and back, once a period.
        amplitude[0, 0] = abs(centre[0, 0] - w / 2) + w / 2 + np.hypot(*half_sizes[0]) + 1
        paths = np.stack([centre, amplitude, 2 * np.pi / period, rng.uniform(0, 2 * np.pi, (m, 2))], axis=-1)
        return _Video(
            top=top,
            bottom=bottom,
            horizon=np.array([rng.uniform(0.3, 0.6) * h, rng.uniform(0.02, 0.08) * h, rng.uniform(0.02, 0.08), 0.1]),
            pan=float(rng.uniform(-2, 2)),
            classes=rng.choice(object_classes, m),
            shapes=rng.integers(0, 3, m),
            half_sizes=half_sizes,
            paths=paths,
            spin=np.stack([rng.uniform(0, 2 * np.pi, m), rng.uniform(-0.08, 0.08, m)], axis=1),
        )

    def video_name(self, video: int) -> str:
        return f"synthetic_{video}"

    def video_length(self, video: int) -> int:
        return self.num_frames

    def frame_id(self, video: int, index: int) -> str:
        return f"{index:05d}"

    def read_frame(self, video: int, index: int) -> np.ndarray:
        return self.render(video, index)[0]

    def read_label(self, video: int, index: int) -> np.ndarray:
        return self.render(video, index)[1]

    def render(self, video: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Frame ``index`` of ``video``: RGB uint8 ``(H, W, 3)`` and its class ids uint8 ``(H, W)``."""
        # ClipDataset reads the query's label, then its frame: keep the last render instead of drawing it twice.
        if self._last is not None and self._last[0] == (video, index):
            return self._last[1], self._last[2]
        p, t = self._videos[video], float(index)
        x, y = self._grid_x, self._grid_y
        row, amp, freq, speed = p.horizon
        horizon = row + amp * np.sin(freq * x[0] + speed * t)  # (W,): one sine per column, not per pixel
        label = np.where(y >= horizon, np.uint8(p.bottom), np.uint8(p.top))
        # Texture coordinates: the background's pan with the camera, an object's move with the object.
        u = x + p.pan * t
        v = y.copy()
        for cls, shape, (a, b), path, (angle0, spin) in zip(
            p.classes, p.shapes, p.half_sizes, p.paths, p.spin, strict=True
        ):
            cx, cy = path[:, 0] + path[:, 1] * np.sin(path[:, 2] * t + path[:, 3])
            reach = np.hypot(a, b)  # the farthest any of the shapes reaches from its centre
            x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, self.width)
            y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, self.height)
            if x0 >= x1 or y0 >= y1:
                continue  # out of view
            dx, dy = x[y0:y1, x0:x1] - cx, y[y0:y1, x0:x1] - cy
            cos, sin = np.cos(angle0 + spin * t), np.sin(angle0 + spin * t)
            lx, ly = cos * dx + sin * dy, cos * dy - sin * dx
            if shape == _ELLIPSE:
                inside = (lx / a) ** 2 + (ly / b) ** 2 <= 1
            elif shape == _RECTANGLE:
                inside = (np.abs(lx) <= a) & (np.abs(ly) <= b)
            else:
                inside = np.abs(lx) / a + np.abs(ly) / b <= 1
            label[y0:y1, x0:x1][inside] = cls
            u[y0:y1, x0:x1][inside] = lx[inside]
            v[y0:y1, x0:x1][inside] = ly[inside]
        # np.take on contiguous tables: several times faster than fancy indexing here.
        classes = label.astype(np.intp)
        stripes = np.sin(np.take(self._stripe_x, classes) * u + np.take(self._stripe_y, classes) * v)
        tile = (classes * _TILE + (v.astype(np.intp) & (_TILE - 1))) * _TILE + (u.astype(np.intp) & (_TILE - 1))
        rgb = np.take(self._texture, tile, axis=0)
        shading = np.take(self._contrast, classes, axis=0)
        shading *= stripes[..., None]
        rgb += shading
        frame = np.clip(rgb, 0, 255, out=rgb).astype(np.uint8)
        self._last = ((video, index), frame, label)
        return frame, label
