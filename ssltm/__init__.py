"""SSLTM video semantic segmentation model (built on :mod:`ssltm_kernels`).

``SSLTM`` is the model, ``VideoPredictor`` its streaming / whole-video inference, ``load_predictor`` a trained
checkpoint's streaming predictor of RGB frames (:mod:`ssltm.infer`); the data loaders are in
:mod:`ssltm.data`, the metrics in :mod:`ssltm.metrics`. The kernels it composes live in :mod:`ssltm_kernels`.
"""

from ssltm.model import SSLTM, VideoPredictor

__version__ = "0.1.0"

__all__ = ["SSLTM", "Predictor", "VideoPredictor", "load_predictor"]

_INFER = ("Predictor", "load_predictor")  # imported on first use: ssltm.infer needs the config machinery


def __getattr__(name: str):
    if name in _INFER:
        from ssltm import infer

        return getattr(infer, name)
    raise AttributeError(f"module 'ssltm' has no attribute {name!r}")
