"""Benchmark: fused 3D window attention of the SSLTM STT blocks against its peers.

    python benchmarks/stt_window_attn.py [--quick] [--providers eager,sdpa,...] [--modes fwd,bwd,fwd+bwd]
                                          [--shapes stride16,large] [--no-module] [--no-save]
                                          [--results-dir DIR] [--cpu]

Providers of the op case (all take q/k/v as strided views of one ``(B, T, H, W, 3C)`` tensor and a learnable
relative position bias table, and return ``(B, T, H, W, heads, head_dim)``):

    eager       ``window_attention_3d_reference``: pad + roll + partition + QK^T + bias (+ shift mask) +
                softmax + PV + reverse + crop, in PyTorch ops (Video Swin's way)
    compile     ``torch.compile`` of that same function (compilation excluded from the timing)
    sdpa        partition into ``(B*nW, heads, N, hd)``, ``F.scaled_dot_product_attention`` with the gathered
                ``(heads, N, N)`` bias (+ shift mask) as ``attn_mask``, reverse; its rows record the SDPA
                kernel that ran and what each ``sdpa_kernel`` backend does with the shape (``info``)
    flex        the same partition + ``flex_attention`` (compiled) with a ``score_mod`` that looks the bias
                up in the table through the ``(N, N)`` index, and the shift mask
    flex-dense  the same, the ``score_mod`` reading a dense ``(heads, N, N)`` bias gathered before the call
    triton      ``window_attention_3d(..., backend="triton")``
    cuda        ``window_attention_3d(..., backend="cuda")``

The module case (``<shape>-module``; ``--no-module`` skips it): torchvision's ``ShiftedWindowAttention3d``
(``shifted_window_attention_3d``, projections included) against our ``WindowAttention3D`` on the reference
(``module-reference``, from ``eager``), Triton and CUDA backends, all on the same parameters; ``torchvision``
in ``--providers`` selects it.

Every count and partition comes from the op's own ``window_geometry`` (padded extents, windows, tokens,
shrunk windows) and ``relative_position_index``. Every provider's output and gradients pass the harness's
correctness gate (float64/fp32 yardstick, 2x-reference-error rule) before they are timed; a wrong one is
marked, not ranked.

On a GPU: bf16, the four SSLTM STT strides for two 4-frame 480x480 clips and a large shape with and
without shift (requested (2, 3, 3); with T = 4 frames Video Swin drops the temporal shift, so it is
(0, 3, 3)), modes fwd / bwd / fwd+bwd, the module case on stride16 and large-shift, CUDA-graph replays of
the calls under 2 ms, then the issue's performance targets with PASS / FAIL.

Without a GPU (or with ``--cpu``): a small fp32 CPU comparison of the providers that run on the CPU
(triton only under TRITON_INTERPRET=1). FlexAttention runs uncompiled there: its CPU compile takes about
a minute on 2 cores, and it has no CPU backward either way; the score_mods and the partition are checked.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange

from benchmarks import harness
from ssltm_kernels.modules import WindowAttention3D
from ssltm_kernels.ops.window_attention_3d import (
    SHIFT_MASK_VALUE,
    WindowGeometry,
    relative_position_index,
    window_attention_3d,
    window_attention_3d_reference,
    window_geometry,
)

BENCHMARK = "stt_window_attn"
PROVIDERS = ("eager", "torchvision", "compile", "sdpa", "flex", "flex-dense", "triton", "cuda")
OURS = ("triton", "cuda")
FUSED_PEERS = ("sdpa", "flex", "flex-dense")
# the module case: torchvision's ShiftedWindowAttention3d against our WindowAttention3D per backend
MODULE_PROVIDERS = {
    "torchvision": "torchvision",
    "eager": "module-reference",
    "triton": "module-triton",
    "cuda": "module-cuda",
}


# ------------------------------------------------------------------------------------ shapes, their work
@dataclass(frozen=True)
class Shape:
    """One problem: a ``(B, T, H, W, C)`` volume, ``heads`` heads, a requested window and shift."""

    name: str
    B: int
    T: int
    H: int
    W: int
    C: int
    heads: int
    window: tuple[int, int, int] = (4, 7, 7)
    shift: tuple[int, int, int] = (0, 0, 0)

    @property
    def head_dim(self) -> int:
        return self.C // self.heads

    @property
    def geom(self) -> WindowGeometry:
        """The op's geometry: effective (shrunk) window and shift, padded extents, nW, N."""
        return window_geometry((self.T, self.H, self.W), self.window, self.shift)

    def record(self) -> dict:
        g = self.geom
        return {
            **{k: v for k, v in asdict(self).items() if k != "name"},
            "head_dim": self.head_dim,
            "effective_window": g.window,
            "effective_shift": g.shift,
            "padded": g.padded,
            "nW": g.num_windows,
            "N": g.tokens_per_window,
        }

    def title(self, dtype: torch.dtype) -> str:
        g = self.geom
        shift = str(self.shift) if self.shift == g.shift else f"{self.shift} (effective {g.shift})"
        return (
            f"B={self.B} T={self.T} H={self.H} W={self.W} C={self.C} heads={self.heads} window={self.window} "
            f"shift={shift}  {str(dtype).removeprefix('torch.')}  (nW={g.num_windows}/item, "
            f"N={g.tokens_per_window}, padded {g.padded})"
        )


