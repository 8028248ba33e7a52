"""Compile the Triton kernel configurations the dispatch launches on a GPU architecture, without a GPU.

``python -m ssltm_kernels.compile_check --arch 90`` builds the cubins for sm_90 (H100/H200) of the
tuned configurations and of the largest windows the Triton dispatch accepts on that architecture
(``triton_key_tile_limit``), each specialised as real launches specialise it (``LAUNCHES``: all
integers multiples of 16, none, and SSLTM's own), prints each kernel's shared-memory use, registers,
spills and global-load widths (``ldg``/``ldgsts`` instructions per width, read from the SASS), and exits
non-zero if any kernel fails to compile, needs more shared memory than the architecture has, or, for a
launch whose rows are aligned, loads window attention's q/k/v/o/dO rows narrower than its tiles allow
(``row_load_problem``).
``--arch 90 80 86`` checks several architectures with one pool of compiler processes.

``--set full`` (the default; ``make compile-check`` runs it for sm_90, sm_80 and sm_86) compiles every
configuration for every launch; ``--set representative`` (what the test suite runs, a few minutes on
two cores) compiles SSLTM's configurations and, per dtype family, the largest windows the dispatch
accepts (see ``window_attention_3d.tuning.compile_configs``), so that kernels proven in the CPU interpreter are also
proven to compile for real hardware.

Every op's kernels are compiled (``--op`` selects some): each op's module defines its configurations
(``compile_configs``, collected in ``OP_CONFIGS``).
"""

from __future__ import annotations

import argparse
import collections
import functools
import inspect
import os
import re
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

from ssltm_kernels._device import ARCHS, SHARED_MEMORY_LIMIT, shared_memory_limit  # noqa: F401 (re-exported)
from ssltm_kernels._op import COMPILE_SETS as SETS
from ssltm_kernels.ops import dwconv3x3, gcc_assign, soft_region_pool
from ssltm_kernels.ops.window_attention_3d import block_pieces
from ssltm_kernels.ops.window_attention_3d import tuning as window_attention_tuning
from ssltm_kernels.ops.window_attention_3d.tuning import Config, launch_int_arg


def compile_report(arch: int, config: Config, index: int) -> str:
    """Compile kernel ``index`` of ``config.specs(arch)``: a report line, ``ok`` or ``FAIL``, with the
    kernel's shared memory, registers, spills and global-load widths, or the compiler's error. It fails
    when the shared memory exceeds the architecture's or the row loads are narrower than the launch's
    alignment and the tile allow (``row_load_problem``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = config.specs(arch)[index]
    name, kernel, signature, constexprs, attrs, options = spec
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=options
        )
    except Exception as error:  # report every failing kernel, then fail
        return f"FAIL sm_{arch} {name} [{config.label}]: {type(error).__name__}: {error}"
    shared = compiled.metadata.shared
    usage, sass = resource_usage(compiled)
    loads = global_loads(sass)
    problems = [f"needs {shared} B of shared memory"] if shared > shared_memory_limit(arch) else []
    row_problem = row_load_problem(config, spec, loads)
    problems += [row_problem] if row_problem else []
    status = "FAIL" if problems else "ok  "
    rows = (
        f" (q/k/v/o/dO rows {load_widths([load for load in loads if is_row_load(load)])})"
        if isinstance(config, Config)
        else ""
    )
    return (
        f"{status} sm_{arch} {name} [{config.label}]: shared memory {shared} B, {usage}, "
        f"loads {load_histogram(loads)}{rows}, {options}, {time.perf_counter() - start:.1f} s"
        + "".join(f"; {problem}" for problem in problems)
    )


def resource_usage(compiled) -> tuple[str, str]:
    """Registers per thread and spills of a compiled kernel, read from its cubin without a GPU (the
    ``n_regs``/``n_spills`` of a ``CompiledKernel`` need a driver to load it), and its SASS with source
    lines: ``cuobjdump`` (shipped with Triton) gives the registers and the local memory per thread (spill
    slots), ``nvdisasm -gi`` the SASS, whose local stores and loads are the spill instructions."""
    import subprocess
    import tempfile

    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", cubin.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        sass = subprocess.run(
            [knobs.nvidia.nvdisasm.path, "-gi", "-c", cubin.name], capture_output=True, text=True, check=True
        ).stdout
    fields = dict(
        item.split(":")
        for item in next(line for line in usage.splitlines() if "REG:" in line).split()
        if ":" in item and item.split(":")[1].isdigit()
    )
    spill_stores, spill_loads = len(re.findall(r"\bSTL\b", sass)), len(re.findall(r"\bLDL\b", sass))
    return (
        f"{fields['REG']} registers, {int(fields['STACK']) + int(fields['LOCAL'])} B local per thread, "
        f"spills {spill_stores} STL / {spill_loads} LDL"
    ), sass


# --------------------------------------------------------------------------------------------------
# Global-load widths, read from the SASS
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GlobalLoad:
    """One global-memory load instruction: ``ldg`` (into registers) or ``ldgsts`` (``cp.async``, into shared
    memory), its width in bytes and where it comes from: ``(file, line)`` of the source line, then of the
    calls it was inlined through, innermost first (empty without line info)."""

    kind: str
    width: int
    source: tuple[tuple[str, int], ...] = ()


# ``LDG.E.128``, ``@!P2 LDG.E.U16.CONSTANT``, ``LDGSTS.E.BYPASS.LTC128B.128``: the opcode and its modifiers
_SASS_LOAD = re.compile(r"(?<![\w.])(LDGSTS|LDG)((?:\.\w+)*)\s")
_SASS_SOURCE = re.compile(
    r'//## File "(?P<file>[^"]+)", line (?P<line>\d+)'
    r'(?: inlined at "(?P<caller>[^"]+)", line (?P<call>\d+))?'
)
# width modifiers in bytes; a load without one moves 4 bytes (cache hints such as LTC128B are not widths)
_LOAD_WIDTHS = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16, "256": 32}


def global_loads(sass: str) -> list[GlobalLoad]:
    """The global loads of a kernel's SASS with line info (``nvdisasm -gi``: before an instruction, a block of
    ``//## File "f", line l inlined at "g", line m`` lines, innermost first, one per inlined call)."""
    loads, source, in_header = [], [], False
    for text in sass.splitlines():
        if match := _SASS_SOURCE.search(text):
            source = (source if in_header else []) + [(match["file"], int(match["line"]))]
            in_header = True
            continue
        in_header = False
        if match := _SASS_LOAD.search(text):
            width = next((_LOAD_WIDTHS[m] for m in match[2].split(".") if m in _LOAD_WIDTHS), 4)
            loads.append(GlobalLoad(match[1].lower(), width, tuple(source)))
    return loads


