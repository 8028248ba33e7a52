"""Optical flow for every user in the project: TC in :mod:`ssltm.metrics` and the models' short-term modules.

Convention, for every flow here: a float32 field ``f`` in pixels, x then y, such that the content at
pixel ``p`` of the source frame is at ``p + f(p)`` in the destination frame (OpenCV's DIS convention).
:func:`warp` reads the destination at ``p + f(p)``, which brings it back onto the source.

- TC's flow functions take two uint8 ``(H, W)`` gray or ``(H, W, 3)`` RGB frames and return a numpy
  ``(H, W, 2)`` field: :func:`dis_flow` (OpenCV DIS) and :class:`RaftFlow` (torchvision's RAFT, VSPW's);
  :func:`make_flow` picks one by name (:data:`FLOWS`).
- The models' flow providers take two ImageNet-normalised float ``(N, 3, H, W)`` batches (the model's
  input frames) and return float32 ``(N, 2, H, W)`` on the source's device, without gradients:
  :class:`DisFlowProvider`, :class:`RaftFlowProvider`, :class:`ZeroFlowProvider`;
  :func:`make_flow_provider` picks one by name (:data:`FLOW_PROVIDERS`). A provider is a plain object,
  not an ``nn.Module``: stored on a model it stays out of the ``state_dict`` and the optimizer.
- :func:`warp` (backward bilinear warping, border padding) and :func:`resize_flow` (a field resized to
  a feature map's size, each component rescaled by its axis's size ratio).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "FLOWS",
    "FLOW_PROVIDERS",
    "RAFT_FLOW_UPDATES",
    "DisFlowProvider",
    "FlowProvider",
    "RaftFlow",
    "RaftFlowProvider",
    "ZeroFlowProvider",
    "check_flow",
    "dis_flow",
    "load_raft",
    "make_flow",
    "make_flow_provider",
    "resize_flow",
    "to_uint8_rgb",
    "warp",
]

FlowFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

# The optical flows TC can use: OpenCV DIS (dis_flow) or torchvision's RAFT (RaftFlow, VSPW's choice).
FLOWS = ("dis", "raft")
# TC_cal.py runs RAFT with iters=20.
RAFT_FLOW_UPDATES = 20
# torchvision's RAFT refuses frames under 128 px a side (its correlation pyramid needs 16 px at 1/8 scale).
_RAFT_MIN_SIZE = 128


def _to_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a torch tensor or a numpy array, got {type(x).__name__}") from err


def _gray_uint8(frame: np.ndarray, name: str) -> np.ndarray:
    if frame.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8 images for the default DIS flow, got dtype {frame.dtype}")
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[..., 0]
    if frame.ndim == 3 and frame.shape[2] == 3:
        return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
    if frame.ndim != 2:
        raise ValueError(f"{name} must be (H, W) gray or (H, W, 3) RGB images, got shape {frame.shape}")
    return np.ascontiguousarray(frame)


def dis_flow(frame_t, frame_t1) -> np.ndarray:
    """Optical flow from ``frame_t`` to ``frame_t1`` with OpenCV DIS (medium preset).

    Args:
        frame_t, frame_t1: uint8 ``(H, W)`` gray or ``(H, W, 3)`` RGB images (torch or numpy).

    Returns:
        float32 ``(H, W, 2)`` flow ``f`` (x then y, in pixels) such that the content at pixel
        ``p`` of ``frame_t`` is at ``p + f(p)`` in ``frame_t1``.
    """
    a = _gray_uint8(_to_numpy(frame_t, "frame_t"), "frame_t")
    b = _gray_uint8(_to_numpy(frame_t1, "frame_t1"), "frame_t1")
    if a.shape != b.shape:
        raise ValueError(f"frame_t and frame_t1 must have the same size, got {a.shape} and {b.shape}")
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    return dis.calc(a, b, None)


def load_raft(path: str | Path) -> nn.Module:
    """torchvision's ``raft_large`` with the weights of the local file ``path`` (nothing is downloaded).

    ``path`` holds a state dict of ``torchvision.models.optical_flow.raft_large``, as torchvision's
    weight files do: ``Raft_Large_Weights.C_T_V1`` (``raft_large_C_T_V1-22a6c225.pth``) is the
    original RAFT-things checkpoint that VSPW's ``TC_cal.py`` uses, ported.

    Returns:
        The model on the CPU, in eval mode.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a ``raft_large`` state dict (not a torch file, missing or unexpected
            keys, other shapes); the message names the path and the first offending key.
    """
    from torchvision.models.optical_flow import raft_large

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"RAFT weights not found: no file at {path} (expected a state dict of torchvision's raft_large, "
            "e.g. raft_large_C_T_V1-22a6c225.pth)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise ValueError(f"RAFT weights {path} are not a torch state dict: {str(err).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"RAFT weights {path} are not a state dict (a mapping of names to tensors)")
    model = raft_large(weights=None, progress=False)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} keys missing, e.g. {missing[0]!r}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]!r}")
    if reshaped:
        k = reshaped[0]
        problems.append(f"{k!r} has shape {tuple(state[k].shape)}, raft_large's {tuple(expected[k].shape)}")
    if problems:
        raise ValueError(f"RAFT weights {path} are not a state dict of torchvision's raft_large: {'; '.join(problems)}")
    model.load_state_dict(state)
    return model.eval()


def _rgb_float(frame: np.ndarray, name: str) -> torch.Tensor:
    """A uint8 gray or RGB image as float32 ``(3, H, W)`` in [-1, 1], as ``Raft_Large_Weights.transforms()``."""
    if frame.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8 images for the RAFT flow, got dtype {frame.dtype}")
    if frame.ndim == 2:
        frame = frame[..., None]
    if frame.ndim != 3 or frame.shape[2] not in (1, 3):
        raise ValueError(f"{name} must be (H, W) gray or (H, W, 3) RGB images, got shape {frame.shape}")
    x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).expand(3, -1, -1)
    return (x.float() / 255 - 0.5) / 0.5


def _check_updates(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _raft_flow(model: nn.Module, image1: torch.Tensor, image2: torch.Tensor, num_flow_updates: int) -> torch.Tensor:
    """RAFT's final flow, float32 ``(N, 2, H, W)``, from ``image1`` to ``image2``: float ``(N, 3, H, W)`` in
    [-1, 1] on the model's device, padded to a multiple of 8 (at least 128) by repeating the edge pixels,
    split evenly between both sides, and the flow cropped back; float32 (autocast off), no gradients."""
    h, w = image1.shape[-2:]
    pad_h, pad_w = max(-h % 8, _RAFT_MIN_SIZE - h), max(-w % 8, _RAFT_MIN_SIZE - w)
    top, left = pad_h // 2, pad_w // 2
    padding = (left, pad_w - left, top, pad_h - top)
    with torch.no_grad(), torch.autocast(image1.device.type, enabled=False):
        image1 = F.pad(image1.float(), padding, mode="replicate")
        image2 = F.pad(image2.float(), padding, mode="replicate")
        flow = model(image1, image2, num_flow_updates=num_flow_updates)[-1]
    return flow[:, :, top : top + h, left : left + w].float()


class RaftFlow:
    """Optical flow with torchvision's RAFT (``raft_large``), the flow of VSPW's ``TC_cal.py``.

    A flow function for :func:`tc` and :class:`VideoMetrics`. Frames are scaled to [-1, 1] (what
    ``Raft_Large_Weights.transforms()`` does) and padded to a multiple of 8 in height and width by
    repeating the edge pixels, split evenly between both sides, as the input padder of VSPW's RAFT
    does (frames under 128 px a side, which torchvision's RAFT refuses, are padded up to 128 the same
    way); the flow of the padded frames is cropped back, so it needs no rescaling. RAFT runs in
    float32 (autocast off) under ``no_grad``.

    Args:
        weights: a local ``raft_large`` state dict file (see :func:`load_raft`) or the loaded model.
        device: where RAFT runs (a GPU makes it fast; on a CPU a 480x854 pair takes seconds).
        num_flow_updates: RAFT's refinement iterations (``TC_cal.py``: 20).
    """

    def __init__(
        self,
        weights: str | Path | nn.Module,
        device: str | torch.device = "cpu",
        num_flow_updates: int = RAFT_FLOW_UPDATES,
    ):
        _check_updates(num_flow_updates, "num_flow_updates")
        self.device = torch.device(device)
        model = weights if isinstance(weights, nn.Module) else load_raft(weights)
        self.model = model.eval().to(self.device)
        self.num_flow_updates = num_flow_updates

    def __call__(self, frame_t, frame_t1) -> np.ndarray:
        """float32 ``(H, W, 2)`` flow from ``frame_t`` to ``frame_t1`` (uint8 ``(H, W)`` or ``(H, W, 3)`` RGB)."""
        a = _rgb_float(_to_numpy(frame_t, "frame_t"), "frame_t")
        b = _rgb_float(_to_numpy(frame_t1, "frame_t1"), "frame_t1")
        if a.shape != b.shape:
            raise ValueError(f"frame_t and frame_t1 must have the same size, got {a.shape[1:]} and {b.shape[1:]}")
        flow = _raft_flow(self.model, a[None].to(self.device), b[None].to(self.device), self.num_flow_updates)
        return flow[0].permute(1, 2, 0).cpu().numpy()


def make_flow(name: str = "dis", raft_weights: str | Path | None = None, device: str | torch.device = "cpu") -> FlowFn:
    """The flow function called ``name``: ``"dis"`` (:func:`dis_flow`) or ``"raft"`` (:class:`RaftFlow`
    with the weights file ``raft_weights``, run on ``device``)."""
    if name not in FLOWS:
        raise ValueError(f"flow must be one of {FLOWS}, got {name!r}")
    if name == "dis":
        return dis_flow
    if raft_weights is None:
        raise ValueError("flow 'raft' needs raft_weights: a local state dict file of torchvision's raft_large")
    return RaftFlow(raft_weights, device)


# --- flow providers of the models: normalised (N, 3, H, W) batches in, (N, 2, H, W) tensors out ---------------

# The providers make_flow_provider knows: OpenCV DIS, torchvision's RAFT, and a zero flow for tests.
FLOW_PROVIDERS = ("dis", "raft", "zero")


def to_uint8_rgb(frame: torch.Tensor) -> np.ndarray:
    """An ImageNet-normalised ``(3, H, W)`` frame back to RGB uint8 ``(H, W, 3)`` (the optical flow's input)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (frame.float().cpu() * std + mean).mul(255).round().clamp(0, 255)
    return rgb.to(torch.uint8).permute(1, 2, 0).numpy()


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape {tuple(x.shape)}, dtype {x.dtype} on {x.device}"
    return type(x).__name__


def _check_frames(src, dst) -> None:
    for name, x in (("src", src), ("dst", dst)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(f"{name} must be a float (N, 3, H, W) tensor of normalised frames, got {_describe(x)}")
    if src.shape != dst.shape or src.device != dst.device:
        raise ValueError(
            f"src and dst must have the same shape and device, got {tuple(src.shape)} on {src.device} "
            f"and {tuple(dst.shape)} on {dst.device}"
        )


class FlowProvider:
    """The model side's optical flow: ``provider(src, dst)`` is the flow from ``src`` to ``dst``.

    ``src``, ``dst``: ImageNet-normalised float ``(N, 3, H, W)`` frames (the model's input), pair ``i``
    being ``(src[i], dst[i])``; the result is float32 ``(N, 2, H, W)`` on ``src``'s device, in pixels,
    x then y, such that the content at ``p`` in ``src`` is at ``p + f(p)`` in ``dst``. No gradient
    flows through it. Subclasses implement ``_flow`` on checked inputs.
    """

    name: str

    def __call__(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        _check_frames(src, dst)
        if len(src) == 0:
            return torch.zeros(0, 2, *src.shape[-2:], dtype=torch.float32, device=src.device)
        with torch.no_grad():
            return self._flow(src.detach(), dst.detach())

    def _flow(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ZeroFlowProvider(FlowProvider):
    """A zero flow (every pixel stays): for tests."""

    name = "zero"

    def _flow(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        n, _, h, w = src.shape
        return torch.zeros(n, 2, h, w, dtype=torch.float32, device=src.device)


class DisFlowProvider(FlowProvider):
    """:func:`dis_flow` (OpenCV DIS, medium preset) on each pair, on the CPU: the frames are turned back into
    RGB uint8 (:func:`to_uint8_rgb`) and the flow is moved to ``src``'s device."""

    name = "dis"

    def _flow(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        flows = [dis_flow(to_uint8_rgb(a), to_uint8_rgb(b)) for a, b in zip(src, dst, strict=True)]
        return torch.from_numpy(np.stack(flows)).permute(0, 3, 1, 2).contiguous().to(src.device)


class RaftFlowProvider(FlowProvider):
    """torchvision's ``raft_large`` (frozen, eval mode, no gradients) on the whole batch, on ``src``'s device
    (the model follows the input there): frames scaled to [-1, 1], padded as :class:`RaftFlow` does.

    Args:
        weights: a local ``raft_large`` state dict file (see :func:`load_raft`) or the loaded model.
        iters: RAFT's refinement iterations (VSPW's ``TC_cal.py``: 20).
    """

    name = "raft"

    def __init__(self, weights: str | Path | nn.Module, iters: int = RAFT_FLOW_UPDATES):
        self.iters = _check_updates(iters, "iters")
        model = weights if isinstance(weights, nn.Module) else load_raft(weights)
        self.model = model.eval().requires_grad_(False)

    def _flow(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(IMAGENET_MEAN, device=src.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=src.device).view(1, 3, 1, 1)
        self.model.to(src.device)
        image1, image2 = ((x.float() * std + mean) * 2 - 1 for x in (src, dst))
        return _raft_flow(self.model, image1, image2, self.iters)

    def __repr__(self) -> str:
        return f"RaftFlowProvider(iters={self.iters})"


def make_flow_provider(
    name: str, weights: str | Path | nn.Module | None = None, iters: int = RAFT_FLOW_UPDATES
) -> FlowProvider:
    """The flow provider called ``name`` (one of :data:`FLOW_PROVIDERS`): ``"dis"``, ``"zero"``, or
    ``"raft"`` with the local ``raft_large`` state dict file ``weights`` (nothing is downloaded) and
    ``iters`` refinement iterations.

    Raises:
        ValueError: an unknown name (listing the choices), ``"raft"`` without ``weights``, a file that is
            not a ``raft_large`` state dict, or ``iters`` not a positive int.
        FileNotFoundError: ``weights`` names no file.
    """
    if name not in FLOW_PROVIDERS:
        raise ValueError(f"flow provider must be one of {FLOW_PROVIDERS}, got {name!r}")
    if name == "zero":
        return ZeroFlowProvider()
    if name == "dis":
        return DisFlowProvider()
    if weights is None:
        raise ValueError("flow provider 'raft' needs weights: a local state dict file of torchvision's raft_large")
    return RaftFlowProvider(weights, iters)


# --- warping ----------------------------------------------------------------------------------------------


def check_flow(flow, size: Sequence[int], device: torch.device | str, name: str = "flow") -> None:
    """Raise a ValueError naming ``name`` unless ``flow`` is a floating-point ``(N, 2, h, w)`` tensor on
    ``device``, where ``size = (N, h, w)``."""
    n, h, w = size
    device = torch.device(device)
    if (
        not isinstance(flow, torch.Tensor)
        or tuple(flow.shape) != (n, 2, h, w)
        or not flow.is_floating_point()
        or flow.device != device
    ):
        raise ValueError(
            f"{name} must be a floating-point (N, 2, h, w) = ({n}, 2, {h}, {w}) tensor on {device}, "
            f"got {_describe(flow)}"
        )


def warp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward warping: ``out(p) = x(p + flow(p))``, bilinear, edge pixels repeated outside ``x``.

    With ``flow`` the flow from frame a to frame b (:class:`FlowProvider`'s convention) and ``x`` a map
    of frame b, the result is aligned with frame a. The sampling grid is ``p + flow(p)`` normalised for
    ``grid_sample(align_corners=True)`` (pixel centres at -1 and 1), border padding; computed in float32
    at least (autocast off), returned in ``x``'s dtype. Differentiable in ``x`` and ``flow``.

    Args:
        x: float ``(N, C, h, w)``.
        flow: float ``(N, 2, h, w)`` in pixels of ``x``, x then y, on ``x``'s device.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point (N, C, h, w) tensor, got {_describe(x)}")
    n, _, h, w = x.shape
    check_flow(flow, (n, h, w), x.device)
    dtype = torch.promote_types(x.dtype, torch.float32)
    ys = torch.arange(h, dtype=dtype, device=x.device).view(h, 1)
    xs = torch.arange(w, dtype=dtype, device=x.device).view(1, w)
    f = flow.to(dtype)
    gx = (xs + f[:, 0]) * (2 / max(w - 1, 1)) - 1
    gy = (ys + f[:, 1]) * (2 / max(h - 1, 1)) - 1
    with torch.autocast(x.device.type, enabled=False):
        out = F.grid_sample(
            x.to(dtype), torch.stack([gx, gy], dim=-1), mode="bilinear", padding_mode="border", align_corners=True
        )
    return out.to(x.dtype)


def resize_flow(flow: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``flow`` resized bilinearly (``align_corners=False``, as the model's feature resizing) to ``size = (h, w)``,
    its x component multiplied by ``w / W`` and its y component by ``h / H``: the flow in pixels of a map of
    that size (at stride ``s``, ``W / s`` wide, the flow divided by ``s``).

    Args:
        flow: float ``(N, 2, H, W)``.
        size: ``(h, w)``, positive ints.
    """
    if not isinstance(flow, torch.Tensor) or flow.dim() != 4 or flow.shape[1] != 2 or not flow.is_floating_point():
        raise ValueError(f"flow must be a floating-point (N, 2, H, W) tensor, got {_describe(flow)}")
    size = tuple(size)
    if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise ValueError(f"size must be (h, w), two positive ints, got {size!r}")
    h, w = flow.shape[-2:]
    scale = torch.tensor([size[1] / w, size[0] / h], dtype=flow.dtype, device=flow.device).view(1, 2, 1, 1)
    return F.interpolate(flow, size=size, mode="bilinear", align_corners=False) * scale
