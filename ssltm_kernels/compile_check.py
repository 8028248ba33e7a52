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
accepts (see ``window_attention_configs``), so that kernels proven in the CPU interpreter are also
proven to compile for real hardware.

Every op's kernels are compiled (``--op`` selects some): window attention's configurations are
defined here (``Config``), the other ops' by their modules (``OP_CONFIGS``).
"""

from __future__ import annotations

import argparse
import collections
import functools
import inspect
import itertools
import math
import os
import re
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace

import torch

from ssltm_kernels.ops import dwconv3x3, gcc_assign, soft_region_pool
from ssltm_kernels.ops.window_attention_3d import (
    KERNELS,
    MAX_WINDOW_TOKENS,
    VARIANTS,
    LaunchConfigs,
    block_pieces,
    default_configs,
    fit_stages,
    key_tile_bytes,
    sweep_configs,
    triton_compile_specs,
    triton_key_tile_limit,
    window_geometry,
)

# architecture -> shared memory a block may opt in to, bytes (CUDA C Programming Guide, compute capabilities)
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}

# (window, head_dim, shift): the SSLTM / Video Swin configurations the kernels are tuned for, in every dtype
WINDOW_ATTENTION_CONFIGS = (
    ((4, 7, 7), 32, (0, 0, 0)),
    ((4, 7, 7), 32, (2, 3, 3)),
    ((8, 7, 7), 32, (4, 3, 3)),
    ((2, 7, 7), 64, (1, 3, 3)),
)
# SSLTM's own: its four STT stages all attend in 4x7x7 windows with head_dim 32, shifted every other block
SSLTM_WINDOW, SSLTM_HEAD_DIM, SSLTM_SHIFT = (4, 7, 7), 32, (2, 3, 3)
SSLTM_VOLUME, SSLTM_HEADS = (2, 4, 30, 30), 4  # (clips, frames, H, W) of one stage, as in the benchmark
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SETS = ("full", "representative", "sweep")


@dataclass(frozen=True)
class Config:
    """One compilation unit: the kernels of one configuration, specialised for one kind of launch.

    ``window_batches``: as ``window_attention_3d_windows`` launches them (always with the bias table,
    never with pad rows); otherwise a volume with bias table and pad rows, as ``WindowAttention3D``
    with ``qkv_bias`` launches them."""

    dtype: torch.dtype
    window: tuple[int, int, int]
    head_dim: int
    shift: tuple[int, int, int] = (0, 0, 0)
    mask: bool = False
    window_batches: bool = False
    launch: str = "aligned"
    configs: LaunchConfigs | None = None  # the kernels' launch configurations; None: those the dispatch takes
    kernels: tuple[str, ...] | None = None  # the names of the kernels to compile; None: every one it launches

    def specs(self, arch: int) -> list[tuple]:
        specs = compile_specs(arch, self)
        return specs if self.kernels is None else [spec for spec in specs if spec[0] in self.kernels]

    @property
    def cost(self) -> int:
        """A guess at the compile time, to start the slowest first: the key tile, fp32 (FMA dots rather
        than tensor-core ones) weighed double."""
        return key_tile_bytes(math.prod(self.window), self.head_dim, self.dtype) * self.dtype.itemsize

    @property
    def label(self) -> str:
        label = f"{str(self.dtype).removeprefix('torch.')} window={self.window} head_dim={self.head_dim}"
        label += f" shift={self.shift}" if any(self.shift) else ""
        label += " window-batches" if self.window_batches else ""
        label += " mask" if self.mask else ""
        if self.configs:
            label += "".join(f" {name}=({getattr(self.configs, name).label})" for name in KERNELS)
            label += f" {self.configs.variant_label}" if self.configs.variant_label else ""
        label += f" only {','.join(self.kernels)}" if self.kernels is not None else ""
        return f"{label} launch={self.launch}"


# --------------------------------------------------------------------------------------------------
# Launches: the integer arguments a launch passes, from which Triton specialises the kernel
# (triton_compile_specs: 1 -> constant, multiple of 16 -> divisible by 16). Every launch has aligned
# pointers: torch allocates at 256 bytes and q/k/v views of a qkv projection start at multiples of
# head_dim * itemsize >= 32 bytes.
# --------------------------------------------------------------------------------------------------
def _strides(prefix: str, x: torch.Tensor) -> dict[str, int]:
    return {f"{prefix}_{axis}": stride for axis, stride in zip("bthwn", x.stride()[:5], strict=True)}


def _launch_ints(q: torch.Tensor, num_windows: int, num_masks: int) -> dict[str, int]:
    """The launcher's integer arguments for q, k, v of q's layout (views into one qkv projection), whose
    backward writes one packed gradient (rows of ``3 * heads * head_dim`` per token)."""
    batch, t, h, w, heads, head_dim = q.shape
    return {**_strides("s", q), "T": t, "H": h, "W": w, "NH": heads, "HD": head_dim, "num_masks": num_masks,
            "num_windows": num_windows, "sg_tok": 3 * heads * head_dim, "sg_head": head_dim}


def ssltm_launch_ints(config: Config) -> dict[str, int]:
    """The integer arguments of an SSLTM launch of ``config``, from the tensors it would pass: q/k/v
    unbound from a ``(clips, frames, 30, 30, 3, heads, head_dim)`` qkv projection for a volume (T = 4,
    H = W = 30, strides multiples of 16, num_masks 1 -> a constant); for window batches, q/k/v of
    ``(clips * windows, N, 3, heads, head_dim)`` as the op sees them, ``(B*nW, 1, 1, N, heads, head_dim)``
    (T = H = 1 -> constants), with one mask per window of a clip."""
    clips, *sizes = SSLTM_VOLUME
    geom = window_geometry(sizes, config.window, config.shift)
    if config.window_batches:
        n = math.prod(config.window)
        qkv = torch.empty(clips * geom.num_windows, n, 3, SSLTM_HEADS, config.head_dim, device="meta")
        q = qkv.unbind(2)[0].unsqueeze(1).unsqueeze(1)
    else:
        qkv = torch.empty(clips, *sizes, 3, SSLTM_HEADS, config.head_dim, device="meta")
        q = qkv.unbind(4)[0]
    return _launch_ints(q, clips * geom.num_windows, geom.num_windows if config.mask else 1)


# launch -> (doc, the value of each integer argument of a config's kernels by name)
LAUNCHES: dict[str, tuple[str, Callable[[Config], Callable[[str], int]]]] = {
    "aligned": ("every integer a multiple of 16: the most specialised variant, whose software pipelining "
                "takes the most shared memory", lambda config: lambda name: 16),
    "unaligned": ("no integer a multiple of 16 nor 1 (H = W = 30, odd strides, ...): the least specialised "
                  "variant", lambda config: lambda name: 30 if name in ("H", "W") else 31),
    "ssltm": ("the integers of SSLTM's own launches (ssltm_launch_ints)",
              lambda config: ssltm_launch_ints(config).get),
}


def _with_default(values: Callable[[str], int | None], default: int) -> Callable[[str], int]:
    """An argument a launch profile does not know (added to a kernel later) takes ``default``."""
    return lambda name: default if values(name) is None else values(name)


# --------------------------------------------------------------------------------------------------
# Configuration sets
# --------------------------------------------------------------------------------------------------
def largest_window_configs(key_tile_limit: int):
    """``(dtype, window, head_dim)``: for each head dim, the largest window whose key tile fits
    ``key_tile_limit`` and the one of half its tile, the largest whose dq kernel double-buffers key
    tiles (T x 7 x 7 windows where they are large enough); fp16 has bf16's tile sizes."""
    for dtype, head_dim in itertools.product((torch.bfloat16, torch.float32), (16, 32, 64, 128, 256)):
        block_n = min(MAX_WINDOW_TOKENS, key_tile_limit // (head_dim * dtype.itemsize))
        for tokens in (block_n, block_n // 2):
            if tokens >= 64:
                yield dtype, (tokens // 64, 7, 7), head_dim
            elif tokens >= 16:
                yield dtype, (1, 4, tokens // 4), head_dim


def _representative_largest(largest) -> list:
    """Of ``largest_window_configs``, per dtype family the largest window the dispatch accepts (at the
    smallest head dim: the most tokens, the biggest score tiles), and the bf16 one at the largest head
    dim (the widest key tiles). Not fp32 at the largest head dim: its fp32 FMA dots take ptxas minutes
    per kernel (about 4 CPU minutes for sm_90 alone), so only the full set compiles it."""
    chosen = []
    for dtype in dict.fromkeys(dtype for dtype, _, _ in largest):
        configs = [(window, head_dim) for d, window, head_dim in largest if d == dtype]
        head_dims = [min(h for _, h in configs)] + ([max(h for _, h in configs)] if dtype != torch.float32 else [])
        for head_dim in head_dims:
            window = max((w for w, h in configs if h == head_dim), key=math.prod)
            chosen.append((dtype, window, head_dim))
    return chosen


def _fits(arch: int, window, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the Triton dispatch takes this window on ``arch`` (else the CUDA kernels run it)."""
    return key_tile_bytes(math.prod(window), head_dim, dtype) <= triton_key_tile_limit(SHARED_MEMORY_LIMIT[arch])


def _ssltm_configs(arch: int, launch: str, *, shifted_volumes_only: bool = False):
    """SSLTM's configurations that the dispatch runs with Triton on ``arch``: 4x7x7 windows, head_dim 32,
    every dtype, unshifted and shifted volumes with bias table and pad rows, and window batches with
    Video Swin's mask."""
    for dtype in DTYPES:
        if not _fits(arch, SSLTM_WINDOW, SSLTM_HEAD_DIM, dtype):
            continue
        if not shifted_volumes_only:
            yield Config(dtype, SSLTM_WINDOW, SSLTM_HEAD_DIM, launch=launch)
        yield Config(dtype, SSLTM_WINDOW, SSLTM_HEAD_DIM, SSLTM_SHIFT, launch=launch)
        if not shifted_volumes_only:
            yield Config(dtype, SSLTM_WINDOW, SSLTM_HEAD_DIM, mask=True, window_batches=True, launch=launch)


def _spec_key(spec: tuple) -> tuple:
    """What makes two compile specs the same cubin: name, signature, constexprs, attrs, options."""
    name, _, signature, constexprs, attrs, options = spec
    return name, *(repr(sorted(d.items(), key=repr)) for d in (signature, constexprs, attrs, options))


def variant_configs(arch: int) -> list[Config]:
    """Each non-default kernel variant (``VARIANTS``) on SSLTM's shifted volumes in bf16 for its own launches,
    restricted to the kernels no earlier configuration compiles (the others are the defaults' cubins): the
    bias pointer in bf16 changes the four attention kernels, "owner" dS sums give backward C one group (a
    constant; A2 is the default kernel launched with one group), two stages add backward C's first stage."""
    base = Config(torch.bfloat16, SSLTM_WINDOW, SSLTM_HEAD_DIM, SSLTM_SHIFT, launch="ssltm")
    if not _fits(arch, base.window, base.head_dim, base.dtype):
        return []
    compiled, configs = {_spec_key(spec) for spec in base.specs(arch)}, []
    defaults = default_configs(math.prod(SSLTM_WINDOW), SSLTM_HEAD_DIM, torch.bfloat16)
    for name, choices in VARIANTS.items():
        for choice in choices[1:]:
            config = replace(base, configs=replace(defaults, **{name: choice}))
            new = [spec for spec in config.specs(arch) if _spec_key(spec) not in compiled]
            compiled |= {_spec_key(spec) for spec in new}
            configs.append(replace(config, kernels=tuple(spec[0] for spec in new)))
    return configs


def window_attention_configs(arch: int, config_set: str = "full") -> list[Config]:
    """The configurations the check compiles for ``arch``.

    ``full``: every tuned configuration in every dtype and the largest windows the dispatch takes on
    ``arch`` (with the window-batch mask, the variant that takes the most shared memory), each for the
    aligned and the unaligned launch, SSLTM's configurations for its own launches, and every launch
    configuration a GPU sweep may ship (``sweep_configs``, the kernel variants included) on SSLTM's shifted
    volumes.

    ``sweep``: only the latter, in bf16 and fp32 (the registers and spills of each configuration).

    ``representative`` (a few minutes for three architectures on two cores): SSLTM's configurations for
    its own launches in bf16, and in fp16 (which compiles as bf16 does) and fp32 (whose three-product
    tf32x3 kernels compile slowest) those with every feature, its shifted volumes and (fp32) its window
    batches; its shifted volumes in bf16 for the unaligned launch; per dtype family (fp16 has bf16's tiles)
    the largest window the dispatch accepts, and bf16's widest (``_representative_largest``), for the
    aligned launch, the most specialised, whose software pipelining takes the most shared memory; for sm_90
    the kernels of the kernel variants that the defaults do not compile (``variant_configs``; ``full``
    compiles every variant for every architecture in its sweep configurations)."""
    if config_set not in SETS:
        raise ValueError(f"config_set must be one of {SETS}, got {config_set!r}")
    largest = list(largest_window_configs(triton_key_tile_limit(SHARED_MEMORY_LIMIT[arch])))
    configs = list(_ssltm_configs(arch, "ssltm"))
    if config_set == "representative":
        configs = [config for config in configs if config.dtype == torch.bfloat16 or config.shift == SSLTM_SHIFT
                   or (config.dtype == torch.float32 and config.window_batches)]
        configs += [config for config in _ssltm_configs(arch, "unaligned", shifted_volumes_only=True)
                    if config.dtype == torch.bfloat16]
        configs += [Config(dtype, window, head_dim, mask=True, launch="aligned")
                    for dtype, window, head_dim in _representative_largest(largest)]
        return configs + (variant_configs(arch) if arch == 90 else [])
    sweep = [Config(dtype, SSLTM_WINDOW, SSLTM_HEAD_DIM, SSLTM_SHIFT, configs=configs)
             for dtype in DTYPES if _fits(arch, SSLTM_WINDOW, SSLTM_HEAD_DIM, dtype) for configs in sweep_configs()]
    if config_set == "sweep":  # fp16 compiles as bf16 does
        return [config for config in sweep if config.dtype != torch.float16]
    configs += sweep
    for launch in ("aligned", "unaligned"):
        configs += _ssltm_configs(arch, launch)
        configs += [Config(dtype, window, head_dim, shift, launch=launch)
                    for dtype, (window, head_dim, shift) in itertools.product(DTYPES, WINDOW_ATTENTION_CONFIGS)
                    if _fits(arch, window, head_dim, dtype)]
        configs += [Config(dtype, window, head_dim, mask=True, launch=launch) for dtype, window, head_dim in largest]
    configs += variant_configs(arch) if arch == 90 else []  # the representative set's (its sweep has them all)
    return list(dict.fromkeys(configs))  # the tuned configurations repeat SSLTM's


# --------------------------------------------------------------------------------------------------
# Compilation
# --------------------------------------------------------------------------------------------------
def compile_specs(arch: int, config: Config) -> list[tuple]:
    """``triton_compile_specs`` of ``config`` on ``arch``: one ``(name, kernel, signature, constexprs,
    attrs, options)`` per kernel the configuration launches."""
    int_arg = _with_default(LAUNCHES[config.launch][1](config), 16)
    return list(triton_compile_specs(
        config.dtype, config.window, config.head_dim, config.shift, bias=True, pad=not config.window_batches,
        mask=config.mask, window_batches=config.window_batches, int_arg=int_arg, aligned_pointers=True,
        shared_memory=SHARED_MEMORY_LIMIT[arch], configs=_fitted(arch, config)))


def _fitted(arch: int, config: Config) -> LaunchConfigs | None:
    """``config.configs`` with the pipeline stages the launcher would cut for ``arch``'s shared memory."""
    if config.configs is None:
        return None
    tokens = math.prod(config.window)
    return replace(config.configs, **{name: fit_stages(name, getattr(config.configs, name), tokens,
                                                       config.head_dim, config.dtype, SHARED_MEMORY_LIMIT[arch])
                                      for name in KERNELS})


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
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as error:  # report every failing kernel, then fail
        return f"FAIL sm_{arch} {name} [{config.label}]: {type(error).__name__}: {error}"
    shared = compiled.metadata.shared
    usage, sass = resource_usage(compiled)
    loads = global_loads(sass)
    problems = [f"needs {shared} B of shared memory"] if shared > SHARED_MEMORY_LIMIT[arch] else []
    row_problem = row_load_problem(config, spec, loads)
    problems += [row_problem] if row_problem else []
    status = "FAIL" if problems else "ok  "
    rows = f" (q/k/v/o/dO rows {load_widths([load for load in loads if is_row_load(load)])})" \
        if isinstance(config, Config) else ""
    return (f"{status} sm_{arch} {name} [{config.label}]: shared memory {shared} B, {usage}, "
            f"loads {load_histogram(loads)}{rows}, {options}, {time.perf_counter() - start:.1f} s"
            + "".join(f"; {problem}" for problem in problems))


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
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([knobs.nvidia.nvdisasm.path, "-gi", "-c", cubin.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(item.split(":") for item in next(line for line in usage.splitlines() if "REG:" in line).split()
                  if ":" in item and item.split(":")[1].isdigit())
    spill_stores, spill_loads = len(re.findall(r"\bSTL\b", sass)), len(re.findall(r"\bLDL\b", sass))
    return (f"{fields['REG']} registers, {int(fields['STACK']) + int(fields['LOCAL'])} B local per thread, "
            f"spills {spill_stores} STL / {spill_loads} LDL"), sass


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
_SASS_SOURCE = re.compile(r'//## File "(?P<file>[^"]+)", line (?P<line>\d+)'
                          r'(?: inlined at "(?P<caller>[^"]+)", line (?P<call>\d+))?')
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
    return ", ".join(f"{kind} {load_widths([load for load in loads if load.kind == kind])}"
                     for kind in ("ldg", "ldgsts") if any(load.kind == kind for load in loads)) or "none"


def _function_lines(fn) -> tuple[str, range]:
    lines, first = inspect.getsourcelines(fn)
    return os.path.realpath(inspect.getsourcefile(fn)), range(first, first + len(lines))


def is_row_load(load: GlobalLoad) -> bool:
    """Whether ``load`` is a window attention q/k/v/o/dO row load, all of which go through ``_load_rows``:
    inlined from a call of ``_load_rows`` (where the SASS has inlining info: Triton >= 3.8, whose innermost
    lines may be off by a few), else from a line of ``_load_rows``."""
    from ssltm_kernels.ops.window_attention_3d import triton_kernels

    path, body = _function_lines(triton_kernels._load_rows.fn)
    source = [(os.path.realpath(file), line) for file, line in load.source]
    if len(source) > 1:
        return source[1] in _row_load_calls()
    return bool(source) and source[0][0] == path and source[0][1] in body


@functools.cache
def _row_load_calls() -> frozenset[tuple[str, int]]:
    """(file, line) of every call of ``_load_rows`` in the window attention's kernels."""
    from ssltm_kernels.ops.window_attention_3d import triton_kernels

    path = os.path.realpath(inspect.getsourcefile(triton_kernels))
    with open(path) as source:
        return frozenset((path, number) for number, text in enumerate(source, start=1)
                         if re.search(r"(?<![\w.])_load_rows\(", text) and "def _load_rows" not in text)


def rows_aligned(config: Config) -> bool:
    """Whether ``config``'s launch puts every q/k/v/o/dO row at a multiple of 16 elements (strides and
    head_dim multiples of 16; pointers are aligned in every launch): its row loads can be 16 bytes wide."""
    values = _with_default(LAUNCHES[config.launch][1](config), 16)
    return all(values(name) % 16 == 0 for name in ("s_b", "s_t", "s_h", "s_w", "s_n", "HD", "sg_tok", "sg_head"))


def row_load_widths(config: Config, spec: tuple) -> tuple[int, int] | None:
    """The narrowest and the widest row load a kernel of ``config`` that loads rows must reach when its rows are
    aligned: Triton gives each thread at most ``tile elements / threads`` contiguous elements of a tile, up
    to 16 bytes, so the smallest tile (row pieces of ``block_pieces``) may load narrower and the largest
    must load ``min(16, its elements per thread * itemsize)``. None: no row loads (the reduction)."""
    _, _, _, constexprs, _, options = spec
    if "BLOCK_N" not in constexprs:
        return None
    threads = 32 * options["num_warps"]
    widths = [width for block in (constexprs["BLOCK_M"], constexprs["BLOCK_N"])
              for _, width in block_pieces(constexprs["N"], block)]
    itemsize = config.dtype.itemsize
    return tuple(min(16, max(1, tile * constexprs["BLOCK_D"] // threads) * itemsize)
                 for tile in (min(widths), max(widths)))


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
        return (f"q/k/v/o/dO row loads too narrow for aligned rows ({load_widths(rows)}): each must move at "
                f"least {narrowest} B, those of the largest tiles {widest} B")
    return None


# op -> its configurations for (arch, config set); every configuration has ``label``, ``specs(arch)``
# and ``cost`` (``Config`` here, ``CompileConfig`` from the ops' own modules)
OP_CONFIGS: dict[str, Callable[[int, str], list]] = {
    "window_attention_3d": window_attention_configs,
    "dwconv3x3": dwconv3x3.compile_configs,
    "gcc_assign": gcc_assign.compile_configs,
    "soft_region_pool": soft_region_pool.compile_configs,
}


def configurations(arch: int, config_set: str, ops=None) -> list:
    """The configurations of ``ops`` (default: every op) that the check compiles for ``arch``."""
    return [config for op in (ops or OP_CONFIGS) for config in OP_CONFIGS[op](arch, config_set)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(SHARED_MEMORY_LIMIT),
                        help="compute capabilities as ints, e.g. 90 (several share one pool of compilers)")
    parser.add_argument("--set", dest="config_set", default="full", choices=SETS,
                        help="every configuration (default), the representative set the tests compile, or the "
                             "launch configurations a GPU sweep may ship")
    parser.add_argument("--op", dest="ops", nargs="+", choices=sorted(OP_CONFIGS),
                        help="the ops whose kernels to compile (default: every op)")
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
    units = sorted(((arch, config, index) for arch in args.arch for config in configs[arch]
                    for index in range(len(config.specs(arch)))), key=lambda unit: unit[1].cost, reverse=True)
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
