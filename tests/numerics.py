"""The numeric checks the op tests share: float64 leaves for the oracle (``upcast``), an absolute-error
assertion that names the worst element, and the 2x-reference-error rule for low-precision results (its
bound is ``ssltm_kernels.numerics.twice_reference_bound``, which the benchmarks' correctness gate uses too)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ssltm_kernels.numerics import twice_reference_bound, upcast

__all__ = ["assert_close", "assert_within_twice_low_precision_error", "upcast"]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    """``|actual - expected| <= atol`` everywhere, in float64; the message names the worst element."""
    err = (actual.double() - expected.double()).abs()
    worst = err.argmax().item()
    assert err.max().item() <= atol, (
        f"{what}: max abs error {err.max().item():.3e} > {atol:.1e} at flat index {worst} "
        f"(got {actual.flatten()[worst].item():.6f}, expected {expected.flatten()[worst].item():.6f})"
    )


def assert_within_twice_low_precision_error(
    names: Sequence[str],
    results: Sequence[torch.Tensor],
    low_results: Sequence[torch.Tensor],
    ref_results: Sequence[torch.Tensor],
    dtype: torch.dtype,
    what: str,
) -> None:
    """The 2x-reference-error rule: each result is at most twice as far from the exact reference
    (``ref_results``) as the reference run in ``dtype`` (``low_results``), plus a floor relative to the
    reference's magnitude."""
    for name, got, low, ref in zip(names, results, low_results, ref_results, strict=True):
        low_err = (low.double() - ref.double()).abs().max().item()
        assert_close(
            got, ref, twice_reference_bound(low, ref, dtype), f"{what} {name} (same-precision ref err {low_err:.2e})"
        )
