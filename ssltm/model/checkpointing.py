"""Activation checkpointing: a module's activations dropped after its forward and recomputed in the backward
(``torch.utils.checkpoint``, non-reentrant), trading about one more forward of the module for its activations'
memory.

The recomputation replays the forward as it ran: the RNG state is restored first (torch's
``preserve_rng_state``), so dropout draws the same masks. Batch norm in training mode normalises by the batch's
statistics, which the recomputation reproduces exactly, but it would also update the running statistics (and
``num_batches_tracked``) a second time; torch has no guard for that, so the running statistics of the module's
batch norms are kept as they were before the recomputation and put back after it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def recomputed(forward: Callable, *args: torch.Tensor, norms: nn.Module | None = None):
    """``forward(*args)``, its activations recomputed in the backward instead of kept from the forward.

    ``norms``: the module whose batch norms ``forward`` runs (default: ``forward`` itself, a module).
    """
    if norms is None:
        if not isinstance(forward, nn.Module):
            raise TypeError(f"norms must name the module of {forward!r}, which is not a module itself")
        norms = forward
    return checkpoint(
        forward,
        *args,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _running_stats_kept(norms)),
    )


def checkpointing_now(module: nn.Module) -> bool:
    """Whether a module with checkpointing on recomputes now: in training, with autograd recording (evaluation
    and inference run as without checkpointing)."""
    return module.training and torch.is_grad_enabled()


@contextlib.contextmanager
def _running_stats_kept(module: nn.Module) -> Iterator[None]:
    """The running statistics of ``module``'s batch norms as they are on entry, put back on exit (the
    recomputation may stop early, by an exception, once it has what the backward needs)."""
    kept = [
        (buffer, buffer.clone())
        for norm in module.modules()
        if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.track_running_stats
        for buffer in (norm.running_mean, norm.running_var, norm.num_batches_tracked)
        if buffer is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in kept:
                buffer.copy_(value)
