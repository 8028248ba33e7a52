// CUDA kernels of the fused 3D window attention (forward, backward) and their launchers.
//
// The kernels are thin: each is a fixed sequence of the phase functions in
// window_attention_3d_core.cuh separated by __syncthreads(). window_attention_3d_cpu.cpp runs the
// same sequence on the CPU, which is how this code is unit-tested without a GPU. The only device-only
// code is tile_product (WMMA tensor-core matrix products on shared-memory tiles), the warp-shuffle sum
// of table_grad_kernel (whose order the emulation replays) and the launchers.
//
// Only light headers here (compile time): no ATen/ATen.h, no torch/extension.h.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <type_traits>

#include "window_attention_3d_core.cuh"

namespace ssltm {
namespace wa3d {
namespace {

// grid (nwin, nh, ceil(N / kThreads)); Pass is ForwardPass (writes out, lse) or DqPass (writes dq, delta)
template <int HD, typename scalar_t, template <int, typename> class Pass>
__global__ void __launch_bounds__(kThreads) query_rows_kernel(const Args<scalar_t, float> a) {
  using TileT = Tile<HD, float>;
  using P = Pass<HD, float>;
  __shared__ TileT tile;
  const int win = blockIdx.x, head = blockIdx.y, tid = threadIdx.x;
  const int n = blockIdx.z * kThreads + tid;
  const WinPos wp = window_pos(a.g, win);
  const float* am = amask_window(a, win);
  typename P::Thread th;
  P::init(a, wp, head, n, th);
  for (int k0 = 0; k0 < a.g.N; k0 += TileT::R) {
    __syncthreads();
    if (tid < TileT::R) stage_kv_meta(a, wp, head, k0, tid, tile);
    __syncthreads();
    stage_kv_rows(a, head, k0, tid, kThreads, tile);
    __syncthreads();
    P::tile(a, head, am, n, k0, tile, th);
  }
  P::finish(a, head, th);
}

// CUDA's 16-bit types for the WMMA fragments (same bits as c10's), and the first architecture
// (__CUDA_ARCH__) with WMMA for the type
template <typename scalar_t>
struct WmmaType;
template <>
struct WmmaType<c10::Half> {
  using type = __half;
  static constexpr int kMinArch = 10 * tensor_core_min_arch(InputType::kFloat16);
};
template <>
struct WmmaType<c10::BFloat16> {
  using type = __nv_bfloat16;
  static constexpr int kMinArch = 10 * tensor_core_min_arch(InputType::kBFloat16);
};

#ifdef __CUDA_ARCH__
constexpr int kCompiledArch = __CUDA_ARCH__;
#else
constexpr int kCompiledArch = 0;  // the host pass generates no device code
#endif

// TileProduct on tensor cores: warp w computes output tiles w, w + kTcWarps, ... with fp32
// accumulators, stepping through k 16 at a time. Loop bounds are warp-uniform, so every lane takes
// part in each *_sync call, as WMMA requires.
template <typename scalar_t, bool kBTransposed>
__device__ void tile_product_wmma(const TileProduct<scalar_t, kBTransposed>& p, unsigned char* smem) {
  namespace wmma = nvcuda::wmma;
  using T = typename WmmaType<scalar_t>::type;
  using BLayout = std::conditional_t<kBTransposed, wmma::col_major, wmma::row_major>;
  const T* A = reinterpret_cast<const T*>(smem + p.a);
  const T* B = reinterpret_cast<const T*>(smem + p.b);
  float* C = reinterpret_cast<float*>(smem + p.c);
  const int tiles_n = p.n / kMma;
  const int tiles = (p.m / kMma) * tiles_n;
  for (int t = threadIdx.x / 32; t < tiles; t += kTcWarps) {
    const int row0 = (t / tiles_n) * kMma, col0 = (t % tiles_n) * kMma;
    wmma::fragment<wmma::accumulator, kMma, kMma, kMma, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int k0 = 0; k0 < p.k; k0 += kMma) {
      wmma::fragment<wmma::matrix_a, kMma, kMma, kMma, T, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, kMma, kMma, kMma, T, BLayout> fb;
      wmma::load_matrix_sync(fa, A + row0 * p.lda + k0, p.lda);
      wmma::load_matrix_sync(fb, kBTransposed ? B + col0 * p.ldb + k0 : B + k0 * p.ldb + col0, p.ldb);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(C + row0 * p.ldc + col0, acc, p.ldc, wmma::mem_row_major);
  }
}

// TileProduct, compiled to a trap for architectures without WMMA for the type (e.g. bf16 below sm_80)
template <typename scalar_t, bool kBTransposed>
__device__ void tile_product(const TileProduct<scalar_t, kBTransposed>& p, unsigned char* smem) {
  if constexpr (kCompiledArch < WmmaType<scalar_t>::kMinArch) {
    __trap();  // never launched: the launchers check the kernel's PTX architecture first
  } else {
    tile_product_wmma(p, smem);
  }
}

// grid (nwin, nh, ceil(N / kTcQueries)), FwdTcLayout<HD, scalar_t>(N).bytes of dynamic shared memory
template <int HD, typename scalar_t>
__global__ void __launch_bounds__(kTcThreads) forward_tc_kernel(const Args<scalar_t, float> a) {
  // WMMA needs 32-byte aligned tile origins: the layout's offsets are multiples of 128 from here
  extern __shared__ __align__(128) unsigned char smem[];
  const FwdTcLayout<HD, scalar_t> layout(a.g.N);
  const int win = blockIdx.x, head = blockIdx.y, tid = threadIdx.x;
  const int q0 = blockIdx.z * kTcQueries;
  const WinPos wp = window_pos(a.g, win);
  fwd_tc_stage_meta(a, wp, head, q0, tid, kTcThreads, layout, smem);
  __syncthreads();
  fwd_tc_stage_rows(a, head, tid, kTcThreads, layout, smem);
  __syncthreads();
  tile_product(layout.scores(), smem);
  __syncthreads();
  if (tid < kTcQueries) fwd_tc_softmax_row(a, head, amask_window(a, win), q0, tid, layout, smem);
  __syncthreads();
  tile_product(layout.outputs(), smem);
  __syncthreads();
  fwd_tc_write(a, head, tid, kTcThreads, layout, smem);
}

// grid (nwin, nh, ceil(N / plan.dq_rows)) for the dq pass (kKeyChunk = false, writes dq and delta),
// then (groups, nh, plan.key_chunks) for the dk/dv pass (reads delta; a window group per block, whose
// sums are stored once at the end); BwdTcLayout bytes of dynamic shared memory.
template <int HD, typename scalar_t, bool kKeyChunk>
__global__ void __launch_bounds__(kTcThreads) backward_tc_kernel(const Args<scalar_t, float> a) {
  // WMMA needs 32-byte aligned tile origins: the layout's offsets are multiples of 128 from here
  extern __shared__ __align__(128) unsigned char smem[];
  const BwdTcLayout<HD, scalar_t> layout(a.g.N, kKeyChunk ? a.plan.dkv_rows : a.plan.dq_rows,
                                         kKeyChunk && a.wpart);
  const int head = blockIdx.y, tid = threadIdx.x;
  const int c0 = blockIdx.z * layout.rows;
  const int windows = kKeyChunk ? a.plan.group_size : 1;
  const GroupOut<float> out = kKeyChunk ? group_out(a, blockIdx.x, head, blockIdx.z) : GroupOut<float>{};
  PadSums<float> pad{};
  if (kKeyChunk) bwd_tc_begin_group(tid, layout, smem, pad);
  for (int j = 0; j < windows; ++j) {
    const int win = blockIdx.x * windows + j;
    if (win >= a.g.nwin) break;  // uniform across the block
    const WinPos wp = window_pos(a.g, win);
    __syncthreads();  // the previous window's write phase is done with the shared memory
    bwd_tc_stage_meta<HD, scalar_t, kKeyChunk>(a, wp, head, c0, tid, kTcThreads, layout, smem);
    __syncthreads();
    bwd_tc_stage_rows<HD, scalar_t, kKeyChunk>(a, tid, kTcThreads, layout, smem);
    __syncthreads();
    tile_product(layout.scores(), smem);
    tile_product(layout.score_grads(), smem);
    __syncthreads();
    bwd_tc_score_grads<HD, scalar_t, kKeyChunk>(a, head, amask_window(a, win), c0, tid, layout, smem);
    __syncthreads();
    tile_product(layout.a_grads(), smem);
    if (kKeyChunk) tile_product(layout.b_grads(), smem);
    __syncthreads();
    bwd_tc_write<HD, scalar_t, kKeyChunk>(a, head, c0, tid, kTcThreads, layout, smem, out.pad_k ? &pad : nullptr);
  }
  if (kKeyChunk) bwd_tc_end_group(a, c0, tid, layout, smem, out, pad);
}

// grid (groups, nh, plan.key_chunks), plan.dkv_smem bytes of dynamic shared memory (the dS sums);
// reads delta written by the DqPass kernel
template <int HD, typename scalar_t>
__global__ void __launch_bounds__(kThreads) dkv_kernel(const Args<scalar_t, float> a) {
  using TileT = Tile<HD, float>;
  __shared__ TileT tile;
  extern __shared__ float ds_sums[];
  const int grp = blockIdx.x, head = blockIdx.y, chunk = blockIdx.z, tid = threadIdx.x;
  const int m = dkv_key(a, chunk, tid);
  const int N = a.g.N;
  const GroupOut<float> out = group_out(a, grp, head, chunk);
  float* ds_col = out.ds && tid < a.plan.dkv_rows ? ds_sums + tid : nullptr;
  DkvThread<HD, float> th;
  dkv_begin_group(a, ds_col, th);
  for (int j = 0; j < a.plan.group_size; ++j) {
    const int win = grp * a.plan.group_size + j;
    if (win >= a.g.nwin) break;  // uniform across the block
    const WinPos wp = window_pos(a.g, win);
    const float* am = amask_window(a, win);
    dkv_begin_window(a, wp, head, m, th);
    for (int q0 = 0; q0 < N; q0 += TileT::R) {
      __syncthreads();
      if (tid < TileT::R) stage_q_meta(a, wp, head, q0, tid, tile);
      __syncthreads();
      stage_q_rows(a, tid, kThreads, tile);
      __syncthreads();
      dkv_tile(a, head, am, m, q0, tile, ds_col, th);
    }
    dkv_end_window(a, head, th);
    if (out.pad_k && window_has_padding(a.g, wp)) {  // uniform across the block
      for (int base = 0; base < a.plan.dkv_rows; base += TileT::R) {
        __syncthreads();
        dkv_stage_pad(a, tid, base, th, tile);
        __syncthreads();
        dkv_sum_pad(a, tid, tile, th);
      }
    }
  }
  dkv_end_group(a, m, tid, ds_col, out, th);
}

constexpr int kReduceThreads = 256;

// one warp per table entry; the lanes' shares are added in the order table_grad_lane documents
__global__ void table_grad_kernel(const Geometry g, int groups, const float* wpart, float* dtable) {
  const int64_t entry = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kTableLanes;
  const int lane = int(threadIdx.x % kTableLanes);
  if (entry >= int64_t(g.Ntab) * g.nh) return;  // uniform across the warp
  float s = table_grad_lane(g, groups, wpart, int(entry / g.nh), int(entry % g.nh), lane);
  for (int offset = kTableLanes / 2; offset > 0; offset /= 2) s += __shfl_down_sync(0xffffffffu, s, offset);
  if (lane == 0) dtable[entry] = s;
}

__global__ void pad_grad_kernel(const Geometry g, const BackwardPlan plan, const float* part, float* dst) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < g.nh * g.hd) dst[i] = pad_grad_elem(g, plan, part, i / g.hd, i % g.hd);
}

// Dynamic shared memory a block may opt in to on this device
int shared_memory_limit(int device_index) {
  int bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_index));
  return bytes;
}

