"""The facts of the GPUs the kernels are built, tuned and measured for, in one place, and the limits read from them.

Per architecture (compute capability as an int, 90 for sm_90): the shared memory a block may opt in to
(``SHARED_MEMORY_LIMIT``, from the CUDA C Programming Guide's table of compute capabilities), which sets
the tiles and pipeline stages the Triton dispatch takes and bounds the kernels ``compile_check`` builds.
Per board: the multiprocessors and the dense peaks a roofline divides by (``DEVICE_SPECS``). The CPU
interpreter and the ahead-of-time compile specifications stand in for one board (``INTERPRETER_DEVICE``,
an H100 SXM): without a GPU, launch configurations are chosen as on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# architecture -> shared memory a block may opt in to, bytes
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}
ARCHS = tuple(sorted(SHARED_MEMORY_LIMIT))


@dataclass(frozen=True)
class DeviceSpec:
    """One GPU board: its architecture and multiprocessors, and its dense peaks: FLOP/s per dtype, DRAM
    bytes/s, ``exp``/s of the special-function unit."""

    name: str
    flops: dict  # torch.dtype -> FLOP/s; fp32 is the non-tensor-core peak (torch's default, no TF32)
    bytes_per_s: float
    exp_per_s: float
    arch: int
    sm_count: int


def _hopper(name: str, sparse_tflops: float, fp32_tflops: float, tb_per_s: float, sms: int, mhz: int) -> DeviceSpec:
    # NVIDIA H100 / H200 datasheets quote tensor FLOP/s "with sparsity": dense is half. MUFU ex2 does
    # 16/clk/SM on sm_90 (CUDA C++ Programming Guide throughput table) at the clock the dense peak implies
    # (4096 bf16 FLOP/clk/SM): 132 SMs x 16 x 1.83 GHz = 3.9e12 exp/s on H100 SXM, FlashAttention-3's figure.
    tensor = sparse_tflops / 2 * 1e12
    flops = {torch.bfloat16: tensor, torch.float16: tensor, torch.float32: fp32_tflops * 1e12}
    return DeviceSpec(name, flops, tb_per_s * 1e12, sms * 16 * mhz * 1e6, arch=90, sm_count=sms)


DEVICE_SPECS = {
    s.name: s
    for s in (
        _hopper("H100 SXM", 1979, 67, 3.35, 132, 1830),
        _hopper("H100 PCIe", 1513, 51, 2.0, 114, 1620),
        _hopper("H100 NVL", 1671, 60, 3.9, 132, 1545),
        _hopper("H200 SXM", 1979, 67, 4.8, 132, 1830),
        _hopper("H200 NVL", 1671, 60, 4.8, 132, 1545),
    )
}

# the board the interpreter and the ahead-of-time compile specifications choose launch configurations for
INTERPRETER_DEVICE = DEVICE_SPECS["H100 SXM"]


def match_device_spec(gpu_name: str | None) -> DeviceSpec | None:
    """Spec for a ``torch.cuda.get_device_name`` ("NVIDIA H100 80GB HBM3" is the SXM board), else None."""
    name = (gpu_name or "").upper()
    for gpu in ("H200", "H100"):
        if gpu in name:
            return DEVICE_SPECS.get(f"{gpu} {'NVL' if 'NVL' in name else 'PCIe' if 'PCIE' in name else 'SXM'}")
    return None


def shared_memory_limit(arch: int) -> int:
    """Shared memory a block may opt in to on architecture ``arch`` (e.g. 90), bytes."""
    if arch not in SHARED_MEMORY_LIMIT:
        raise ValueError(f"arch must be one of the known compute capabilities {ARCHS}, got {arch!r}")
    return SHARED_MEMORY_LIMIT[arch]


def device_arch(device: torch.device) -> int:
    """The compute capability of ``device`` as an int (90 for sm_90); the interpreter's board's off a GPU."""
    if device.type != "cuda":
        return INTERPRETER_DEVICE.arch
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def device_shared_memory(device: torch.device) -> int:
    """Shared memory a block may opt in to on ``device``; the interpreter runs the kernels as sm_90 would."""
    if device.type != "cuda":
        return shared_memory_limit(INTERPRETER_DEVICE.arch)
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def device_sm_count(device: torch.device) -> int:
    """Multiprocessors of ``device``; the interpreter's board's off a GPU."""
    if device.type != "cuda":
        return INTERPRETER_DEVICE.sm_count
    return torch.cuda.get_device_properties(device).multi_processor_count
