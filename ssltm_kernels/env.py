"""``python -m ssltm_kernels.env``: versions, GPU and built backends, for bug reports."""

from __future__ import annotations

import os
import platform

import torch

from ssltm_kernels import _ext
from ssltm_kernels._backend import HAS_TRITON, triton_interpreting


def extension_report() -> str:
    """What the compiled extension ``_C`` holds: whether it loaded, whether it has the CUDA kernels
    (``_C.WITH_CUDA``; a CPU build of torch or no nvcc at build time gives only their CPU emulation)
    and, when the extension says so (``_C.CUDA_ARCHS``), the architectures they were compiled for."""
    if not _ext.HAS_CUDA_EXT:
        return f"not available: {_ext.CUDA_EXT_IMPORT_ERROR}"
    if not _ext._C.WITH_CUDA:
        return "built without CUDA kernels (CPU emulation only)"
    archs = getattr(_ext._C, "CUDA_ARCHS", None)
    return "built with CUDA kernels" + (f" for {', '.join(map(str, archs))}" if archs else "")


def env_report() -> str:
    lines = [
        f"python          {platform.python_version()} ({platform.machine()})",
        f"torch           {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
    ]
    if HAS_TRITON:
        import triton

        mode = "CPU interpreter (TRITON_INTERPRET=1)" if triton_interpreting() else "compiled kernels"
        lines.append(f"triton          {triton.__version__}, {mode}")
    else:
        lines.append("triton          not installed")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(
                f"gpu {i}           {props.name} (sm_{props.major}{props.minor}, "
                f"{props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
                f"L2 {props.L2_cache_size / 2**20:.0f} MiB)"
            )
    else:
        lines.append("gpu             none visible")
    lines.append(f"cuda extension  {extension_report()}")
    lines.append(f"SSLTM_BACKEND   {os.environ.get('SSLTM_BACKEND', '(unset: cuda -> triton -> reference)')}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(env_report())