// Whether `kernel` was compiled for (its PTX targets) an architecture with WMMA for scalar_t; a
// build for older architectures runs the CUDA-core kernels
template <typename scalar_t, typename Kernel>
bool compiled_with_wmma(Kernel kernel) {
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  return attributes.ptxVersion * 10 >= WmmaType<scalar_t>::kMinArch;
}

// Whether the tensor-core backward for scalar_t is compiled for an architecture with WMMA for it
template <int HD, typename scalar_t>
bool backward_tc_compiled() {
  if constexpr (kTensorCoreInput<scalar_t>) {
    return compiled_with_wmma<scalar_t>(backward_tc_kernel<HD, scalar_t, false>);
  } else {
    return false;
  }
}

unsigned blocks_for(int64_t n) { return unsigned((n + kReduceThreads - 1) / kReduceThreads); }

dim3 attention_grid(int x, const Geometry& g) {
  return dim3(unsigned(x), unsigned(g.nh), unsigned((g.N + kThreads - 1) / kThreads));
}

// Tensor cores for 16-bit inputs whose window fits in the device's shared memory, else CUDA cores
template <int HD, typename scalar_t>
void launch_forward(const Args<scalar_t, float>& a, int device_index, cudaStream_t stream) {
  if constexpr (kTensorCoreInput<scalar_t>) {
    const auto kernel = forward_tc_kernel<HD, scalar_t>;
    if (forward_on_tensor_cores(a.g.N, a.g.hd, shared_memory_limit(device_index)) &&
        compiled_with_wmma<scalar_t>(kernel)) {
      const int bytes = FwdTcLayout<HD, scalar_t>(a.g.N).bytes;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
      const dim3 grid(unsigned(a.g.nwin), unsigned(a.g.nh), unsigned((a.g.N + kTcQueries - 1) / kTcQueries));
      kernel<<<grid, kTcThreads, bytes, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  query_rows_kernel<HD, scalar_t, ForwardPass><<<attention_grid(a.g.nwin, a.g), kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The plan's kernels (device_limits_cuda gave it the device's limits and the kernels' architecture);
// either way the dq pass (which writes delta) runs before the dk/dv pass (which reads it).
template <int HD, typename scalar_t>
void launch_backward(const Args<scalar_t, float>& a, cudaStream_t stream) {
  const BackwardPlan& plan = a.plan;
  const dim3 dkv_grid(unsigned(plan.groups), unsigned(a.g.nh), unsigned(plan.key_chunks));
  if constexpr (kTensorCoreInput<scalar_t>) {
    if (plan.tensor_cores) {
      const auto dq_kernel = backward_tc_kernel<HD, scalar_t, false>;
      const auto dkv_tc_kernel = backward_tc_kernel<HD, scalar_t, true>;
      const int dq_bytes = BwdTcLayout<HD, scalar_t>(a.g.N, plan.dq_rows, false).bytes;
      C10_CUDA_CHECK(cudaFuncSetAttribute(dq_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dq_bytes));
      C10_CUDA_CHECK(
          cudaFuncSetAttribute(dkv_tc_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, plan.dkv_smem));
      const dim3 dq_grid(unsigned(a.g.nwin), unsigned(a.g.nh), unsigned((a.g.N + plan.dq_rows - 1) / plan.dq_rows));
      dq_kernel<<<dq_grid, kTcThreads, dq_bytes, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dkv_tc_kernel<<<dkv_grid, kTcThreads, plan.dkv_smem, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  query_rows_kernel<HD, scalar_t, DqPass><<<attention_grid(a.g.nwin, a.g), kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto kernel = dkv_kernel<HD, scalar_t>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, plan.dkv_smem));
  kernel<<<dkv_grid, kThreads, plan.dkv_smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define SSLTM_DISPATCH_KERNEL_TYPES(dtype, name, ...)                                 \
  AT_DISPATCH_SWITCH(dtype, name, AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                                      AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                                          AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

}  // namespace

void forward_cuda(const Problem& p) {
  if (p.g.nwin == 0) return;
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(p.device_index));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(p.device_index));
  const auto dtype = static_cast<at::ScalarType>(p.dtype);
  SSLTM_DISPATCH_KERNEL_TYPES(dtype, "window_attention_3d_forward_cuda", [&] {
    const auto a = make_args<scalar_t, float>(p);
    SSLTM_DISPATCH_HEAD_DIM(p.g.hd, [&] { launch_forward<HD>(a, p.device_index, stream); });
  });
}

DeviceLimits device_limits_cuda(int device_index, int dtype, int hd) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index));
  DeviceLimits d{shared_memory_limit(device_index), 0, false};
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, device_index));
  SSLTM_DISPATCH_KERNEL_TYPES(static_cast<at::ScalarType>(dtype), "window_attention_3d_device_limits", [&] {
    SSLTM_DISPATCH_HEAD_DIM(hd, [&] { d.tensor_cores = backward_tc_compiled<HD, scalar_t>(); });
  });
  return d;
}

