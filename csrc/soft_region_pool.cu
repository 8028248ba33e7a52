// CUDA kernels of the OCR soft region pooling (forward, backward) and their launchers.
//
// Each kernel is a fixed sequence of the phase functions of soft_region_pool_core.cuh separated by
// __syncthreads(); soft_region_pool_cpu.cpp runs the same sequence on the CPU, which is how this code is
// tested without a GPU. The only device-only code is the warp-shuffle reductions (whose order the
// emulation replays) and the launchers. The kernels run on CUDA cores with float accumulation.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "soft_region_pool_core.cuh"

namespace ssltm {
namespace srp {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

// grid ceil(B * K / kWarpsPerBlock): one warp per (b, k)
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) stats_kernel(const Args<scalar_t, float> a) {
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  RunningSum<float> r = stats_lane(a, row, threadIdx.x % kWarp);
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const RunningSum<float> o{__shfl_down_sync(kFullMask, r.m, offset), __shfl_down_sync(kFullMask, r.total, offset)};
    r = combine(r, o, a.magnitude);
  }
  if (threadIdx.x % kWarp == 0) stats_write(a, row, r);
}

// grid B * splits * k_tiles * c_tiles (pool_block)
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) pool_kernel(const Args<scalar_t, float> a) {
  __shared__ PoolTiles<float> tiles;
  const PoolBlock blk = pool_block(a, blockIdx.x);
  PoolThread<float> th;
  pool_init(th);
  for (int n0 = blk.n_begin; n0 < blk.n_end; n0 += kPoolSteps) {
    __syncthreads();
    pool_stage(a, blk, n0, threadIdx.x, tiles);
    __syncthreads();
    pool_accumulate(threadIdx.x, tiles, th);
  }
  pool_write(a, blk, threadIdx.x, th);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) reduce_kernel(const Args<scalar_t, float> a) {
  reduce_element(a, int64_t(blockIdx.x) * kThreads + threadIdx.x);
}

// grid ceil(B * K / kWarpsPerBlock): one warp per (b, k)
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) delta_kernel(const Args<scalar_t, float> a) {
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  float sum = delta_lane(a, row, threadIdx.x % kWarp);
  for (int offset = kWarp / 2; offset > 0; offset /= 2) sum += __shfl_down_sync(kFullMask, sum, offset);
  if (threadIdx.x % kWarp == 0) delta_write(a, row, sum);
}

// grid B * ceil(N / kBwdPositions), bwd_shared_bytes<float>(K) of dynamic shared memory
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) bwd_kernel(const Args<scalar_t, float> a) {
  extern __shared__ float smem[];
  const BwdShared<float> s = bwd_shared(smem, a.K);
  const BwdBlock blk = bwd_block(a, blockIdx.x);
  const int tid = threadIdx.x;
  BwdThread<float> th;
  bwd_init(th);
  bwd_stage_probs(a, blk, tid, s);
  for (int c0 = 0; c0 < a.C; c0 += kBwdChannels) {
    __syncthreads();
    bwd_stage_chunk(a, blk, c0, tid, s);
    __syncthreads();
    if (a.dlogits) bwd_accumulate_dp(a.K, tid, s, th);
    if (a.dfeats) bwd_write_dfeats(a, blk, c0, tid, s);
  }
  if (a.dlogits) bwd_write_dlogits(a, blk, tid, s, th);
}

unsigned blocks_for(int64_t count, int per_block) { return unsigned((count + per_block - 1) / per_block); }

#define SSLTM_SRP_DISPATCH_TYPES(dtype, name, ...)                                    \
  AT_DISPATCH_SWITCH(dtype, name, AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                                      AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                                          AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

}  // namespace

int sm_count_cuda(int device_index) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device_index));
  return count;
}

void forward_cuda(const Problem& p) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(p.device_index));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(p.device_index));
  SSLTM_SRP_DISPATCH_TYPES(static_cast<at::ScalarType>(p.dtype), "soft_region_pool_forward_cuda", [&] {
    const auto a = make_args<scalar_t, float>(p);
    const int64_t rows = int64_t(p.B) * p.K;
    stats_kernel<scalar_t><<<blocks_for(rows, kWarpsPerBlock), kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    pool_kernel<scalar_t><<<unsigned(int64_t(pool_blocks(p.B, p.K, p.C)) * p.splits), kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (p.splits > 1) {
      reduce_kernel<scalar_t><<<blocks_for(rows * p.C, kThreads), kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void backward_cuda(const Problem& p) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(p.device_index));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(p.device_index));
  SSLTM_SRP_DISPATCH_TYPES(static_cast<at::ScalarType>(p.dtype), "soft_region_pool_backward_cuda", [&] {
    const auto a = make_args<scalar_t, float>(p);
    if (p.dlogits) {
      delta_kernel<scalar_t><<<blocks_for(int64_t(p.B) * p.K, kWarpsPerBlock), kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int bytes = bwd_shared_bytes<float>(p.K);
    const auto kernel = bwd_kernel<scalar_t>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    kernel<<<unsigned(int64_t(p.B) * ceil_div(p.N, kBwdPositions)), kThreads, bytes, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace srp
}  // namespace ssltm
