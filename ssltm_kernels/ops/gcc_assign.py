"""GCC nearest-cluster assignment: SSLTM's Global Category Context step (paper §3.4, Eq. 8 and 9).

One op, one file: the pure-PyTorch reference, the Triton kernels and their launchers, the
``torch.library`` custom ops with autograd, and the public :func:`gcc_assign`.

Semantics. ``feats (B, K, D)`` are the category representations of the query frames, ``centers
(T, K, D)`` the learnable global category representations G (T clusters for each of K categories),
``valid (B, K)`` says which categories the label of frame b contains. For every (b, j):

- ``index[b, j] = argmin_i ||feats[b, j] - centers[i, j]||`` over the T clusters of category j. The
  kernels compare squared L2 distances accumulated in fp32 (float64 for float64 inputs in the
  reference); ties resolve to the lowest cluster index in every backend.
- ``nearest[b, j] = centers[index[b, j], j]`` (a gather: gradient reaches ``centers``).
- index and nearest are computed for *every* (b, j): the argmin does not depend on the mask, and a
  category absent from the label still has a nearest cluster. ``valid`` selects the loss's entries.
- ``loss = sum over valid (b, j) and d of (nearest[b, j, d] - feats[b, j, d])**2 / (n_valid * D)``:
  the mean over the valid (b, j) of the per-category MSE (Eq. 9), which is the mean over the
  ``n_valid x D`` valid elements. No valid entry: the loss is exactly 0 and its gradient is zero.
  The loss is float32 (float64 for float64 inputs), as autocast runs ``mse_loss``.
- Stop-gradient on ``feats`` (the paper: the MSE only optimises G): no gradient reaches ``feats``,
  through the loss or the index. ``centers`` receives the loss's gradient and, when the caller
  backpropagates through ``nearest``, that of the gather.

Non-finite inputs are an error in every backend: a NaN or infinite element of ``feats`` or ``centers``
raises ``ValueError`` before any work (the kernels would skip a NaN distance where the reference's argmin
picks it, so the results would depend on the backend). The check is one ``isfinite`` reduction over
both inputs and one device synchronisation per call; it runs inside the forward op, so a compiled graph
keeps it.

Kernels: the forward is one launch: each program takes a block of frames of one category, computes
the T distances, the argmin, writes index and nearest, and stores its share of the loss; the program
that finishes last (an integer ticket, :func:`_ticket_counter`) adds the shares in a fixed order and
writes the loss. The backward is one launch: each program owns a slice of D of one category and sums
the contributions of the frames in order of b. No floating-point atomics: both are deterministic.

Every backend runs through the same custom op (``ssltm::gcc_assign_fwd`` / ``_bwd``); for the
``reference`` backend its forward and backward are PyTorch code (the backward a one-hot contraction,
deterministic too). :func:`gcc_assign_reference` is the ground truth, differentiated by autograd.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from ssltm_kernels._backend import (
    HAS_TRITON,
    BackendCheck,
    cuda_unavailable_reason,
    on_device,
    triton_unavailable_reason,
)
from ssltm_kernels._ext import _C
from ssltm_kernels._op import (
    autocasting,
    backend_predicates,
    compile_cases,
    dispatch,
    dtype_reason,
    next_pow2,
    register_autocast,
)
from ssltm_kernels._triton_specs import TYPE_NAMES, CompileConfig, kernel_spec

__all__ = [
    "gcc_assign",
    "gcc_assign_reference",
    "can_run_cuda",
    "can_run_triton",
    "can_run_reference",
    "compile_configs",
]

OP = "gcc_assign"
MAX_TRITON_CLUSTERS = 1024  # the backward holds one category's clusters in one tile


# --------------------------------------------------------------------------------------------------
# Reference (pure PyTorch, the ground truth)
# --------------------------------------------------------------------------------------------------
def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Distances and the loss: float32 for 16- and 32-bit inputs, float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _nearest_index(feats: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """``(B, K)`` argmin over the clusters of the squared L2 distance (same argmin as the L2 distance,
    without a square root that could round two close distances to one); the first minimum wins."""
    acc = accumulation_dtype(feats.dtype)
    f, c = feats.detach().to(acc), centers.detach().to(acc)
    dist = (f[:, :, None, :] - c.transpose(0, 1)[None]).square().sum(-1)  # (B, K, T)
    return dist.argmin(-1)


def _gather(centers: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``nearest[b, j] = centers[index[b, j], j]`` (differentiable in centers)."""
    return centers[index, torch.arange(centers.shape[1], device=centers.device)]