def load_widths(loads: list[GlobalLoad]) -> str:
    """``16B x12 2B x4``: instructions per width, widest first."""
    counts = collections.Counter(load.width for load in loads)
    return " ".join(f"{width}B x{counts[width]}" for width in sorted(counts, reverse=True)) or "none"


def load_histogram(loads: list[GlobalLoad]) -> str:
    """``ldg 16B x12 2B x4, ldgsts 16B x8``: instructions per kind and width, widest first."""
    return (
        ", ".join(
            f"{kind} {load_widths([load for load in loads if load.kind == kind])}"
            for kind in ("ldg", "ldgsts")
            if any(load.kind == kind for load in loads)
        )
        or "none"
    )


def _source_key(file: str) -> str:
    """A source file as line info is compared: its path inside the ``ssltm_kernels`` package. Triton's cache is
    keyed by the source's content, so a kernel first compiled from another checkout of the same code carries
    that checkout's path in its line info."""
    parts = os.path.realpath(file).split(os.sep)
    if "ssltm_kernels" not in parts:
        return os.path.realpath(file)
    return "/".join(parts[len(parts) - 1 - parts[::-1].index("ssltm_kernels") :])


def _function_lines(fn) -> tuple[str, range]:
    lines, first = inspect.getsourcelines(fn)
    return _source_key(inspect.getsourcefile(fn)), range(first, first + len(lines))


def is_row_load(load: GlobalLoad) -> bool:
    """Whether ``load`` is a window attention q/k/v/o/dO row load, all of which go through ``_load_rows``:
    inlined from a call of ``_load_rows`` (where the SASS has inlining info: Triton >= 3.8, whose innermost
    lines may be off by a few), else from a line of ``_load_rows``."""
    from ssltm_kernels.ops.window_attention_3d import triton_kernels

    path, body = _function_lines(triton_kernels._load_rows.fn)
    source = [(_source_key(file), line) for file, line in load.source]
    if len(source) > 1:
        return source[1] in _row_load_calls()
    return bool(source) and source[0][0] == path and source[0][1] in body


@functools.cache
def _row_load_calls() -> frozenset[tuple[str, int]]:
    """(file, line) of every call of ``_load_rows`` in the window attention's kernels."""
    from ssltm_kernels.ops.window_attention_3d import triton_kernels

    path = inspect.getsourcefile(triton_kernels)
    with open(path) as source:
        return frozenset(
            (_source_key(path), number)
            for number, text in enumerate(source, start=1)
            if re.search(r"(?<![\w.])_load_rows\(", text) and "def _load_rows" not in text
        )


