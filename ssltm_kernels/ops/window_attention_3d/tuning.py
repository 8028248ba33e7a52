"""Triton launch configurations of the window attention: per-kernel sets, the shipped (measured) choices
and defaults, the backend automatic dispatch prefers, the Triton dispatch's limits, and the kernels'
ahead-of-time compile specifications and profiles (what ``python -m ssltm_kernels.compile_check`` builds,
``compile_configs``)."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ssltm_kernels._backend import triton_interpreting
from ssltm_kernels._device import SHARED_MEMORY_LIMIT, device_arch, device_shared_memory, shared_memory_limit
from ssltm_kernels._op import COMPILE_SETS, dot_block
from ssltm_kernels._triton_specs import TYPE_NAMES, kernel_spec
from ssltm_kernels.ops.window_attention_3d import triton_kernels
from ssltm_kernels.ops.window_attention_3d.reference import WindowGeometry, _triple, window_geometry
from ssltm_kernels.ops.window_attention_3d.triton_kernels import WHOLE_WINDOW_BLOCK, padded_tokens

# The Triton kernels' limits; the CUDA kernels' are _C.MAX_WINDOW_TOKENS and _C.MAX_HEAD_DIM, defined in
# csrc/ beside the kernels
MAX_WINDOW_TOKENS = 1024
MAX_HEAD_DIM = 256
# Shared memory a block may opt in to -> the largest "key tile" (one head's keys of a window padded to
# powers of 2, key_tile_bytes: a measure of the window's size) the Triton dispatch takes there; compile_check
# compiles the largest such windows for sm_90, sm_80 and sm_86 (their shared memory and registers)
TRITON_KEY_TILE_LIMITS = (
    (SHARED_MEMORY_LIMIT[90], 64 * 1024),
    (SHARED_MEMORY_LIMIT[80], 32 * 1024),
    (SHARED_MEMORY_LIMIT[86], 16 * 1024),
)
MAX_TRITON_KEY_TILE_BYTES = TRITON_KEY_TILE_LIMITS[0][1]

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def triton_key_tile_limit(shared_memory_bytes: int) -> int:
    """The largest key tile, in bytes, the Triton kernels take on a device whose blocks may opt in to
    ``shared_memory_bytes`` of shared memory; 0 below the smallest device they are proven on."""
    return next((tile for needed, tile in TRITON_KEY_TILE_LIMITS if shared_memory_bytes >= needed), 0)


# --------------------------------------------------------------------------------------------------
# Triton launch configurations: per-kernel sets, the shipped (measured) choices, defaults
# --------------------------------------------------------------------------------------------------
KERNELS = ("fwd", "dq", "dbias", "dkdv")


@dataclass(frozen=True)
class KernelConfig:
    """Blocks and launch options of one Triton kernel.

    ``fwd`` and ``dq``: a program takes ``block_m`` query rows (one of ``block_pieces(N, block_m)``) of one
    head in a group of windows and runs over the keys in blocks of ``block_n``. ``dbias``: a program takes a
    ``block_m x block_n`` tile of (query, key) pairs. ``dkdv``: a program takes ``block_n`` keys and runs over
    the queries in blocks of ``block_m``. ``num_stages``: software pipelining of the innermost loop (fwd and
    dq: key blocks; dbias: windows; dkdv: query blocks). ``group_mult`` (dbias): the number of window groups
    times this (more programs, a larger dS partial; ignored with ``LaunchConfigs.dbias_sum="owner"``)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    group_mult: int = 1

    @property
    def label(self) -> str:
        groups = f" groups-x{self.group_mult}" if self.group_mult > 1 else ""
        return f"m{self.block_m} n{self.block_n} w{self.num_warps} s{self.num_stages}{groups}"


# The kernels' variants a GPU measurement chooses between, per problem (fields of LaunchConfigs; the first of
# each is the default):
#   bias_dtype     the dense bias tile every attention kernel reads per window-head: "float32", or "input",
#                  the input's dtype (half the bytes in fp16/bf16; products still accumulate in fp32)
#   dbias_sum      backward A2's dS sums: "groups", per window group (more programs, a (groups, heads, Np, Np)
#                  partial that backward C reduces), or "owner", one program per (query piece x key piece, head)
#                  over every window, writing the final per-head sums (fewer programs, no partial)
#   reduce_stages  backward C over the groups' partials: 1, the table gather over every group's partial, or 2,
#                  a dense coalesced sum over the groups first, then the gather from that one sum
VARIANTS = {"bias_dtype": ("float32", "input"), "dbias_sum": ("groups", "owner"), "reduce_stages": (1, 2)}