def _stt(name: str, hw: int, c: int, heads: int) -> Shape:
    return Shape(name, B=2, T=4, H=hw, W=hw, C=c, heads=heads)


# SSLTM STT blocks: strides 4/8/16/32 of a 480x480 input, dims 32/64/128/256, head dim 32, 4x7x7 windows
# over 4 stacked frames; two clips per batch.
GPU_SHAPES = {
    s.name: s
    for s in (
        _stt("stride4", 120, 32, 1),
        _stt("stride8", 60, 64, 2),
        _stt("stride16", 30, 128, 4),
        _stt("stride32", 15, 256, 8),
        Shape("large", B=8, T=4, H=56, W=56, C=256, heads=8),
        Shape("large-shift", B=8, T=4, H=56, W=56, C=256, heads=8, shift=(2, 3, 3)),
    )
}
QUICK_GPU_SHAPES = ("stride16", "large", "large-shift")
MODULE_SHAPES = ("stride16", "large-shift")  # GPU shapes that also run the module case (CPU: every shape)
CPU_SHAPES = {
    s.name: s
    for s in (
        Shape("cpu-small", B=1, T=4, H=14, W=14, C=64, heads=2),
        # padded in every axis (6 -> 8, 10 -> 14) and shifted: exercises padding and the region mask
        Shape("cpu-pad-shift", B=1, T=6, H=10, W=10, C=64, heads=2, shift=(2, 3, 3)),
    )
}
SHAPES = harness.ShapeSet(GPU_SHAPES, CPU_SHAPES, QUICK_GPU_SHAPES)
TARGET_SHAPES = ("large", "stride16")

# Flash-attention's convention: the backward does 5 matmuls of the forward's size (recompute S = QK^T,
# dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q) against the forward's 2.
ATTENTION_BWD_FLOP_RATIO = 2.5


def attention_flops(batch_heads: int, n_q: int, n_k: int, head_dim: int, mode: str) -> float:
    """Forward: QK^T and PV, 2 * n_q * n_k * head_dim FLOPs each per (batch, head); bwd 2.5x; fwd+bwd 3.5x."""
    ratio = {"fwd": 1.0, "bwd": ATTENTION_BWD_FLOP_RATIO, "fwd+bwd": 1.0 + ATTENTION_BWD_FLOP_RATIO}[mode]
    return 4.0 * batch_heads * n_q * n_k * head_dim * ratio


def attention_exps(batch_heads: int, n_q: int, n_k: int, mode: str) -> float:
    """One ``exp`` per score in the forward; a recomputing (flash-style) backward evaluates them again."""
    return float(batch_heads * n_q * n_k) * {"fwd": 1, "bwd": 1, "fwd+bwd": 2}[mode]


