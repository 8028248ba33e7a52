// CPU emulation of the CUDA kernels in soft_region_pool.cu.
//
// Not a second implementation: every block runs the same phase functions of soft_region_pool_core.cuh
// in the same order as the kernels, with loops over the threads of a block between what are
// __syncthreads() barriers on the GPU, and the warp-shuffle reductions replayed in the kernels' order.
// Blocks run one after another. The accumulation type is float for float/half/bfloat16 inputs (as on
// the GPU) and double for double inputs (a precise check of the index arithmetic).
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <vector>

#include "soft_region_pool_core.cuh"

namespace ssltm {
namespace srp {
namespace {

template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// __shfl_down_sync(v, offset) then combine, for offsets 16, 8, 4, 2, 1: lane l takes lane l + offset's
// value; lane 0 ends with the result.
template <typename T, typename Combine>
T warp_reduce(T* lanes, Combine combine_lanes) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    for (int lane = 0; lane < offset; ++lane) lanes[lane] = combine_lanes(lanes[lane], lanes[lane + offset]);
  }
  return lanes[0];
}

// stats_kernel of the .cu
template <typename scalar_t, typename acc_t>
void emulate_stats(const Args<scalar_t, acc_t>& a) {
  RunningSum<acc_t> lanes[kWarp];
  for (int64_t row = 0; row < int64_t(a.B) * a.K; ++row) {
    for (int lane = 0; lane < kWarp; ++lane) lanes[lane] = stats_lane(a, row, lane);
    stats_write(a, row, warp_reduce(lanes, [&](const RunningSum<acc_t>& r, const RunningSum<acc_t>& o) {
      return combine(r, o, a.magnitude);
    }));
  }
}

// pool_kernel and reduce_kernel of the .cu
template <typename scalar_t, typename acc_t>
void emulate_pool(const Args<scalar_t, acc_t>& a) {
  auto tiles = std::make_unique<PoolTiles<acc_t>>();
  std::vector<PoolThread<acc_t>> th(kThreads);
  const int64_t blocks = int64_t(pool_blocks(a.B, a.K, a.C)) * a.splits;
  for (int64_t b = 0; b < blocks; ++b) {
    const PoolBlock blk = pool_block(a, b);
    for (int tid = 0; tid < kThreads; ++tid) pool_init(th[tid]);
    for (int n0 = blk.n_begin; n0 < blk.n_end; n0 += kPoolSteps) {
      // shared memory keeps what the previous step left; NaN makes a read of an unstaged element visible
      std::fill_n(&tiles->p[0][0], kPoolRows * kPoolSteps, std::numeric_limits<acc_t>::quiet_NaN());
      std::fill_n(&tiles->f[0][0], kPoolSteps * kPoolCols, std::numeric_limits<acc_t>::quiet_NaN());
      for (int tid = 0; tid < kThreads; ++tid) pool_stage(a, blk, n0, tid, *tiles);
      for (int tid = 0; tid < kThreads; ++tid) pool_accumulate(tid, *tiles, th[tid]);
    }
    for (int tid = 0; tid < kThreads; ++tid) pool_write(a, blk, tid, th[tid]);
  }
  if (a.splits > 1) {
    for (int64_t i = 0; i < int64_t(a.B) * a.K * a.C; ++i) reduce_element(a, i);
  }
}

// delta_kernel of the .cu
template <typename scalar_t, typename acc_t>
void emulate_delta(const Args<scalar_t, acc_t>& a) {
  acc_t lanes[kWarp];
  for (int64_t row = 0; row < int64_t(a.B) * a.K; ++row) {
    for (int lane = 0; lane < kWarp; ++lane) lanes[lane] = delta_lane(a, row, lane);
    delta_write(a, row, warp_reduce(lanes, [](acc_t x, acc_t y) { return x + y; }));
  }
}

// bwd_kernel of the .cu
template <typename scalar_t, typename acc_t>
void emulate_bwd(const Args<scalar_t, acc_t>& a) {
  std::vector<acc_t> smem(size_t(bwd_shared_bytes<acc_t>(a.K)) / sizeof(acc_t));
  const BwdShared<acc_t> s = bwd_shared(smem.data(), a.K);
  std::vector<BwdThread<acc_t>> th(kThreads);
  const int64_t blocks = int64_t(a.B) * ceil_div(a.N, kBwdPositions);
  for (int64_t b = 0; b < blocks; ++b) {
    std::fill(smem.begin(), smem.end(), std::numeric_limits<acc_t>::quiet_NaN());
    const BwdBlock blk = bwd_block(a, b);
    for (int tid = 0; tid < kThreads; ++tid) bwd_init(th[tid]);
    for (int tid = 0; tid < kThreads; ++tid) bwd_stage_probs(a, blk, tid, s);
    for (int c0 = 0; c0 < a.C; c0 += kBwdChannels) {
      for (int tid = 0; tid < kThreads; ++tid) bwd_stage_chunk(a, blk, c0, tid, s);
      for (int tid = 0; tid < kThreads; ++tid) {
        if (a.dlogits) bwd_accumulate_dp(a.K, tid, s, th[tid]);
        if (a.dfeats) bwd_write_dfeats(a, blk, c0, tid, s);
      }
    }
    if (a.dlogits) {
      for (int tid = 0; tid < kThreads; ++tid) bwd_write_dlogits(a, blk, tid, s, th[tid]);
    }
  }
}

}  // namespace

void forward_cpu(const Problem& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16,
                                  static_cast<at::ScalarType>(p.dtype), "soft_region_pool_forward_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const auto a = make_args<scalar_t, acc_t>(p);
    emulate_stats(a);
    emulate_pool(a);
  });
}

void backward_cpu(const Problem& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16,
                                  static_cast<at::ScalarType>(p.dtype), "soft_region_pool_backward_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const auto a = make_args<scalar_t, acc_t>(p);
    if (a.dlogits) emulate_delta(a);
    emulate_bwd(a);
  });
}

}  // namespace srp
}  // namespace ssltm