def _masked_mse(nearest: torch.Tensor, feats: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, norm)``: the Eq. 9 loss with ``feats`` detached, and ``norm = 1 / (n_valid * D)`` (0
    without a valid entry), in the accumulation dtype."""
    acc = accumulation_dtype(feats.dtype)
    sq = (nearest.to(acc) - feats.detach().to(acc)).square()
    total = torch.where(valid[..., None], sq, torch.zeros((), dtype=acc, device=sq.device)).sum()
    count = valid.sum().to(acc) * feats.shape[-1]
    norm = torch.where(count > 0, 1.0 / count.clamp_min(1), torch.zeros((), dtype=acc, device=count.device))
    return total * norm, norm


def gcc_assign_reference(
    feats: torch.Tensor, centers: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager implementation (distance, argmin, gather, masked MSE), differentiable by autograd in
    ``centers``; same arguments and results as :func:`gcc_assign`, any float dtype."""
    _validate(feats, centers, valid)
    _check_finite(feats, centers)
    index = _nearest_index(feats, centers)
    nearest = _gather(centers, index)
    loss, _ = _masked_mse(nearest, feats, valid)
    return index, nearest, loss


def _reference_forward(feats, centers, valid):
    index = _nearest_index(feats, centers)
    nearest = _gather(centers.detach(), index)
    loss, norm = _masked_mse(nearest, feats, valid)
    return index, nearest, loss, norm


def _reference_backward(grad_nearest, grad_loss, feats, centers, valid, index, norm):
    """dcenters as the kernels compute it: the contributions of the frames assigned to each cluster,
    summed by a one-hot contraction (deterministic, no index_add)."""
    acc = accumulation_dtype(feats.dtype)
    contrib = torch.zeros(feats.shape, dtype=acc, device=feats.device)
    if grad_nearest is not None:
        contrib = contrib + grad_nearest.to(acc)
    if grad_loss is not None:
        diff = _gather(centers, index).to(acc) - feats.to(acc)
        contrib = contrib + torch.where(valid[..., None], 2 * grad_loss.to(acc) * norm * diff, 0)
    onehot = F.one_hot(index, centers.shape[0]).to(acc)  # (B, K, T)
    return torch.einsum("bkt,bkd->tkd", onehot, contrib).to(centers.dtype).contiguous()


# --------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------
def _shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _validate(feats, centers, valid) -> None:
    for name, x in (("feats", feats), ("centers", centers), ("valid", valid)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if feats.dim() != 3:
        raise ValueError(f"feats must be 3-D (B, K, D), got shape {_shape(feats)}")
    if centers.dim() != 3:
        raise ValueError(f"centers must be 3-D (T, K, D), got shape {_shape(centers)}")
    batch, categories, dim = feats.shape
    if centers.shape[1:] != feats.shape[1:]:
        raise ValueError(
            f"centers must have shape (T, K, D) = (T, {categories}, {dim}) to match feats "
            f"{_shape(feats)}, got {_shape(centers)}"
        )
    if valid.dim() != 2 or valid.shape != feats.shape[:2]:
        raise ValueError(
            f"valid must have shape (B, K) = {(batch, categories)} to match feats {_shape(feats)}, got {_shape(valid)}"
        )
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool tensor, got {valid.dtype} of shape {_shape(valid)}")
    if feats.numel() == 0 or centers.numel() == 0:
        raise ValueError(
            f"feats and centers must not be empty, got feats {_shape(feats)} and centers {_shape(centers)}"
        )
    for name, x in (("centers", centers), ("valid", valid)):
        if x.device != feats.device:
            raise ValueError(f"{name} must be on feats' device {feats.device}, got {x.device} (shape {_shape(x)})")
    for name, x in (("feats", feats), ("centers", centers)):
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype} of shape {_shape(x)}")
    if centers.dtype != feats.dtype and not autocasting(feats, centers):
        raise TypeError(
            f"centers must have feats' dtype {feats.dtype}, got {centers.dtype} (shape "
            f"{_shape(centers)}); under torch.autocast both are promoted to the wider one"
        )