def window_attention_work(shape: Shape, dtype: torch.dtype, mode: str) -> harness.Work:
    """Least work of one call. FLOPs and exps over the padded windows (``B * nW * heads`` attentions of
    N x N). Bytes, for M = B*T*H*W real tokens of C channels and element size e: the forward reads q, k, v
    and writes out (``4 * M * C * e``); the backward reads q, k, v, out, dout and the fp32 row log-sum-exp
    and writes dq, dk, dv (``8 * M * C * e + 4 * M * heads``); fwd+bwd is both. The bias table (a few KB)
    is left out."""
    g = shape.geom
    batch_heads, n = shape.B * g.num_windows * shape.heads, g.tokens_per_window
    m, e = shape.B * shape.T * shape.H * shape.W, torch.finfo(dtype).bits // 8
    fwd_bytes, bwd_bytes = 4 * m * shape.C * e, 8 * m * shape.C * e + 4 * m * shape.heads
    nbytes = {"fwd": fwd_bytes, "bwd": bwd_bytes, "fwd+bwd": fwd_bytes + bwd_bytes}[mode]
    return harness.Work(
        flops=attention_flops(batch_heads, n, n, shape.head_dim, mode),
        bytes=float(nbytes),
        exps=attention_exps(batch_heads, n, n, mode),
    )


# ------------------------------------------------------------------ the partition of the sdpa/flex peers
class Partition:
    """Pad / roll / partition / reverse by the op's geometry, with the bias index and the shift regions.

    ``rel_index``: ``(N, N)`` index into the bias table (``relative_position_index`` as the op decodes it).
    ``region``: ``(nW, N)`` shift-region id of each token of each window, None without a shift.
    """

    def __init__(self, shape: Shape, device: torch.device) -> None:
        self.shape, self.geom = shape, shape.geom
        g = self.geom
        self.rel_index = relative_position_index(g.table_window, g.tokens_per_window, g.bias_window, device)
        self.region = self.shift_mask = None
        if g.shifted:
            # Video Swin's compute_mask: along a shifted axis the slices [:-w], [-w:-s], [-s:] of the padded
            # extent are regions 0, 1, 2; a region of the volume is one combination of the three axes.
            image = torch.zeros(g.padded, dtype=torch.long)
            for axis, (extent, w, s) in enumerate(zip(g.padded, g.window, g.shift, strict=True)):
                ids = torch.zeros(extent, dtype=torch.long)
                if s:
                    ids[-w:] = 1
                    ids[-s:] = 2
                image = image * 3 + ids.view([-1 if a == axis else 1 for a in range(3)])
            wt, wh, ww = g.window
            self.region = (
                rearrange(image, "(nt wt) (nh wh) (nw ww) -> (nt nh nw) (wt wh ww)", wt=wt, wh=wh, ww=ww)
                .contiguous()
                .to(device)
            )
            self.shift_mask = (self.region[:, :, None] != self.region[:, None, :]).float() * SHIFT_MASK_VALUE

    def __call__(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, T, H, W, 3C)`` -> q, k, v of shape ``(B*nW, heads, N, head_dim)`` (one copy)."""
        g = self.geom
        (t, h, w), (tp, hp, wp) = g.sizes, g.padded
        x = F.pad(qkv, (0, 0, 0, wp - w, 0, hp - h, 0, tp - t))  # padded tokens: keys and values 0
        if g.shifted:
            x = torch.roll(x, tuple(-s for s in g.shift), (1, 2, 3))
        wt, wh, ww = g.window
        x = rearrange(
            x,
            "b (nt wt) (nh wh) (nw ww) (three heads d) -> three (b nt nh nw) heads (wt wh ww) d",
            wt=wt,
            wh=wh,
            ww=ww,
            three=3,
            heads=self.shape.heads,
        )
        return x.unbind(0)

    def reverse(self, out: torch.Tensor) -> torch.Tensor:
        """``(B*nW, heads, N, head_dim)`` -> ``(B, T, H, W, heads, head_dim)``."""
        g = self.geom
        (wt, wh, ww), (nt, nh, _) = g.window, g.windows_per_axis
        x = rearrange(
            out,
            "(b nt nh nw) heads (wt wh ww) d -> b (nt wt) (nh wh) (nw ww) heads d",
            b=self.shape.B,
            nt=nt,
            nh=nh,
            wt=wt,
            wh=wh,
            ww=ww,
        )
        if g.shifted:
            x = torch.roll(x, g.shift, (1, 2, 3))
        t, h, w = g.sizes
        return x[:, :t, :h, :w]

    def dense_bias(self, table: torch.Tensor) -> torch.Tensor:
        """The table gathered into the dense ``(heads, N, N)`` bias of every window (differentiable)."""
        n = self.geom.tokens_per_window
        return table[self.rel_index.reshape(-1)].reshape(n, n, self.shape.heads).permute(2, 0, 1).contiguous()

    def sdpa_mask(self, table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive ``attn_mask`` ``(B*nW, heads, N, N)``: the gathered bias (+ shift mask); a stride-0
        broadcast of the ``(heads, N, N)`` bias without a shift, materialized with one. Rows are stored
        padded to a multiple of 8 elements and sliced back to N: the memory-efficient SDPA kernel wants
        16-byte aligned mask strides and would otherwise copy the (expanded) mask."""
        n, heads, windows = self.geom.tokens_per_window, self.shape.heads, self.shape.B * self.geom.num_windows
        pad = -n % 8
        bias = self.dense_bias(table).to(dtype)
        if self.shift_mask is None:
            return F.pad(bias, (0, pad))[None, :, :, :n].expand(windows, heads, n, n)
        mask = F.pad(bias[None] + self.shift_mask[:, None].to(dtype), (0, pad))  # (nW, heads, N, N + pad)
        return mask[None].expand(self.shape.B, *mask.shape).reshape(-1, heads, n, n + pad)[..., :n]


