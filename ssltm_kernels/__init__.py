"""Fused GPU kernels for spatial-temporal video transformers.

Each op has a pure-PyTorch reference, Triton kernels, CUDA kernels (compiled extension ``_C``) and an
autograd-aware public function that validates its inputs and dispatches (cuda -> triton -> reference,
or as forced by ``backend=`` / ``SSLTM_BACKEND``). The ops live in ``ssltm_kernels.ops.<op>``, one
module each, with their ``can_run_cuda`` / ``can_run_triton`` / ``can_run_reference`` predicates.
"""

from ssltm_kernels._backend import BACKENDS, BackendCheck, BackendUnavailableError, choose_backend
from ssltm_kernels._ext import HAS_CUDA_EXT
from ssltm_kernels.modules import (
    MixFFN,
    ShiftedWindowAttention3d,
    SpatialGather,
    WindowAttention3D,
    replace_torchvision_attention,
)
from ssltm_kernels.ops.dwconv3x3 import dwconv3x3, dwconv3x3_reference
from ssltm_kernels.ops.gcc_assign import gcc_assign, gcc_assign_reference
from ssltm_kernels.ops.soft_region_pool import soft_region_pool, soft_region_pool_reference
from ssltm_kernels.ops.window_attention_3d import (
    relative_position_index,
    window_attention_3d,
    window_attention_3d_qkvpacked,
    window_attention_3d_reference,
    window_attention_3d_windows,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendCheck",
    "BackendUnavailableError",
    "HAS_CUDA_EXT",
    "MixFFN",
    "ShiftedWindowAttention3d",
    "SpatialGather",
    "WindowAttention3D",
    "choose_backend",
    "dwconv3x3",
    "dwconv3x3_reference",
    "gcc_assign",
    "gcc_assign_reference",
    "relative_position_index",
    "replace_torchvision_attention",
    "soft_region_pool",
    "soft_region_pool_reference",
    "window_attention_3d",
    "window_attention_3d_qkvpacked",
    "window_attention_3d_reference",
    "window_attention_3d_windows",
]