def _check_finite(feats: torch.Tensor, centers: torch.Tensor) -> None:
    """``ValueError`` naming the input that holds NaN or infinite values (one device synchronisation)."""
    if bool(torch.isfinite(feats).all() & torch.isfinite(centers).all()):
        return
    for name, x in (("feats", feats), ("centers", centers)):
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise ValueError(
                f"{name} must be finite, got {bad} NaN or infinite values of {x.numel()} (shape {_shape(x)})"
            )


def compute_dtype(feats: torch.Tensor, centers: torch.Tensor) -> torch.dtype:
    """The dtype the kernels run in: the inputs', or the wider of the two where autocast promotes them."""
    return torch.promote_types(feats.dtype, centers.dtype)


# --------------------------------------------------------------------------------------------------
# Backend checks
# --------------------------------------------------------------------------------------------------
def _triton_reason(feats, centers) -> str | None:
    reason = triton_unavailable_reason(feats) or dtype_reason(compute_dtype(feats, centers))
    if reason is None and centers.shape[0] > MAX_TRITON_CLUSTERS:
        reason = f"{centers.shape[0]} clusters exceed the Triton kernels' {MAX_TRITON_CLUSTERS}"
    return reason


def _cuda_reason(feats, centers) -> str | None:
    return cuda_unavailable_reason(feats) or dtype_reason(compute_dtype(feats, centers))


def _checks(feats, centers) -> dict[str, BackendCheck]:
    return {
        "cuda": BackendCheck("cuda", _cuda_reason(feats, centers)),
        "triton": BackendCheck("triton", _triton_reason(feats, centers)),
        "reference": BackendCheck("reference", None),
    }


def _validated_checks(feats, centers, valid) -> dict[str, BackendCheck]:
    _validate(feats, centers, valid)
    return _checks(feats, centers)


