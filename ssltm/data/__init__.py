"""Video clip datasets for SSLTM (README "Data and metrics").

Every dataset is a ``torch.utils.data.Dataset`` of clips sampled by one :class:`ClipSampler`; a
sample is a dict with ``"frames"`` float32 ``(1+n, 3, H, W)`` (query first, then the adjacent
frames nearest first), ``"reference"`` float32 ``(3, H, W)``, ``"label"`` int64 ``(H, W)``
(255 = ignore), ``"video"`` and ``"frame"`` (str), ``"labeled"`` (bool). See :class:`ClipDataset`;
:class:`UnlabeledClips` gives the clips of a dataset's unlabelled frames.

:data:`DATASETS` names the datasets a config's ``data.dataset`` can choose; :func:`dataset_class` also
imports a ``"package.module:ClassName"`` of the user's.
"""

import importlib
import os
import re
import sys

from .base import ClipDataset, FileClipDataset, SplitClipDataset, VideoFiles, natural_order
from .camvid import CamVid
from .cityscapes import CityscapesSequence
from .folder import VideoFolder
from .holdout import hold_out
from .sampling import ClipSampler
from .synthetic import SyntheticVideos
from .transforms import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Photometric,
    RandomScale,
    eval_transform,
    photometric_distortion,
    train_transform,
)
from .unlabeled import UnlabeledClips
from .vspw import VSPW

# data.dataset's names: adding a dataset is a ClipDataset subclass and a line here.
DATASETS: dict[str, type[ClipDataset]] = {
    "synthetic": SyntheticVideos,
    "vspw": VSPW,
    "cityscapes": CityscapesSequence,
    "camvid": CamVid,
    "folder": VideoFolder,
}
# data.dataset's other form, a class of the user's: "package.module:ClassName".
IMPORT_STRING = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def dataset_class(name: str) -> type[ClipDataset]:
    """The class ``data.dataset = name`` names: one of :data:`DATASETS`, or ``"package.module:ClassName"``
    imported (from the current directory or ``PYTHONPATH``), which must be a :class:`ClipDataset` subclass.

    Raises:
        ValueError: naming ``data.dataset``: an unknown name, a module that is not found, a missing
            attribute, or not a ``ClipDataset`` subclass.
    """
    if name in DATASETS:
        return DATASETS[name]
    if not IMPORT_STRING.fullmatch(name):
        raise ValueError(f"data.dataset must be one of {tuple(DATASETS)} or 'package.module:ClassName', got {name!r}")
    module_name, attr = name.split(":")
    if os.getcwd() not in sys.path and "" not in sys.path:  # as `python -m ssltm` does, for the `ssltm` script too
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ValueError(
            f"data.dataset {name!r}: no module named {err.name!r} (the module must be importable from the current "
            "directory or PYTHONPATH)"
        ) from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise ValueError(f"data.dataset {name!r}: module {module_name!r} ({module.__file__}) has no attribute {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, ClipDataset)):
        raise ValueError(f"data.dataset {name!r}: {cls!r} is not a subclass of ssltm.data.ClipDataset")
    return cls


__all__ = [
    "DATASETS",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VSPW",
    "CamVid",
    "CityscapesSequence",
    "ClipDataset",
    "ClipSampler",
    "FileClipDataset",
    "Photometric",
    "RandomScale",
    "SplitClipDataset",
    "SyntheticVideos",
    "UnlabeledClips",
    "VideoFiles",
    "VideoFolder",
    "dataset_class",
    "eval_transform",
    "hold_out",
    "natural_order",
    "photometric_distortion",
    "train_transform",
]
