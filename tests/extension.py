"""The compiled extension for the tests of the CUDA kernels' code: imported, or the calling test module skipped
with how to build it. Any other import error (a broken package or build) fails."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest

import ssltm_kernels  # noqa: F401  (a broken package import must fail, not skip)


def built_extension() -> ModuleType:
    """``ssltm_kernels._C``; skips the calling module (at import) when it is not built."""
    try:
        return importlib.import_module("ssltm_kernels._C")
    except ModuleNotFoundError as error:  # pragma: no cover - depends on the build
        if error.name != "ssltm_kernels._C":
            raise
        pytest.skip(
            "ssltm_kernels._C is not built: run `pip install -e . --no-build-isolation` "
            "(or `python setup.py build_ext --inplace`)",
            allow_module_level=True,
        )
