// What every op's per-thread core (csrc/<op>_core.cuh) shares: the qualifier that compiles a function
// for the device and the host (the CPU emulation calls the same code), the accumulation type of an
// input type, and exact exp/log in it (the build does not use --use_fast_math).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define SSLTM_HD __host__ __device__ __forceinline__
#else
#define SSLTM_HD inline
#endif

namespace ssltm {

// fp16, bf16 and fp32 inputs accumulate in fp32, fp64 inputs (CPU emulation only) in fp64
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

SSLTM_HD float acc_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}
SSLTM_HD double acc_exp(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}
SSLTM_HD float acc_log(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return std::log(x);
#endif
}
SSLTM_HD double acc_log(double x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  return std::log(x);
#endif
}

}  // namespace ssltm
