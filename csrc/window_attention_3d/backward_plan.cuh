// Fused 3D window attention: how the backward runs on a device (kernel family, chunk rows, window
// groups), which family the forward and the backward take, and the fixed-order reductions of the
// dk/dv blocks' group partials into the bias-table and pad-row gradients. Part of
// window_attention_3d_core.cuh.
#pragma once

#include <cstdint>

#include "cuda_cores.cuh"
#include "tensor_cores.cuh"

namespace ssltm {
namespace wa3d {

// ------------------------------------------------------------------------------------------------
// Backward plan (host code: the bindings plan with the device's limits, or the emulation's)
// ------------------------------------------------------------------------------------------------
struct DeviceLimits {
  int smem_limit;     // shared memory a block may opt in to, bytes
  int sm_count;       // multiprocessors
  bool tensor_cores;  // the tensor-core backward is compiled for (and runs on) the device for the dtype
};

// Shared memory and multiprocessors that the emulation assumes (an H100/H200's opt-in limit, 227 KB;
// few SMs, so that the test shapes get several window groups of several windows).
constexpr DeviceLimits kEmulatedDevice{227 * 1024, 4, true};

// Static shared memory of a dkv_kernel block (its tile).
inline int dkv_tile_bytes(int hd, int acc_bytes) {
  return SSLTM_DISPATCH_HEAD_DIM(hd, [&] {
    return acc_bytes == 8 ? int(sizeof(Tile<HD, double>)) : int(sizeof(Tile<HD, float>));
  });
}
static_assert(sizeof(Tile<kMaxHeadDim, float>) + kMaxWindowTokens * sizeof(float) <= 64 * 1024,
              "a dkv_kernel block must fit one key's column of dS sums next to its tile in sm_75's 64 KB");

// Blocks of 128 threads that one multiprocessor can hold at most (2048 threads).
constexpr int kMaxBlocksPerSm = 2048 / kThreads;

// Kernels and window groups of the backward. dkv_rows = 0 means that no block fits the shared memory.
//
// Groups: enough dk/dv blocks to give every multiprocessor as many blocks as its shared memory holds
// (one wave; each block then runs its group's windows in turn), but at most as many that the dS sums,
// groups * heads * N * N fp32, stay within half the bytes of q. Without a table or pad gradient there
// is nothing to sum and every window is its own group.
// At the stride-4 shape of SSLTM (B = 2, T = 4, H = W = 120, 1 head, head_dim 32, window 4x7x7:
// 648 windows of 196 tokens, q 7.4 MB in bf16) on an H100 (132 SMs, 227 KB): tensor-core dk/dv
// blocks of 32 keys (7 per group, 154 KB of shared memory each, one per SM) give 18 groups of 36
// windows, 2.8 MB of dS sums (0.38x q) and 32 KB of pad sums. Before: 324 groups, 50 MB of dS sums
// (6.8x q) zero-filled and read-modify-written per window, 16 MB of pad sums, a 150 KB group sum.
inline BackwardPlan plan_backward(const Geometry& g, InputType t, const DeviceLimits& dev, bool table_grad,
                                  bool pad_grad, int64_t forced_groups) {
  BackwardPlan plan{};
  const int acc_bytes = t == InputType::kFloat64 ? 8 : 4;
  const int in_bytes = t == InputType::kFloat64 ? 8 : t == InputType::kFloat32 ? 4 : 2;
  plan.tensor_cores = dev.tensor_cores && tensor_core_min_arch(t) > 0 &&
                      backward_on_tensor_cores(g.N, g.hd, dev.smem_limit);
  int block_bytes;
  if (plan.tensor_cores) {
    SSLTM_DISPATCH_HEAD_DIM(g.hd, [&] {
      plan.dq_rows = bwd_tc_rows<HD, TcStorage>(g.N, dev.smem_limit, false);
      plan.dkv_rows = bwd_tc_rows<HD, TcStorage>(g.N, dev.smem_limit, table_grad);
      plan.dkv_smem = BwdTcLayout<HD, TcStorage>(g.N, plan.dkv_rows, table_grad).bytes;
    });
    block_bytes = plan.dkv_smem;
  } else {
    const int tile_bytes = dkv_tile_bytes(g.hd, acc_bytes);
    plan.dkv_rows = kThreads;
    if (table_grad) {
      // each key's column of dS sums takes N entries: as many keys as fit, in whole warps where possible
      int keys = (dev.smem_limit - tile_bytes) / (g.N * acc_bytes);
      if (keys > kThreads) {
        keys = kThreads;
      } else if (keys > 32) {
        keys = keys / 32 * 32;
      }
      plan.dkv_rows = keys > 0 ? keys : 0;
    }
    plan.dkv_smem = table_grad ? g.N * plan.dkv_rows * acc_bytes : 0;
    block_bytes = tile_bytes + plan.dkv_smem;
  }
  if (plan.dkv_rows == 0) return plan;
  plan.key_chunks = (g.N + plan.dkv_rows - 1) / plan.dkv_rows;
  int64_t groups = g.nwin;
  if (forced_groups > 0 && (table_grad || pad_grad)) {
    groups = forced_groups;
  } else if (table_grad || pad_grad) {
    int per_sm = dev.smem_limit / block_bytes;
    per_sm = per_sm < 1 ? 1 : per_sm > kMaxBlocksPerSm ? kMaxBlocksPerSm : per_sm;
    groups = int64_t(dev.sm_count) * per_sm / (int64_t(g.nh) * plan.key_chunks);
    if (table_grad) {
      const int64_t q_bytes = int64_t(g.B) * g.T * g.H * g.W * g.nh * g.hd * in_bytes;
      const int64_t cap = q_bytes / 2 / (int64_t(g.nh) * g.N * g.N * acc_bytes);
      if (groups > cap) groups = cap;
    }
  }
  if (groups > g.nwin) groups = g.nwin;
  if (groups < 1) groups = 1;
  plan.group_size = int((g.nwin + groups - 1) / groups);
  plan.groups = (g.nwin + plan.group_size - 1) / plan.group_size;
  return plan;
}

// Kernel families (tensor cores or not) of the forward and the backward for a device with smem_limit
// bytes of opt-in shared memory per block and compute capability arch (10 * major + minor). The CUDA
// launchers decide the same way, with the kernels' compiled architecture in place of arch.
struct KernelFamilies {
  bool forward_tensor_cores, backward_tensor_cores;
};

inline KernelFamilies kernel_families(InputType t, int N, int hd, int smem_limit, int arch) {
  const int min_arch = tensor_core_min_arch(t);
  const bool wmma = min_arch > 0 && arch >= min_arch;
  return {wmma && forward_on_tensor_cores(N, hd, smem_limit), wmma && backward_on_tensor_cores(N, hd, smem_limit)};
}

// ------------------------------------------------------------------------------------------------
// Gradients of the bias table and the pad rows from the group partials (fixed-order reductions)
// ------------------------------------------------------------------------------------------------
constexpr int kTableLanes = 32;  // threads (a warp) per table entry

// Lane `lane`'s share of the gradient of table[idx, head]: over queries n = lane, lane + kTableLanes,
// ..., the dS sums of groups 0, 1, ... at (n, m), m being the key whose bias coordinates are
// c(n) - delta(idx), if it exists. The lanes' shares are then added in a fixed tree order
// (table_grad_kernel's warp shuffles, replayed by the emulation).
template <typename acc_t>
SSLTM_HD acc_t table_grad_lane(const Geometry& g, int groups, const acc_t* wpart, int idx, int head, int lane) {
  const int dt = idx / g.key_t - (g.ft - 1);
  const int dh = (idx / g.key_h) % (2 * g.fh - 1) - (g.fh - 1);
  const int dw = idx % g.key_h - (g.fw - 1);
  const int64_t slice = int64_t(g.N) * g.N;
  const int64_t group_stride = int64_t(g.nh) * slice;
  const acc_t* w = wpart + head * slice;
  acc_t s = 0;
  for (int n = lane; n < g.N; n += kTableLanes) {
    const int ct = n / (g.bh * g.bw) - dt;
    const int ch = (n / g.bw) % g.bh - dh;
    const int cw = n % g.bw - dw;
    if (ct < 0 || ch < 0 || cw < 0 || ct >= g.bt || ch >= g.bh || cw >= g.bw) continue;
    const int m = (ct * g.bh + ch) * g.bw + cw;
    if (m >= g.N) continue;
    for (int grp = 0; grp < groups; ++grp) s += w[grp * group_stride + int64_t(n) * g.N + m];
  }
  return s;
}

// Gradient of pad[head, d]: sum over groups, then over a group's dk/dv blocks, of the
// (groups, nh, key_chunks, hd) partials.
template <typename acc_t>
SSLTM_HD acc_t pad_grad_elem(const Geometry& g, const BackwardPlan& plan, const acc_t* part, int head, int d) {
  acc_t s = 0;
  for (int grp = 0; grp < plan.groups; ++grp) {
    const acc_t* p = part + ((int64_t(grp) * g.nh + head) * plan.key_chunks) * g.hd + d;
    for (int c = 0; c < plan.key_chunks; ++c) s += p[int64_t(c) * g.hd];
  }
  return s;
}
}  // namespace wa3d
}  // namespace ssltm
