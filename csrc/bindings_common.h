// What every op's entry points (csrc/<op>_bindings.cpp) share: whether the CUDA kernels are compiled in
// (-DSSLTM_WITH_CUDA), the checks of the tensor that decides where and in which dtype an op runs, and the
// accumulation dtype of its buffers.
#pragma once

#include <ATen/ATen.h>

namespace ssltm {

#ifdef SSLTM_WITH_CUDA
inline constexpr bool kWithCuda = true;
#else
inline constexpr bool kWithCuda = false;
#endif

// `t` (called `name` in `op`'s messages) lives on the CPU (the kernels' emulation) or on a GPU, and the
// CUDA kernels are compiled in if it is on a GPU.
inline void check_kernel_device(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cpu() || t.is_cuda(), op, ": ", name, " must be a CPU or CUDA tensor, got ", t.device(),
              " (shape ", t.sizes(), ")");
  TORCH_CHECK(!t.is_cuda() || kWithCuda, op, ": ssltm_kernels._C was built without CUDA kernels; rebuild with a "
              "CUDA build of torch and nvcc (SSLTM_CUDA=on pip install -e . --no-build-isolation)");
}

// `t` is float32, float16 or bfloat16, or float64 on the CPU where `float64_on_cpu` (the emulation's
// oracle precision).
inline void check_kernel_dtype(const at::Tensor& t, const char* op, const char* name, bool float64_on_cpu) {
  const auto dtype = t.scalar_type();
  const bool half_or_float = dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
  TORCH_CHECK(half_or_float || (float64_on_cpu && dtype == at::kDouble && t.is_cpu()), op, ": ", name,
              " must be float32, float16 or bfloat16", float64_on_cpu ? " (float64 on CPU only)" : "", ", got ",
              dtype, " on ", t.device(), " (shape ", t.sizes(), ")");
}

// The dtype of accumulation buffers for inputs of dtype `t`: float64 for float64 (the CPU emulation), else
// float32 (the host-side twin of AccType in common.cuh).
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace ssltm
