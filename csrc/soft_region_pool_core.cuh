// OCR soft region pooling (OCRNet SpatialGather_Module), per-thread logic shared by the CUDA kernels
// (soft_region_pool.cu) and their CPU emulation (soft_region_pool_cpu.cpp).
//
// out[b, k, c] = sum_n P[b, k, n] * feats[b, c, n], P = softmax over the N = H*W positions n of
// scale * logits[b, k, n]. The probabilities are evaluated as exp(|scale| * (sign(scale) * logit - M) - log S)
// from two floats per (b, k) (the "stats"): M, the maximum of sign(scale) * logit, and log S, the log of
// the softmax denominator. Taking the difference before the scaling keeps the accuracy of the logits for
// large scaled values (logits 1e4, scale 100).
//
// Kernels (each a fixed sequence of the phase functions below, separated by __syncthreads() on the GPU
// and by loops over the threads of a block in the emulation):
//   forward : stats_kernel (one warp per (b, k): M and log S by an online pass over the positions),
//             pool_kernel (a tile of classes x channels over a range of positions, partial sums of
//             P * feats), and, when the positions are split, reduce_kernel (the splits' sums in order);
//   backward: delta_kernel (one warp per (b, k): Delta = sum_c dOut * Out), bwd_kernel (a tile of
//             positions with every class: dP = dOut F over channel chunks, dfeats = dOut^T P per chunk,
//             then dlogits = scale * P * (dP - Delta)). Every output element has one writer, sums run in
//             a fixed order: the gradients are deterministic.
// Accumulation is in float for float/half/bfloat16 (double for the emulation's double inputs). The header
// depends on nothing but the C++ standard library and compiles with both nvcc and the host compiler.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define SRP_HD __host__ __device__ __forceinline__
#else
#define SRP_HD inline
#endif

