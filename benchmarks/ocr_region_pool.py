"""Benchmark: OCR soft region pooling (SSLTM's OCR gather, OCRNet's SpatialGather) against its peers.

    python benchmarks/ocr_region_pool.py [--quick] [--providers eager,compile,triton,cuda]
                                         [--modes fwd,bwd,fwd+bwd] [--shapes k124-120,k19-60,...]
                                         [--no-save] [--results-dir DIR] [--cpu]

Providers (all take logits ``(B, K, H, W)`` and feats ``(B, C, H, W)`` requiring grad and return
``(B, K, C)``):

    eager    ``soft_region_pool_reference``: ``softmax(scale * logits)`` over the positions, then a batched
             matrix product with the features (OCRNet's way; the ``(B, K, H*W)`` probabilities are written)
    compile  ``torch.compile`` of that same function (compilation excluded from the timing)
    triton   ``soft_region_pool(..., backend="triton")``: online softmax fused with the weighted sum
    cuda     ``soft_region_pool(..., backend="cuda")``: the extension's CUDA-core kernels

On a GPU: bf16, SSLTM's shapes (B = 8 clips' frames, C = 512, VSPW's K = 124 and Cityscapes' K = 19 classes,
120x120 and 60x60 positions: strides 4 and 8 of 480x480), modes fwd / bwd / fwd+bwd, then the issue's
performance targets with PASS / FAIL. Rows report ms, GB/s against the least traffic of each mode, % of the
roofline (HBM bandwidth: these calls are memory-bound), peak memory and kernel launches per call.

Without a GPU (or with ``--cpu``): a small fp32 CPU comparison of the providers that run on the CPU (triton
only under TRITON_INTERPRET=1; cuda never: its CPU emulation is a test vehicle, not a provider).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial

import torch

from benchmarks import harness
from ssltm_kernels.ops.soft_region_pool import soft_region_pool, soft_region_pool_reference

BENCHMARK = "ocr_region_pool"
PROVIDERS = ("eager", "compile", "triton", "cuda")
OURS = ("triton", "cuda")
SCALE = 1.0  # OCRNet's and SSLTM's


# ------------------------------------------------------------------------------------ shapes, their work
@dataclass(frozen=True)
class Shape:
    """One problem: ``B`` items of ``K`` classes and ``C`` channels at ``H x W`` positions."""

    name: str
    B: int
    K: int
    C: int
    H: int
    W: int

    @property
    def N(self) -> int:
        return self.H * self.W

    def record(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "name"}, "N": self.N}

    def title(self, dtype: torch.dtype) -> str:
        return f"B={self.B} K={self.K} C={self.C} H={self.H} W={self.W}  {str(dtype).removeprefix('torch.')}"


GPU_SHAPES = {
    s.name: s
    for s in (
        Shape("k124-120", B=8, K=124, C=512, H=120, W=120),  # VSPW, stride 4 of 480x480: SSLTM's OCR gather
        Shape("k124-60", B=8, K=124, C=512, H=60, W=60),
        Shape("k19-120", B=8, K=19, C=512, H=120, W=120),  # Cityscapes' classes
        Shape("k19-60", B=8, K=19, C=512, H=60, W=60),
    )
}
QUICK_GPU_SHAPES = ("k124-120", "k19-60")
CPU_SHAPES = {
    s.name: s
    for s in (
        Shape("cpu-k19", B=2, K=19, C=48, H=12, W=13),
        Shape("cpu-k124", B=1, K=124, C=20, H=9, W=7),
    )
}
SHAPES = harness.ShapeSet(GPU_SHAPES, CPU_SHAPES, QUICK_GPU_SHAPES)
TARGET_SHAPES = tuple(GPU_SHAPES)


def region_pool_work(shape: Shape, dtype: torch.dtype, mode: str) -> harness.Work:
    """Least work of one call, for element size e. Forward: read logits and feats, write the output
    (``(B*K*N + B*C*N + B*K*C) * e`` bytes), ``2*B*K*N*C`` FLOPs (the weighted sum), ``B*K*N`` exps.
    Backward: read logits, feats and the output's gradient, write both input gradients
    (``(2*B*K*N + 2*B*C*N + B*K*C) * e``), ``4*B*K*N*C`` FLOPs (dP = dOut F and dfeats = dOut^T P), the
    exps again (the probabilities are recomputed, not stored). fwd+bwd is both. The per-(b, k) softmax
    statistics (8 bytes each) are left out."""
    b, k, c, n = shape.B, shape.K, shape.C, shape.N
    e = torch.finfo(dtype).bits // 8
    fwd = harness.Work(
        flops=2.0 * b * k * n * c, bytes=float((b * k * n + b * c * n + b * k * c) * e), exps=float(b * k * n)
    )
    bwd = harness.Work(
        flops=4.0 * b * k * n * c, bytes=float((2 * b * k * n + 2 * b * c * n + b * k * c) * e), exps=float(b * k * n)
    )
    if mode == "fwd":
        return fwd
    if mode == "bwd":
        return bwd
    return harness.Work(fwd.flops + bwd.flops, fwd.bytes + bwd.bytes, fwd.exps + bwd.exps)


# ------------------------------------------------------------------------------------------- providers
def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """logits ``(B, K, H, W)`` (spread like a classifier's scores) and feats ``(B, C, H, W)``, requiring grad."""
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = 4.0 * torch.randn(shape.B, shape.K, shape.H, shape.W, generator=gen, device=device)
    feats = torch.randn(shape.B, shape.C, shape.H, shape.W, generator=gen, device=device)
    return logits.to(dtype).requires_grad_(), feats.to(dtype).requires_grad_()


def build_providers(
    names: Sequence[str], logits: torch.Tensor, feats: torch.Tensor
) -> dict[str, harness.Impl | harness.Unavailable]:
    """A forward (or the reason it cannot run) for every requested provider."""
    providers: dict[str, harness.Impl | harness.Unavailable] = {}
    for name in names:
        if name in ("eager", "compile"):
            providers[name] = harness.eager_or_compiled(
                name, soft_region_pool_reference, lambda fn: fn(logits, feats, SCALE)
            )
        elif name == "cuda" and logits.device.type == "cpu":
            providers[name] = harness.Unavailable(
                "the CUDA kernels need a GPU (on CPU tensors they are a test emulation)"
            )
        else:
            providers[name] = harness.backend_provider(
                name, logits.device, lambda b: soft_region_pool(logits, feats, SCALE, backend=b)
            )
    return providers


def cases(shape: Shape, run: harness.Context):
    logits, feats = make_inputs(shape, run.dtype, run.device)
    providers = build_providers(run.args.providers, logits, feats)
    case = harness.Case(
        shape.name,
        shape.record(),
        run.dtype,
        {m: region_pool_work(shape, run.dtype, m) for m in harness.MODES},
        title=shape.title(run.dtype),
    )
    yield harness.Measurement(
        case, providers, leaves=[logits, feats], exact=harness.Exact(partial(soft_region_pool_reference, scale=SCALE))
    )


# ----------------------------------------------------------------------------------------------- targets
def evaluate_targets(
    rows: Sequence[harness.Row],
    bytes_per_s: float | None,
    cases: Sequence[str] = TARGET_SHAPES,
    ours: Sequence[str] = OURS,
) -> list[harness.TargetResult]:
    """The issue's targets from the measured rows, per case and each of ours: forward >= 70% of the HBM
    bandwidth (``bytes_per_s``, the device's peak), fwd+bwd >= 2x eager and >= 1.3x compile, forward peak
    memory <= 0.5x eager's. A target whose numbers are missing is "n/a"."""

    def judge(index: harness.RowIndex, case: str, provider: str, own: harness.Row) -> list[harness.TargetResult]:
        fb, fwd = index.timed(case, provider, "fwd+bwd"), index.timed(case, provider, "fwd")
        checks = [
            harness.bandwidth_check(
                "fwd >= 70% of HBM bandwidth",
                fwd,
                bytes_per_s,
                70.0,
                own_why="no forward time",
                peak_why="no bandwidth for this device",
            ),
            *harness.peer_speedup_checks(index, case, fb, {"eager": 2.0, "compile": 1.3}, own_why="no fwd+bwd time"),
            harness.peak_memory_check(
                "fwd peak memory <= 0.5x eager", fwd, index.timed(case, "eager", "fwd"), 0.5, mib_digits=1
            ),
        ]
        return harness.target_results(case, provider, checks, own.correct)

    return harness.check_targets(rows, cases, ours, judge)


SPEC = harness.BenchmarkSpec(
    BENCHMARK,
    __doc__,
    PROVIDERS,
    OURS,
    SHAPES,
    cases,
    targets=evaluate_targets,
    target_cases=TARGET_SHAPES,
    quick_help=f"smoke run: {', '.join(QUICK_GPU_SHAPES)} on GPU, shorter timing budgets",
)

if __name__ == "__main__":
    harness.run_benchmark(SPEC)
