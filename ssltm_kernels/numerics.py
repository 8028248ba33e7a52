"""The numeric yardstick the op tests and the benchmarks share: float64 (or float32) copies of a result's
leaves, and the 2x-reference-error rule for results computed in a low precision."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["exact_dtype", "twice_reference_bound", "upcast"]


def upcast(inputs: Sequence[torch.Tensor | None], dtype: torch.dtype = torch.float64) -> tuple:
    """Detached copies of ``inputs`` in ``dtype`` that require grad (``None`` stays ``None``)."""
    return tuple(None if t is None else t.detach().to(dtype).requires_grad_() for t in inputs)


def exact_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision that stands for the exact result of a computation in ``dtype``: float64 for float32
    and float64, float32 for the 16-bit types."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def twice_reference_bound(low: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> float:
    """The largest absolute error against ``exact`` that the 2x-reference-error rule accepts for a result
    computed in ``dtype``: twice the error of the reference run in ``dtype`` (``low``), plus a floor
    relative to the exact result's magnitude (1e-4 for float32, 1e-6 otherwise). NaN where ``low`` is not
    finite, so that nothing passes against a broken reference."""
    low_err = (low.double() - exact.double()).abs().max().item() if low.numel() else 0.0
    floor = (1e-4 if dtype == torch.float32 else 1e-6) * (exact.abs().max().item() if exact.numel() else 0.0)
    return 2 * low_err + floor