# ------------------------------------------------------------------------------------------- providers
def split_qkv(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, T, H, W, 3C)`` -> three strided ``(B, T, H, W, heads, head_dim)`` views (no copy)."""
    b, t, h, w, c3 = qkv.shape
    return qkv.view(b, t, h, w, 3, heads, c3 // 3 // heads).unbind(4)


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """qkv ``(B, T, H, W, 3C)`` in ``dtype`` and an fp32 bias table (a parameter under autocast), both
    requiring grad."""
    gen = torch.Generator(device=device).manual_seed(seed)
    qkv = torch.randn(shape.B, shape.T, shape.H, shape.W, 3 * shape.C, generator=gen, device=device, dtype=dtype)
    table = torch.randn(shape.geom.table_size, shape.heads, generator=gen, device=device, dtype=torch.float32)
    return qkv.requires_grad_(), table.requires_grad_()


def exact_attention(shape: Shape, qkv: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The op's reference on the gate's widened leaves (its yardstick)."""
    return window_attention_3d_reference(
        *split_qkv(qkv, shape.heads),
        window_size=shape.window,
        rel_pos_bias_table=table,
        shift_size=shape.shift,
        scale=shape.head_dim**-0.5,
    )


def build_providers(names: Sequence[str], shape: Shape, qkv: torch.Tensor, table: torch.Tensor) -> dict:
    """A forward (or the reason it cannot run) for every requested provider of the op case (``torchvision``
    belongs to the module case: :func:`module_providers`)."""
    heads, scale, cpu = shape.heads, shape.head_dim**-0.5, qkv.device.type == "cpu"
    kwargs = dict(window_size=shape.window, rel_pos_bias_table=table, shift_size=shape.shift, scale=scale)
    partition = Partition(shape, qkv.device)
    providers: dict[str, harness.Impl | harness.Unavailable] = {}
    for name in names:
        if name == "torchvision":
            continue
        if name in ("eager", "compile"):
            providers[name] = harness.eager_or_compiled(
                name, window_attention_3d_reference, lambda fn: fn(*split_qkv(qkv, heads), **kwargs)
            )
        elif name == "sdpa":

            def sdpa() -> torch.Tensor:
                return partition.reverse(
                    F.scaled_dot_product_attention(
                        *partition(qkv), attn_mask=partition.sdpa_mask(table, qkv.dtype), scale=scale
                    )
                )

            providers[name] = harness.Impl(sdpa, describe=partial(sdpa_kernels, sdpa))
        elif name in ("flex", "flex-dense"):
            providers[name] = _flex_provider(partition, qkv, table, scale, compiled=not cpu, dense=name == "flex-dense")
        else:
            providers[name] = harness.backend_provider(
                name, qkv.device, lambda b: window_attention_3d(*split_qkv(qkv, heads), backend=b, **kwargs)
            )
    return providers


