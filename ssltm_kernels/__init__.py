"""Fused GPU kernels for spatial-temporal video transformers.

Each op has a pure-PyTorch reference, Triton kernels, CUDA kernels (compiled extension ``_C``) and an
autograd-aware public function that validates its inputs and dispatches (cuda -> triton -> reference,
or as forced by ``backend=`` / ``SSLTM_BACKEND``).
"""

from ssltm_kernels._backend import BACKENDS, BackendUnavailableError, choose_backend
from ssltm_kernels._ext import HAS_CUDA_EXT
from ssltm_kernels.modules import WindowAttention3D
from ssltm_kernels.window_attention_3d import (
    relative_position_index,
    window_attention_3d,
    window_attention_3d_reference,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "HAS_CUDA_EXT",
    "WindowAttention3D",
    "choose_backend",
    "relative_position_index",
    "window_attention_3d",
    "window_attention_3d_reference",
]
