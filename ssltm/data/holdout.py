"""Hold out the last frames of every video, for validating on data shipped without a validation split."""

from __future__ import annotations

from .base import FileClipDataset, VideoFiles

PARTS = ("train", "holdout")


def hold_out(dataset: FileClipDataset, fraction: float, part: str) -> FileClipDataset:
    """Cut every video of ``dataset`` in two, in place, and keep one part; returns ``dataset``.

    The last ``max(1, round(fraction * length))`` frames of each video are the ``"holdout"`` part, the
    frames before them the ``"train"`` part (a one-frame video stays whole in ``"train"``). Each part is
    a video of its own: its clips' adjacent and reference frames come from that part only, so no frame
    of the held-out part reaches training. Queries keep their order; videos left without frames are
    dropped.
    """
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    videos: list[VideoFiles] = []
    renumber: dict[int, tuple[int, int, int]] = {}  # old video -> (new video, first frame, end frame)
    for v, video in enumerate(dataset.videos):
        length = len(video.images)
        cut = length - max(1, round(fraction * length)) if length > 1 else length
        start, stop = (0, cut) if part == "train" else (cut, length)
        if start == stop:
            continue
        renumber[v] = (len(videos), start, stop)
        videos.append(
            VideoFiles(
                name=video.name,
                frame_ids=video.frame_ids[start:stop],
                images=video.images[start:stop],
                labels={t - start: path for t, path in video.labels.items() if start <= t < stop},
            )
        )
    queries = []
    for v, t in dataset.queries:
        if v in renumber:
            new, start, stop = renumber[v]
            if start <= t < stop:
                queries.append((new, t - start))
    dataset.videos, dataset.queries = videos, queries
    return dataset
