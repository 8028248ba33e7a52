"""The one place that imports the compiled extension ``ssltm_kernels._C``.

``HAS_CUDA_EXT`` says whether it loaded; when it did not, ``_C`` is a stub whose attributes raise an
ImportError that says how to build it.
"""

from __future__ import annotations

import importlib

import torch  # noqa: F401  (loads libtorch before the extension)

BUILD_HINT = "build it with a CUDA build of torch and nvcc on PATH: SSLTM_CUDA=on pip install -e . --no-build-isolation"


class _MissingExtension:
    def __init__(self, error: str) -> None:
        self._error = error

    def __getattr__(self, name: str):
        raise ImportError(f"ssltm_kernels._C.{name} is unavailable ({self._error}); {BUILD_HINT}")


try:
    _C = importlib.import_module("ssltm_kernels._C")

    HAS_CUDA_EXT = True
    CUDA_EXT_IMPORT_ERROR: str | None = None
except ImportError as error:
    _C = _MissingExtension(str(error))
    HAS_CUDA_EXT = False
    CUDA_EXT_IMPORT_ERROR = str(error)