@dataclass(frozen=True)
class LaunchConfigs:
    """One configuration per kernel: forward, dq (+ delta), dbias (the dS partial), dk/dv (+ pad partial), and
    the kernels' variants (``VARIANTS``)."""

    fwd: KernelConfig
    dq: KernelConfig
    dbias: KernelConfig
    dkdv: KernelConfig
    bias_dtype: str = VARIANTS["bias_dtype"][0]
    dbias_sum: str = VARIANTS["dbias_sum"][0]
    reduce_stages: int = VARIANTS["reduce_stages"][0]

    def __post_init__(self) -> None:
        for name, choices in VARIANTS.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")

    @property
    def variant_label(self) -> str:
        """The variants that differ from the defaults, e.g. ``"bias_dtype=input dbias_sum=owner"`` ("" if none)."""
        return " ".join(
            f"{name}={getattr(self, name)}" for name, choices in VARIANTS.items() if getattr(self, name) != choices[0]
        )

    def to_json(self) -> dict:
        return {
            **{name: asdict(getattr(self, name)) for name in KERNELS},
            **{name: getattr(self, name) for name in VARIANTS},
        }

    @classmethod
    def from_json(cls, record: dict) -> LaunchConfigs:
        """The configurations of a ``to_json`` record; a record without the variants (written before they
        existed) takes their defaults."""
        return cls(
            **{name: KernelConfig(**record[name]) for name in KERNELS},
            **{name: record[name] for name in VARIANTS if name in record},
        )


# The configurations a GPU sweep (benchmarks/wmsa_decide.py) chooses from, per kernel, for SSLTM's windows
# (4x7x7, head_dim 32); compile_check proves every one (``--set full``) and the tests run each.
CONFIG_SETS = {  # the first of each: the default for SSLTM's windows in 16-bit (default_configs)
    "fwd": (
        KernelConfig(64, 64, 4, 2),
        KernelConfig(64, 64, 4, 3),
        KernelConfig(64, 64, 8, 2),
        KernelConfig(32, 64, 4, 2),
        KernelConfig(128, 64, 8, 2),
        KernelConfig(64, 32, 4, 3),
    ),
    "dq": (
        KernelConfig(64, 64, 8, 2),
        KernelConfig(32, 64, 4, 2),
        KernelConfig(64, 64, 4, 2),
        KernelConfig(64, 32, 4, 2),
        KernelConfig(128, 64, 8, 1),
    ),
    "dbias": (
        KernelConfig(64, 64, 8, 2),
        KernelConfig(64, 32, 4, 3),
        KernelConfig(32, 64, 4, 2),
        KernelConfig(64, 64, 4, 2),
        KernelConfig(64, 64, 8, 2, group_mult=2),
    ),
    "dkdv": (
        KernelConfig(64, 64, 8, 1),
        KernelConfig(64, 64, 8, 2),
        KernelConfig(64, 32, 4, 2),
        KernelConfig(64, 32, 8, 1),
        KernelConfig(32, 64, 4, 3),
    ),
}


def _variants(index: int) -> dict:
    """The ``index``-th combination of ``VARIANTS`` (mixed radix, the first variant fastest; 0: the defaults)."""
    chosen = {}
    for name, choices in VARIANTS.items():
        index, digit = divmod(index, len(choices))
        chosen[name] = choices[digit]
    return chosen


def sweep_configs() -> list[LaunchConfigs]:
    """Every kernel's configuration set as launch configurations: the i-th of each set together (a shorter
    set starts again) with the i-th combination of the variants, so that compiling or testing these covers
    every configuration of every kernel and every variant (the first: the defaults)."""
    count = max(len(configs) for configs in CONFIG_SETS.values())
    return [
        LaunchConfigs(**{name: CONFIG_SETS[name][i % len(CONFIG_SETS[name])] for name in KERNELS}, **_variants(i))
        for i in range(count)
    ]


# The interpreter pays per block step, not per element: whole windows per program
INTERPRETER_CONFIGS = LaunchConfigs(*(KernelConfig(WHOLE_WINDOW_BLOCK, WHOLE_WINDOW_BLOCK, 4, 1) for _ in KERNELS))
CONFIG_FILE = Path(__file__).parent.with_name("window_attention_3d_configs.json")  # beside the package