can_run_cuda, can_run_triton, can_run_reference = backend_predicates(OP, _validated_checks)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gcc_assign_fwd_kernel(
        FEATS,
        CENTERS,
        VALID,
        INDEX,
        NEAREST,
        PARTIAL,
        COUNTER,
        LOSS,
        NORM,
        B,
        K,
        T,
        D,
        sf_b,
        sf_k,
        sf_d,
        sc_t,
        sc_k,
        sc_d,
        sv_b,
        sv_k,
        BLOCK_B: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """One program: frames ``BLOCK_B`` at a time of category ``j``. Writes index, nearest and its
        loss share (sum of the valid frames' minimum distances, their count) to ``PARTIAL``; the last
        program to finish reduces the shares in program order and writes the loss and the norm."""
        blocks_b = tl.cdiv(B, BLOCK_B)
        pid = tl.program_id(0)
        j = pid // blocks_b
        offs_b = (pid % blocks_b) * BLOCK_B + tl.arange(0, BLOCK_B)
        b_ok = offs_b < B
        offs_d = tl.arange(0, BLOCK_D)
        f_rows = FEATS + offs_b.to(tl.int64)[:, None] * sf_b + j.to(tl.int64) * sf_k
        c_row = CENTERS + j.to(tl.int64) * sc_k

        best = tl.full([BLOCK_B], float("inf"), tl.float32)
        best_i = tl.zeros([BLOCK_B], tl.int32)
        for i in range(T):
            dist = tl.zeros([BLOCK_B], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + offs_d
                f = tl.load(f_rows + d[None, :] * sf_d, mask=b_ok[:, None] & (d < D)[None, :], other=0.0)
                c = tl.load(c_row + i * sc_t + d * sc_d, mask=d < D, other=0.0)
                diff = f.to(tl.float32) - c.to(tl.float32)[None, :]
                dist += tl.sum(diff * diff, axis=1)
            closer = dist < best  # strict: the first of equal distances stays
            best = tl.where(closer, dist, best)
            best_i = tl.where(closer, i, best_i)

        tl.store(INDEX + offs_b.to(tl.int64) * K + j, best_i.to(tl.int64), mask=b_ok)
        out_rows = NEAREST + (offs_b.to(tl.int64)[:, None] * K + j) * D
        src_rows = c_row + best_i.to(tl.int64)[:, None] * sc_t
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            mask = b_ok[:, None] & (d < D)[None, :]
            tl.store(out_rows + d[None, :], tl.load(src_rows + d[None, :] * sc_d, mask=mask), mask=mask)

        v = tl.load(VALID + offs_b.to(tl.int64) * sv_b + j * sv_k, mask=b_ok, other=0) != 0
        programs = tl.num_programs(0)
        tl.store(PARTIAL + pid, tl.sum(tl.where(v, best, 0.0)))
        tl.store(PARTIAL + programs + pid, tl.sum(v.to(tl.float32)))
        tl.debug_barrier()  # the shares are stored before the ticket releases them
        ticket = tl.atomic_add(COUNTER, 1, sem="acq_rel")
        if ticket == programs - 1:
            total = tl.zeros([BLOCK_P], tl.float32)
            count = tl.zeros([BLOCK_P], tl.int32)
            for p0 in range(0, programs, BLOCK_P):
                p = p0 + tl.arange(0, BLOCK_P)
                total += tl.load(PARTIAL + p, mask=p < programs, other=0.0, cache_modifier=".cg")
                count += tl.load(PARTIAL + programs + p, mask=p < programs, other=0.0, cache_modifier=".cg").to(
                    tl.int32
                )
            n = tl.sum(count).to(tl.float32) * D
            norm = tl.where(n > 0, 1.0 / tl.maximum(n, 1.0), 0.0)
            tl.store(LOSS, tl.sum(total) * norm)
            tl.store(NORM, norm)
            tl.atomic_xchg(COUNTER, 0)  # ready for the next launch

    @triton.jit
    def _gcc_assign_bwd_kernel(
        FEATS,
        CENTERS,
        VALID,
        INDEX,
        GRAD_NEAREST,
        GRAD_LOSS,
        NORM,
        DCENTERS,
        B,
        K,
        T,
        D,
        sf_b,
        sf_k,
        sf_d,
        sc_t,
        sc_k,
        sc_d,
        sv_b,
        sv_k,
        sg_b,
        sg_k,
        sg_d,
        HAS_GRAD_NEAREST: tl.constexpr,
        HAS_GRAD_LOSS: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """One program: ``BLOCK_D`` features of every cluster of category ``j``.
        ``dcenters[i, j] = sum over b with index[b, j] == i, in order of b, of
        grad_nearest[b, j] + valid[b, j] * s * (centers[i, j] - feats[b, j])``, ``s = 2 grad_loss norm``."""
        blocks_d = tl.cdiv(D, BLOCK_D)
        pid = tl.program_id(0)
        j = pid // blocks_d
        d = (pid % blocks_d) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < D
        t = tl.arange(0, BLOCK_T)
        scale = 0.0
        if HAS_GRAD_LOSS:
            scale = 2.0 * tl.load(GRAD_LOSS).to(tl.float32) * tl.load(NORM)

        acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)  # sum of grad_nearest - w * feats per cluster
        weight = tl.zeros([BLOCK_T], tl.float32)  # sum of w per cluster
        for b0 in range(0, B, BLOCK_B):
            b = b0 + tl.arange(0, BLOCK_B)
            b_ok = b < B
            mask = b_ok[:, None] & d_ok[None, :]
            idx = tl.load(INDEX + b.to(tl.int64) * K + j, mask=b_ok, other=-1).to(tl.int32)
            onehot = (idx[None, :] == t[:, None]).to(tl.float32)  # (BLOCK_T, BLOCK_B)
            contrib = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
            if HAS_GRAD_NEAREST:
                g_ptrs = GRAD_NEAREST + b.to(tl.int64)[:, None] * sg_b + j * sg_k + d[None, :] * sg_d
                contrib += tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
            if HAS_GRAD_LOSS:
                v = tl.load(VALID + b.to(tl.int64) * sv_b + j * sv_k, mask=b_ok, other=0) != 0
                w = tl.where(v, scale, 0.0)
                f_ptrs = FEATS + b.to(tl.int64)[:, None] * sf_b + j * sf_k + d[None, :] * sf_d
                contrib -= w[:, None] * tl.load(f_ptrs, mask=mask, other=0.0).to(tl.float32)
                weight += tl.sum(onehot * w[None, :], axis=1)
            acc += tl.sum(onehot[:, :, None] * contrib[None, :, :], axis=1)

        t_ok = t < T
        c_ptrs = CENTERS + t.to(tl.int64)[:, None] * sc_t + j * sc_k + d[None, :] * sc_d
        mask = t_ok[:, None] & d_ok[None, :]
        grad = acc
        if HAS_GRAD_LOSS:
            grad += weight[:, None] * tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)
        out_ptrs = DCENTERS + (t.to(tl.int64)[:, None] * K + j) * D + d[None, :]
        tl.store(out_ptrs, grad.to(DCENTERS.dtype.element_ty), mask=mask)


def triton_blocks(batch: int, clusters: int, dim: int) -> dict:
    """Block sizes: forward ``(BLOCK_B, BLOCK_D)`` tiles of at most 4096 elements (a whole D up to
    512); backward ``(BLOCK_T, BLOCK_B, BLOCK_D)`` products of at most 8192 (more for many clusters),
    slices of at most 128 features so that a category's gradient spreads over several programs."""
    fwd_d = min(max(16, next_pow2(dim)), 512)
    bwd_t = next_pow2(clusters)
    bwd_d = min(max(16, next_pow2(dim)), 128, max(16, 2048 // bwd_t))
    return dict(
        fwd=dict(BLOCK_B=min(next_pow2(batch), 4096 // fwd_d, 16), BLOCK_D=fwd_d, BLOCK_P=256),
        bwd=dict(BLOCK_T=bwd_t, BLOCK_D=bwd_d, BLOCK_B=min(next_pow2(batch), max(1, 8192 // (bwd_t * bwd_d)))),
    )


_COUNTERS: dict = {}


def _ticket_counter(device: torch.device) -> torch.Tensor:
    """The forward's ticket counter for the current stream of ``device``: one int32, zero between
    launches (each launch's last program resets it), so a launch needs no memset. One per stream, so
    that launches on concurrent streams do not share it."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    counter = _COUNTERS.get(key)
    if counter is None:
        counter = _COUNTERS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


def _triton_forward(feats, centers, valid):
    batch, categories, dim = feats.shape
    clusters = centers.shape[0]
    blocks = triton_blocks(batch, clusters, dim)["fwd"]
    programs = categories * triton.cdiv(batch, blocks["BLOCK_B"])
    index = torch.empty((batch, categories), dtype=torch.int64, device=feats.device)
    nearest = torch.empty(feats.shape, dtype=centers.dtype, device=feats.device)
    loss = torch.empty((), dtype=torch.float32, device=feats.device)
    norm = torch.empty((), dtype=torch.float32, device=feats.device)
    shares = torch.empty(2 * programs, dtype=torch.float32, device=feats.device)
    _gcc_assign_fwd_kernel[(programs,)](
        feats,
        centers,
        valid,
        index,
        nearest,
        shares,
        _ticket_counter(feats.device),
        loss,
        norm,
        batch,
        categories,
        clusters,
        dim,
        *feats.stride(),
        *centers.stride(),
        *valid.stride(),
        **blocks,
        num_warps=4,
    )
    return index, nearest, loss, norm


def _triton_backward(grad_nearest, grad_loss, feats, centers, valid, index, norm):
    batch, categories, dim = feats.shape
    clusters = centers.shape[0]
    blocks = triton_blocks(batch, clusters, dim)["bwd"]
    dcenters = torch.empty(centers.shape, dtype=centers.dtype, device=centers.device)
    dummy = feats.new_empty(0)
    grad_strides = (0, 0, 0) if grad_nearest is None else grad_nearest.stride()
    _gcc_assign_bwd_kernel[(categories * triton.cdiv(dim, blocks["BLOCK_D"]),)](
        feats,
        centers,
        valid,
        index,
        dummy if grad_nearest is None else grad_nearest,
        dummy if grad_loss is None else grad_loss,
        norm,
        dcenters,
        batch,
        categories,
        clusters,
        dim,
        *feats.stride(),
        *centers.stride(),
        *valid.stride(),
        *grad_strides,
        HAS_GRAD_NEAREST=grad_nearest is not None,
        HAS_GRAD_LOSS=grad_loss is not None,
        **blocks,
        num_warps=4,
    )
    return dcenters


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile specifications (compile_check)
# --------------------------------------------------------------------------------------------------
SSLTM_SHAPE = dict(B=8, K=124, T=3, D=512)  # VSPW: 124 categories, 3 clusters, 512-d representations
_POINTERS_FWD = ("FEATS", "CENTERS", "VALID", "INDEX", "NEAREST", "PARTIAL", "COUNTER", "LOSS", "NORM")
_POINTERS_BWD = ("FEATS", "CENTERS", "VALID", "INDEX", "GRAD_NEAREST", "GRAD_LOSS", "NORM", "DCENTERS")
_FIXED_POINTER_TYPES = {
    "VALID": "i1",
    "INDEX": "i64",
    "PARTIAL": "fp32",
    "COUNTER": "i32",
    "LOSS": "fp32",
    "NORM": "fp32",
    "GRAD_LOSS": "fp32",
}


def launch_ints(batch: int, categories: int, clusters: int, dim: int) -> dict[str, int]:
    """The integer arguments of a launch on contiguous ``feats``, ``centers``, ``valid`` and
    ``grad_nearest`` of these sizes (stride 1 along D and K of valid becomes a constant)."""
    return dict(
        B=batch,
        K=categories,
        T=clusters,
        D=dim,
        sf_b=categories * dim,
        sf_k=dim,
        sf_d=1,
        sc_t=categories * dim,
        sc_k=dim,
        sc_d=1,
        sv_b=categories,
        sv_k=1,
        sg_b=categories * dim,
        sg_k=dim,
        sg_d=1,
    )


def triton_compile_specs(
    dtype: torch.dtype, batch: int, categories: int, clusters: int, dim: int, *, grad_nearest: bool = False
):
    """The forward and backward kernels as a launch on contiguous inputs of these sizes specialises them,
    for ``triton.compile`` ahead of time (see ``ssltm_kernels._triton_specs.kernel_spec``).
    ``grad_nearest``: the backward also takes the gradient of ``nearest`` (the loss's always)."""
    blocks = triton_blocks(batch, clusters, dim)
    ints = launch_ints(batch, categories, clusters, dim)
    for kernel, pointers, constexprs in (
        (_gcc_assign_fwd_kernel, _POINTERS_FWD, blocks["fwd"]),
        (
            _gcc_assign_bwd_kernel,
            _POINTERS_BWD,
            {**blocks["bwd"], "HAS_GRAD_NEAREST": grad_nearest, "HAS_GRAD_LOSS": True},
        ),
    ):
        types = {name: _FIXED_POINTER_TYPES.get(name, TYPE_NAMES[dtype]) for name in pointers}
        yield kernel_spec(kernel, constexprs, types, int_arg=ints.__getitem__, options={"num_warps": 4})


def _specs(dtype: torch.dtype, shape: tuple[int, int, int, int], grad_nearest: bool, arch: int):
    return list(triton_compile_specs(dtype, *shape, grad_nearest=grad_nearest))


def compile_configs(arch: int, config_set: str = "full") -> list[CompileConfig]:
    """``compile_check``'s configurations: SSLTM's launch (B=8, K=124, T=3, D=512; the loss's gradient
    only) in bf16 and fp32; ``full`` adds fp16, the gradient of ``nearest`` too, and odd sizes (D not a
    multiple of 16, one cluster, one frame)."""
    ssltm = tuple(SSLTM_SHAPE.values())
    representative = [(torch.bfloat16, ssltm, False), (torch.float32, ssltm, False)]
    cases = compile_cases(
        config_set,
        representative=representative,
        full=representative
        + [
            (torch.float16, ssltm, False),
            (torch.bfloat16, ssltm, True),
            (torch.float32, (3, 19, 1, 100), True),
            (torch.bfloat16, (1, 124, 5, 2048), True),
        ],
    )
    return [
        CompileConfig(
            f"gcc_assign {str(dtype).removeprefix('torch.')} B,K,T,D={shape}"
            + (" grad_nearest" if grad_nearest else ""),
            partial(_specs, dtype, shape, grad_nearest),
        )
        for dtype, shape, grad_nearest in cases
    ]


# --------------------------------------------------------------------------------------------------
# torch.library custom ops + autograd
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("ssltm::gcc_assign_fwd", mutates_args=())
def _gcc_assign_fwd(
    feats: torch.Tensor, centers: torch.Tensor, valid: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(nearest (B,K,D), loss, index (B,K) int64, norm)``: ``norm = 1 / (n_valid * D)`` (0 without a
    valid entry), the backward's scale; loss and norm 0-dim in the accumulation dtype. (The float
    outputs come first: ``opcheck`` adds up the outputs in order, which fails from an integer start.)"""
    _check_finite(feats, centers)  # here rather than in gcc_assign, so that compiled graphs check too
    if backend == "cuda":
        index, nearest, loss, norm = _C.gcc_assign_forward(feats, centers, valid)
    elif backend == "triton":
        with on_device(feats):
            index, nearest, loss, norm = _triton_forward(feats, centers, valid)
    else:
        index, nearest, loss, norm = _reference_forward(feats, centers, valid)
    return nearest, loss, index, norm


@_gcc_assign_fwd.register_fake
def _(feats, centers, valid, backend):
    acc = accumulation_dtype(feats.dtype)
    return (
        centers.new_empty(feats.shape),
        feats.new_empty((), dtype=acc),
        feats.new_empty(feats.shape[:2], dtype=torch.int64),
        feats.new_empty((), dtype=acc),
    )


@torch.library.custom_op("ssltm::gcc_assign_bwd", mutates_args=())
def _gcc_assign_bwd(
    grad_nearest: torch.Tensor | None,
    grad_loss: torch.Tensor | None,
    feats: torch.Tensor,
    centers: torch.Tensor,
    valid: torch.Tensor,
    index: torch.Tensor,
    norm: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    """``dcenters (T, K, D)`` in centers' dtype from the gradients of nearest and of the loss (either may
    be None)."""
    if backend == "cuda":
        return _C.gcc_assign_backward(grad_nearest, grad_loss, feats, centers, valid, index, norm)
    if backend == "triton":
        with on_device(feats):
            return _triton_backward(grad_nearest, grad_loss, feats, centers, valid, index, norm)
    return _reference_backward(grad_nearest, grad_loss, feats, centers, valid, index, norm)


@_gcc_assign_bwd.register_fake
def _(grad_nearest, grad_loss, feats, centers, valid, index, norm, backend):
    return centers.new_empty(centers.shape)


def _setup_context(ctx, inputs, output):
    feats, centers, valid, backend = inputs
    _, _, index, norm = output
    ctx.backend = backend
    ctx.save_for_backward(feats, centers, valid, index, norm)
    ctx.mark_non_differentiable(index, norm)
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: the kernel skips it


def _backward(ctx, grad_nearest, grad_loss, _grad_index, _grad_norm):
    if not ctx.needs_input_grad[1] or (grad_nearest is None and grad_loss is None):
        return None, None, None, None
    feats, centers, valid, index, norm = ctx.saved_tensors
    dcenters = _gcc_assign_bwd(grad_nearest, grad_loss, feats, centers, valid, index, norm, ctx.backend)
    return None, dcenters, None, None  # stop-gradient on feats


torch.library.register_autograd("ssltm::gcc_assign_fwd", _backward, setup_context=_setup_context)


# Under torch.autocast the forward promotes feats and centers to the wider of their dtypes (autocast's "promote"
# policy, as for cat or index_put): bf16 category features meet fp32 learnable centres in fp32, and the centres'
# gradient stays fp32. Both ops then run with autocast off (the reference backend's einsum would otherwise run in
# the autocast dtype in a backward under autocast).
register_autocast("ssltm::gcc_assign_fwd", activations=(0, 1), dtype=lambda args: compute_dtype(*args[:2]))
register_autocast("ssltm::gcc_assign_bwd")


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------
def gcc_assign(
    feats: torch.Tensor, centers: torch.Tensor, valid: torch.Tensor, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest global cluster of each category representation and the masked MSE (SSLTM Eq. 8, 9).

    Args:
        feats: ``(B, K, D)`` category representations of the query frames (no gradient reaches them).
        centers: ``(T, K, D)`` global category representations G, T clusters per category; feats' dtype
            (under ``torch.autocast`` the two are promoted to the wider dtype).
        valid: ``(B, K)`` bool, the categories present in each frame's label: the loss's entries.
        backend: ``"cuda"``, ``"triton"`` or ``"reference"``; default ``SSLTM_BACKEND`` or the first that
            can run (cuda -> triton -> reference). The kernels take fp32, fp16 and bf16 (fp32 accumulation).

    Raises:
        ValueError: ``feats`` or ``centers`` holds a NaN or infinite value, in every backend, before any work
            (one device synchronisation per call).

    Returns:
        ``(index, nearest, loss)``: ``index (B, K)`` int64, the argmin over the T clusters of category j
        of the L2 distance to ``feats[b, j]`` (lowest index on ties), for every (b, j), valid or not;
        ``nearest (B, K, D)`` in centers' dtype, ``centers[index[b, j], j]``, differentiable in centers;
        ``loss``: 0-dim float32 (float64 for float64 inputs), the sum over valid (b, j) and the D
        features of ``(nearest - feats)**2`` divided by ``n_valid * D``, 0 with a zero gradient when no
        entry is valid.
    """
    _validate(feats, centers, valid)
    # the custom op runs the reference too: its finite check and stop-gradient hold in every backend
    return dispatch(OP, _checks(feats, centers), backend, fused=partial(_fused, feats, centers, valid), reference=None)


def _fused(feats, centers, valid, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    nearest, loss, index, _ = torch.ops.ssltm.gcc_assign_fwd(feats, centers, valid, backend)
    return index, nearest, loss
