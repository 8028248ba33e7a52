"""The Triton kernels compile, within the shared memory a block may take, for sm_90 (H100/H200), sm_80
(A100) and sm_86 (RTX 30xx), without a GPU: the representative set of configurations here (every
configuration: ``make compile-check``), each specialised as the launches it stands for are, with window
attention's q/k/v/o/dO row loads as wide as aligned launches allow (read from the SASS)."""

import inspect
import os
import re
import subprocess
import sys

import pytest
import torch

from ssltm_kernels.compile_check import (
    GlobalLoad,
    _row_load_calls,
    _source_key,
    configurations,
    global_loads,
    is_row_load,
    load_histogram,
    row_load_problem,
    row_load_widths,
    rows_aligned,
)
from ssltm_kernels.ops.window_attention_3d import triton_compile_specs, triton_kernels
from ssltm_kernels.ops.window_attention_3d.tuning import (
    LAUNCHES,
    SSLTM_HEAD_DIM,
    SSLTM_SHIFT,
    SSLTM_WINDOW,
    Config,
    compile_configs,
    ssltm_launch_ints,
)

ARCHS = (90, 80, 86)


@pytest.fixture(scope="module")
def representative_report():
    """One run for the three architectures: they share one pool of compiler processes."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    command = [
        sys.executable,
        "-m",
        "ssltm_kernels.compile_check",
        "--set",
        "representative",
        "--arch",
        *map(str, ARCHS),
    ]
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
def test_row_loads_of_aligned_launches_are_16_bytes_wide(arch, representative_report):
    """Every window attention kernel that loads rows reports its q/k/v/o/dO row-load widths (compile_check fails
    a kernel of an aligned launch whose row loads are narrower than its tiles allow); SSLTM's kernels (4x7x7
    windows, head_dim 32, 64-row tiles) load their rows 16 bytes wide, in every dtype."""
    _, stdout, report = representative_report
    lines = [
        line
        for line in stdout.splitlines()
        if line.startswith(f"ok   sm_{arch} _window_attn_") and "reduce" not in line
    ]
    rows = {line: re.search(r"\(q/k/v/o/dO rows ([^)]*)\)", line) for line in lines}
    assert lines and all(found and found[1] != "none" for found in rows.values()), report
    ssltm = [line for line in lines if "window=(4, 7, 7) head_dim=32" in line and "launch=ssltm" in line]
    assert ssltm, report
    for line in ssltm:
        assert rows[line][1].startswith("16B x"), line


@pytest.mark.parametrize("arch", ARCHS)
def test_representative_set_covers_ssltm_and_both_launch_extremes(arch):
    configs = compile_configs(arch, "representative")
    assert set(configs) <= set(compile_configs(arch, "full"))
    launches = {config.launch for config in configs}
    assert {"aligned", "unaligned", "ssltm"} <= launches
    ssltm = {
        (c.dtype, c.shift, c.window_batches, c.mask)
        for c in configs
        if c.window == SSLTM_WINDOW and c.head_dim == SSLTM_HEAD_DIM and c.launch == "ssltm"
    }
    # bf16 in every variant; fp16 (compiled as bf16) and fp32 (slow tf32x3 compiles) with every feature
    assert {
        (torch.bfloat16, (0, 0, 0), False, False),
        (torch.bfloat16, SSLTM_SHIFT, False, False),
        (torch.bfloat16, (0, 0, 0), True, True),
        (torch.float16, SSLTM_SHIFT, False, False),
    } <= ssltm
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
        for _, kernel, signature, _, attrs, _ in triton_compile_specs(
            torch.float32, (2, 3, 3), 32, aligned_pointers=pointers_aligned
        ):
            pointers = [i for i, name in enumerate(kernel.arg_names) if signature[name].startswith("*")]
            assert pointers and all(((i,) in attrs) == pointers_aligned for i in pointers)


def test_launches_give_every_integer_argument_a_value():
    """The launch profiles give each integer argument the kernels take a value (new arguments a default),
    and SSLTM's own launches hit Triton's constant-1 specialisation (num_masks, or T and H of window
    batches)."""
    for config in compile_configs(90, "representative"):
        for name, _, signature, _, _, _ in config.specs(90):
            assert all(
                kind in ("constexpr", "fp32", "i32", "i64", "u64") or kind.startswith("*")
                for kind in signature.values()
            ), (config.label, name)
        if config.launch == "unaligned":
            values = LAUNCHES["unaligned"][1](config)
            assert all(values(name) % 16 and values(name) != 1 for name in ("T", "H", "W", "s_h", "HD"))
        if config.launch == "ssltm":
            ints = ssltm_launch_ints(config)
            ones = {"T", "H"} if config.window_batches else {"num_masks"}
            assert {name for name, value in ints.items() if value == 1} == ones, config.label
            for _, kernel, signature, constexprs, _, _ in config.specs(90):
                assert all(
                    signature[name] == "constexpr" and constexprs[name] == 1
                    for name in ones
                    if name in kernel.arg_names
                )


# nvdisasm -gi output: the source line of each instruction, then the calls it was inlined through
SASS = """
        /*0090*/                   S2R R0, SR_CTAID.X ;                                     /* 0x0000000000007919 */
	//## File "/src/ops/kernels.py", line 619 inlined at "/src/ops/kernels.py", line 636
	//## File "/src/ops/kernels.py", line 636 inlined at "/src/ops/kernels.py", line 769
	//## File "/src/ops/kernels.py", line 769
        /*0ad0*/              @!P2 LDG.E.128 R92, desc[UR32][R10.64] ;                      /* 0x000000200a5ca981 */
        /*0af0*/                   LDG.E.U16 R7, desc[UR32][R6.64] ;                        /* 0x0000002006077981 */
	//## File "/src/ops/kernels.py", line 610
        /*3630*/                   LDGSTS.E.BYPASS.128 [R83+0x5000], desc[UR32][R38.64], P3 ; /* 0x0500000026537fae */
        /*3640*/               @P2 LDGSTS.E.BYPASS.LTC128B.128 [R83+0x5800], desc[UR32][R40.64] ;
        /*3650*/                   LDGSTS.E [R83+0x6000], desc[UR32][R42.64], P3 ;          /* 0x0600000026537fae */
        /*3660*/                   LDGDEPBAR ;                                               /* 0x00000000000079af */
        /*3670*/                   LDG.E.64.CONSTANT R2, desc[UR4][R2.64] ;
        /*3680*/                   LDG.E R3, desc[UR4][R4.64] ;
        /*3690*/                   LDG.E.EL.S8 R5, desc[UR4][R4.64] ;
        /*36a0*/                   LDS.128 R8, [R2] ;
        /*36b0*/                   STG.E.128 desc[UR4][R2.64], R8 ;
        /*36c0*/                   LDL R9, [R1+0x8] ;
