"""Video clip datasets for SSLTM (README "Data and metrics").

Every dataset is a ``torch.utils.data.Dataset`` of clips sampled by one :class:`ClipSampler`; a
sample is a dict with ``"frames"`` float32 ``(1+n, 3, H, W)`` (query first, then the adjacent
frames nearest first), ``"reference"`` float32 ``(3, H, W)``, ``"label"`` int64 ``(H, W)``
(255 = ignore), ``"video"`` and ``"frame"`` (str). See :class:`ClipDataset`.
"""

from .base import ClipDataset, FileClipDataset, VideoFiles
from .camvid import CamVid
from .cityscapes import CityscapesSequence
from .holdout import hold_out
from .sampling import ClipSampler
from .synthetic import SyntheticVideos
from .transforms import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, RandomScale, eval_transform, train_transform
from .vspw import VSPW

__all__ = [
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VSPW",
    "CamVid",
    "CityscapesSequence",
    "ClipDataset",
    "ClipSampler",
    "FileClipDataset",
    "RandomScale",
    "SyntheticVideos",
    "VideoFiles",
    "eval_transform",
    "hold_out",
    "train_transform",
]