def rows_aligned(config: Config) -> bool:
    """Whether ``config``'s launch puts every q/k/v/o/dO row at a multiple of 16 elements (strides and
    head_dim multiples of 16; pointers are aligned in every launch): its row loads can be 16 bytes wide."""
    values = launch_int_arg(config)
    return all(
        values(name) % 16 == 0
        for name in ("s_b", "s_t", "s_h", "s_w", "s_n", "HD", "grad_token_stride", "grad_head_stride")
    )


def row_load_widths(config: Config, spec: tuple) -> tuple[int, int] | None:
    """The narrowest and the widest row load a kernel of ``config`` that loads rows must reach when its rows are
    aligned: Triton gives each thread at most ``tile elements / threads`` contiguous elements of a tile, up
    to 16 bytes, so the smallest tile (row pieces of ``block_pieces``) may load narrower and the largest
    must load ``min(16, its elements per thread * itemsize)``. None: no row loads (the reduction)."""
    _, _, _, constexprs, _, options = spec
    if "BLOCK_N" not in constexprs:
        return None
    threads = 32 * options["num_warps"]
    widths = [
        width
        for block in (constexprs["BLOCK_M"], constexprs["BLOCK_N"])
        for _, width in block_pieces(constexprs["N"], block)
    ]
    itemsize = config.dtype.itemsize
    return tuple(
        min(16, max(1, tile * constexprs["BLOCK_D"] // threads) * itemsize) for tile in (min(widths), max(widths))
    )


def row_load_problem(config, spec: tuple, loads: list[GlobalLoad]) -> str | None:
    """Why the row loads of a window attention kernel are too narrow for its launch, or None: for a launch
    with aligned rows (``rows_aligned``), none narrower than its smallest tile allows and the widest as wide
    as its largest tile allows (``row_load_widths``: 16 bytes for 64-row tiles)."""
    if not isinstance(config, Config) or not rows_aligned(config):
        return None
    bounds = row_load_widths(config, spec)
    if bounds is None:
        return None
    rows = [load for load in loads if is_row_load(load)]
    if not rows:
        return "no q/k/v/o/dO row loads found in the SASS (is Triton's line info off?)"
    narrowest, widest = bounds
    if min(load.width for load in rows) < narrowest or max(load.width for load in rows) < widest:
        return (
            f"q/k/v/o/dO row loads too narrow for aligned rows ({load_widths(rows)}): each must move at "
            f"least {narrowest} B, those of the largest tiles {widest} B"
        )
    return None


# op -> its configurations for (arch, config set); every configuration has ``label``, ``specs(arch)``
# and ``cost`` (``Config`` here, ``CompileConfig`` from the ops' own modules)
OP_CONFIGS: dict[str, Callable[[int, str], list]] = {
    "window_attention_3d": window_attention_tuning.compile_configs,
    "dwconv3x3": dwconv3x3.compile_configs,
    "gcc_assign": gcc_assign.compile_configs,
    "soft_region_pool": soft_region_pool.compile_configs,
}


def configurations(arch: int, config_set: str, ops=None) -> list:
    """The configurations of ``ops`` (default: every op) that the check compiles for ``arch``."""
    return [config for op in (ops or OP_CONFIGS) for config in OP_CONFIGS[op](arch, config_set)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch",
        type=int,
        nargs="+",
        default=[90],
        choices=ARCHS,
        help="compute capabilities as ints, e.g. 90 (several share one pool of compilers)",
    )
    parser.add_argument(
        "--set",
        dest="config_set",
        default="full",
        choices=SETS,
        help="every configuration (default), the representative set the tests compile, or the "
        "launch configurations a GPU sweep may ship",
    )
    parser.add_argument(
        "--op",
        dest="ops",
        nargs="+",
        choices=sorted(OP_CONFIGS),
        help="the ops whose kernels to compile (default: every op)",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="compiler processes")
    parser.add_argument("--list", action="store_true", help="print the configurations without compiling")
    args = parser.parse_args(argv)
    configs = {arch: configurations(arch, args.config_set, args.ops) for arch in args.arch}
    if args.list:
        print(*(f"sm_{arch} {config.label}" for arch in args.arch for config in configs[arch]), sep="\n")
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter does not compile kernels")

    # one unit per kernel, slowest first, so that no compiler process idles long at the end
    units = sorted(
        (
            (arch, config, index)
            for arch in args.arch
            for config in configs[arch]
            for index in range(len(config.specs(arch)))
        ),
        key=lambda unit: unit[1].cost,
        reverse=True,
    )
    start, failures = time.perf_counter(), 0
    with ProcessPoolExecutor(args.jobs) as pool:
        for future in as_completed([pool.submit(compile_report, *unit) for unit in units]):
            line = future.result()
            failures += line.startswith("FAIL")
            print(line, flush=True)
    for arch in args.arch:
        print(f"sm_{arch} {args.config_set}: {len(configs[arch])} configurations")
    print(f"{len(units)} kernels compiled in {time.perf_counter() - start:.0f} s, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
