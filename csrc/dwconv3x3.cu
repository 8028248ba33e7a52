// CUDA kernels of the fused depthwise 3x3 convolution (dwconv3x3_core.cuh holds their per-thread code,
// which dwconv3x3_cpu.cpp runs on the CPU) and their launchers.
//
// Only light headers here (compile time): no ATen/ATen.h, no torch/extension.h.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "dwconv3x3_core.cuh"

namespace ssltm {
namespace dwc {
namespace {

// grid-stride loops over int64 element indices
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) forward_kernel(const Args<scalar_t, float> a, int64_t total) {
  for (int64_t e = blockIdx.x * int64_t(kThreads) + threadIdx.x; e < total; e += int64_t(gridDim.x) * kThreads) {
    forward_element(a, e);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) dx_kernel(const Args<scalar_t, float> a, const scalar_t* g,
                                                       int64_t total) {
  for (int64_t e = blockIdx.x * int64_t(kThreads) + threadIdx.x; e < total; e += int64_t(gridDim.x) * kThreads) {
    dx_element(a, g, e);
  }
}

// grid (channel chunks, groups)
template <typename scalar_t>
__global__ void __launch_bounds__(kPartialThreads) partial_kernel(const Args<scalar_t, float> a) {
  __shared__ float shared[kPartialLanes * kPartialRows * kPartialChannels];
  const int tid = threadIdx.x;
  float sums[kPartialRows];
  partial_thread(a, blockIdx.x, blockIdx.y, tid, sums);
  for (int r = 0; r < kPartialRows; ++r) shared[shared_index(tid, r)] = sums[r];
  __syncthreads();
  if (tid < kPartialChannels) partial_store(a, blockIdx.x, blockIdx.y, tid, shared);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) final_sum_kernel(const Args<scalar_t, float> a, int64_t total) {
  const int64_t e = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if (e < total) final_sum_element(a, e);
}

unsigned int blocks_for(int64_t total) {
  return static_cast<unsigned int>(std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 24));
}

#define SSLTM_DW_DISPATCH(dtype, name, ...)                                                 \
  AT_DISPATCH_SWITCH(static_cast<at::ScalarType>(dtype), name,                              \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)                   \
                         AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)                \
                             AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

}  // namespace

void forward_cuda(const Problem& p) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(p.device_index));
  const int64_t total = p.s.frames * p.s.H * p.s.W * p.s.C;
  SSLTM_DW_DISPATCH(p.dtype, "dwconv3x3_forward", [&] {
    forward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(make_args<scalar_t, float>(p), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void backward_cuda(const Problem& p) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(p.device_index));
  const int64_t total = p.s.frames * p.s.H * p.s.W * p.s.C;
  const dim3 partial_grid(static_cast<unsigned int>((p.s.C + kPartialChannels - 1) / kPartialChannels),
                          static_cast<unsigned int>(p.groups));
  SSLTM_DW_DISPATCH(p.dtype, "dwconv3x3_backward", [&] {
    const Args<scalar_t, float> a = make_args<scalar_t, float>(p);
    partial_kernel<scalar_t><<<partial_grid, kPartialThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dx_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(a, p.gelu ? a.g : a.dout, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t sums = int64_t(kPartialRows) * p.s.C;
    final_sum_kernel<scalar_t><<<blocks_for(sums), kThreads, 0, stream>>>(a, sums);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

int multiprocessors_cuda(int device_index) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device_index));
  return count;
}

}  // namespace dwc
}  // namespace ssltm
