"""Benchmark: fused 3D window attention of the SSLTM STT blocks against its peers.

    python benchmarks/stt_window_attn.py [--quick] [--providers eager,sdpa,...] [--modes fwd,bwd,fwd+bwd]
                                          [--shapes stride16,large] [--no-save] [--cpu]

Providers (all take q/k/v as strided views of one ``(B, T, H, W, 3C)`` tensor and a learnable
relative-position bias table, and return ``(B, T, H, W, heads, head_dim)``):

    eager    ``window_attention_3d_reference``: Video-Swin style pad + roll + partition + QK^T + bias
             (+ shift mask) + softmax + PV + reverse + crop, in PyTorch ops
    compile  ``torch.compile`` of that same function (compilation excluded from the timing)
    sdpa     explicit partition into ``(B*nW, heads, N, hd)``, ``F.scaled_dot_product_attention`` with
             the gathered ``(heads, N, N)`` bias (+ shift mask) as ``attn_mask``, reverse (below)
    flex     the same partition + ``flex_attention`` (compiled) with a ``score_mod`` that adds the bias
             gathered from the table through a precomputed ``(N, N)`` index and the shift mask
    triton   ``window_attention_3d(..., backend="triton")``
    cuda     ``window_attention_3d(..., backend="cuda")``

The sdpa and flex providers deliberately build their index, mask and partition with their own code
(Video Swin's construction), not the library's, so checking them against ``eager`` tests them too.

On a GPU: bf16, the four SSLTM STT strides for two 4-frame 480x480 clips plus a large shape with and
without shift (requested (2, 3, 3); with T = 4 frames Video Swin drops the temporal shift, so the
effective shift is (0, 3, 3)), modes fwd / bwd / fwd+bwd, and at the end the issue's performance
targets with PASS / FAIL. The compiled peers run with AOTAutograd's buffer donation off, which the
``bwd`` mode (a replayed retained graph) needs.

Without a GPU (or with ``--cpu``): a small fp32 CPU comparison of the providers that run on the CPU
(triton only under TRITON_INTERPRET=1); with ``--quick`` there, FlexAttention runs uncompiled (its
CPU compile takes ~20 s on 2 cores and it has no CPU backward either way), which still checks the
score_mod and the partition.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import harness  # noqa: E402
from harness import MODES, Case, Harness, Impl, Unavailable, Work  # noqa: E402

BENCHMARK = "stt_window_attn"
PROVIDERS = ("eager", "compile", "sdpa", "flex", "triton", "cuda")
OURS = ("triton", "cuda")
PEERS = ("eager", "compile", "sdpa", "flex")
SHIFT_MASK_VALUE = -100.0  # Video Swin's additive mask between tokens of different shift regions
COMPILE_NOTE = "donated buffers off"


def configure_compile() -> None:
    """torch.compile settings for the compiled peers (compile, flex).

    * One compiled graph per shape and shift: raise Dynamo's recompile limit above the shape count.
    * AOTAutograd by default donates saved activations to the backward, which then refuses
      ``retain_graph=True``; the ``bwd`` mode replays one retained graph, so donation is turned off
      for the whole run (the reference graph-breaks, so a separate compilation for ``bwd`` alone would
      share its inner frames with the default one). Rows of compiled providers carry COMPILE_NOTE.
    """
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if hasattr(torch._functorch.config, "donated_buffer"):
        torch._functorch.config.donated_buffer = False


# --------------------------------------------------------------------------------------------------
# Shapes and their work
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """One problem: a ``(B, T, H, W, C)`` volume, ``heads`` heads, a window and a shift."""

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
    def sizes(self) -> tuple[int, int, int]:
        return self.T, self.H, self.W

    @property
    def eff_window(self) -> tuple[int, int, int]:
        """Video Swin's ``get_window_size``: an axis not larger than the window shrinks it ..."""
        return tuple(min(s, w) for s, w in zip(self.sizes, self.window, strict=True))

    @property
    def eff_shift(self) -> tuple[int, int, int]:
        """... and drops its shift."""
        return tuple(0 if s <= w else sh for s, w, sh in zip(self.sizes, self.window, self.shift, strict=True))

    @property
    def padded(self) -> tuple[int, int, int]:
        return tuple(-(-s // w) * w for s, w in zip(self.sizes, self.eff_window, strict=True))

    @property
    def windows(self) -> int:
        """Windows per batch item (nW)."""
        return math.prod(p // w for p, w in zip(self.padded, self.eff_window, strict=True))

    @property
    def tokens(self) -> int:
        """Tokens per window (N)."""
        return math.prod(self.eff_window)

    @property
    def table_size(self) -> int:
        return math.prod(2 * w - 1 for w in self.window)

    def record(self) -> dict:
        d = asdict(self)
        d.pop("name")
        d.update(head_dim=self.head_dim, effective_window=self.eff_window, effective_shift=self.eff_shift,
                 nW=self.windows, N=self.tokens)
        return d

    def title(self, dtype: torch.dtype) -> str:
        return (f"B={self.B} T={self.T} H={self.H} W={self.W} C={self.C} heads={self.heads} "
                f"window={self.window} shift={self._shift_text()}  {str(dtype).replace('torch.', '')}  "
                f"(nW={self.windows}/item, N={self.tokens}, padded {self.padded})")

    def _shift_text(self) -> str:
        if self.shift == self.eff_shift:
            return str(self.shift)
        return f"{self.shift} (effective {self.eff_shift})"


def _stt(name: str, hw: int, c: int, heads: int) -> Shape:
    return Shape(name, B=2, T=4, H=hw, W=hw, C=c, heads=heads)


# SSLTM STT blocks: strides 4/8/16/32 of a 480x480 input, dims 32/64/128/256, head dim 32, 4x7x7
# windows over 4 stacked frames; two clips per batch.
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
CPU_SHAPES = {
    s.name: s
    for s in (
        Shape("cpu-small", B=1, T=4, H=14, W=14, C=64, heads=2),
        # padded in every axis (6 -> 8, 10 -> 14) and shifted: exercises padding and the region mask
        Shape("cpu-pad-shift", B=1, T=6, H=10, W=10, C=64, heads=2, shift=(2, 3, 3)),
    )
}
ALL_SHAPES = {**GPU_SHAPES, **CPU_SHAPES}
TARGET_SHAPES = ("large", "stride16")


def window_attention_work(shape: Shape, dtype: torch.dtype, mode: str) -> Work:
    """Minimum work of one call of fused window attention.

    FLOPs are counted over the padded windows: forward ``4 * B * nW * heads * N * N * head_dim``
    (QK^T and PV, an FMA is 2 FLOPs), backward 2.5x that, fwd+bwd 3.5x (``harness.attention_flops``).
    exps: ``B * nW * heads * N * N`` per pass (the backward recomputes P).
    Bytes (M = B*T*H*W real tokens, e = element size): forward reads q, k, v and writes out:
    ``4 * M * C * e`` (= 8*M*C for bf16); backward reads q, k, v, out, dout and the fp32 row
    log-sum-exp and writes dq, dk, dv: ``8 * M * C * e + 4 * M * heads``; fwd+bwd is their sum. The
    bias table (a few KB) is left out.
    """
    batch_heads = shape.B * shape.windows * shape.heads
    n = shape.tokens
    flops = harness.attention_flops(batch_heads, n, n, shape.head_dim, mode)
    exps = harness.attention_exps(batch_heads, n, n, mode)
    m = shape.B * shape.T * shape.H * shape.W
    e = torch.finfo(dtype).bits // 8
    fwd_bytes = 4 * m * shape.C * e
    bwd_bytes = 8 * m * shape.C * e + 4 * m * shape.heads
    nbytes = {"fwd": fwd_bytes, "bwd": bwd_bytes, "fwd+bwd": fwd_bytes + bwd_bytes}[mode]
    return Work(flops=flops, bytes=float(nbytes), exps=exps)


# --------------------------------------------------------------------------------------------------
# Explicit window partition for the sdpa and flex peers (Video Swin's construction)
# --------------------------------------------------------------------------------------------------
class WindowPlan:
    """Pad / roll / partition / reverse for one shape, plus the bias index and the shift regions.

    ``rel_index``: ``(N, N)`` index into the bias table built as Video Swin's
    ``relative_position_index`` for the full window and sliced ``[:N, :N]`` (what Video Swin does
    when the window shrinks). ``region``: ``(nW, N)`` shift-region id of every token of every window
    (Video Swin's ``compute_mask`` image, partitioned), None without a shift.
    """

    def __init__(self, shape: Shape, device: torch.device) -> None:
        self.shape = shape
        self.window = shape.eff_window
        self.shift = shape.eff_shift
        self.shifted = any(self.shift)
        self.padded = shape.padded
        n = shape.tokens

        ft, fh, fw = shape.window
        grid = torch.meshgrid(torch.arange(ft), torch.arange(fh), torch.arange(fw), indexing="ij")
        coords = torch.stack(grid).flatten(1)  # (3, ft*fh*fw)
        rel = coords[:, :, None] - coords[:, None, :]  # query minus key
        index = (rel[0] + ft - 1) * (2 * fh - 1) * (2 * fw - 1) + (rel[1] + fh - 1) * (2 * fw - 1) + (rel[2] + fw - 1)
        self.rel_index = index[:n, :n].contiguous().to(device)

        self.region = None
        self.shift_mask = None
        if self.shifted:
            image = torch.zeros(self.padded, dtype=torch.long)
            count = 0
            (wt, wh, ww), (st, sh, sw) = self.window, self.shift
            for t in (slice(-wt), slice(-wt, -st), slice(-st, None)):
                for h in (slice(-wh), slice(-wh, -sh), slice(-sh, None)):
                    for w in (slice(-ww), slice(-ww, -sw), slice(-sw, None)):
                        image[t, h, w] = count
                        count += 1
            region = rearrange(image, "(nt wt) (nh wh) (nw ww) -> (nt nh nw) (wt wh ww)", wt=wt, wh=wh, ww=ww)
            self.region = region.contiguous().to(device)
            differ = self.region[:, :, None] != self.region[:, None, :]
            self.shift_mask = differ.float() * SHIFT_MASK_VALUE  # (nW, N, N)

    def partition(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, T, H, W, 3C)`` -> q, k, v of shape ``(B*nW, heads, N, head_dim)`` (one copy)."""
        (t, h, w), (tp, hp, wp) = self.shape.sizes, self.padded
        x = F.pad(qkv, (0, 0, 0, wp - w, 0, hp - h, 0, tp - t))  # zero tokens = keys/values 0
        if self.shifted:
            x = torch.roll(x, tuple(-s for s in self.shift), (1, 2, 3))
        wt, wh, ww = self.window
        x = rearrange(x, "b (nt wt) (nh wh) (nw ww) (three heads d) -> three (b nt nh nw) heads (wt wh ww) d",
                      wt=wt, wh=wh, ww=ww, three=3, heads=self.shape.heads)
        return x.unbind(0)

    def reverse(self, out: torch.Tensor) -> torch.Tensor:
        """``(B*nW, heads, N, head_dim)`` -> ``(B, T, H, W, heads, head_dim)``."""
        (wt, wh, ww), (tp, hp, _) = self.window, self.padded
        x = rearrange(out, "(b nt nh nw) heads (wt wh ww) d -> b (nt wt) (nh wh) (nw ww) heads d",
                      b=self.shape.B, nt=tp // wt, nh=hp // wh, wt=wt, wh=wh, ww=ww)
        if self.shifted:
            x = torch.roll(x, self.shift, (1, 2, 3))
        t, h, w = self.shape.sizes
        return x[:, :t, :h, :w]

    def sdpa_mask(self, table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive ``attn_mask`` ``(B*nW, heads, N, N)``: the gathered bias (+ shift mask); a
        stride-0 broadcast of the ``(heads, N, N)`` bias without a shift, materialized with one.

        Rows are stored padded to a multiple of 8 elements and sliced back to N: the memory-efficient
        SDPA kernel wants 16-byte aligned mask strides and would otherwise copy the (expanded) mask.
        """
        n, heads, batch = self.shape.tokens, self.shape.heads, self.shape.B
        pad = -n % 8
        bias = table[self.rel_index.reshape(-1)].reshape(n, n, heads).permute(2, 0, 1).to(dtype).contiguous()
        if not self.shifted:
            return F.pad(bias, (0, pad))[None, :, :, :n].expand(batch * self.shape.windows, heads, n, n)
        mask = F.pad(bias[None] + self.shift_mask[:, None].to(dtype), (0, pad))  # (nW, heads, N, N + pad)
        return mask[None].expand(batch, *mask.shape).reshape(-1, heads, n, n + pad)[..., :n]


# --------------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------------
def split_qkv(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, T, H, W, 3C)`` -> three strided ``(B, T, H, W, heads, head_dim)`` views (no copy)."""
    b, t, h, w, c3 = qkv.shape
    return qkv.view(b, t, h, w, 3, heads, c3 // 3 // heads).unbind(4)


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """qkv ``(B, T, H, W, 3C)`` in ``dtype`` and an fp32 bias table (a parameter under autocast),
    both requiring grad."""
    gen = torch.Generator(device=device).manual_seed(seed)
    qkv = torch.randn(shape.B, shape.T, shape.H, shape.W, 3 * shape.C, generator=gen, device=device, dtype=dtype)
    table = torch.randn(shape.table_size, shape.heads, generator=gen, device=device, dtype=torch.float32)
    return qkv.requires_grad_(), table.requires_grad_()


def _import_op():
    from ssltm_kernels.window_attention_3d import window_attention_3d, window_attention_3d_reference

    return window_attention_3d, window_attention_3d_reference


def build_providers(names: Sequence[str], shape: Shape, qkv: torch.Tensor, table: torch.Tensor, *,
                    cpu_quick: bool = False) -> dict[str, Impl | BaseException]:
    """A forward closure (or the reason it cannot run) for every requested provider."""
    device = qkv.device
    heads, scale = shape.heads, shape.head_dim**-0.5
    kwargs = dict(window_size=shape.window, rel_pos_bias_table=table, shift_size=shape.shift, scale=scale)
    try:
        op, reference = _import_op()
        op_error = None
    except Exception as error:  # the library is broken or missing: peers still run
        op = reference = None
        op_error = Unavailable(f"cannot import ssltm_kernels.window_attention_3d: {error}")

    providers: dict[str, Impl | BaseException] = {}
    plan = WindowPlan(shape, device) if {"sdpa", "flex"} & set(names) else None
    for name in names:
        try:
            if name in ("eager", "compile", "triton", "cuda") and op_error is not None:
                raise op_error
            if name == "eager":
                providers[name] = Impl(_on_views(reference, qkv, heads, **kwargs))
            elif name == "compile":
                compiled = torch.compile(reference, dynamic=False)
                providers[name] = Impl(_on_views(compiled, qkv, heads, **kwargs), note=COMPILE_NOTE)
            elif name == "sdpa":
                providers[name] = Impl(lambda: _sdpa_forward(plan, qkv, table, scale))
            elif name == "flex":
                providers[name] = _flex_provider(plan, qkv, table, scale, compiled=not cpu_quick)
            elif name in OURS:
                if name == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
                    raise Unavailable("triton on CPU runs only under TRITON_INTERPRET=1")
                providers[name] = Impl(_on_views(op, qkv, heads, backend=name, **kwargs))
            else:
                raise ValueError(f"unknown provider {name!r}; choose from {PROVIDERS}")
        except Exception as error:
            providers[name] = error
    return providers


def _on_views(fn, qkv: torch.Tensor, heads: int, **kwargs) -> Callable[[], torch.Tensor]:
    """A forward that calls ``fn(q, k, v, **kwargs)`` on fresh strided views of ``qkv``."""
    return lambda: fn(*split_qkv(qkv, heads), **kwargs)


def _sdpa_forward(plan: WindowPlan, qkv: torch.Tensor, table: torch.Tensor, scale: float) -> torch.Tensor:
    q, k, v = plan.partition(qkv)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.sdpa_mask(table, q.dtype), scale=scale)
    return plan.reverse(out)


def _flex_provider(plan: WindowPlan, qkv: torch.Tensor, table: torch.Tensor, scale: float, *,
                   compiled: bool) -> Impl:
    from torch.nn.attention.flex_attention import flex_attention

    index, region, windows = plan.rel_index, plan.region, plan.shape.windows
    cpu = qkv.device.type == "cpu"
    if cpu:  # FlexAttention has no CPU backward: forward only, on detached views of the inputs
        qkv, table = qkv.detach(), table.detach()

    # score_mod(score, batch, head, q_idx, kv_idx) -> score; "batch" runs over the B*nW windows,
    # window-major within each batch item, so its window is batch % nW.
    if region is None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[index[q_idx, kv_idx], h]
    else:
        def score_mod(score, b, h, q_idx, kv_idx):
            score = score + table[index[q_idx, kv_idx], h]
            w = b % windows
            return torch.where(region[w, q_idx] == region[w, kv_idx], score, score + SHIFT_MASK_VALUE)

    attend = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention

    def forward() -> torch.Tensor:
        q, k, v = plan.partition(qkv)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = attend(q, k, v, score_mod=score_mod, scale=scale)
        return plan.reverse(out)

    notes = ["uncompiled (quick CPU run)"] if not compiled else []
    if cpu:
        notes.append("forward only: FlexAttention has no CPU backward")
        return Impl(forward, modes=("fwd",), reason="FlexAttention does not support backward on CPU",
                    note="; ".join(notes))
    return Impl(forward, note=COMPILE_NOTE if compiled else None)


# --------------------------------------------------------------------------------------------------
# Checking outputs
# --------------------------------------------------------------------------------------------------
class Tolerance:
    """A provider matches when its error against an fp32 run of the reference is at most twice the
    error of the reference itself run in the benchmark dtype, plus a small floor (the repository's
    low-precision rule). The reported error is against ``eager`` in the benchmark dtype."""

    FLOOR = {torch.float32: 1e-4, torch.float64: 1e-9}

    def __init__(self, shape: Shape, qkv: torch.Tensor, table: torch.Tensor) -> None:
        self.shape, self.qkv, self.table = shape, qkv, table
        self._ref32: torch.Tensor | None = None

    def reference_fp32(self, eager_out: torch.Tensor) -> torch.Tensor:
        if self._ref32 is None:
            if self.qkv.dtype in (torch.float32, torch.float64):
                self._ref32 = eager_out.float()
            else:
                _, reference = _import_op()
                with torch.no_grad():
                    self._ref32 = reference(
                        *split_qkv(self.qkv.detach().float(), self.shape.heads), window_size=self.shape.window,
                        rel_pos_bias_table=self.table.detach().float(), shift_size=self.shape.shift,
                        scale=self.shape.head_dim**-0.5)
        return self._ref32

    def __call__(self, name: str, out: torch.Tensor, eager_out: torch.Tensor) -> tuple[float, bool]:
        if out.shape != eager_out.shape:
            return math.inf, False
        err = (out.float() - eager_out.float()).abs().max().item()
        ref32 = self.reference_fp32(eager_out)
        own = (out.float() - ref32).abs().max().item()
        base = (eager_out.float() - ref32).abs().max().item()
        allowed = 2.0 * base + self.FLOOR.get(self.qkv.dtype, 1e-3)
        return err, bool(own <= allowed)


# --------------------------------------------------------------------------------------------------
# The targets
# --------------------------------------------------------------------------------------------------
@dataclass
class TargetResult:
    case: str
    target: str
    provider: str
    value: str
    status: str  # PASS, FAIL or n/a (...)


def evaluate_targets(rows: Sequence[harness.Row], cases: Sequence[str] = TARGET_SHAPES,
                     ours: Sequence[str] = OURS) -> list[TargetResult]:
    """The performance targets, from the measured rows: on each target case (fwd+bwd unless noted)
    ours >= 3x eager, >= 1.5x compile, >= 1.3x the faster of sdpa and flex; forward >= 50% of the
    roofline; fwd+bwd peak memory <= 0.3x eager's. A target whose numbers are missing is "n/a"."""
    by_key = {(r.case, r.provider, r.mode): r for r in rows}

    def timed(case, provider, mode):
        r = by_key.get((case, provider, mode))
        return r if r is not None and r.ok else None

    results = []
    for case in cases:
        if not any(r.case == case for r in rows):
            continue
        for provider in ours:
            fb, fwd = timed(case, provider, "fwd+bwd"), timed(case, provider, "fwd")
            own_row = by_key.get((case, provider, "fwd+bwd")) or by_key.get((case, provider, "fwd"))
            if own_row is None:
                continue
            mismatch = own_row.match is False
            own_why = f"{provider}: {own_row.error or 'no time'}"
            if fb is None and fwd is None:  # nothing measured: one line instead of five
                results.append(TargetResult(case, "all targets", provider, "-", f"n/a ({own_why})"))
                continue
            checks: list[tuple[str, str, bool | None, str | None]] = []  # target, value, ok, why n/a
            for peer, factor in (("eager", 3.0), ("compile", 1.5)):
                target, peer_row = f"fwd+bwd >= {factor:g}x {peer}", timed(case, peer, "fwd+bwd")
                if fb is None or peer_row is None:
                    checks.append((target, "-", None, own_why if fb is None else f"{peer} has no time"))
                else:
                    speedup = peer_row.ms / fb.ms
                    checks.append((target, f"{speedup:.2f}x", speedup >= factor, None))
            target = "fwd+bwd >= 1.3x faster of sdpa/flex"
            fused = [r for r in (timed(case, "sdpa", "fwd+bwd"), timed(case, "flex", "fwd+bwd")) if r]
            if fb is None or not fused:
                checks.append((target, "-", None, own_why if fb is None else "neither sdpa nor flex has a time"))
            else:
                best = min(fused, key=lambda r: r.ms)
                speedup = best.ms / fb.ms
                checks.append((target, f"{speedup:.2f}x vs {best.provider}", speedup >= 1.3, None))
            target = "fwd >= 50% of roofline"
            if fwd is None:
                checks.append((target, "-", None, f"{provider}: no forward time"))
            elif fwd.roofline_pct is None:
                checks.append((target, "-", None, "no roofline for this device"))
            else:
                checks.append((target, f"{fwd.roofline_pct:.1f}% ({fwd.limiter}-bound)", fwd.roofline_pct >= 50.0,
                               None))
            target = "fwd+bwd peak memory <= 0.3x eager"
            eager_fb = timed(case, "eager", "fwd+bwd")
            if fb is None or fb.peak_mib is None or eager_fb is None or not eager_fb.peak_mib:
                checks.append((target, "-", None, "no memory measurement"))
            else:
                ratio = fb.peak_mib / eager_fb.peak_mib
                checks.append((target, f"{ratio:.2f}x ({fb.peak_mib:.0f} / {eager_fb.peak_mib:.0f} MiB)",
                               ratio <= 0.3, None))
            for target, value, ok, why in checks:
                if why is not None:
                    status = f"n/a ({why})"
                elif mismatch:
                    status = "FAIL (output mismatch)"
                else:
                    status = "PASS" if ok else "FAIL"
                results.append(TargetResult(case, target, provider, value, status))
    return results


def format_targets(results: Sequence[TargetResult]) -> str:
    if not results:
        return "targets: none of the target shapes (large, stride16) ran with triton or cuda"
    body = [(r.case, r.target, r.provider, r.value, r.status) for r in results]
    table = harness.text_table(("case", "target", "provider", "measured", "status"), body, left=5)
    passed = sum(r.status == "PASS" for r in results)
    return f"targets (from the measured numbers above)\n{table}\n{passed}/{len(results)} targets pass"


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _csv(choices: Sequence[str], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad or text!r}; choose from {', '.join(choices)}")
        return items

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    summary, details = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=summary, epilog=details.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"fewer shapes ({', '.join(QUICK_GPU_SHAPES)} on GPU) and shorter timing budgets")
    p.add_argument("--providers", type=_csv(PROVIDERS, "provider"), default=list(PROVIDERS),
                   help=f"comma-separated subset of {','.join(PROVIDERS)}")
    p.add_argument("--modes", type=_csv(MODES, "mode"), default=list(MODES),
                   help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--shapes", type=_csv(tuple(ALL_SHAPES), "shape"), default=None,
                   help=f"comma-separated subset of {','.join(ALL_SHAPES)} (default: all GPU shapes, or the "
                        "CPU shapes without a GPU)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--no-save", action="store_true", help=f"do not append to benchmarks/results/{BENCHMARK}.jsonl")
    p.add_argument("--cpu", action="store_true", help="run the CPU comparison even when a GPU is present")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU runs: torch threads (default 1: spin-waiting threads make timings erratic on a "
                        "loaded machine)")
    p.add_argument("--rows-out", type=Path, default=None,
                   help="also write this run's rows as JSON lines to this file (for tests)")
    p.add_argument("--compile-timeout", type=float, default=None,
                   help="seconds allowed for a provider's first (compiling) call; default none on GPU, 45 on CPU")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[harness.Row]:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    if args.shapes:
        shapes = [ALL_SHAPES[s] for s in args.shapes]
    elif on_gpu:
        shapes = [GPU_SHAPES[s] for s in (QUICK_GPU_SHAPES if args.quick else GPU_SHAPES)]
    else:
        shapes = list(CPU_SHAPES.values())

    note = None
    if not on_gpu:
        why = "--cpu given" if args.cpu else "no CUDA GPU available"
        print(f"{why}: running a small {str(dtype).replace('torch.', '')} CPU comparison instead of the GPU "
              "benchmark (times show that the providers run and agree, not kernel performance)")
        note = "cpu run (no GPU): small shapes, not kernel performance"
        torch.set_num_threads(max(1, args.threads))
        # inductor's CPU compile logs a CUDA_HOME guess on a CUDA build of torch without a GPU
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    configure_compile()

    timeout = args.compile_timeout if args.compile_timeout is not None else (None if on_gpu else 45.0)
    bench = Harness(BENCHMARK, device=device, quick=args.quick, save=not args.no_save, note=note,
                    first_call_timeout_s=timeout)
    print(bench.header())
    if bench.spec is not None:
        s = bench.spec
        print(f"roofline peaks ({s.name}): {s.bf16_flops / 1e12:.0f} TFLOP/s bf16 dense, "
              f"{s.fp32_flops / 1e12:.0f} TFLOP/s fp32, {s.hbm_bytes_per_s / 1e12:.2f} TB/s, "
              f"{s.exp_per_s / 1e12:.2f} Texp/s (MUFU), {s.sm_count} SMs @ {s.clock_mhz} MHz")

    for shape in shapes:
        qkv, table = make_inputs(shape, dtype, device)
        providers = build_providers(args.providers, shape, qkv, table, cpu_quick=args.quick and not on_gpu)
        work = {mode: window_attention_work(shape, dtype, mode) for mode in MODES}
        case = Case(shape.name, shape.record(), dtype, work, title=shape.title(dtype))
        reference = "eager" if "eager" in providers else None
        bench.run_case(case, providers, leaves=[qkv, table], modes=args.modes, reference=reference,
                       tolerance=Tolerance(shape, qkv, table))
        del providers, qkv, table

    rows = bench.rows
    print()
    speedups = harness.format_speedups(rows, [p for p in OURS if p in args.providers], PROVIDERS)
    if speedups:
        print(speedups)
    mismatched = sorted({(r.case, r.provider) for r in rows if r.match is False})
    if mismatched:
        print("!!! OUTPUT MISMATCH vs eager: " + ", ".join(f"{p} on {c}" for c, p in mismatched))
    print()
    if on_gpu:
        print(format_targets(evaluate_targets(rows)))
    else:
        print("targets: defined for bf16 on a GPU; not evaluated on this CPU run")
    bench.finish()
    if args.rows_out is not None:
        args.rows_out.parent.mkdir(parents=True, exist_ok=True)
        with args.rows_out.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(harness._json_safe(asdict(row))) + "\n")
    return rows


if __name__ == "__main__":
    main()
