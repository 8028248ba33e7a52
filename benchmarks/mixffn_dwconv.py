"""Benchmark: the fused Mix-FFN depthwise conv + GELU of the SSLTM STT blocks, and the whole MixFFN, against
their peers.

    python benchmarks/mixffn_dwconv.py [--quick] [--providers eager,compile,...] [--modes fwd,bwd,fwd+bwd]
                                        [--shapes stride16,large] [--compile-all] [--no-save]
                                        [--results-dir DIR] [--cpu]

The conv (``<shape>``): depthwise 3x3 + GELU of the channels-last hidden activation ``x (B, T, H, W, C)``
(fc1's output), weight ``(C, 1, 3, 3)`` and bias ``(C,)``; every provider returns ``(B, T, H, W, C)``:

    eager                permute to contiguous NCHW frames, ``F.conv2d(groups=C)``, GELU, permute back to
                         contiguous channels-last (two permute copies each way, SegFormer's cost on an
                         NCHW-first conv)
    eager-channels-last  the op's reference: ``F.conv2d`` on the channels-last view (``channels_last`` memory
                         format, no permute copies), GELU
    compile              ``torch.compile`` of eager (compilation excluded from the timing)
    triton, cuda         ``dwconv3x3(..., activation="gelu", backend=...)``

The module (``<shape>-mixffn``): fc1 -> dwconv -> GELU -> fc2 on ``(B, T, H, W, C/4)`` volumes:
``segformer-eager`` is SegFormer's ``Mlp`` + ``DWConv`` on the frames' tokens, ``segformer-compile`` its
``torch.compile`` (with ``compile``), ``mixffn-reference`` our ``MixFFN`` on the op's reference backend (with
``eager-channels-last``), ``mixffn-triton`` / ``mixffn-cuda`` our ``MixFFN`` on the fused op.

On a GPU: bf16, SSLTM's shapes (two 4-frame 480x480 clips; hidden widths 4x the STT dims 32/64/128/256 at
strides 4/8/16/32) and a large one, modes fwd / bwd / fwd+bwd, then the issue's targets with PASS / FAIL.
GB/s count the least traffic (forward: read x, write y; backward: read x and dy, write dx); the conv is
memory-bound, so its ``%roof`` is the share of the HBM bandwidth. The compiled peers run on the target
cases only (``--compile-all``: every case), their compilation being the slow part of the run.

Without a GPU (or with ``--cpu``): a small fp32 CPU comparison of the providers that run on the CPU
(triton only under TRITON_INTERPRET=1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import harness
from ssltm_kernels.modules import MixFFN
from ssltm_kernels.ops.dwconv3x3 import dwconv3x3, dwconv3x3_reference

BENCHMARK = "mixffn_dwconv"
PROVIDERS = ("eager", "eager-channels-last", "compile", "triton", "cuda")
OURS = ("triton", "cuda")
MODULE_PROVIDERS = {
    "eager": "segformer-eager",
    "compile": "segformer-compile",
    "eager-channels-last": "mixffn-reference",
    "triton": "mixffn-triton",
    "cuda": "mixffn-cuda",
}


# ------------------------------------------------------------------------------------ shapes, their work
@dataclass(frozen=True)
class Shape:
    """The hidden activation ``(B, T, H, W, C)`` of a Mix-FFN with ``C / 4`` input channels."""

    name: str
    B: int
    T: int
    H: int
    W: int
    C: int

    @property
    def elements(self) -> int:
        return self.B * self.T * self.H * self.W * self.C

    @property
    def tokens(self) -> int:
        return self.B * self.T * self.H * self.W

    @property
    def dim(self) -> int:
        return max(1, self.C // 4)

    def record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "name"} | {"in_features": self.dim}

    def title(self, dtype: torch.dtype) -> str:
        return f"B={self.B} T={self.T} H={self.H} W={self.W} C={self.C}  {str(dtype).removeprefix('torch.')}"


# SSLTM's STT blocks: strides 4/8/16/32 of a 480x480 input, dims 32/64/128/256 -> hidden 128..1024, two clips
# of 4 frames
SSLTM_SHAPES = (
    Shape("stride4", 2, 4, 120, 120, 128),
    Shape("stride8", 2, 4, 60, 60, 256),
    Shape("stride16", 2, 4, 30, 30, 512),
    Shape("stride32", 2, 4, 15, 15, 1024),
)
GPU_SHAPES = {s.name: s for s in (*SSLTM_SHAPES, Shape("large", 8, 4, 56, 56, 1024))}
QUICK_GPU_SHAPES = ("stride16", "large")
CPU_SHAPES = {s.name: s for s in (Shape("cpu-small", 1, 2, 9, 13, 40),)}
SHAPES = harness.ShapeSet(GPU_SHAPES, CPU_SHAPES, QUICK_GPU_SHAPES)
TARGET_SHAPES = ("large", "stride16")


def dwconv_work(shape: Shape, dtype: torch.dtype, mode: str) -> harness.Work:
    """Least work of the conv + GELU: 9 FMAs per output element forward, 18 backward (dx and dweight);
    bytes: forward reads x and writes y, backward reads x and dy and writes dx (weights and bias, a few
    KB, left out); the backward's one ``exp`` per element (GELU's derivative; erf is a polynomial)."""
    m, e = shape.elements, torch.finfo(dtype).bits // 8
    flops = {"fwd": 18.0 * m, "bwd": 36.0 * m, "fwd+bwd": 54.0 * m}[mode]
    nbytes = {"fwd": 2 * m * e, "bwd": 3 * m * e, "fwd+bwd": 5 * m * e}[mode]
    return harness.Work(flops=flops, bytes=float(nbytes), exps=float(m if mode != "fwd" else 0))


def mixffn_work(shape: Shape, dtype: torch.dtype, mode: str) -> harness.Work:
    """Least work of the module: fc1 and fc2 (``2 * tokens * dim * C`` FLOPs each forward, twice that
    backward) plus the conv; bytes: the module's input and output (forward), input, output gradient and
    input gradient (backward), as for the conv."""
    conv = dwconv_work(shape, dtype, mode)
    linear = 2 * 2.0 * shape.tokens * shape.dim * shape.C
    flops = {"fwd": linear, "bwd": 2 * linear, "fwd+bwd": 3 * linear}[mode]
    e = torch.finfo(dtype).bits // 8
    nbytes = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[mode] * shape.tokens * shape.dim * e
    return harness.Work(flops=flops + conv.flops, bytes=float(nbytes), exps=conv.exps)


# ------------------------------------------------------------------------------------------- providers
def eager_dwconv_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Depthwise conv + GELU on contiguous NCHW frames: permute copies in and out."""
    frames = x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2).contiguous()
    y = F.gelu(F.conv2d(frames, weight, bias, padding=1, groups=x.shape[-1]))
    return y.permute(0, 2, 3, 1).contiguous().view(x.shape)


