"""Video inference with per-frame feature caching: streaming (frame by frame) and whole videos."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from ssltm.data.sampling import ClipSampler

from .ssltm import MIN_SIZE, SSLTM

FrameAt = Callable[[int], torch.Tensor]  # frame index -> (B, 3, H, W)


class VideoPredictor:
    """Predicts the frames of a video with an :class:`SSLTM`, each frame through the backbone once.

    Every frame's ``model.encode`` output (backbone + FPN + projection; with the ocrnet decoder the trunk's
    stride-8 C4 and C5) is cached while a later clip can still need it, and a reference frame's category
    representations are computed once. With the ocrnet decoder the OCR head runs on each clip frame the module
    reads (TCB: every frame's regions; NetWarp-OCR: the adjacent frame's OCR output), from the cached C4/C5.
    Clips follow :class:`ssltm.data.ClipSampler` with ``offsets`` (one distance per adjacent frame):

    - ``step(frame)`` streams a video frame by frame (causal: adjacent frames before the start are clamped
      to frame 0, and the reference is the farthest frame seen, frame 0); ``reset()`` starts a new video.
      It gives the class maps ``model.predict`` gives on the clips of a ``causal=True`` dataset.
    - ``predict_video(frames)`` is the paper's offline inference on a whole video: adjacent frames before
      the start are taken after the query, and the reference is the frame farthest from the query.

    The short-term module's inputs: the frames a module that ``needs_images`` (or ``needs_flow``) reads are kept
    with their features; the flow from each query to each of its adjacent frames is computed once per pair
    with the model's flow provider (:meth:`SSLTM.set_flow_provider`) and cached; a module with a memory over
    a video keeps it in the predictor's per-video ``state`` dict, passed to ``model.decode`` explicitly
    and cleared by ``reset()``. A module that reads the query alone (``none``) gets no adjacent frames.

    Frames are ImageNet-normalised float tensors ``(3, H, W)`` or ``(B, 3, H, W)`` (``B`` videos in lockstep);
    they are moved to the model's device. The model runs in eval mode (its mode is restored after each
    call) without gradients; wrap the calls in ``torch.autocast`` for mixed precision.
    """

    def __init__(self, model: SSLTM, offsets: Sequence[int] = (3, 6, 9)) -> None:
        offsets = tuple(offsets)
        if len(offsets) != model.num_adjacent:
            raise ValueError(
                f"offsets {offsets} must give one distance per adjacent frame "
                f"(model.num_adjacent = {model.num_adjacent})"
            )
        self.model = model
        self.streaming = ClipSampler(offsets, causal=True, reference="farthest")
        self.offline = ClipSampler(offsets, causal=False, reference="farthest")
        self.reset()

    def reset(self) -> None:
        """Forget the current video: cached features, frames, flows, reference categories, the short-term
        module's state, frame count and frame shape."""
        self._levels: dict[int, list[torch.Tensor]] = {}
        self._frames: dict[int, torch.Tensor] = {}
        self._flows: dict[tuple[int, int], torch.Tensor] = {}
        self.state: dict = {}
        self._references: dict[int, torch.Tensor] = {}
        self._frames_seen = 0
        self._shape: tuple[int, ...] | None = None

    @torch.no_grad()
    def step(self, frame: torch.Tensor) -> torch.Tensor:
        """The next frame of the streamed video -> its class map ``(H, W)`` (``(B, H, W)`` for a batch), int64."""
        batch = self._check_frame(frame)
        index, self._frames_seen = self._frames_seen, self._frames_seen + 1
        logits = self._logits(index, index + 1, self.streaming, lambda i: batch)  # earlier frames are cached
        return logits.argmax(1).reshape(frame.shape[:-3] + frame.shape[-2:])

    @torch.no_grad()
    def predict_video(self, frames: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Class maps of a whole video's frames (a sequence: a ``(L, 3, H, W)`` tensor, a list, ...), yielded
        in order. Each frame goes through the backbone once: the two possible references (the first and the
        last frame) are encoded first, and the last one stays cached until it is a query. Starts a new video."""
        self.reset()
        length = len(frames)
        frame_at = lambda i: self._check_frame(frames[i])
        if self.model.uses_reference and length:
            with _eval(self.model):
                for index in sorted({0, length - 1}):
                    self._reference(index, frame_at)
        for index in range(length):
            logits = self._logits(index, length, self.offline, frame_at)
            yield logits.argmax(1).reshape(frames[index].shape[:-3] + frames[index].shape[-2:])
        self.reset()

    def _logits(self, index: int, length: int, sampler: ClipSampler, frame_at: FrameAt) -> torch.Tensor:
        """Logits ``(B, K, H, W)`` of frame ``index`` of a video of ``length`` frames."""
        model, module = self.model, self.model.short_term_module
        with _eval(model):
            indices = (index, *sampler.adjacent(index, length)) if module.uses_adjacent else (index,)
            clip = [self._encoded(i, frame_at) for i in indices]
            clip = [torch.stack(level, dim=1) for level in zip(*clip, strict=True)]  # [(B, 1+n, h, w, d)]
            images = flow = None
            if self._keeps_frames:
                images = torch.stack([self._frames[i] for i in indices], dim=1)
            if module.needs_flow:
                flow = torch.stack([self._flow(index, i) for i in indices[1:]], dim=1)
            reference = None
            if model.uses_reference:
                reference = self._reference(sampler.reference_index(index, length), frame_at)
            logits = model.decode(clip, reference, self._shape[-2:], images, flow, self.state)
        # every later clip's frames are at most max(offsets) before its query (or after it)
        oldest_needed = index + 1 - max(sampler.offsets, default=0)
        for cache in (self._levels, self._frames):
            for i in [i for i in cache if i < oldest_needed]:
                del cache[i]
        for pair in [pair for pair in self._flows if pair[0] <= index]:  # each query is predicted once
            del self._flows[pair]
        return logits

    @property
    def _keeps_frames(self) -> bool:
        module = self.model.short_term_module
        return module.needs_images or module.needs_flow

    def _flow(self, query: int, adjacent: int) -> torch.Tensor:
        if (query, adjacent) not in self._flows:
            self._flows[query, adjacent] = self.model.optical_flow(self._frames[query], self._frames[adjacent])
        return self._flows[query, adjacent]

    def _encoded(self, index: int, frame_at: FrameAt) -> list[torch.Tensor]:
        if index not in self._levels:
            frame = frame_at(index)
            self._levels[index] = self.model.encode(frame)
            if self._keeps_frames:
                self._frames[index] = frame
        return self._levels[index]

    def _reference(self, index: int, frame_at: FrameAt) -> torch.Tensor:
        if index not in self._references:
            self._references[index] = self.model.reference_context(self._encoded(index, frame_at))
        return self._references[index]

    def _check_frame(self, frame: torch.Tensor) -> torch.Tensor:
        """A frame as ``(B, 3, H, W)`` on the model's device, checked against the video's first frame."""
        if not isinstance(frame, torch.Tensor):
            raise TypeError(f"frame must be a tensor (3, H, W) or (B, 3, H, W), got {type(frame).__name__}")
        batch = frame[None] if frame.dim() == 3 else frame
        if batch.dim() != 4 or batch.shape[1] != 3 or min(batch.shape[-2:]) < MIN_SIZE or batch.shape[0] == 0:
            raise ValueError(
                f"frame must be (3, H, W) or (B, 3, H, W) with H, W >= {MIN_SIZE}, got shape {tuple(frame.shape)}"
            )
        if not frame.is_floating_point():
            raise TypeError(f"frame must be a floating-point tensor, got {frame.dtype}")
        if self._shape is None:
            self._shape = tuple(batch.shape)
        elif tuple(batch.shape) != self._shape:
            raise ValueError(
                f"frame has shape {tuple(frame.shape)} but this video's frames are {self._shape} "
                "(call reset() to start another video)"
            )
        return batch.to(next(self.model.parameters()).device)


@contextlib.contextmanager
def _eval(model: torch.nn.Module):
    """Eval mode inside, the model's own mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
