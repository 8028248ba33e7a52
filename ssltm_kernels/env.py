"""``python -m ssltm_kernels.env``: versions, GPU and built backends, for bug reports."""

from __future__ import annotations

import os
import platform

import torch

from ssltm_kernels._backend import HAS_TRITON, triton_interpreting
from ssltm_kernels._ext import CUDA_EXT_IMPORT_ERROR, HAS_CUDA_EXT


def env_report() -> str:
    lines = [
        f"python          {platform.python_version()} ({platform.machine()})",
        f"torch           {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
    ]
    if HAS_TRITON:
        import triton

        lines.append(f"triton          {triton.__version__}{' (interpreter)' if triton_interpreting() else ''}")
    else:
        lines.append("triton          not installed")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"gpu {i}           {props.name} (sm_{props.major}{props.minor}, "
                         f"{props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)")
    else:
        lines.append("gpu             none visible")
    lines.append(f"cuda extension  {'built' if HAS_CUDA_EXT else f'not available: {CUDA_EXT_IMPORT_ERROR}'}")
    lines.append(f"SSLTM_BACKEND   {os.environ.get('SSLTM_BACKEND', '(unset: cuda -> triton -> reference)')}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(env_report())
