"""The table of GPU facts: shared memory per architecture, the boards' multiprocessors and peaks, and what the
CPU interpreter stands in for."""

import pytest
import torch

from ssltm_kernels import _device


def test_shared_memory_per_architecture():
    assert _device.shared_memory_limit(90) == 232448  # H100/H200: 227 KB
    assert _device.shared_memory_limit(80) == 166912  # A100: 163 KB
    assert _device.shared_memory_limit(86) == _device.shared_memory_limit(89) == 101376  # RTX 30xx/40xx: 99 KB
    assert _device.ARCHS == (80, 86, 89, 90, 100)


@pytest.mark.parametrize("arch", [75, "90", None])
def test_unknown_architecture_names_the_argument(arch):
    with pytest.raises(ValueError, match=rf"arch must be one of the known compute capabilities .*, got {arch!r}"):
        _device.shared_memory_limit(arch)


def test_off_a_gpu_the_interpreter_stands_in_for_an_h100_sxm():
    cpu = torch.device("cpu")
    assert _device.INTERPRETER_DEVICE is _device.DEVICE_SPECS["H100 SXM"]
    assert (_device.device_arch(cpu), _device.device_shared_memory(cpu), _device.device_sm_count(cpu)) == (
        90,
        227 * 1024,
        132,
    )


def test_boards():
    assert {name: (s.arch, s.sm_count) for name, s in _device.DEVICE_SPECS.items()} == {
        "H100 SXM": (90, 132),
        "H100 PCIe": (90, 114),
        "H100 NVL": (90, 132),
        "H200 SXM": (90, 132),
        "H200 NVL": (90, 132),
    }
    assert _device.match_device_spec("NVIDIA H100 PCIe") is _device.DEVICE_SPECS["H100 PCIe"]
    assert _device.DEVICE_SPECS["H100 SXM"].exp_per_s == 132 * 16 * 1830e6
