"""Compile every Triton kernel configuration the dispatch launches on a GPU architecture, without a GPU.

``python -m ssltm_kernels.compile_check --arch 90`` builds the cubins for sm_90 (H100/H200) of the
tuned configurations and of the largest windows the Triton dispatch accepts on that architecture
(``triton_key_tile_limit``), specialised as a launch on aligned inputs is, prints each kernel's
shared-memory use and exits non-zero if any configuration fails to compile or needs more shared memory
than the architecture has. CI runs it for sm_90, sm_80 and sm_86 so that kernels proven in the CPU
interpreter are also proven to compile for real hardware.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import torch

from ssltm_kernels.window_attention_3d import (
    MAX_WINDOW_TOKENS,
    key_tile_bytes,
    triton_compile_specs,
    triton_key_tile_limit,
)

# architecture -> shared memory a block may opt in to, bytes (CUDA C Programming Guide, compute capabilities)
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}

# (window, head_dim, shift): the SSLTM / Video Swin configurations the kernels are tuned for, in every dtype
WINDOW_ATTENTION_CONFIGS = (
    ((4, 7, 7), 32, (0, 0, 0)),
    ((4, 7, 7), 32, (2, 3, 3)),
    ((8, 7, 7), 32, (4, 3, 3)),
    ((2, 7, 7), 64, (1, 3, 3)),
)


def largest_window_configs(key_tile_limit: int):
    """``(dtype, window, head_dim)``: for each head dim, the largest window whose key tile fits
    ``key_tile_limit`` and the one of half its tile, the largest whose dq kernel double-buffers key
    tiles (T x 7 x 7 windows where they are large enough); fp16 has bf16's tile sizes."""
    for dtype, head_dim in itertools.product((torch.bfloat16, torch.float32), (16, 32, 64, 128, 256)):
        block_n = min(MAX_WINDOW_TOKENS, key_tile_limit // (head_dim * dtype.itemsize))
        for tokens in (block_n, block_n // 2):
            if tokens >= 64:
                yield dtype, (tokens // 64, 7, 7), head_dim
            elif tokens >= 16:
                yield dtype, (1, 4, tokens // 4), head_dim


def window_attention_configs(arch: int):
    """``(dtype, window, head_dim, shift, mask)``: the configurations the dispatch launches on ``arch``
    that the check covers."""
    key_tile_limit = triton_key_tile_limit(SHARED_MEMORY_LIMIT[arch])
    for dtype, (window, head_dim, shift) in itertools.product(
        (torch.bfloat16, torch.float16, torch.float32), WINDOW_ATTENTION_CONFIGS
    ):
        if key_tile_bytes(math.prod(window), head_dim, dtype) <= key_tile_limit:  # else the CUDA kernels run
            yield dtype, window, head_dim, shift, False
    # with Video Swin's window-batch mask: the variant that takes the most shared memory
    for dtype, window, head_dim in largest_window_configs(key_tile_limit):
        yield dtype, window, head_dim, (0, 0, 0), True


def compile_report(arch: int, dtype: torch.dtype, window, head_dim: int, shift, mask: bool) -> list[str]:
    """Compile the three kernels of one configuration for ``arch``: a report line each, ``ok`` or
    ``FAIL``, with the kernel's shared memory or the compiler's error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    label = f"{str(dtype).removeprefix('torch.')} window={window} head_dim={head_dim} shift={shift}"
    label += " mask" if mask else ""
    key_tile_limit = triton_key_tile_limit(SHARED_MEMORY_LIMIT[arch])
    lines = []
    for name, kernel, signature, constexprs, attrs, options in triton_compile_specs(
        dtype, window, head_dim, shift, mask=mask, key_tile_limit=key_tile_limit
    ):
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", arch, 32), options=options)
        except Exception as error:  # report every failing configuration, then fail
            lines.append(f"FAIL sm_{arch} {name} [{label}]: {type(error).__name__}: {error}")
            continue
        shared = compiled.metadata.shared
        status = "FAIL" if shared > SHARED_MEMORY_LIMIT[arch] else "ok  "
        lines.append(f"{status} sm_{arch} {name} [{label}]: shared memory {shared} B, {options}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_MEMORY_LIMIT),
                        help="compute capability as an int, e.g. 90")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="compiler processes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter does not compile kernels")

    failures = 0
    configs = list(window_attention_configs(args.arch))
    with ProcessPoolExecutor(args.jobs) as pool:
        for lines in pool.map(compile_report, [args.arch] * len(configs), *zip(*configs, strict=True)):
            failures += sum(line.startswith("FAIL") for line in lines)
            print(*lines, sep="\n", flush=True)
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
