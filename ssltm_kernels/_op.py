"""The scaffold every op shares around its kernels: block sizes, the dtypes the kernels take, the
``can_run_cuda/can_run_triton/can_run_reference`` predicates, the dispatch, the autocast registration
and the sets of configurations ``compile_check`` compiles.

An op supplies its input validation and one function that returns a :class:`BackendCheck` per backend
(``checks``); :func:`backend_predicates` makes the three public predicates of it and :func:`dispatch`
chooses the backend with it. Where the reference runs is one rule, :func:`dispatch`'s: as eager PyTorch,
outside the custom ops, so that autograd differentiates it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

import torch

from ssltm_kernels._backend import BACKENDS, BackendCheck, choose_backend

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the kernels take (fp32 accumulation)
MIN_DOT_BLOCK = 16  # tl.dot takes operands whose every dimension is at least 16
# the configuration sets compile_check compiles: every configuration, the one the tests compile, and the launch
# configurations a GPU sweep may ship (only ops with tuned launch configurations have the latter)
COMPILE_SETS = ("full", "representative", "sweep")

Checks = Mapping[str, BackendCheck]


def next_pow2(n: int) -> int:
    """The smallest power of 2 that is at least ``n`` (1 for ``n <= 1``)."""
    return 1 << (max(1, n) - 1).bit_length()


def dot_block(n: int) -> int:
    """A block of ``n`` elements that ``tl.dot`` takes: ``next_pow2(n)``, at least ``MIN_DOT_BLOCK``."""
    return max(MIN_DOT_BLOCK, next_pow2(n))


def dtype_reason(dtype: torch.dtype) -> str | None:
    """Why the kernels cannot run in ``dtype`` (None: it is one of ``KERNEL_DTYPES``)."""
    return None if dtype in KERNEL_DTYPES else f"dtype {dtype} is not one of {KERNEL_DTYPES}"


def autocasting(*tensors: torch.Tensor) -> bool:
    """Whether ``torch.autocast`` casts ``tensors`` before an op's forward runs (see :func:`register_autocast`):
    autocast is on for their device (CUDA or CPU) and each has a kernel dtype."""
    device_type = tensors[0].device.type
    return (
        device_type in ("cuda", "cpu")
        and torch.is_autocast_enabled(device_type)
        and all(x.dtype in KERNEL_DTYPES for x in tensors)
    )


def autocast_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype an op that runs in the autocast dtype computes ``tensors`` in: the autocast dtype where
    autocast casts them (:func:`autocasting`), else the first one's."""
    return torch.get_autocast_dtype(tensors[0].device.type) if autocasting(*tensors) else tensors[0].dtype


def backend_predicates(op: str, checks: Callable[..., Checks]) -> tuple[Callable[..., BackendCheck], ...]:
    """``(can_run_cuda, can_run_triton, can_run_reference)`` of ``op``. Each takes the arguments of ``checks``
    (which validates them, raising the input error, and returns a ``BackendCheck`` per backend) and a
    keyword ``raise_error``; it returns its backend's check, truthy when the backend can run, with the
    reason when not (``raise_error``: raise it, a ``BackendUnavailableError``)."""
    params = list(inspect.signature(checks).parameters.values())
    params.append(inspect.Parameter("raise_error", inspect.Parameter.KEYWORD_ONLY, default=False))

    def predicate(backend: str) -> Callable[..., BackendCheck]:
        def can_run(*args, raise_error: bool = False, **kwargs) -> BackendCheck:
            check = checks(*args, **kwargs)[backend]
            if raise_error:
                check.raise_if_unavailable(op)
            return check

        can_run.__name__ = can_run.__qualname__ = f"can_run_{backend}"
        can_run.__module__ = checks.__module__
        can_run.__signature__ = inspect.Signature(params, return_annotation=BackendCheck)
        can_run.__doc__ = (
            f"The reference runs any valid arguments of :func:`{op}` (invalid ones raise the input error)."
            if backend == "reference"
            else f"Whether the {backend} backend's kernels can run :func:`{op}` on these arguments (truthy), "
            "with the reason when not (``raise_error``: raise it); invalid ones raise the input error."
        )
        return can_run

    return tuple(predicate(backend) for backend in BACKENDS)


def dispatch(
    op: str,
    checks: Checks,
    backend: str | None,
    *,
    fused: Callable[[str], object],
    reference: Callable[[], object] | None,
    passed_over: Mapping[str, Callable[[], str | None]] | None = None,
):
    """Run ``op`` on the backend ``choose_backend`` picks from ``checks`` (``backend``: forced, see there):
    ``fused(backend)`` runs the custom op. The reference runs as eager PyTorch outside the custom ops,
    ``reference()``, differentiated by autograd; an op whose custom op must run in every backend (its
    checks and gradient rule hold for the reference too) passes ``reference=None``, and ``fused`` takes
    ``"reference"`` as well."""
    chosen = choose_backend(
        op, {name: (lambda check=check: check.reason) for name, check in checks.items()}, backend, passed_over
    )
    return reference() if chosen == "reference" and reference is not None else fused(chosen)


def register_autocast(
    qualname: str, activations: tuple[int, ...] = (), dtype: Callable[[tuple], torch.dtype] | None = None
) -> None:
    """Autocast declaration of the custom op ``qualname`` (``"ssltm::name"``) on CUDA and CPU: under
    ``torch.autocast`` the tensor arguments at positions ``activations`` that have a kernel dtype are cast
    to ``dtype(args)`` (default: the autocast dtype); then the op runs with autocast off (the others keep
    their dtypes)."""
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default

    def cast(x, to: torch.dtype):
        return x.to(to) if isinstance(x, torch.Tensor) and x.dtype in KERNEL_DTYPES else x

    for device_type, key in (("cuda", "AutocastCUDA"), ("cpu", "AutocastCPU")):

        def autocast_kernel(*args, device_type=device_type):
            to = torch.get_autocast_dtype(device_type) if dtype is None else dtype(args)
            args = [cast(x, to) if i in activations else x for i, x in enumerate(args)]
            with torch.autocast(device_type, enabled=False):
                return op(*args)

        torch.library.impl(qualname, key, autocast_kernel)


def compile_cases(config_set: str, *, representative: list, full: list) -> list:
    """An op's cases for ``compile_check``'s ``config_set`` (one of ``COMPILE_SETS``): ``representative`` or
    ``full``; none for ``sweep`` (an op without tuned launch configurations has nothing a sweep ships)."""
    if config_set not in COMPILE_SETS:
        raise ValueError(f"config_set must be one of {COMPILE_SETS}, got {config_set!r}")
    return {"representative": representative, "full": full, "sweep": []}[config_set]
