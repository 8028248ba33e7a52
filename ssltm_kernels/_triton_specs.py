"""Ahead-of-time compile specifications of Triton kernels, shared by every op and ``compile_check``.

A launch specialises a kernel on its arguments: an integer equal to 1 becomes a constant, a multiple
of 16 (and a pointer to a 16-byte aligned address) is marked divisible by 16, an integer outside
int32 makes the argument i64 (u64 from 2**63); ``do_not_specialize(_on_alignment)`` parameters are
exempt. :func:`kernel_spec` reproduces this for ``triton.compile`` without a GPU, so that the cubins
``compile_check`` builds are the ones real launches would build.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def kernel_spec(
    kernel,
    constexprs: Mapping[str, object],
    pointer_types: Mapping[str, str],
    *,
    float_args: tuple[str, ...] = (),
    int_arg: Callable[[str], int] | None = None,
    aligned_pointers: bool = True,
    options: Mapping[str, object] | None = None,
):
    """``(name, kernel, signature, constexprs, attrs, options)`` for ``triton.compile(ASTSource(...))``.

    ``constexprs``: values of the kernel's ``tl.constexpr`` parameters (names the kernel lacks are
    dropped); ``pointer_types``: each pointer argument's element type (``"fp32"``, ``"bf16"``, ...);
    ``float_args``: float scalars (never specialised); every other argument is an integer whose launch
    value is ``int_arg(name)`` (default 16: the most specialised variant). ``aligned_pointers``: the
    tensors start at multiples of 16 bytes, as torch's allocations do."""
    constexprs = {name: value for name, value in constexprs.items() if name in kernel.arg_names}
    signature, attrs = {}, {}
    # the interpreter's functions keep no parameter records
    params = getattr(kernel, "params", None) or [None] * len(kernel.arg_names)
    for i, (name, param) in enumerate(zip(kernel.arg_names, params, strict=True)):
        specialise = not getattr(param, "do_not_specialize", False)
        align = specialise and not getattr(param, "do_not_specialize_on_alignment", False)
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name in pointer_types:
            signature[name] = "*" + pointer_types[name]
            divisible = aligned_pointers
        elif name in float_args:
            signature[name] = "fp32"
            continue
        else:
            value = 16 if int_arg is None else int(int_arg(name))
            if value == 1 and specialise:
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "u64" if value >= 2**63 else "i64"
            divisible = value % 16 == 0
        if divisible and align:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return kernel.__name__, kernel, signature, constexprs, attrs, dict(options or {})


@dataclass(frozen=True)
class CompileConfig:
    """One configuration ``compile_check`` compiles: ``make_specs(arch)`` yields the ``kernel_spec``
    tuples of the kernels it launches. ``make_specs`` must pickle (a module-level function or a
    ``functools.partial`` of one): the compiles run in worker processes. ``cost`` orders the work,
    slowest first."""

    label: str
    make_specs: Callable[[int], object]
    cost: int = 1

    def specs(self, arch: int) -> list[tuple]:
        return list(self.make_specs(arch))