def default_configs(tokens_per_window: int, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> LaunchConfigs:
    """Configurations before any measurement, by what compile_check reports: at SSLTM's windows in 16-bit
    the first of each ``CONFIG_SETS`` (none spills registers on sm_90); fp32 (three tf32 products per
    product) and head dims from 128 take 32-row/key blocks, the fewest spills compiled."""
    if dtype == torch.float32 or dot_block(head_dim) >= 128:
        warps = 4 if dtype == torch.float32 else 8
        return LaunchConfigs(*(KernelConfig(32, 32, warps, 1) for _ in KERNELS))
    return LaunchConfigs(**{name: CONFIG_SETS[name][0] for name in KERNELS})


def config_key(
    device: str, tokens_per_window: int, head_dim: int, heads: int, dtype: torch.dtype, shifted: bool
) -> str:
    """The shipped configuration file's key of one problem (``device``: the GPU's name, or ``*`` for any)."""
    return f"{device}|N={tokens_per_window}|hd={head_dim}|heads={heads}|{_DTYPE_NAMES[dtype]}|" + (
        "shifted" if shifted else "unshifted"
    )


@functools.cache
def _config_file(path: Path = CONFIG_FILE) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def shipped_configs() -> dict[str, LaunchConfigs]:
    """The configurations ``benchmarks/wmsa_decide.py`` measured and wrote, by ``config_key``."""
    return {key: LaunchConfigs.from_json(record) for key, record in _config_file().get("configs", {}).items()}


# Automatic dispatch prefers the Triton kernels to the CUDA ones on these compute capabilities (10 * major +
# minor) until a measurement on the device (benchmarks/wmsa_decide.py, "default_backend" in the config file)
# says otherwise: the Triton kernels' design (whole windows per program, tensor-core dots) is expected, not yet
# measured, to beat the WMMA kernels on Hopper; elsewhere the CUDA kernels keep their place before Triton.
TRITON_FIRST_ARCHS = (90,)


def preferred_backend(device: torch.device) -> str:
    """``"triton"`` or ``"cuda"``: which fused backend automatic dispatch tries first on ``device``."""
    if device.type != "cuda":
        return "cuda"
    measured = _config_file().get("default_backend", {}).get(torch.cuda.get_device_name(device))
    if measured is not None:
        return measured
    return "triton" if device_arch(device) in TRITON_FIRST_ARCHS else "cuda"


def pipeline_stage_bytes(
    kernel: str, cfg: KernelConfig, tokens_per_window: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Shared memory one stage of a kernel's software pipeline takes, what one iteration of its innermost
    loop loads (fwd and dq: a key block's keys, values and fp32 bias rows; dbias: a window's query, dO, key
    and value rows; dkdv: a query block's query and dO rows and fp32 bias rows), an upper estimate that
    compile_check holds against the compiled kernels."""
    d, e = dot_block(head_dim), dtype.itemsize
    if kernel == "dbias":
        return 2 * (cfg.block_m + cfg.block_n) * d * e
    rows = cfg.block_m if kernel == "dkdv" else cfg.block_n
    return 2 * rows * d * e + cfg.block_m * cfg.block_n * 4


def fit_stages(
    kernel: str, cfg: KernelConfig, tokens_per_window: int, head_dim: int, dtype: torch.dtype, shared_memory: int
) -> KernelConfig:
    """``cfg`` with as many pipeline stages as fit ``shared_memory`` (at least 1: no prefetch)."""
    stage = pipeline_stage_bytes(kernel, cfg, tokens_per_window, head_dim, dtype)
    stages = max(1, min(cfg.num_stages, (shared_memory - PIPELINE_MARGIN_BYTES) // stage))
    return cfg if stages == cfg.num_stages else replace(cfg, num_stages=stages)


PIPELINE_MARGIN_BYTES = 32 * 1024  # shared memory kept for the products' operand tiles and reductions


@functools.lru_cache(maxsize=1024)
def launch_configs(
    tokens_per_window: int,
    head_dim: int,
    heads: int,
    dtype: torch.dtype,
    shifted: bool,
    device: str = "*",
    shared_memory: int = TRITON_KEY_TILE_LIMITS[0][0],
    interpreting: bool = False,
) -> LaunchConfigs:
    """The configurations for one problem: fixed ones under the interpreter; else the shipped measured
    ones for the device (or for any device), else ``default_configs``; pipeline stages cut to what fits
    the device's ``shared_memory``."""
    if interpreting:
        return INTERPRETER_CONFIGS
    shipped = shipped_configs()
    keys = [config_key(name, tokens_per_window, head_dim, heads, dtype, shifted) for name in (device, "*")]
    configs = next((shipped[key] for key in keys if key in shipped), None) or default_configs(
        tokens_per_window, head_dim, dtype
    )
    return replace(
        configs,
        **{
            name: fit_stages(name, getattr(configs, name), tokens_per_window, head_dim, dtype, shared_memory)
            for name in KERNELS
        },
    )


_FORCED_CONFIGS: list[LaunchConfigs] = []


@contextlib.contextmanager
def forced_launch_configs(configs: LaunchConfigs):
    """Every Triton launch inside the context takes ``configs`` (GPU sweeps and tests; not thread-safe)."""
    _FORCED_CONFIGS.append(configs)
    try:
        yield configs
    finally:
        _FORCED_CONFIGS.pop()


def _launch_configs(q: torch.Tensor, geom: WindowGeometry) -> LaunchConfigs:
    """The configurations for windows of ``q`` (B, T, H, W, heads, head_dim) on its device."""
    if _FORCED_CONFIGS:
        return _FORCED_CONFIGS[-1]
    device = torch.cuda.get_device_name(q.device) if q.is_cuda else "*"
    return launch_configs(
        geom.tokens_per_window,
        q.shape[-1],
        q.shape[-2],
        q.dtype,
        geom.shifted,
        device,
        device_shared_memory(q.device),
        triton_interpreting(),
    )


def key_tile_bytes(tokens_per_window: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one head's keys of a window padded to powers of 2: the size the Triton dispatch limits per
    device (``TRITON_KEY_TILE_LIMITS``)."""
    return dot_block(tokens_per_window) * dot_block(head_dim) * dtype.itemsize


def _kernel_constants(
    geom: WindowGeometry, dtype: torch.dtype, *, bias: bool, pad_k: bool, pad_v: bool, mask: bool
) -> dict:
    return dict(
        N=geom.tokens_per_window,
        WT=geom.window[0],
        WH=geom.window[1],
        WW=geom.window[2],
        ST=geom.shift[0],
        SH=geom.shift[1],
        SW=geom.shift[2],
        HAS_BIAS=bias,
        HAS_PAD_K=pad_k,
        HAS_PAD_V=pad_v,
        HAS_MASK=mask,
        PRECISION="tf32x3" if dtype == torch.float32 else "tf32",
        WIDE_INDEX=triton_interpreting(),
    )


REDUCE_BLOCKS = (32, 64)  # (BLOCK_E, BLOCK_M) of backward C's table gradient on a GPU: ~40 programs per head at 4x7x7
DSUM_BLOCK = 1024  # dS-sum elements per program of backward C's first stage (reduce_stages=2) on a GPU


def _reduce_constants(geom: WindowGeometry) -> dict:
    """How backward C decodes bias coordinates: ``bias_window`` strides, ``table_window``."""
    return dict(
        N=geom.tokens_per_window,
        BH=geom.bias_window[1],
        BW=geom.bias_window[2],
        FT=geom.table_window[0],
        FH=geom.table_window[1],
        FW=geom.table_window[2],
    )


_TRITON_FP32_POINTERS = {"Lse", "Delta", "DBIAS", "DSUM", "DPAD", "DPAD_K", "DPAD_V", "MASK", "DTABLE", "BIAS"}
_TRITON_POINTERS = _TRITON_FP32_POINTERS | {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV", "PAD_K", "PAD_V"}


def triton_compile_specs(
    dtype: torch.dtype,
    window,
    head_dim: int,
    shift=(0, 0, 0),
    *,
    bias: bool = True,
    pad: bool = True,
    mask: bool = False,
    window_batches: bool = False,
    int_arg=None,
    aligned_pointers: bool = True,
    shared_memory: int = TRITON_KEY_TILE_LIMITS[0][0],
    configs: LaunchConfigs | None = None,
):
    """The kernels as the GPU launcher would specialise them for one configuration on a device whose blocks
    may opt in to ``shared_memory`` bytes, as ``(name, kernel, signature, constexprs, attrs, options)`` for
    ``triton.compile`` ahead of time. ``configs``: the launch configurations (default: those the dispatch
    takes, ``launch_configs``), variants included (the bias pointer's dtype, backward C's first stage, one
    group where backward C takes per-head sums).

    ``window_batches``: the geometry ``window_attention_3d_windows`` launches (rows of ``prod(window)``
    tokens whose bias coordinates decode by ``window``; no shift, no pad rows) instead of a volume's.

    ``int_arg(name)`` is the value a launch passes for the integer argument ``name``; the signature and
    ``attrs`` specialise the kernel on it as Triton's launcher does: 1 becomes a constant, a multiple of
    16 is marked divisible by 16, values outside int32 make it i64 (u64 from 2**63). Default: 16 for
    every one, as for a qkv projection whose sizes are multiples of 16, the most specialised variant,
    whose software pipelining takes the most shared memory. ``aligned_pointers``: every tensor starts at
    a multiple of 16 bytes (torch's allocations, and q/k/v views into a qkv projection when
    ``head_dim * itemsize`` is a multiple of 16, do), so pointers are marked divisible by 16 too."""
    window, shift = _triple(tuple(window), "window"), _triple(tuple(shift), "shift")
    if window_batches:
        if any(shift) or pad:
            raise ValueError("window batches take neither a shift (it is in their attn_mask) nor pad rows")
        tokens = math.prod(window)
        geom = WindowGeometry((1, 1, tokens), (1, 1, tokens), (0, 0, 0), window, window)
    else:
        geom = WindowGeometry(window, window, shift, window, window)
    configs = configs or launch_configs(
        geom.tokens_per_window, head_dim, 1, dtype, geom.shifted, shared_memory=shared_memory
    )
    constants = _kernel_constants(geom, dtype, bias=bias, pad_k=pad, pad_v=pad, mask=mask) | {"WIDE_INDEX": False}
    block_d = dot_block(head_dim)
    kernels = (
        (triton_kernels._window_attn_fwd_kernel, configs.fwd, {}),
        (triton_kernels._window_attn_bwd_dq_kernel, configs.dq, {}),
    )
    kernels += ((triton_kernels._window_attn_bwd_dbias_kernel, configs.dbias, {}),) if bias else ()
    kernels += ((triton_kernels._window_attn_bwd_dkdv_kernel, configs.dkdv, {"NEED_DPAD": pad}),)
    pointer_types = {name: "fp32" if name in _TRITON_FP32_POINTERS else TYPE_NAMES[dtype] for name in _TRITON_POINTERS}
    if configs.bias_dtype == "input":
        pointer_types["BIAS"] = TYPE_NAMES[dtype]
    for kernel, cfg, extra in kernels:
        blocks = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_D": block_d}
        yield kernel_spec(
            kernel,
            {**constants, **extra, **blocks},
            pointer_types,
            float_args=("scale", "qk_scale"),
            int_arg=int_arg,
            aligned_pointers=aligned_pointers,
            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
        )
    # the launcher passes backward C one group where A2 wrote per-head sums or C's first stage summed the groups
    one_group = bias and (configs.dbias_sum == "owner" or configs.reduce_stages == 2)
    if bias and configs.dbias_sum == "groups" and configs.reduce_stages == 2:
        block_s = min(DSUM_BLOCK, padded_tokens(geom.tokens_per_window) ** 2)
        yield kernel_spec(
            triton_kernels._window_attn_bwd_dsum_kernel,
            {"N": geom.tokens_per_window, "BLOCK_S": block_s},
            pointer_types,
            int_arg=int_arg,
            aligned_pointers=aligned_pointers,
            options={"num_warps": 4},
        )
    if bias or pad:
        block_e, block_m = REDUCE_BLOCKS
        reduce_ints = (
            int_arg
            if not one_group
            else (lambda name: 1 if name == "groups" else 16 if int_arg is None else int_arg(name))
        )
        yield kernel_spec(
            triton_kernels._window_attn_bwd_reduce_kernel,
            {
                **_reduce_constants(geom),
                "NEED_DTABLE": bias,
                "NEED_DPAD": pad,
                "BLOCK_E": block_e,
                "BLOCK_M": block_m,
                "BLOCK_D": block_d,
            },
            pointer_types,
            int_arg=reduce_ints,
            aligned_pointers=aligned_pointers,
            options={"num_warps": 4},
        )


# --------------------------------------------------------------------------------------------------
# Compile profiles: the configurations ``python -m ssltm_kernels.compile_check`` builds (compile_configs).
# Launches: the integer arguments a launch passes, from which Triton specialises the kernels
# (triton_compile_specs: 1 -> constant, multiple of 16 -> divisible by 16). Every launch has aligned
# pointers: torch allocates at 256 bytes and q/k/v views of a qkv projection start at multiples of
# head_dim * itemsize >= 32 bytes.
# --------------------------------------------------------------------------------------------------
# (window, head_dim, shift): the SSLTM / Video Swin configurations the kernels are tuned for, in every dtype
TUNED_WINDOWS = (
    ((4, 7, 7), 32, (0, 0, 0)),
    ((4, 7, 7), 32, (2, 3, 3)),
    ((8, 7, 7), 32, (4, 3, 3)),
    ((2, 7, 7), 64, (1, 3, 3)),
)
# SSLTM's own: its four STT stages all attend in 4x7x7 windows with head_dim 32, shifted every other block
SSLTM_WINDOW, SSLTM_HEAD_DIM, SSLTM_SHIFT = (4, 7, 7), 32, (2, 3, 3)
SSLTM_VOLUME, SSLTM_HEADS = (2, 4, 30, 30), 4  # (clips, frames, H, W) of one stage, as in the benchmark
COMPILE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


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


def launch_integers(
    q: torch.Tensor, num_windows: int, num_masks: int = 1, *, packed_grad: bool = True
) -> dict[str, int]:
    """The integer arguments a Triton launch passes for q, k, v of q's layout ``(B, T, H, W, heads, head_dim)``
    (views into one qkv projection), by the kernels' argument names: what Triton specialises the kernels on
    (``triton_compile_specs(int_arg=...)``). ``packed_grad``: the backward writes one packed gradient (rows of
    ``3 * heads * head_dim`` per token), else three contiguous ones (``heads * head_dim``)."""
    batch, t, h, w, heads, head_dim = q.shape
    strides = {f"s_{axis}": stride for axis, stride in zip("bthwn", q.stride()[:5], strict=True)}
    return {
        **strides,
        "T": t,
        "H": h,
        "W": w,
        "NH": heads,
        "HD": head_dim,
        "num_masks": num_masks,
        "num_windows": num_windows,
        "grad_token_stride": (3 if packed_grad else 1) * heads * head_dim,
        "grad_head_stride": head_dim,
    }


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
    return launch_integers(q, clips * geom.num_windows, geom.num_windows if config.mask else 1)


# launch -> (doc, the value of each integer argument of a config's kernels by name)
LAUNCHES: dict[str, tuple[str, Callable[[Config], Callable[[str], int]]]] = {
    "aligned": (
        "every integer a multiple of 16: the most specialised variant, whose software pipelining "
        "takes the most shared memory",
        lambda config: lambda name: 16,
    ),
    "unaligned": (
        "no integer a multiple of 16 nor 1 (H = W = 30, odd strides, ...): the least specialised variant",
        lambda config: lambda name: 30 if name in ("H", "W") else 31,
    ),
    "ssltm": ("the integers of SSLTM's own launches (ssltm_launch_ints)", lambda config: ssltm_launch_ints(config).get),
}


def launch_int_arg(config: Config) -> Callable[[str], int]:
    """The value of each integer argument of ``config``'s launch by name; an argument the launch profile does
    not know (added to a kernel later) takes 16."""
    values = LAUNCHES[config.launch][1](config)
    return lambda name: 16 if values(name) is None else values(name)


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
    return key_tile_bytes(math.prod(window), head_dim, dtype) <= triton_key_tile_limit(shared_memory_limit(arch))


def _ssltm_configs(arch: int, launch: str, *, shifted_volumes_only: bool = False):
    """SSLTM's configurations that the dispatch runs with Triton on ``arch``: 4x7x7 windows, head_dim 32,
    every dtype, unshifted and shifted volumes with bias table and pad rows, and window batches with
    Video Swin's mask."""
    for dtype in COMPILE_DTYPES:
        if not _fits(arch, SSLTM_WINDOW, SSLTM_HEAD_DIM, dtype):
            continue
        if not shifted_volumes_only:
            yield Config(dtype, SSLTM_WINDOW, SSLTM_HEAD_DIM, launch=launch)
        yield Config(dtype, SSLTM_WINDOW, SSLTM_HEAD_DIM, SSLTM_SHIFT, launch=launch)
        if not shifted_volumes_only:
            yield Config(dtype, SSLTM_WINDOW, SSLTM_HEAD_DIM, mask=True, window_batches=True, launch=launch)


def spec_key(spec: tuple) -> tuple:
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
    compiled, configs = {spec_key(spec) for spec in base.specs(arch)}, []
    defaults = default_configs(math.prod(SSLTM_WINDOW), SSLTM_HEAD_DIM, torch.bfloat16)
    for name, choices in VARIANTS.items():
        for choice in choices[1:]:
            config = replace(base, configs=replace(defaults, **{name: choice}))
            new = [spec for spec in config.specs(arch) if spec_key(spec) not in compiled]
            compiled |= {spec_key(spec) for spec in new}
            configs.append(replace(config, kernels=tuple(spec[0] for spec in new)))
    return configs


def compile_configs(arch: int, config_set: str = "full") -> list[Config]:
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
    if config_set not in COMPILE_SETS:
        raise ValueError(f"config_set must be one of {COMPILE_SETS}, got {config_set!r}")
    largest = list(largest_window_configs(triton_key_tile_limit(shared_memory_limit(arch))))
    configs = list(_ssltm_configs(arch, "ssltm"))
    if config_set == "representative":
        configs = [
            config
            for config in configs
            if config.dtype == torch.bfloat16
            or config.shift == SSLTM_SHIFT
            or (config.dtype == torch.float32 and config.window_batches)
        ]
        configs += [
            config
            for config in _ssltm_configs(arch, "unaligned", shifted_volumes_only=True)
            if config.dtype == torch.bfloat16
        ]
        configs += [
            Config(dtype, window, head_dim, mask=True, launch="aligned")
            for dtype, window, head_dim in _representative_largest(largest)
        ]
        return configs + (variant_configs(arch) if arch == 90 else [])
    sweep = [
        Config(dtype, SSLTM_WINDOW, SSLTM_HEAD_DIM, SSLTM_SHIFT, configs=configs)
        for dtype in COMPILE_DTYPES
        if _fits(arch, SSLTM_WINDOW, SSLTM_HEAD_DIM, dtype)
        for configs in sweep_configs()
    ]
    if config_set == "sweep":  # fp16 compiles as bf16 does
        return [config for config in sweep if config.dtype != torch.float16]
    configs += sweep
    for launch in ("aligned", "unaligned"):
        configs += _ssltm_configs(arch, launch)
        configs += [
            Config(dtype, window, head_dim, shift, launch=launch)
            for dtype, (window, head_dim, shift) in itertools.product(COMPILE_DTYPES, TUNED_WINDOWS)
            if _fits(arch, window, head_dim, dtype)
        ]
        configs += [Config(dtype, window, head_dim, mask=True, launch=launch) for dtype, window, head_dim in largest]
    configs += variant_configs(arch) if arch == 90 else []  # the representative set's (its sweep has them all)
    return list(dict.fromkeys(configs))  # the tuned configurations repeat SSLTM's


def compile_specs(arch: int, config: Config) -> list[tuple]:
    """``triton_compile_specs`` of ``config`` on ``arch``: one ``(name, kernel, signature, constexprs,
    attrs, options)`` per kernel the configuration launches."""
    return list(
        triton_compile_specs(
            config.dtype,
            config.window,
            config.head_dim,
            config.shift,
            bias=True,
            pad=not config.window_batches,
            mask=config.mask,
            window_batches=config.window_batches,
            int_arg=launch_int_arg(config),
            aligned_pointers=True,
            shared_memory=shared_memory_limit(arch),
            configs=_fitted(arch, config),
        )
    )


def _fitted(arch: int, config: Config) -> LaunchConfigs | None:
    """``config.configs`` with the pipeline stages the launcher would cut for ``arch``'s shared memory."""
    if config.configs is None:
        return None
    tokens = math.prod(config.window)
    return replace(
        config.configs,
        **{
            name: fit_stages(
                name, getattr(config.configs, name), tokens, config.head_dim, config.dtype, shared_memory_limit(arch)
            )
            for name in KERNELS
        },
    )