namespace ssltm {
namespace srp {

constexpr int kThreads = 256;  // every kernel
constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = kThreads / kWarp;  // stats and delta kernels: one (b, k) row per warp

// pool_kernel: a block sums kPoolRows classes x kPoolCols channels, kPoolSteps positions per step;
// thread t owns a kPoolThreadRows x kPoolThreadCols tile of the accumulators.
constexpr int kPoolRows = 32;
constexpr int kPoolCols = 64;
constexpr int kPoolSteps = 32;
constexpr int kPoolThreadRows = 2;
constexpr int kPoolThreadCols = 4;
static_assert((kPoolRows / kPoolThreadRows) * (kPoolCols / kPoolThreadCols) == kThreads, "pool tile / threads");

// bwd_kernel: a block takes kBwdPositions positions with every class (at most kMaxClasses), kBwdChannels
// channels per step; thread t owns position t % kBwdPositions and the classes t / kBwdPositions + i * kBwdGroups.
constexpr int kBwdPositions = 16;
constexpr int kBwdChannels = 32;
constexpr int kBwdGroups = kThreads / kBwdPositions;
constexpr int kMaxClasses = 256;
constexpr int kBwdClassesPerThread = kMaxClasses / kBwdGroups;
static_assert(kBwdChannels % kBwdGroups == 0, "every thread writes the same number of dfeats channels");

// Element strides of a (B, X, N) view of a (B, X, H, W) tensor (X: classes or channels, N = H*W).
struct Strides3 {
  int64_t b, x, n;
};

// Type-erased problem filled by the bindings; make_args gives the typed view the kernels take.
struct Problem {
  int B, K, C, N;
  int splits, split_len;  // forward: positions [s * split_len, (s + 1) * split_len) per split
  int dtype;              // at::ScalarType of the inputs
  int device_index;
  double sign, magnitude, scale;
  const void* logits;
  Strides3 sl;
  const void* feats;
  Strides3 sf;
  void* out;      // (B, K, C) contiguous, the inputs' dtype
  void* out_acc;  // (B, K, C) contiguous, accumulation type: the forward writes it for 16-bit inputs, the
                  // backward's Delta reads it instead of out when given
  void* stats;    // (B, K, 2) accumulation type: M, log S
  void* partial;  // (B, splits, K, C) accumulation type, when splits > 1
  const void* grad_out;
  Strides3 sdo;
  void* delta;  // (B, K) accumulation type
  void* dlogits;
  Strides3 sdl;
  void* dfeats;
  Strides3 sdf;
};

template <typename scalar_t, typename acc_t>
struct Args {
  int B, K, C, N, splits, split_len;
  acc_t sign, magnitude, scale;
  const scalar_t* logits;
  Strides3 sl;
  const scalar_t* feats;
  Strides3 sf;
  scalar_t* out;
  acc_t* out_acc;
  acc_t* stats;
  acc_t* partial;
  const scalar_t* grad_out;
  Strides3 sdo;
  acc_t* delta;
  scalar_t* dlogits;
  Strides3 sdl;
  scalar_t* dfeats;
  Strides3 sdf;
};

template <typename scalar_t, typename acc_t>
inline Args<scalar_t, acc_t> make_args(const Problem& p) {
  Args<scalar_t, acc_t> a{};
  a.B = p.B;
  a.K = p.K;
  a.C = p.C;
  a.N = p.N;
  a.splits = p.splits;
  a.split_len = p.split_len;
  a.sign = acc_t(p.sign);
  a.magnitude = acc_t(p.magnitude);
  a.scale = acc_t(p.scale);
  a.logits = static_cast<const scalar_t*>(p.logits);
  a.sl = p.sl;
  a.feats = static_cast<const scalar_t*>(p.feats);
  a.sf = p.sf;
  a.out = static_cast<scalar_t*>(p.out);
  a.out_acc = static_cast<acc_t*>(p.out_acc);
  a.stats = static_cast<acc_t*>(p.stats);
  a.partial = static_cast<acc_t*>(p.partial);
  a.grad_out = static_cast<const scalar_t*>(p.grad_out);
  a.sdo = p.sdo;
  a.delta = static_cast<acc_t*>(p.delta);
  a.dlogits = static_cast<scalar_t*>(p.dlogits);
  a.sdl = p.sdl;
  a.dfeats = static_cast<scalar_t*>(p.dfeats);
  a.sdf = p.sdf;
  return a;
}

// ------------------------------------------------------------------------------------------------
// Planning (host)
// ------------------------------------------------------------------------------------------------
SRP_HD int ceil_div(int64_t a, int64_t b) { return int((a + b - 1) / b); }

inline int pool_blocks(int B, int K, int C) { return B * ceil_div(K, kPoolRows) * ceil_div(C, kPoolCols); }

// How many position splits the forward takes: about four pool blocks per multiprocessor, at least four
// steps of positions per split. requested > 0 forces it (bounded by the positions).
inline int plan_splits(int B, int K, int C, int N, int sm_count, int requested) {
  const int most = ceil_div(N, kPoolSteps);
  if (requested > 0) return requested < most ? requested : most;
  const int want = ceil_div(int64_t(4) * sm_count, pool_blocks(B, K, C));
  const int cap = N / (4 * kPoolSteps) > 1 ? N / (4 * kPoolSteps) : 1;
  return want < 1 ? 1 : (want < cap ? want : cap);
}

// Positions per split (a multiple of kPoolSteps) for `splits` splits; then ceil_div(N, split_len) splits,
// none empty.
inline int plan_split_len(int N, int splits) {
  return ceil_div(ceil_div(N, splits), kPoolSteps) * kPoolSteps;
}

// Dynamic shared memory of bwd_kernel, bytes: probabilities (K x kBwdPositions), a chunk of dOut
// (K x kBwdChannels) and of feats (kBwdChannels x kBwdPositions).
template <typename acc_t>
inline int bwd_shared_bytes(int K) {
  return int(sizeof(acc_t)) * (K * kBwdPositions + K * kBwdChannels + kBwdChannels * kBwdPositions);
}

// ------------------------------------------------------------------------------------------------
// Scalar helpers (exact expf/logf on the device: the build does not use --use_fast_math)
// ------------------------------------------------------------------------------------------------
SRP_HD float acc_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}
SRP_HD double acc_exp(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}
SRP_HD float acc_log(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return std::log(x);
#endif
}
SRP_HD double acc_log(double x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  return std::log(x);
#endif
}
template <typename T>
SRP_HD T lowest() {
  return -std::numeric_limits<T>::max();  // not -inf: exp(|scale| * (lowest - M)) is 0, or 1 for scale 0
}

// The probability of class k at position n of batch item b (the stats must be written).
template <typename scalar_t, typename acc_t>
SRP_HD acc_t probability(const Args<scalar_t, acc_t>& a, int64_t b, int k, int n) {
  const acc_t x = a.sign * acc_t(a.logits[b * a.sl.b + k * a.sl.x + n * a.sl.n]);
  const acc_t* st = a.stats + (b * a.K + k) * 2;
  return acc_exp(a.magnitude * (x - st[0]) - st[1]);
}

// ------------------------------------------------------------------------------------------------
// Forward, stats_kernel: warp w of block blk takes row (b, k) = blk * kWarpsPerBlock + w; lane l the
// positions l, l + 32, ...; the lanes' (max, sum) pairs combine in shuffle order (offsets 16, 8, ..., 1).
// ------------------------------------------------------------------------------------------------
template <typename acc_t>
struct RunningSum {  // the running maximum M of sign * logit and the sum of exp(|scale| * (x - M))
  acc_t m, total;
};

template <typename scalar_t, typename acc_t>
SRP_HD RunningSum<acc_t> stats_lane(const Args<scalar_t, acc_t>& a, int64_t row, int lane) {
  RunningSum<acc_t> r{lowest<acc_t>(), acc_t(0)};
  if (row >= int64_t(a.B) * a.K) return r;
  const int64_t b = row / a.K;
  const scalar_t* x = a.logits + b * a.sl.b + (row % a.K) * a.sl.x;
  for (int n = lane; n < a.N; n += kWarp) {
    const acc_t v = a.sign * acc_t(x[n * a.sl.n]);
    if (v > r.m) {
      r.total = r.total * acc_exp(a.magnitude * (r.m - v)) + acc_t(1);
      r.m = v;
    } else {
      r.total += acc_exp(a.magnitude * (v - r.m));
    }
  }
  return r;
}

template <typename acc_t>
SRP_HD RunningSum<acc_t> combine(const RunningSum<acc_t>& r, const RunningSum<acc_t>& o, acc_t magnitude) {
  const acc_t m = r.m > o.m ? r.m : o.m;
  return {m, r.total * acc_exp(magnitude * (r.m - m)) + o.total * acc_exp(magnitude * (o.m - m))};
}

template <typename scalar_t, typename acc_t>
SRP_HD void stats_write(const Args<scalar_t, acc_t>& a, int64_t row, const RunningSum<acc_t>& r) {
  if (row >= int64_t(a.B) * a.K) return;
  a.stats[row * 2] = r.m;
  a.stats[row * 2 + 1] = acc_log(r.total);
}

// ------------------------------------------------------------------------------------------------
// Forward, pool_kernel: block blk = ((b * splits + s) * k_tiles + kt) * c_tiles + ct sums classes
// kt * kPoolRows... over the positions of split s, kPoolSteps at a time: pool_stage fills the shared
// tiles, pool_accumulate adds their product to the thread's accumulators, pool_write stores them.
// ------------------------------------------------------------------------------------------------
struct PoolBlock {
  int64_t b;
  int split, k0, c0, n_begin, n_end;
};

template <typename scalar_t, typename acc_t>
SRP_HD PoolBlock pool_block(const Args<scalar_t, acc_t>& a, int64_t blk) {
  const int c_tiles = ceil_div(a.C, kPoolCols), k_tiles = ceil_div(a.K, kPoolRows);
  PoolBlock p{};
  p.c0 = int(blk % c_tiles) * kPoolCols;
  p.k0 = int((blk / c_tiles) % k_tiles) * kPoolRows;
  p.split = int((blk / (int64_t(c_tiles) * k_tiles)) % a.splits);
  p.b = blk / (int64_t(c_tiles) * k_tiles * a.splits);
  p.n_begin = p.split * a.split_len;
  const int64_t end = int64_t(p.n_begin) + a.split_len;
  p.n_end = end < a.N ? int(end) : a.N;
  return p;
}

template <typename acc_t>
struct PoolTiles {  // shared memory of pool_kernel
  acc_t p[kPoolRows][kPoolSteps];  // probabilities of the block's classes at the step's positions
  acc_t f[kPoolSteps][kPoolCols];  // the step's feature vectors, the block's channels
};

template <typename scalar_t, typename acc_t>
SRP_HD void pool_stage(const Args<scalar_t, acc_t>& a, const PoolBlock& blk, int n0, int tid, PoolTiles<acc_t>& t) {
  for (int i = tid; i < kPoolRows * kPoolSteps; i += kThreads) {
    const int r = i / kPoolSteps, j = i % kPoolSteps;
    const int k = blk.k0 + r, n = n0 + j;
    t.p[r][j] = (k < a.K && n < blk.n_end) ? probability(a, blk.b, k, n) : acc_t(0);
  }
  // consecutive threads read consecutive addresses: along the positions, or along the channels of a
  // channels-last tensor
  const bool positions_inner = a.sf.n == 1;
  for (int i = tid; i < kPoolSteps * kPoolCols; i += kThreads) {
    const int j = positions_inner ? i % kPoolSteps : i / kPoolCols;
    const int c = positions_inner ? i / kPoolSteps : i % kPoolCols;
    const int n = n0 + j, ch = blk.c0 + c;
    t.f[j][c] = (ch < a.C && n < blk.n_end) ? acc_t(a.feats[blk.b * a.sf.b + ch * a.sf.x + n * a.sf.n]) : acc_t(0);
  }
}

template <typename acc_t>
struct PoolThread {
  acc_t acc[kPoolThreadRows][kPoolThreadCols];
};

template <typename acc_t>
SRP_HD void pool_init(PoolThread<acc_t>& th) {
  for (int r = 0; r < kPoolThreadRows; ++r)
    for (int q = 0; q < kPoolThreadCols; ++q) th.acc[r][q] = acc_t(0);
}

template <typename acc_t>
SRP_HD void pool_accumulate(int tid, const PoolTiles<acc_t>& t, PoolThread<acc_t>& th) {
  const int r0 = (tid / (kPoolCols / kPoolThreadCols)) * kPoolThreadRows;
  const int q0 = (tid % (kPoolCols / kPoolThreadCols)) * kPoolThreadCols;
  for (int j = 0; j < kPoolSteps; ++j) {
    for (int r = 0; r < kPoolThreadRows; ++r) {
      const acc_t p = t.p[r0 + r][j];
      for (int q = 0; q < kPoolThreadCols; ++q) th.acc[r][q] += p * t.f[j][q0 + q];
    }
  }
}

// One split: the output; several: the split's partial sums for reduce_kernel.
template <typename scalar_t, typename acc_t>
SRP_HD void pool_write(const Args<scalar_t, acc_t>& a, const PoolBlock& blk, int tid, const PoolThread<acc_t>& th) {
  const int r0 = (tid / (kPoolCols / kPoolThreadCols)) * kPoolThreadRows;
  const int q0 = (tid % (kPoolCols / kPoolThreadCols)) * kPoolThreadCols;
  for (int r = 0; r < kPoolThreadRows; ++r) {
    const int k = blk.k0 + r0 + r;
    if (k >= a.K) continue;
    for (int q = 0; q < kPoolThreadCols; ++q) {
      const int c = blk.c0 + q0 + q;
      if (c >= a.C) continue;
      if (a.splits == 1) {
        const int64_t i = (blk.b * a.K + k) * a.C + c;
        a.out[i] = scalar_t(th.acc[r][q]);
        if (a.out_acc) a.out_acc[i] = th.acc[r][q];
      } else {
        a.partial[((blk.b * a.splits + blk.split) * a.K + k) * a.C + c] = th.acc[r][q];
      }
    }
  }
}

// reduce_kernel: element i of the (B, K, C) output sums its splits in order.
template <typename scalar_t, typename acc_t>
SRP_HD void reduce_element(const Args<scalar_t, acc_t>& a, int64_t i) {
  if (i >= int64_t(a.B) * a.K * a.C) return;
  const int64_t per_item = int64_t(a.K) * a.C;
  const int64_t b = i / per_item, kc = i % per_item;
  acc_t sum = acc_t(0);
  for (int s = 0; s < a.splits; ++s) sum += a.partial[(b * a.splits + s) * per_item + kc];
  a.out[i] = scalar_t(sum);
  if (a.out_acc) a.out_acc[i] = sum;
}

// ------------------------------------------------------------------------------------------------
// Backward, delta_kernel: warp w of block blk takes row (b, k); lane l the channels l, l + 32, ...;
// the lanes' sums add in shuffle order.
// ------------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
SRP_HD acc_t delta_lane(const Args<scalar_t, acc_t>& a, int64_t row, int lane) {
  acc_t sum = acc_t(0);
  if (row >= int64_t(a.B) * a.K) return sum;
  const scalar_t* g = a.grad_out + (row / a.K) * a.sdo.b + (row % a.K) * a.sdo.x;
  for (int c = lane; c < a.C; c += kWarp) {
    const acc_t o = a.out_acc ? a.out_acc[row * a.C + c] : acc_t(a.out[row * a.C + c]);
    sum += acc_t(g[c * a.sdo.n]) * o;
  }
  return sum;
}

template <typename scalar_t, typename acc_t>
SRP_HD void delta_write(const Args<scalar_t, acc_t>& a, int64_t row, acc_t sum) {
  if (row < int64_t(a.B) * a.K) a.delta[row] = sum;
}

// ------------------------------------------------------------------------------------------------
// Backward, bwd_kernel: block blk = b * n_tiles + nt takes positions nt * kBwdPositions... of batch item
// b with every class. bwd_stage_probs fills the probabilities; per chunk of kBwdChannels channels,
// bwd_stage_chunk fills dOut and feats, bwd_accumulate_dp adds dOut F to the thread's dP, and
// bwd_write_dfeats writes dOut^T P of the chunk; bwd_write_dlogits ends the block.
// ------------------------------------------------------------------------------------------------
struct BwdBlock {
  int64_t b;
  int n0;
};

template <typename scalar_t, typename acc_t>
SRP_HD BwdBlock bwd_block(const Args<scalar_t, acc_t>& a, int64_t blk) {
  const int n_tiles = ceil_div(a.N, kBwdPositions);
  return BwdBlock{blk / n_tiles, int(blk % n_tiles) * kBwdPositions};
}

template <typename acc_t>
struct BwdShared {  // views of the dynamic shared memory (bwd_shared_bytes)
  acc_t* p;   // [K][kBwdPositions]
  acc_t* dout;  // [K][kBwdChannels]
  acc_t* f;   // [kBwdChannels][kBwdPositions]
};

template <typename acc_t>
SRP_HD BwdShared<acc_t> bwd_shared(acc_t* smem, int K) {
  return BwdShared<acc_t>{smem, smem + K * kBwdPositions, smem + K * kBwdPositions + K * kBwdChannels};
}

template <typename scalar_t, typename acc_t>
SRP_HD void bwd_stage_probs(const Args<scalar_t, acc_t>& a, const BwdBlock& blk, int tid, const BwdShared<acc_t>& s) {
  for (int i = tid; i < a.K * kBwdPositions; i += kThreads) {
    const int k = i / kBwdPositions, n = blk.n0 + i % kBwdPositions;
    s.p[i] = n < a.N ? probability(a, blk.b, k, n) : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t>
SRP_HD void bwd_stage_chunk(const Args<scalar_t, acc_t>& a, const BwdBlock& blk, int c0, int tid,
                            const BwdShared<acc_t>& s) {
  for (int i = tid; i < a.K * kBwdChannels; i += kThreads) {
    const int k = i / kBwdChannels, c = c0 + i % kBwdChannels;
    s.dout[i] = c < a.C ? acc_t(a.grad_out[blk.b * a.sdo.b + k * a.sdo.x + c * a.sdo.n]) : acc_t(0);
  }
  const bool positions_inner = a.sf.n == 1;
  for (int i = tid; i < kBwdChannels * kBwdPositions; i += kThreads) {
    const int j = positions_inner ? i % kBwdPositions : i / kBwdChannels;
    const int cc = positions_inner ? i / kBwdPositions : i % kBwdChannels;
    const int n = blk.n0 + j, c = c0 + cc;
    s.f[cc * kBwdPositions + j] =
        (c < a.C && n < a.N) ? acc_t(a.feats[blk.b * a.sf.b + c * a.sf.x + n * a.sf.n]) : acc_t(0);
  }
}

template <typename acc_t>
struct BwdThread {
  acc_t dp[kBwdClassesPerThread];  // dP of classes tid / kBwdPositions + i * kBwdGroups at the thread's position
};

template <typename acc_t>
SRP_HD void bwd_init(BwdThread<acc_t>& th) {
  for (int i = 0; i < kBwdClassesPerThread; ++i) th.dp[i] = acc_t(0);
}

template <typename acc_t>
SRP_HD void bwd_accumulate_dp(int K, int tid, const BwdShared<acc_t>& s, BwdThread<acc_t>& th) {
  const int j = tid % kBwdPositions, g = tid / kBwdPositions;
  for (int cc = 0; cc < kBwdChannels; ++cc) {
    const acc_t f = s.f[cc * kBwdPositions + j];
    for (int i = 0; i < kBwdClassesPerThread; ++i) {
      const int k = g + i * kBwdGroups;
      if (k < K) th.dp[i] += s.dout[k * kBwdChannels + cc] * f;
    }
  }
}

template <typename scalar_t, typename acc_t>
SRP_HD void bwd_write_dfeats(const Args<scalar_t, acc_t>& a, const BwdBlock& blk, int c0, int tid,
                             const BwdShared<acc_t>& s) {
  const int j = tid % kBwdPositions, n = blk.n0 + j;
  for (int cc = tid / kBwdPositions; cc < kBwdChannels; cc += kBwdGroups) {
    const int c = c0 + cc;
    acc_t sum = acc_t(0);
    for (int k = 0; k < a.K; ++k) sum += s.dout[k * kBwdChannels + cc] * s.p[k * kBwdPositions + j];
    if (c < a.C && n < a.N) a.dfeats[blk.b * a.sdf.b + c * a.sdf.x + n * a.sdf.n] = scalar_t(sum);
  }
}

template <typename scalar_t, typename acc_t>
SRP_HD void bwd_write_dlogits(const Args<scalar_t, acc_t>& a, const BwdBlock& blk, int tid,
                              const BwdShared<acc_t>& s, const BwdThread<acc_t>& th) {
  const int j = tid % kBwdPositions, g = tid / kBwdPositions, n = blk.n0 + j;
  if (n >= a.N) return;
  for (int i = 0; i < kBwdClassesPerThread; ++i) {
    const int k = g + i * kBwdGroups;
    if (k >= a.K) break;
    const acc_t ds = s.p[k * kBwdPositions + j] * (th.dp[i] - a.delta[blk.b * a.K + k]);
    a.dlogits[blk.b * a.sdl.b + k * a.sdl.x + n * a.sdl.n] = scalar_t(a.scale * ds);
  }
}

}  // namespace srp
}  // namespace ssltm
