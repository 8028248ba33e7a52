// CPU emulation of the CUDA kernels in gcc_assign.cu.
//
// Not a second implementation: every block runs the same phase functions of gcc_assign_core.cuh in
// the same order as the kernels, with loops over the threads of a block between what are
// __syncthreads() barriers on the GPU, and a row's warp-shuffle sum replayed in the kernel's order.
// Blocks run one after another, so the last one takes the last ticket, as some block does on the GPU.
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "gcc_assign_core.cuh"

namespace ssltm {
namespace gcc {
namespace {

// __shfl_xor_sync sum of forward_kernel: at each offset every lane adds the lane offset away
void warp_sum(float (&lanes)[kLanes]) {
  for (int offset = kLanes / 2; offset > 0; offset /= 2) {
    float next[kLanes];
    for (int lane = 0; lane < kLanes; ++lane) next[lane] = lanes[lane] + lanes[lane ^ offset];
    for (int lane = 0; lane < kLanes; ++lane) lanes[lane] = next[lane];
  }
}

template <typename scalar_t>
void emulate_forward(const Args<scalar_t>& a) {
  const int64_t blocks = fwd_blocks(a.n);
  unsigned int counter = 0;
  for (int64_t block = 0; block < blocks; ++block) {
    float row_loss[kRows];
    int row_count[kRows];
    for (int slot = 0; slot < kRows; ++slot) {  // the block's warps
      const Row r = fwd_row(a.n, block, slot * kLanes);
      Best best = no_cluster();
      if (r.active) {
        for (int64_t t = 0; t < a.n.T; ++t) {
          float lanes[kLanes];
          for (int lane = 0; lane < kLanes; ++lane) lanes[lane] = lane_distance(a, r, t, lane);
          warp_sum(lanes);
          keep_closer(best, lanes[0], t);
        }
        for (int lane = 0; lane < kLanes; ++lane) write_nearest(a, r, best.index, lane);
      }
      store_row(a, r, best, row_loss, row_count);
    }
    store_block_share(a, block, row_loss, row_count);
    if (counter++ != unsigned(blocks - 1)) continue;
    float red_loss[kFwdThreads];
    int red_count[kFwdThreads];
    for (int tid = 0; tid < kFwdThreads; ++tid) thread_shares(a, tid, kFwdThreads, red_loss, red_count);
    for (int stride = kFwdThreads / 2; stride > 0; stride /= 2) {
      for (int tid = 0; tid < stride; ++tid) tree_step(red_loss, red_count, tid, stride);
    }
    finish_loss(a, red_loss[0], red_count[0]);
  }
}

template <typename scalar_t>
void emulate_backward(const Args<scalar_t>& a) {
  for (int64_t block = 0; block < bwd_blocks(a.n); ++block) {
    for (int tid = 0; tid < kBwdThreads; ++tid) bwd_thread(a, block, tid);
  }
}

// the kernels' types: float, half and bfloat16 (float accumulation)
#define SSLTM_GCC_DISPATCH_TYPES(dtype, name, ...)                                        \
  AT_DISPATCH_SWITCH(dtype, name, AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                                      AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                                          AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

}  // namespace

void forward_cpu(const Problem& p) {
  SSLTM_GCC_DISPATCH_TYPES(static_cast<at::ScalarType>(p.dtype), "gcc_assign_forward_cpu",
                           [&] { emulate_forward(make_args<scalar_t>(p)); });
}

void backward_cpu(const Problem& p) {
  SSLTM_GCC_DISPATCH_TYPES(static_cast<at::ScalarType>(p.dtype), "gcc_assign_backward_cpu",
                           [&] { emulate_backward(make_args<scalar_t>(p)); });
}

}  // namespace gcc
}  // namespace ssltm