"""


def test_global_loads_reads_kind_width_and_source_lines_from_sass():
    loads = global_loads(SASS)
    inlined = (("/src/ops/kernels.py", 619), ("/src/ops/kernels.py", 636), ("/src/ops/kernels.py", 769))
    line_610 = (("/src/ops/kernels.py", 610),)
    assert loads == [
        GlobalLoad("ldg", 16, inlined),
        GlobalLoad("ldg", 2, inlined),
        GlobalLoad("ldgsts", 16, line_610),
        GlobalLoad("ldgsts", 16, line_610),
        GlobalLoad("ldgsts", 4, line_610),
        GlobalLoad("ldg", 8, line_610),
        GlobalLoad("ldg", 4, line_610),
        GlobalLoad("ldg", 1, line_610),
    ]
    assert load_histogram(loads) == "ldg 16B x1 8B x1 4B x1 2B x1 1B x1, ldgsts 16B x2 4B x1"
    assert load_histogram(global_loads("LDS.128 R8, [R2] ;")) == "none"


def _load_rows_lines():
    lines, first = inspect.getsourcelines(triton_kernels._load_rows.fn)
    return inspect.getsourcefile(triton_kernels._load_rows.fn), first, len(lines)


def test_row_loads_are_those_of_load_rows_by_call_or_by_line():
    path, first, count = _load_rows_lines()
    calls = sorted(_row_load_calls())
    assert len(calls) >= 5 and all(file == _source_key(path) for file, _ in calls)  # q, k, v, o, dO
    module_lines, _ = inspect.getsourcelines(triton_kernels)
    pad_call = next(number for number, text in enumerate(module_lines, start=1) if "_pad_row(PAD_K" in text)
    kernel = (path, 10_000)
    # inlined (Triton 3.8): the call the innermost line was inlined from decides, whatever that line says
    assert is_row_load(GlobalLoad("ldg", 16, ((path, 1), calls[0], kernel)))
    assert not is_row_load(GlobalLoad("ldg", 16, ((path, first + 1), (path, pad_call), kernel)))
    # no inlining info (Triton 3.6): the innermost line
    assert is_row_load(GlobalLoad("ldg", 16, ((path, first + count - 1),)))
    assert not is_row_load(GlobalLoad("ldg", 16, ((path, first - 2),)))
    assert not is_row_load(GlobalLoad("ldg", 16, ()))
    # Triton's cache is keyed by content: a kernel compiled first in another checkout names that checkout's file
    elsewhere = "/elsewhere/checkout/ssltm_kernels/ops/window_attention_3d/triton_kernels.py"
    assert _source_key(elsewhere) == _source_key(path) == "ssltm_kernels/ops/window_attention_3d/triton_kernels.py"
    assert is_row_load(GlobalLoad("ldg", 16, ((elsewhere, first + count - 1),)))
    assert not is_row_load(GlobalLoad("ldg", 16, (("/elsewhere/other.py", first + count - 1),)))


def test_row_load_widths_follow_the_tiles_elements_per_thread():
    # 196 tokens in pieces of 64: 64, 64, 64, 16 rows of 32 elements over 128 threads: 4 and 16 elements each
    spec = ("kernel", None, {}, {"N": 196, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32}, {}, {"num_warps": 4})
    assert row_load_widths(Config(torch.bfloat16, (4, 7, 7), 32), spec) == (8, 16)
    assert row_load_widths(Config(torch.float32, (4, 7, 7), 32), spec) == (16, 16)
    wide = spec[:3] + ({"N": 16, "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16}, {}, {"num_warps": 8})
    assert row_load_widths(Config(torch.float16, (1, 4, 4), 16), wide) == (2, 2)  # 1 element per thread
    reduction = spec[:3] + ({"N": 196, "BLOCK_M": 64, "BLOCK_E": 64, "BLOCK_D": 32}, {}, {"num_warps": 4})
    assert row_load_widths(Config(torch.bfloat16, (4, 7, 7), 32), reduction) is None


def test_row_load_problem_names_narrow_row_loads_of_aligned_launches_only():
    path, first, _ = _load_rows_lines()
    row = ((path, first + 5),)
    shifted = Config(torch.bfloat16, SSLTM_WINDOW, SSLTM_HEAD_DIM, SSLTM_SHIFT, launch="ssltm")
    assert rows_aligned(shifted) and rows_aligned(Config(torch.bfloat16, SSLTM_WINDOW, SSLTM_HEAD_DIM))
    assert rows_aligned(
        Config(torch.bfloat16, SSLTM_WINDOW, SSLTM_HEAD_DIM, mask=True, window_batches=True, launch="ssltm")
    )
    unaligned = Config(torch.bfloat16, SSLTM_WINDOW, SSLTM_HEAD_DIM, SSLTM_SHIFT, launch="unaligned")
    assert not rows_aligned(unaligned)
    fwd = shifted.specs(90)[0]
    narrowest, widest = row_load_widths(shifted, fwd)
    scalar = [GlobalLoad("ldg", 2, row)] * 100
    problem = row_load_problem(shifted, fwd, scalar)
    assert problem and "too narrow" in problem and "2B x100" in problem and f"{widest} B" in problem
    assert row_load_problem(unaligned, unaligned.specs(90)[0], scalar) is None
    assert (
        row_load_problem(shifted, fwd, [GlobalLoad("ldgsts", widest, row), GlobalLoad("ldg", narrowest, row)]) is None
    )
    assert "too narrow" in row_load_problem(shifted, fwd, [GlobalLoad("ldg", narrowest, row)] * 4)
    assert "no q/k/v/o/dO row loads" in row_load_problem(shifted, fwd, [GlobalLoad("ldg", 16, ((path, 1),))])
