// CUDA kernels of the GCC nearest-cluster assignment (forward, backward) and their launchers.
//
// The kernels are thin: each is a fixed sequence of the phase functions in gcc_assign_core.cuh
// separated by __syncthreads(). gcc_assign_cpu.cpp runs the same sequence on the CPU. Device-only
// here: the warp-shuffle sum of a row's distance (whose order the emulation replays), the ticket of
// the forward's last block (an integer atomic, reset by that block), and the launchers.
//
// Only light headers here (compile time): no ATen/ATen.h, no torch/extension.h.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "gcc_assign_core.cuh"

namespace ssltm {
namespace gcc {
namespace {

// grid fwd_blocks(n): block = kRows frames of one category, a warp per frame. Every block stores its
// loss share; the block that takes the last ticket adds them all in a fixed order (no float atomics).
template <typename scalar_t>
__global__ void __launch_bounds__(kFwdThreads) forward_kernel(const Args<scalar_t> a) {
  __shared__ float row_loss[kRows];
  __shared__ int row_count[kRows];
  __shared__ float red_loss[kFwdThreads];
  __shared__ int red_count[kFwdThreads];
  __shared__ bool last;
  const int tid = threadIdx.x, lane = tid % kLanes;
  const int64_t block = blockIdx.x;
  const Row r = fwd_row(a.n, block, tid);
  Best best = no_cluster();
  if (r.active) {  // uniform across the warp: a warp is one frame
    for (int64_t t = 0; t < a.n.T; ++t) {
      float s = lane_distance(a, r, t, lane);
      for (int offset = kLanes / 2; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
      keep_closer(best, s, t);
    }
    write_nearest(a, r, best.index, lane);
  }
  if (lane == 0) store_row(a, r, best, row_loss, row_count);
  __syncthreads();
  if (tid == 0) {
    store_block_share(a, block, row_loss, row_count);
    __threadfence();  // the share is visible to every block before the ticket is taken
    last = atomicAdd(a.counter, 1u) == unsigned(fwd_blocks(a.n) - 1);
  }
  __syncthreads();
  if (!last) return;  // uniform across the block
  __threadfence();
  thread_shares(a, tid, kFwdThreads, red_loss, red_count);
  for (int stride = kFwdThreads / 2; stride > 0; stride /= 2) {
    __syncthreads();
    if (tid < stride) tree_step(red_loss, red_count, tid, stride);
  }
  if (tid == 0) {
    finish_loss(a, red_loss[0], red_count[0]);
    atomicExch(a.counter, 0u);  // zero again for the next launch on this stream
  }
}

// grid bwd_blocks(n): block = kBwdThreads features of one category, every cluster
template <typename scalar_t>
__global__ void __launch_bounds__(kBwdThreads) backward_kernel(const Args<scalar_t> a) {
  bwd_thread(a, blockIdx.x, threadIdx.x);
}

#define SSLTM_GCC_DISPATCH_TYPES(dtype, name, ...)                                        \
  AT_DISPATCH_SWITCH(dtype, name, AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                                      AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                                          AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

}  // namespace

void forward_cuda(const Problem& p) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(p.device_index));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(p.device_index));
  SSLTM_GCC_DISPATCH_TYPES(static_cast<at::ScalarType>(p.dtype), "gcc_assign_forward_cuda", [&] {
    forward_kernel<scalar_t><<<unsigned(fwd_blocks(p.n)), kFwdThreads, 0, stream>>>(make_args<scalar_t>(p));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void backward_cuda(const Problem& p) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(p.device_index));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(p.device_index));
  SSLTM_GCC_DISPATCH_TYPES(static_cast<at::ScalarType>(p.dtype), "gcc_assign_backward_cuda", [&] {
    backward_kernel<scalar_t><<<unsigned(bwd_blocks(p.n)), kBwdThreads, 0, stream>>>(make_args<scalar_t>(p));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace gcc
}  // namespace ssltm
