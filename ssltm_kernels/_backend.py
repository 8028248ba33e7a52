"""Backend selection shared by every op: ``cuda`` (compiled extension) -> ``triton`` -> ``reference``.

Each op supplies one reason function per backend (``None`` when the backend can run). An explicit
``backend=`` argument or the ``SSLTM_BACKEND`` environment variable forces a backend and raises that
backend's reason when it cannot run; otherwise the first backend that can run is taken.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ssltm_kernels._ext import _C, CUDA_EXT_IMPORT_ERROR, HAS_CUDA_EXT

BACKENDS = ("cuda", "triton", "reference")

logger = logging.getLogger("ssltm_kernels")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is optional
    HAS_TRITON = False


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the given inputs; the message says why."""


@dataclass(frozen=True)
class BackendCheck:
    """The answer of an op's ``can_run_<backend>``: true when the backend can run the inputs.

    ``reason`` says why it cannot; ``kernels`` names the kernel family it would launch where a
    backend has several (the CUDA kernels: ``("tensor_cores" | "cuda_cores")`` for forward and backward).
    """

    backend: str
    reason: str | None
    kernels: tuple[str, ...] | None = None

    def __bool__(self) -> bool:
        return self.reason is None

    def raise_if_unavailable(self, op: str) -> None:
        if self.reason is not None:
            raise BackendUnavailableError(f"{op}: backend {self.backend!r} cannot run: {self.reason}")


def triton_interpreting() -> bool:
    """Whether Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(tensor: torch.Tensor) -> str | None:
    if not HAS_TRITON:
        return "triton is not installed (pip install triton)"
    if tensor.device.type == "cuda":
        return None
    if tensor.device.type == "cpu" and triton_interpreting():
        return None
    return f"triton kernels need CUDA tensors (got {tensor.device}); CPU tensors run them only under TRITON_INTERPRET=1"


def cuda_unavailable_reason(tensor: torch.Tensor) -> str | None:
    if not HAS_CUDA_EXT:
        return f"the compiled extension ssltm_kernels._C is not available ({CUDA_EXT_IMPORT_ERROR})"
    if not _C.WITH_CUDA:
        return "ssltm_kernels._C was built without CUDA (a CPU build of torch or no nvcc at build time)"
    if tensor.device.type != "cuda":
        return f"the CUDA kernels need CUDA tensors (got {tensor.device})"
    return None


def on_device(tensor: torch.Tensor):
    """Kernels launch on the current CUDA device: a context that makes it the tensor's device."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def requested_backend(backend: str | None) -> str | None:
    """The backend forced by the argument or by ``SSLTM_BACKEND`` (argument wins), validated."""
    name = backend if backend is not None else os.environ.get("SSLTM_BACKEND") or None
    if name is not None and name not in BACKENDS:
        source = "backend" if backend is not None else "SSLTM_BACKEND"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def choose_backend(
    op: str,
    reasons: dict[str, Callable[[], str | None]],
    backend: str | None = None,
    passed_over: dict[str, Callable[[], str | None]] | None = None,
) -> str:
    """Pick the backend for ``op``; ``reasons[name]()`` says why ``name`` cannot run (or ``None``).

    ``passed_over[name]()`` (optional) says why automatic dispatch should skip ``name`` although it can
    run (a slower kernel family, when the next backend runs the inputs); a forced backend ignores it.
    """
    forced = requested_backend(backend)
    if forced is not None:
        BackendCheck(forced, reasons[forced]()).raise_if_unavailable(op)
        return forced
    passed_over = passed_over or {}
    for name in BACKENDS:
        reason = reasons[name]()
        if reason is None and name in passed_over:
            reason = passed_over[name]()
        if reason is None:
            return name
        logger.debug("%s: skipping backend %r: %s", op, name, reason)
    raise AssertionError("the reference backend always runs")  # pragma: no cover
