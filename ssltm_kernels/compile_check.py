"""Compile every shipped Triton kernel configuration for a GPU architecture, without a GPU.

``python -m ssltm_kernels.compile_check --arch 90`` builds the cubins for sm_90 (H100/H200) of the
tuned configurations and of the largest windows the Triton dispatch accepts, specialised as a launch
on aligned inputs is, prints each kernel's shared-memory use and exits non-zero if any configuration
fails to compile or needs more shared memory than the architecture has. CI runs it so that kernels proven in the CPU
interpreter are also proven to compile for real hardware.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

# architecture -> usable shared memory per block, bytes (CUDA C Programming Guide, compute capabilities)
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}

# (window, head_dim, shift): the SSLTM / Video Swin configurations the kernels are tuned for, in every dtype
WINDOW_ATTENTION_CONFIGS = (
    ((4, 7, 7), 32, (0, 0, 0)),
    ((4, 7, 7), 32, (2, 3, 3)),
    ((8, 7, 7), 32, (4, 3, 3)),
    ((2, 7, 7), 64, (1, 3, 3)),
)

# (dtype, window, head_dim): the largest windows the Triton dispatch accepts (a 64 KB key tile, see
# MAX_TRITON_KEY_TILE_BYTES), compiled with Video Swin's window-batch mask, the variant that takes the
# most shared memory; fp16 has bf16's tile sizes
LARGEST_WINDOW_CONFIGS = (
    (torch.bfloat16, (16, 7, 7), 32),
    (torch.bfloat16, (16, 7, 7), 16),
    (torch.bfloat16, (8, 7, 7), 64),
    (torch.bfloat16, (4, 7, 7), 128),
    (torch.bfloat16, (2, 7, 7), 256),
    (torch.float32, (16, 7, 7), 16),
    (torch.float32, (8, 7, 7), 32),
    (torch.float32, (4, 7, 7), 64),
    (torch.float32, (2, 7, 7), 128),
    (torch.float32, (1, 7, 7), 256),
)


def window_attention_specs():
    from ssltm_kernels.window_attention_3d import triton_compile_specs

    def labelled(dtype, window, head_dim, shift, mask):
        label = f"{str(dtype).removeprefix('torch.')} window={window} head_dim={head_dim} shift={shift}"
        label += " mask" if mask else ""
        for name, *spec in triton_compile_specs(dtype, window, head_dim, shift, mask=mask):
            yield f"{name} [{label}]", *spec

    for dtype, (window, head_dim, shift) in itertools.product(
        (torch.bfloat16, torch.float16, torch.float32), WINDOW_ATTENTION_CONFIGS
    ):
        yield from labelled(dtype, window, head_dim, shift, mask=False)
    for dtype, window, head_dim in LARGEST_WINDOW_CONFIGS:
        yield from labelled(dtype, window, head_dim, (0, 0, 0), mask=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an int, e.g. 90")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter does not compile kernels")

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    limit = SHARED_MEMORY_LIMIT.get(args.arch)
    failures = 0
    for label, kernel, signature, constexprs, attrs, options in window_attention_specs():
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options)
        except Exception as error:  # report every failing configuration, then fail
            failures += 1
            print(f"FAIL {label}: {type(error).__name__}: {error}")
            continue
        shared = compiled.metadata.shared
        too_big = limit is not None and shared > limit
        failures += too_big
        print(f"{'FAIL' if too_big else 'ok  '} sm_{args.arch} {label}: shared memory {shared} B, "
              f"{options}")
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
