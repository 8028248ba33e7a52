"""Which frames of a video make up a clip: the adjacent frames and the reference frame (paper §3.1).

Every dataset in :mod:`ssltm.data` samples its clips through :class:`ClipSampler`, so that training,
evaluation and streaming inference agree on what a clip is.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch

REFERENCE_MODES = ("random", "farthest")


@dataclass(frozen=True)
class ClipSampler:
    """Chooses a clip's adjacent frames and reference frame, as indices into one video.

    Args:
        offsets: temporal distances of the adjacent frames from the query, strictly increasing
            positive ints (paper: ``(3, 6, 9)``); ``()`` gives clips of the query alone.
        causal: use only frames at or before the query, as streaming inference does. An adjacent
            frame before the video's start is clamped to frame 0, and the reference is drawn from
            frames ``0..query`` (``"farthest"`` is then always frame 0, so one reference serves a
            whole video when it is predicted frame by frame).
        reference: ``"random"`` (training, paper §3.1): uniformly one of the video's other frames
            (the query itself when the video has one frame); ``"farthest"`` (evaluation): the frame
            farthest from the query, the earlier one on a tie.
    """

    offsets: tuple[int, ...] = (3, 6, 9)
    causal: bool = False
    reference: str = "random"

    def __post_init__(self):
        offsets = tuple(self.offsets)
        if not all(isinstance(o, int) and not isinstance(o, bool) and o > 0 for o in offsets):
            raise ValueError(f"offsets must be positive ints, got {self.offsets!r}")
        if any(a >= b for a, b in pairwise(offsets)):
            # Strictly increasing keeps the clip's "nearest first" order without re-sorting.
            raise ValueError(f"offsets must be strictly increasing (nearest first), got {self.offsets!r}")
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"reference must be one of {REFERENCE_MODES}, got {self.reference!r}")
        object.__setattr__(self, "offsets", offsets)

    def adjacent(self, query: int, length: int) -> tuple[int, ...]:
        """Indices of the adjacent frames, nearest first, for ``query`` in a video of ``length`` frames.

        Each is ``query - o``. Where that is before the video's start it becomes ``query + o``
        (clamped to the last frame), since clamping backwards would make every adjacent frame of
        frame 0 (VSPW-SF's queries) the query itself; with ``causal=True`` it is clamped to 0.
        """
        _check_query(query, length)
        if self.causal:
            return tuple(max(query - o, 0) for o in self.offsets)
        return tuple(query - o if query - o >= 0 else min(query + o, length - 1) for o in self.offsets)

    def reference_index(self, query: int, length: int, generator: torch.Generator | None = None) -> int:
        """Index of the reference frame; ``"random"`` draws from ``generator`` (torch's global RNG if None)."""
        _check_query(query, length)
        last = query if self.causal else length - 1
        if self.reference == "farthest":
            return 0 if query >= last - query else last
        if last == 0:
            return 0
        # Draw among the candidates other than the query: it would add no long-term context.
        pick = int(torch.randint(last, (1,), generator=generator))
        return pick + (pick >= query)


def _check_query(query: int, length: int) -> None:
    if length < 1:
        raise ValueError(f"a video needs at least one frame, got length={length}")
    if not 0 <= query < length:
        raise IndexError(f"query frame {query} is outside a video of {length} frames")
