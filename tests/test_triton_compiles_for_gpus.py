"""The Triton kernels compile, within the shared memory a block may take, for sm_90 (H100/H200), sm_80
(A100) and sm_86 (RTX 30xx), without a GPU: the representative set of configurations here (every
configuration: ``make compile-check``), each specialised as the launches it stands for are."""

import os
import subprocess
import sys

import pytest
import torch

from ssltm_kernels.compile_check import (
    LAUNCHES,
    SSLTM_HEAD_DIM,
    SSLTM_SHIFT,
    SSLTM_WINDOW,
    configurations,
    ssltm_launch_ints,
    window_attention_configs,
)
from ssltm_kernels.ops.window_attention_3d import triton_compile_specs

ARCHS = (90, 80, 86)


@pytest.fixture(scope="module")
def representative_report():
    """One run for the three architectures: they share one pool of compiler processes."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    command = [sys.executable, "-m", "ssltm_kernels.compile_check", "--set", "representative",
               "--arch", *map(str, ARCHS)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    return result.returncode, result.stdout, result.stdout + result.stderr


def test_representative_set_compiles(representative_report):
    returncode, stdout, report = representative_report
    assert returncode == 0, report
    assert stdout.rstrip().endswith(" 0 failed"), report


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_of_the_representative_set_compiled_for(arch, representative_report):
    _, stdout, report = representative_report
    compiled = [line for line in stdout.splitlines() if line.startswith(f"ok   sm_{arch} ")]
    # as many kernels as the specs yield: ops may add kernels to a configuration
    expected = sum(len(config.specs(arch)) for config in configurations(arch, "representative"))
    assert len(compiled) == expected, report


@pytest.mark.parametrize("arch", ARCHS)
def test_representative_set_covers_ssltm_and_both_launch_extremes(arch):
    configs = window_attention_configs(arch, "representative")
    assert set(configs) <= set(window_attention_configs(arch, "full"))
    launches = {config.launch for config in configs}
    assert {"aligned", "unaligned", "ssltm"} <= launches
    ssltm = {(c.dtype, c.shift, c.window_batches, c.mask) for c in configs
             if c.window == SSLTM_WINDOW and c.head_dim == SSLTM_HEAD_DIM and c.launch == "ssltm"}
    # bf16 in every variant; fp16 (compiled as bf16) and fp32 (slow tf32x3 compiles) with every feature
    assert {(torch.bfloat16, (0, 0, 0), False, False), (torch.bfloat16, SSLTM_SHIFT, False, False),
            (torch.bfloat16, (0, 0, 0), True, True), (torch.float16, SSLTM_SHIFT, False, False)} <= ssltm
    if arch != 86:  # sm_86: fp32 runs in CUDA
        assert {(torch.float32, SSLTM_SHIFT, False, False), (torch.float32, (0, 0, 0), True, True)} <= ssltm


def test_specs_specialise_integers_as_the_installed_triton_launcher_does():
    """``triton_compile_specs`` derives the signature and attrs from a launch's integers exactly as the
    installed Triton's launcher specialises them (1 -> constant, multiple of 16 -> divisible, int64)."""
    libtriton = pytest.importorskip("triton._C.libtriton")
    if not hasattr(libtriton, "native_specialize_impl"):
        pytest.skip("this Triton has no native_specialize_impl to compare with")
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", 90, 32))
    reference = list(triton_compile_specs(torch.bfloat16, (2, 3, 3), 32))  # every integer 16: none constant
    for value in (1, 0, 16, 30, 48, -16, 2**31 - 16, 2**31, 2**33 + 1, 2**63):
        specs = triton_compile_specs(torch.bfloat16, (2, 3, 3), 32, int_arg=lambda name, value=value: value)
        for (name, kernel, signature, constexprs, attrs, _), ref in zip(specs, reference, strict=True):
            ints = [(i, arg) for i, arg in enumerate(kernel.arg_names) if ref[2][arg] == "i32"]
            expected = {"groups", "NH"} if name == "_window_attn_bwd_reduce_kernel" else {"T", "H", "W", "HD"}
            assert expected <= {arg for _, arg in ints}, name
            kind, key = libtriton.native_specialize_impl(backend, value, False, True, True)
            for i, arg in ints:
                assert signature[arg] == kind, (name, arg, value)
                if kind == "constexpr":
                    assert constexprs[arg] == key == 1, (name, arg, value)
                else:
                    assert attrs.get((i,), []) == backend.parse_attr(key), (name, arg, value)


def test_specs_mark_pointers_as_their_alignment():
    aligned, unaligned = (torch.empty(64), torch.empty(64)[1:])  # data_ptr % 16: 0 and 4
    for pointers_aligned, tensor in ((True, aligned), (False, unaligned)):
        assert (tensor.data_ptr() % 16 == 0) == pointers_aligned
        for _, kernel, signature, _, attrs, _ in triton_compile_specs(torch.float32, (2, 3, 3), 32,
                                                                      aligned_pointers=pointers_aligned):
            pointers = [i for i, name in enumerate(kernel.arg_names) if signature[name].startswith("*")]
            assert pointers and all(((i,) in attrs) == pointers_aligned for i in pointers)


def test_launches_give_every_integer_argument_a_value():
    """The launch profiles give each integer argument the kernels take a value (new arguments a default),
    and SSLTM's own launches hit Triton's constant-1 specialisation (num_masks, or T and H of window
    batches)."""
    for config in window_attention_configs(90, "representative"):
        for name, _, signature, _, _, _ in config.specs(90):
            assert all(kind in ("constexpr", "fp32", "i32", "i64", "u64") or kind.startswith("*")
                       for kind in signature.values()), (config.label, name)
        if config.launch == "unaligned":
            values = LAUNCHES["unaligned"][1](config)
            assert all(values(name) % 16 and values(name) != 1 for name in ("T", "H", "W", "s_h", "HD"))
        if config.launch == "ssltm":
            ints = ssltm_launch_ints(config)
            ones = {"T", "H"} if config.window_batches else {"num_masks"}
            assert {name for name, value in ints.items() if value == 1} == ones, config.label
            for _, kernel, signature, constexprs, _, _ in config.specs(90):
                assert all(signature[name] == "constexpr" and constexprs[name] == 1
                           for name in ones if name in kernel.arg_names)