class SegFormerDWConv(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, _, channels = x.shape
        x = self.dwconv(x.transpose(1, 2).view(batch, channels, height, width))
        return x.flatten(2).transpose(1, 2)


class SegFormerMlp(nn.Module):
    """SegFormer's Mix-FFN (``Mlp`` with ``DWConv``), on the tokens ``(B*T, H*W, C)`` of every frame."""

    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = SegFormerDWConv(hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        batch, frames, height, width, channels = volume.shape
        x = self.fc1(volume.reshape(batch * frames, height * width, channels))
        x = self.fc2(self.act(self.dwconv(x, height, width)))
        return x.view(batch, frames, height, width, -1)


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """x ``(B, T, H, W, C)``, weight ``(C, 1, 3, 3)``, bias ``(C,)`` in ``dtype``, requiring grad."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape.B, shape.T, shape.H, shape.W, shape.C, generator=gen, device=device, dtype=dtype)
    weight = torch.randn(shape.C, 1, 3, 3, generator=gen, device=device, dtype=dtype) / 3
    bias = torch.randn(shape.C, generator=gen, device=device, dtype=dtype)
    return x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()


def _compile_skipped(name: str, shape: Shape, compile_all: bool) -> harness.Unavailable | None:
    if shape.name not in TARGET_SHAPES and not compile_all:
        return harness.Unavailable(
            f"{name} runs on the target cases ({', '.join(TARGET_SHAPES)}); --compile-all: every case"
        )
    return None


def conv_providers(names: Sequence[str], shape: Shape, x, weight, bias, compile_all: bool) -> dict:
    providers: dict[str, harness.Impl | harness.Unavailable] = {}
    for name in names:
        if name == "eager-channels-last":
            providers[name] = harness.Impl(lambda: dwconv3x3_reference(x, weight, bias, "gelu"))
        elif name in ("eager", "compile"):
            providers[name] = (
                name == "compile" and _compile_skipped(name, shape, compile_all)
            ) or harness.eager_or_compiled(name, eager_dwconv_gelu, lambda fn: fn(x, weight, bias))
        else:
            providers[name] = harness.backend_provider(
                name, x.device, lambda b: dwconv3x3(x, weight, bias, "gelu", backend=b)
            )
    return providers


def _mixffn(shape: Shape, segformer: SegFormerMlp, backend: str) -> MixFFN:
    """Our ``MixFFN`` on ``backend`` with SegFormer's layers themselves: the same parameters, whose gradients the
    harness resets."""
    module = MixFFN(shape.dim, shape.C, backend=backend)
    module.fc1, module.dwconv.dwconv, module.fc2 = segformer.fc1, segformer.dwconv.dwconv, segformer.fc2
    return module


def module_providers(
    names: Sequence[str], shape: Shape, x: torch.Tensor, segformer: SegFormerMlp, compile_all: bool
) -> dict:
    providers: dict[str, harness.Impl | harness.Unavailable] = {}
    for name in names:
        label = MODULE_PROVIDERS[name]
        if name in ("eager", "compile"):
            providers[label] = (
                name == "compile" and _compile_skipped(label, shape, compile_all)
            ) or harness.eager_or_compiled(name, segformer, lambda fn: fn(x))
        else:
            backend = "reference" if name == "eager-channels-last" else name
            providers[label] = harness.triton_unavailable(backend, x.device) or harness.Impl(
                partial(_mixffn(shape, segformer, backend), x)
            )
    return providers


def exact_module(segformer: SegFormerMlp) -> harness.Exact:
    """The gate's yardstick of the module case: SegFormer's module on the leaves ``(volume, *parameters)``."""
    names = [name for name, _ in segformer.named_parameters()]
    return harness.Exact(
        lambda volume, *params: torch.func.functional_call(segformer, dict(zip(names, params, strict=True)), (volume,))
    )


def conv_case(shape: Shape, run: harness.Context) -> harness.Measurement:
    x, weight, bias = make_inputs(shape, run.dtype, run.device)
    case = harness.Case(
        shape.name,
        shape.record(),
        run.dtype,
        {m: dwconv_work(shape, run.dtype, m) for m in harness.MODES},
        title=f"dwconv3x3 + GELU  {shape.title(run.dtype)}",
    )
    return harness.Measurement(
        case,
        conv_providers(run.args.providers, shape, x, weight, bias, run.args.compile_all),
        leaves=[x, weight, bias],
        exact=harness.Exact(partial(dwconv3x3_reference, activation="gelu")),
    )


def module_case(shape: Shape, run: harness.Context) -> harness.Measurement:
    torch.manual_seed(0)
    segformer = SegFormerMlp(shape.dim, shape.C).to(run.device, run.dtype)
    volume = torch.randn(
        shape.B, shape.T, shape.H, shape.W, shape.dim, device=run.device, dtype=run.dtype, requires_grad=True
    )
    case = harness.Case(
        f"{shape.name}-mixffn",
        shape.record(),
        run.dtype,
        {m: mixffn_work(shape, run.dtype, m) for m in harness.MODES},
        title=f"Mix-FFN {shape.dim} -> {shape.C} -> {shape.dim}  {shape.title(run.dtype)}",
    )
    providers = module_providers(run.args.providers, shape, volume, segformer, run.args.compile_all)
    return harness.Measurement(
        case,
        providers,
        leaves=[volume, *segformer.parameters()],
        exact=exact_module(segformer),
        references=("segformer-eager",),
    )


def cases(shape: Shape, run: harness.Context):
    """The conv + GELU, then (without ``--no-module``) the whole MixFFN."""
    yield conv_case(shape, run)
    if not run.args.no_module:
        yield module_case(shape, run)


# ----------------------------------------------------------------------------------------------- targets
def evaluate_targets(
    rows: Sequence[harness.Row],
    hbm_bytes_per_s: float | None,
    cases: Sequence[str] = TARGET_SHAPES,
    ours: Sequence[str] = OURS,
) -> list[harness.TargetResult]:
    """The issue's targets, from the measured rows, on each target case: conv + GELU forward >= 70% of the
    HBM bandwidth; conv + GELU fwd+bwd >= 3x eager and >= 1.3x compile; MixFFN fwd+bwd >= 1.3x SegFormer's
    eager module. A target whose numbers are missing is "n/a"."""

    def judge(index: harness.RowIndex, case: str, provider: str, own: harness.Row) -> list[harness.TargetResult]:
        fwd, fb = index.timed(case, provider, "fwd"), index.timed(case, provider, "fwd+bwd")
        conv = [
            harness.bandwidth_check(
                "conv+GELU fwd >= 70% of HBM bandwidth",
                fwd,
                hbm_bytes_per_s,
                70.0,
                own_why=harness.untimed(own, "no forward time"),
                peak_why="no HBM peak for this device",
            ),
            *harness.peer_speedup_checks(
                index, case, fb, {"eager": 3.0, "compile": 1.3}, own_why=harness.untimed(own), prefix="conv+GELU "
            ),
        ]
        module_case, label = f"{case}-mixffn", MODULE_PROVIDERS[provider]
        mine = index.get(module_case, label, "fwd+bwd")
        module = harness.speedup_check(
            "MixFFN fwd+bwd >= 1.3x SegFormer eager",
            mine,
            [index.timed(module_case, "segformer-eager", "fwd+bwd")],
            1.3,
            own_why=harness.untimed(mine) if mine else f"{label}: not run",
            peer_why="no eager time",
        )
        return [
            *harness.target_results(case, provider, conv, own.correct),
            *harness.target_results(module_case, provider, [module], mine.correct if mine else None),
        ]

    return harness.check_targets(rows, cases, ours, judge, one_line_when_untimed=False)


def options(p) -> None:
    p.add_argument("--compile-all", action="store_true", help="run the compiled peers on every case")
    p.add_argument("--no-module", action="store_true", help="only the conv, not the whole MixFFN")


SPEC = harness.BenchmarkSpec(
    BENCHMARK,
    __doc__,
    PROVIDERS,
    OURS,
    SHAPES,
    cases,
    targets=evaluate_targets,
    target_cases=TARGET_SHAPES,
    labels=[MODULE_PROVIDERS],
    options=options,
    quick_help=f"smoke run: {', '.join(QUICK_GPU_SHAPES)} on GPU, shorter timing budgets",
)

if __name__ == "__main__":
    harness.run_benchmark(SPEC)