# the SDPA backends torch.nn.attention.sdpa_kernel chooses from, by the names their aten ops carry
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


def sdpa_kernels(forward: Callable[[], torch.Tensor]) -> dict:
    """Which SDPA kernel ``forward`` ran, from the aten ops torch.profiler records during one forward and
    backward (``sdpa_kernel``: the backend its forward op names, ``sdpa_ops``: every ``_scaled_dot_product``
    op), and what each backend of ``torch.nn.attention.sdpa_kernel`` does with this shape, dtype and
    mask alone (``sdpa_backends``: "fwd+bwd", "fwd only: why", or "no: why")."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    def call() -> None:
        with warnings.catch_warnings():  # "... kernel not used because": the record below says it
            warnings.simplefilter("ignore")
            out = forward()
            if out.requires_grad:
                out.sum().backward()

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    ops = sorted({e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product_")})
    ran = next((b for op in ops if not op.endswith("backward") for b in SDPA_BACKENDS if b in op), None)
    backends = {}
    for name in SDPA_BACKENDS:
        with sdpa_kernel(
            getattr(
                SDPBackend,
                {
                    "flash": "FLASH_ATTENTION",
                    "efficient": "EFFICIENT_ATTENTION",
                    "cudnn": "CUDNN_ATTENTION",
                    "math": "MATH",
                }[name],
            )
        ):
            try:
                call()
                backends[name] = "fwd+bwd"
            except Exception as error:  # "No available kernel" and its kin: a record, not a failure
                why = str(error).strip().splitlines()[0][:120]
                try:
                    with torch.no_grad(), warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        forward()
                    backends[name] = f"fwd only: {why}"
                except Exception:
                    backends[name] = f"no: {why}"
    return {"sdpa_kernel": ran, "sdpa_ops": ops, "sdpa_backends": backends}


def _flex_provider(
    partition: Partition,
    qkv: torch.Tensor,
    table: torch.Tensor,
    scale: float,
    *,
    compiled: bool,
    kernel_options: dict | None = None,
    dense: bool = False,
) -> harness.Impl:
    """FlexAttention on the partitioned windows with the bias (and shift mask) in a ``score_mod``;
    ``kernel_options`` as flex_attention takes them (block sizes, ...). The bias: looked up through the
    ``(N, N)`` index in the table (the table gather), or with ``dense`` read from the ``(heads, N, N)`` bias
    gathered before the call (one more ``heads * N * N`` tensor per call, no index lookup per score)."""
    from torch.nn.attention.flex_attention import flex_attention

    index, region, windows = partition.rel_index, partition.region, partition.geom.num_windows
    cpu = qkv.device.type == "cpu"
    if cpu:  # FlexAttention has no CPU backward: forward only, on detached inputs
        qkv, table = qkv.detach(), table.detach()

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # score_mod(score, batch, head, q_idx, kv_idx): "batch" runs over the B*nW windows, window-major
        # within each batch item, so its window is batch % nW.
        def score_mod(score, b, h, q_idx, kv_idx):
            score = score + (bias[h, q_idx, kv_idx] if dense else bias[index[q_idx, kv_idx], h])
            if region is None:
                return score
            w = b % windows
            return torch.where(region[w, q_idx] == region[w, kv_idx], score, score + SHIFT_MASK_VALUE)

        return flex_attention(q, k, v, score_mod=score_mod, scale=scale, kernel_options=kernel_options)

    attend = torch.compile(attention, dynamic=False) if compiled else attention

    def forward() -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return partition.reverse(attend(*partition(qkv), partition.dense_bias(table) if dense else table))

    if cpu:
        return harness.Impl(
            forward,
            modes=("fwd",),
            reason="FlexAttention does not support backward on CPU",
            note="uncompiled on CPU; forward only: FlexAttention has no CPU backward",
        )
    return harness.Impl(forward, note=harness.COMPILE_NOTE if compiled else None)


# ------------------------------------------------------------------------- the module case (torchvision)
def module_providers(names: Sequence[str], shape: Shape, x: torch.Tensor, module: WindowAttention3D) -> dict:
    """The module case's providers (labels: MODULE_PROVIDERS): torchvision's ``ShiftedWindowAttention3d``
    (its ``shifted_window_attention_3d``: qkv projection, pad, roll, partition, attention with the bias and
    shift mask, reverse, output projection) and our ``WindowAttention3D`` on the volume, per backend, all on
    the same parameters (``module``'s)."""
    providers: dict[str, harness.Impl | harness.Unavailable] = {}
    for name in names:
        label = MODULE_PROVIDERS.get(name)
        if label is None:
            continue
        if name == "torchvision":
            try:
                from torchvision.models.video.swin_transformer import ShiftedWindowAttention3d
            except ImportError as error:
                providers[label] = harness.Unavailable(f"torchvision: {error}")
                continue
            theirs = ShiftedWindowAttention3d(shape.C, list(shape.window), list(shape.shift), shape.heads)
            theirs.qkv, theirs.proj = module.qkv, module.proj
            theirs.relative_position_bias_table = module.relative_position_bias_table
            theirs.relative_position_index = theirs.relative_position_index.to(x.device)
            providers[label] = harness.Impl(lambda m=theirs: m(x))
        else:
            ours = "reference" if name == "eager" else name
            providers[label] = harness.triton_unavailable(ours, x.device) or harness.Impl(
                partial(_on_backend(module, ours), x, shift_size=shape.shift)
            )
    return providers


def _on_backend(module: WindowAttention3D, backend: str) -> WindowAttention3D:
    """``module`` on ``backend``: the same parameters, another backend."""
    ours = copy.copy(module)
    ours.backend = backend
    return ours


def make_module(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A volume ``x (B, T, H, W, C)`` requiring grad and a ``WindowAttention3D`` with qkv and projection
    biases (Video Swin's), its bias table drawn like the op case's."""
    torch.manual_seed(seed)
    module = WindowAttention3D(shape.C, shape.window, shape.heads, qkv_bias=True).to(device, dtype)
    with torch.no_grad():
        module.relative_position_bias_table.normal_()
    x = torch.randn(shape.B, shape.T, shape.H, shape.W, shape.C, device=device, dtype=dtype)
    return x.requires_grad_(), module


def exact_module(shape: Shape, module: WindowAttention3D) -> harness.Exact:
    """The module case's yardstick: our module on the reference backend, on the leaves ``(x, *parameters)``."""
    reference = _on_backend(module, "reference")
    names = [name for name, _ in module.named_parameters()]
    return harness.Exact(
        lambda x, *params: torch.func.functional_call(
            reference, dict(zip(names, params, strict=True)), (x,), {"shift_size": shape.shift}
        )
    )


def module_work(shape: Shape, dtype: torch.dtype, mode: str) -> harness.Work:
    """The attention's work plus the qkv and output projections (``8 * M * C^2`` FLOPs forward, twice that
    backward, M tokens); bytes: the module's input and output (forward), input, output gradient and input
    gradient (backward), the weights left out."""
    attention = window_attention_work(shape, dtype, mode)
    m, e = shape.B * shape.T * shape.H * shape.W, torch.finfo(dtype).bits // 8
    linear = 8.0 * m * shape.C**2 * {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]
    nbytes = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[mode] * m * shape.C * e
    return harness.Work(flops=attention.flops + linear, bytes=float(nbytes), exps=attention.exps)


# ----------------------------------------------------------------------------------------------- targets
def evaluate_targets(
    rows: Sequence[harness.Row], cases: Sequence[str] = TARGET_SHAPES, ours: Sequence[str] = OURS
) -> list[harness.TargetResult]:
    """The performance targets, from the measured rows: on each target case (fwd+bwd unless noted) ours
    >= 3x eager, >= 1.5x compile, >= 1.3x the faster of sdpa and flex; forward >= 50% of the roofline;
    fwd+bwd peak memory <= 0.3x eager's. A target whose numbers are missing is "n/a"; a peer that failed the
    correctness gate is not compared with."""

    def judge(index: harness.RowIndex, case: str, provider: str, own: harness.Row) -> list[harness.TargetResult]:
        fb, fwd = index.timed(case, provider, "fwd+bwd"), index.timed(case, provider, "fwd")
        fused = [index.timed(case, peer, "fwd+bwd") for peer in FUSED_PEERS]
        checks = [
            *harness.peer_speedup_checks(index, case, fb, {"eager": 3.0, "compile": 1.5}, own_why=harness.untimed(own)),
            harness.speedup_check(
                "fwd+bwd >= 1.3x faster of sdpa/flex",
                fb,
                fused,
                1.3,
                own_why=harness.untimed(own),
                peer_why="neither sdpa nor flex has a time",
            ),
            harness.roofline_check("fwd >= 50% of roofline", fwd, 50.0, own_why=f"{provider}: no forward time"),
            harness.peak_memory_check(
                "fwd+bwd peak memory <= 0.3x eager", fb, index.timed(case, "eager", "fwd+bwd"), 0.3
            ),
        ]
        return harness.target_results(case, provider, checks, own.correct)

    return harness.check_targets(rows, cases, ours, judge)


# ----------------------------------------------------------------------------------------------- cases
def op_case(shape: Shape, run: harness.Context) -> harness.Measurement:
    qkv, table = make_inputs(shape, run.dtype, run.device)
    providers = build_providers(run.args.providers, shape, qkv, table)
    case = harness.Case(
        shape.name,
        shape.record(),
        run.dtype,
        {m: window_attention_work(shape, run.dtype, m) for m in harness.MODES},
        title=shape.title(run.dtype),
    )
    return harness.Measurement(
        case, providers, leaves={"qkv": qkv, "table": table}, exact=harness.Exact(partial(exact_attention, shape))
    )


def module_case(shape: Shape, run: harness.Context) -> harness.Measurement:
    x, module = make_module(shape, run.dtype, run.device)
    providers = module_providers(run.args.providers, shape, x, module)
    case = harness.Case(
        f"{shape.name}-module",
        shape.record(),
        run.dtype,
        {m: module_work(shape, run.dtype, m) for m in harness.MODES},
        title=f"WindowAttention3D module (qkv + attention + proj)  {shape.title(run.dtype)}",
    )
    return harness.Measurement(
        case,
        providers,
        leaves={"x": x, **dict(module.named_parameters())},
        exact=exact_module(shape, module),
        references=("torchvision", "module-reference"),
    )


def cases(shape: Shape, run: harness.Context):
    """The op, then (on a GPU for MODULE_SHAPES only; not with ``--no-module``) the module case."""
    yield op_case(shape, run)
    if not (run.args.no_module or (run.on_gpu and shape.name not in MODULE_SHAPES)):
        yield module_case(shape, run)


def options(p) -> None:
    p.add_argument("--no-module", action="store_true", help="only the op, not the module case against torchvision")


SPEC = harness.BenchmarkSpec(
    BENCHMARK,
    __doc__,
    PROVIDERS,
    OURS,
    SHAPES,
    cases,
    targets=lambda rows, _: evaluate_targets(rows),
    target_cases=TARGET_SHAPES,
    labels=[MODULE_PROVIDERS],
    options=options,
    quick_help=f"CI smoke run: {', '.join(QUICK_GPU_SHAPES)} on GPU, shorter timing budgets",
)

if __name__ == "__main__":
    harness.run_benchmark(SPEC)
