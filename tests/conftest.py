"""Test setup: Triton kernels run on the GPU when there is one, else through the CPU interpreter.

``TRITON_INTERPRET`` must be set before triton is imported (before any ``@triton.jit``), so this
happens here, ahead of the package import; an explicit ``TRITON_INTERPRET`` in the environment wins.
A ``gpu``-marked test skips without a GPU and fails when it would run the Triton kernels in the
interpreter, so that it can never pass without having tested the GPU code.
"""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

from ssltm_kernels._backend import triton_interpreting  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _gpu_tests_run_compiled_kernels(request):
    if "gpu" in request.keywords and triton_interpreting():
        pytest.fail("a GPU test must run the compiled Triton kernels, but TRITON_INTERPRET=1: unset it")


@pytest.fixture(scope="session")
def raft_file(tmp_path_factory):
    """A randomly initialised raft_large saved as a state dict, as torchvision's weight files are."""
    from torchvision.models.optical_flow import raft_large

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("raft") / "raft_large.pth"
    torch.save(raft_large(weights=None, progress=False).state_dict(), path)
    return path
