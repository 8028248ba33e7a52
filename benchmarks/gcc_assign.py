"""Benchmark: the GCC nearest-cluster assignment (SSLTM Eq. 8, 9) against its peers.

    python benchmarks/gcc_assign.py [--quick] [--providers eager,compile,triton,cuda] [--modes fwd,bwd,fwd+bwd]
                                    [--no-save] [--results-dir DIR] [--cpu]

Providers (all take ``feats (B, K, D)``, the learnable ``centers (T, K, D)`` and ``valid (B, K)``, and return
the loss, whose gradient reaches ``centers``):

    eager    ``torch.cdist`` per category (in fp32, as under autocast), ``argmin``, gather of the nearest
             centres, the per-category MSE averaged over the valid categories (Eq. 9) in the inputs' dtype
    compile  ``torch.compile`` of that same function (compilation excluded from the timing)
    triton   ``gcc_assign(..., backend="triton")``: one kernel forward, one backward
    cuda     ``gcc_assign(..., backend="cuda")``: likewise

On a GPU: bf16, SSLTM's shape (B=8 query frames, K=124 VSPW categories, T=3 clusters, D=512), modes fwd /
bwd / fwd+bwd with the kernel launches of each call, then the target (fwd+bwd >= 5x eager) with PASS / FAIL.
Without a GPU (or with ``--cpu``): a small fp32 CPU comparison of the providers that run on the CPU (triton
only under TRITON_INTERPRET=1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch

from benchmarks import harness
from ssltm_kernels.ops.gcc_assign import gcc_assign, gcc_assign_reference

BENCHMARK = "gcc_assign"
PROVIDERS = ("eager", "compile", "triton", "cuda")
OURS = ("triton", "cuda")
TARGET_SPEEDUP = 5.0  # fwd+bwd against eager


@dataclass(frozen=True)
class Shape:
    name: str
    B: int
    K: int
    T: int
    D: int
    valid_fraction: float = 0.1  # a VSPW label holds about a tenth of the 124 categories

    def title(self, dtype: torch.dtype) -> str:
        return (
            f"B={self.B} K={self.K} T={self.T} D={self.D} valid~{self.valid_fraction:.0%}  "
            f"{str(dtype).removeprefix('torch.')}"
        )


GPU_SHAPES = {"ssltm": Shape("ssltm", B=8, K=124, T=3, D=512)}
CPU_SHAPES = {"cpu-small": Shape("cpu-small", B=4, K=19, T=3, D=96, valid_fraction=0.5)}


def gcc_work(shape: Shape, dtype: torch.dtype, mode: str) -> harness.Work:
    """Least work of one call, for element size e. Forward: read feats and centers, write nearest
    (``(2 B K D + T K D) e``), the mask, and the int64 index (``9 B K``); a subtraction, a multiplication
    and an addition per feature of each of the T distances (``3 B K T D`` FLOPs). Backward of the loss:
    read feats, centers, the index and the mask, write dcenters (``(B K D + 2 T K D) e + 9 B K``), a
    subtraction, a multiplication and an addition per feature of each frame (``3 B K D``)."""
    e = torch.finfo(dtype).bits // 8
    bk, kd = shape.B * shape.K, shape.K * shape.D
    fwd = harness.Work(flops=3.0 * bk * shape.T * shape.D, bytes=float((2 * bk * shape.D + shape.T * kd) * e + 9 * bk))
    bwd = harness.Work(flops=3.0 * bk * shape.D, bytes=float((bk * shape.D + 2 * shape.T * kd) * e + 9 * bk))
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": harness.Work(flops=fwd.flops + bwd.flops, bytes=fwd.bytes + bwd.bytes)}[
        mode
    ]


def eager_gcc_loss(feats: torch.Tensor, centers: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Eq. 8 and 9 as one writes them in PyTorch: cdist per category, argmin, gather, masked MSE."""
    feats = feats.detach()  # the loss only optimises G
    # (K, B, T); in fp32 as autocast runs cdist (it has no 16-bit CUDA kernel)
    dist = torch.cdist(feats.transpose(0, 1).float(), centers.detach().transpose(0, 1).float())
    index = dist.argmin(-1).t()  # (B, K)
    nearest = centers[index, torch.arange(centers.shape[1], device=centers.device)]  # (B, K, D)
    mse = (nearest - feats).square().mean(-1)  # (B, K): the MSE of each category
    return (mse * valid).sum() / valid.sum().clamp_min(1)


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    feats = torch.randn(shape.B, shape.K, shape.D, generator=gen, device=device, dtype=dtype)
    centers = torch.randn(shape.T, shape.K, shape.D, generator=gen, device=device, dtype=dtype)
    valid = torch.rand(shape.B, shape.K, generator=gen, device=device) < shape.valid_fraction
    return feats, centers.requires_grad_(), valid


def exact_loss(feats: torch.Tensor, valid: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """The op's reference loss with ``feats`` widened to the dtype of ``centers`` (the gate's yardstick)."""
    return gcc_assign_reference(feats.to(centers.dtype), centers, valid)[2]


def build_providers(names: Sequence[str], feats, centers, valid) -> dict[str, harness.Impl | harness.Unavailable]:
    return {
        name: harness.eager_or_compiled(name, eager_gcc_loss, lambda fn: fn(feats, centers, valid))
        if name in ("eager", "compile")
        else harness.backend_provider(name, feats.device, lambda b: gcc_assign(feats, centers, valid, backend=b)[2])
        for name in names
    }


def cases(shape: Shape, run: harness.Context):
    """The one case of a shape: the loss of ``centers`` (the leaf) against the reference loss."""
    feats, centers, valid = make_inputs(shape, run.dtype, run.device)
    record = {"B": shape.B, "K": shape.K, "T": shape.T, "D": shape.D, "n_valid": int(valid.sum())}
    case = harness.Case(
        shape.name,
        record,
        run.dtype,
        {m: gcc_work(shape, run.dtype, m) for m in harness.MODES},
        title=shape.title(run.dtype),
    )
    yield harness.Measurement(
        case,
        build_providers(run.args.providers, feats, centers, valid),
        leaves=[centers],
        exact=harness.Exact(partial(exact_loss, feats, valid)),
    )


def evaluate_targets(rows: Sequence[harness.Row], ours: Sequence[str] = OURS) -> list[harness.TargetResult]:
    """fwd+bwd >= 5x eager on every case, for each of our backends; "n/a" where a time is missing."""
    index, results = harness.RowIndex(rows), []
    for row in rows:
        if row.mode == "fwd+bwd" and row.provider in ours:
            checks = harness.peer_speedup_checks(
                index, row.case, row, {"eager": TARGET_SPEEDUP}, own_why=harness.untimed(row)
            )
            results += harness.target_results(row.case, row.provider, checks, row.correct)
    return results


SHAPES = harness.ShapeSet(GPU_SHAPES, CPU_SHAPES, option=False)
SPEC = harness.BenchmarkSpec(
    BENCHMARK,
    __doc__,
    PROVIDERS,
    OURS,
    SHAPES,
    cases,
    targets=lambda rows, _: evaluate_targets(rows),
    target_cases=tuple(GPU_SHAPES),
)

if __name__ == "__main__":
    harness.run_benchmark(SPEC)
