"""SSLTM video semantic segmentation model (built on :mod:`ssltm_kernels`).

The model, data loaders, training and evaluation land here; the kernels it composes live in
:mod:`ssltm_kernels`.
"""

__version__ = "0.1.0"
