"""SSLTM video semantic segmentation model (built on :mod:`ssltm_kernels`).

``SSLTM`` is the model, ``VideoPredictor`` its streaming / whole-video inference; the data loaders are in
:mod:`ssltm.data`, the metrics in :mod:`ssltm.metrics`. The kernels it composes live in :mod:`ssltm_kernels`.
"""

from ssltm.model import SSLTM, VideoPredictor

__version__ = "0.1.0"

__all__ = ["SSLTM", "VideoPredictor"]