void backward_cuda(const Problem& p) {
  if (p.g.nwin == 0) return;
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(p.device_index));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(p.device_index));
  const auto dtype = static_cast<at::ScalarType>(p.dtype);
  SSLTM_DISPATCH_KERNEL_TYPES(dtype, "window_attention_3d_backward_cuda", [&] {
    const auto a = make_args<scalar_t, float>(p);
    SSLTM_DISPATCH_HEAD_DIM(p.g.hd, [&] { launch_backward<HD>(a, stream); });
  });
  const Geometry& g = p.g;
  if (p.wpart) {
    const int64_t threads = int64_t(g.Ntab) * g.nh * kTableLanes;
    table_grad_kernel<<<blocks_for(threads), kReduceThreads, 0, stream>>>(
        g, p.plan.groups, static_cast<const float*>(p.wpart), static_cast<float*>(p.dtable));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (p.padk_part) {
    pad_grad_kernel<<<blocks_for(int64_t(g.nh) * g.hd), kReduceThreads, 0, stream>>>(
        g, p.plan, static_cast<const float*>(p.padk_part), static_cast<float*>(p.dpad_k));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    pad_grad_kernel<<<blocks_for(int64_t(g.nh) * g.hd), kReduceThreads, 0, stream>>>(
        g, p.plan, static_cast<const float*>(p.padv_part), static_cast<float*>(p.dpad_v));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace wa3d
}  // namespace ssltm
