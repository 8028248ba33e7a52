// GCC nearest-cluster assignment (SSLTM Eq. 8, 9): per-thread logic shared by the CUDA kernels
// (gcc_assign.cu) and their CPU emulation (gcc_assign_cpu.cpp).
//
// A kernel is a fixed sequence of the phase functions below, separated by __syncthreads(); the CPU
// emulation runs the same sequence with loops standing in for the threads of a block (and replays the
// order of the forward's warp-shuffle sums), so the CPU tests exercise this very code. The header
// depends on nothing but the C++ standard library and compiles with both nvcc and the host compiler.
//
// Semantics (ssltm_kernels/ops/gcc_assign.py): for every frame b and category j, the cluster t of
// centers[:, j] at the least squared L2 distance from feats[b, j] (strictly less replaces, so ties keep
// the lowest index), nearest[b, j] = centers[t, j], and loss = sum over valid (b, j) of that distance
// / (n_valid * D), 0 without a valid entry. The backward gives dcenters only (stop-gradient on feats).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SSLTM_GCC_HD __host__ __device__ __forceinline__
#else
#define SSLTM_GCC_HD inline
#endif

namespace ssltm {
namespace gcc {

// Forward: a block takes kRows frames of one category, one warp of kLanes threads per frame.
constexpr int kLanes = 32;
constexpr int kRows = 8;
constexpr int kFwdThreads = kLanes * kRows;
// Backward: a block takes kBwdThreads features of every cluster of one category, one per thread.
constexpr int kBwdThreads = 128;

struct Sizes {
  int64_t B, K, T, D;
};

struct Strides3 {  // element strides of a 3-D tensor
  int64_t s0, s1, s2;
};

// Everything the bindings hand to the launchers and to the emulation (type-erased; `dtype` is the
// at::ScalarType of feats and centers).
struct Problem {
  Sizes n;
  int dtype;
  int device_index;
  const void* feats;
  const void* centers;
  const bool* valid;
  Strides3 sf, sc;
  int64_t sv_b, sv_k;
  // forward
  int64_t* index;
  void* nearest;
  float* shares;  // 2 * fwd_blocks: each block's sum of minimum distances, then its count of valid frames
  unsigned int* counter;  // CUDA: the ticket counter, zero between launches; the emulation keeps its own
  float* loss;
  float* norm;
  // backward
  const int64_t* index_in;
  const void* grad_nearest;  // nullptr: no gradient of nearest
  Strides3 sg;
  const float* grad_loss;  // nullptr: no gradient of the loss
  const float* norm_in;
  void* dcenters;
};

template <typename scalar_t>
struct Args {
  Sizes n;
  const scalar_t* feats;
  const scalar_t* centers;
  const bool* valid;
  Strides3 sf, sc;
  int64_t sv_b, sv_k;
  int64_t* index;
  scalar_t* nearest;
  float* shares;
  unsigned int* counter;
  float* loss;
  float* norm;
  const int64_t* index_in;
  const scalar_t* grad_nearest;
  Strides3 sg;
  const float* grad_loss;
  const float* norm_in;
  scalar_t* dcenters;
};

template <typename scalar_t>
inline Args<scalar_t> make_args(const Problem& p) {
  return Args<scalar_t>{p.n, static_cast<const scalar_t*>(p.feats), static_cast<const scalar_t*>(p.centers),
                        p.valid, p.sf, p.sc, p.sv_b, p.sv_k, p.index, static_cast<scalar_t*>(p.nearest),
                        p.shares, p.counter, p.loss, p.norm, p.index_in,
                        static_cast<const scalar_t*>(p.grad_nearest), p.sg, p.grad_loss, p.norm_in,
                        static_cast<scalar_t*>(p.dcenters)};
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------
SSLTM_GCC_HD int64_t fwd_blocks_per_category(const Sizes& n) { return (n.B + kRows - 1) / kRows; }
SSLTM_GCC_HD int64_t fwd_blocks(const Sizes& n) { return n.K * fwd_blocks_per_category(n); }

struct Row {  // the frame b of category j that a warp of a forward block takes
  int64_t b, j;
  int slot;  // the warp within the block
  bool active;
};

SSLTM_GCC_HD Row fwd_row(const Sizes& n, int64_t block, int tid) {
  const int64_t per = fwd_blocks_per_category(n);
  Row r;
  r.slot = tid / kLanes;
  r.j = block / per;
  r.b = (block % per) * kRows + r.slot;
  r.active = r.b < n.B;
  return r;
}

// The lane's share of the squared distance between feats[b, j] and centers[t, j]: features lane,
// lane + kLanes, ... in order, accumulated in fp32.
template <typename scalar_t>
SSLTM_GCC_HD float lane_distance(const Args<scalar_t>& a, const Row& r, int64_t t, int lane) {
  const scalar_t* f = a.feats + r.b * a.sf.s0 + r.j * a.sf.s1;
  const scalar_t* c = a.centers + t * a.sc.s0 + r.j * a.sc.s1;
  float s = 0.0f;
  for (int64_t d = lane; d < a.n.D; d += kLanes) {
    const float diff = float(f[d * a.sf.s2]) - float(c[d * a.sc.s2]);
    s += diff * diff;
  }
  return s;
}

struct Best {
  float dist;
  int64_t index;
};

SSLTM_GCC_HD Best no_cluster() { return Best{INFINITY, 0}; }

// Cluster t at distance `dist` replaces the best so far only when strictly closer: ties keep the lowest.
SSLTM_GCC_HD void keep_closer(Best& best, float dist, int64_t t) {
  if (dist < best.dist) {
    best.dist = dist;
    best.index = t;
  }
}

// nearest[b, j] = centers[index, j], the lane's features (contiguous output)
template <typename scalar_t>
SSLTM_GCC_HD void write_nearest(const Args<scalar_t>& a, const Row& r, int64_t index, int lane) {
  const scalar_t* c = a.centers + index * a.sc.s0 + r.j * a.sc.s1;
  scalar_t* out = a.nearest + (r.b * a.n.K + r.j) * a.n.D;
  for (int64_t d = lane; d < a.n.D; d += kLanes) out[d] = c[d * a.sc.s2];
}

// Lane 0 of a row: the index, and the row's loss share (its distance, when valid) for the block sum.
template <typename scalar_t>
SSLTM_GCC_HD void store_row(const Args<scalar_t>& a, const Row& r, const Best& best, float* row_loss,
                            int* row_count) {
  const bool valid = r.active && a.valid[r.b * a.sv_b + r.j * a.sv_k];
  if (r.active) a.index[r.b * a.n.K + r.j] = best.index;
  row_loss[r.slot] = valid ? best.dist : 0.0f;
  row_count[r.slot] = valid ? 1 : 0;
}

// Thread 0: the block's share, its rows added in order.
template <typename scalar_t>
SSLTM_GCC_HD void store_block_share(const Args<scalar_t>& a, int64_t block, const float* row_loss,
                                    const int* row_count) {
  float loss = 0.0f;
  int count = 0;
  for (int r = 0; r < kRows; ++r) {
    loss += row_loss[r];
    count += row_count[r];
  }
  a.shares[block] = loss;
  a.shares[fwd_blocks(a.n) + block] = float(count);
}

// Another block's share, read past the (incoherent) L1 cache on the GPU.
SSLTM_GCC_HD float load_share(const float* p) {
#if defined(__CUDA_ARCH__)
  return __ldcg(p);
#else
  return *p;
#endif
}

// The last block, thread tid: the shares of blocks tid, tid + nthreads, ... in order.
template <typename scalar_t>
SSLTM_GCC_HD void thread_shares(const Args<scalar_t>& a, int tid, int nthreads, float* red_loss, int* red_count) {
  const int64_t blocks = fwd_blocks(a.n);
  float loss = 0.0f;
  int count = 0;
  for (int64_t p = tid; p < blocks; p += nthreads) {
    loss += load_share(a.shares + p);
    count += int(load_share(a.shares + blocks + p));
  }
  red_loss[tid] = loss;
  red_count[tid] = count;
}

// One step of the last block's tree sum: thread tid < stride adds the entry stride above.
SSLTM_GCC_HD void tree_step(float* red_loss, int* red_count, int tid, int stride) {
  red_loss[tid] += red_loss[tid + stride];
  red_count[tid] += red_count[tid + stride];
}

// Thread 0 of the last block: loss = total / (n_valid * D), norm = 1 / (n_valid * D), 0 without a valid entry.
template <typename scalar_t>
SSLTM_GCC_HD void finish_loss(const Args<scalar_t>& a, float total, int count) {
  const float n = float(count) * float(a.n.D);
  const float norm = count > 0 ? 1.0f / n : 0.0f;
  *a.loss = total * norm;
  *a.norm = norm;
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------
SSLTM_GCC_HD int64_t bwd_blocks_per_category(const Sizes& n) { return (n.D + kBwdThreads - 1) / kBwdThreads; }
SSLTM_GCC_HD int64_t bwd_blocks(const Sizes& n) { return n.K * bwd_blocks_per_category(n); }

// Feature d of category j (the block's), every cluster t:
// dcenters[t, j, d] = sum over b with index[b, j] == t, in order of b, of
// grad_nearest[b, j, d] + valid[b, j] * 2 * grad_loss * norm * (centers[t, j, d] - feats[b, j, d]).
template <typename scalar_t>
SSLTM_GCC_HD void bwd_thread(const Args<scalar_t>& a, int64_t block, int tid) {
  const int64_t per = bwd_blocks_per_category(a.n);
  const int64_t j = block / per;
  const int64_t d = (block % per) * kBwdThreads + tid;
  if (d >= a.n.D) return;
  const float scale = a.grad_loss ? 2.0f * *a.grad_loss * *a.norm_in : 0.0f;
  for (int64_t t = 0; t < a.n.T; ++t) {
    const float c = float(a.centers[t * a.sc.s0 + j * a.sc.s1 + d * a.sc.s2]);
    float acc = 0.0f;
    for (int64_t b = 0; b < a.n.B; ++b) {
      if (a.index_in[b * a.n.K + j] != t) continue;
      float g = 0.0f;
      if (a.grad_nearest) g += float(a.grad_nearest[b * a.sg.s0 + j * a.sg.s1 + d * a.sg.s2]);
      if (a.grad_loss && a.valid[b * a.sv_b + j * a.sv_k]) {
        g += scale * (c - float(a.feats[b * a.sf.s0 + j * a.sf.s1 + d * a.sf.s2]));
      }
      acc += g;
    }
    a.dcenters[(t * a.n.K + j) * a.n.D + d] = scalar_t(acc);
  }
}

}  // namespace gcc
}  // namespace ssltm
