"""The unlabelled clips of a dataset: its frames that are no labelled query, for the objectives that learn from them
(IFR's unlabelled terms, Mean Teacher)."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from .base import ClipDataset

# The last word of an unlabelled sample's seed: its random draws differ from those of the labelled sample of the
# same index (ClipDataset seeds those from (seed, epoch, index)).
UNLABELED_STREAM = 1


class UnlabeledClips(Dataset):
    """The clips of ``dataset``'s videos whose query is a frame that is no labelled query of it.

    The queries are :meth:`ClipDataset.unlabeled_queries` (video by video, in temporal order); adjacent and
    reference frames are chosen by the dataset's sampler as for its labelled clips, and its transform (so its
    crop, flip and strong views) applies to them the same way. The label
    is all 255 (ignore), made before the transform (padding and crop keep it 255), and ``"labeled"`` is False;
    the other keys are those of a labelled sample. With an int ``seed`` on ``dataset``, sample ``i`` is a
    function of ``(seed, epoch, i)`` alone (a stream of its own: not the labelled sample ``i``'s draws);
    :meth:`set_epoch` sets the epoch of these samples only.

    Raises:
        ValueError: ``dataset`` has no unlabelled frame (every frame of its videos is a labelled query).
    """

    def __init__(self, dataset: ClipDataset):
        if not isinstance(dataset, ClipDataset):
            raise TypeError(f"dataset must be a ssltm.data.ClipDataset, got {type(dataset).__name__}")
        self.dataset = dataset
        self.queries = dataset.unlabeled_queries()
        if not self.queries:
            mode = getattr(dataset, "mode", None)
            raise ValueError(
                f"{type(dataset).__name__}{'' if mode is None else f' (mode {mode!r})'} has no unlabelled frames: "
                "every frame of its videos is a labelled query"
            )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """With an int ``seed`` on the dataset, draw a new reference and augmentation for every sample."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} is outside {len(self)} unlabelled clips")
        video, query = self.queries[i]
        return self.dataset.clip(video, query, self.epoch, (i % len(self), UNLABELED_STREAM), labeled=False)
