"""Test setup: Triton kernels run through the CPU interpreter unless a GPU is present.

``TRITON_INTERPRET`` must be set before triton is imported (before any ``@triton.jit``), so this
happens here, ahead of the package import.
"""

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("SSLTM_TEST_GPU") == "1" else "1")

import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
