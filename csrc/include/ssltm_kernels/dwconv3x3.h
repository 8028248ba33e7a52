// Public C++ API of libssltm_kernels: the fused depthwise 3x3 convolution of SegFormer's Mix-FFN over
// channels-last frames (+ optional exact GELU), the functions behind ssltm_kernels._C.dwconv3x3_*. CUDA
// tensors run the CUDA kernels (when the library was built with them), CPU tensors a CPU emulation of
// the same code.
//
// Shapes: x, grad_out: (B, H, W, C) or (B, T, H, W, C) (every frame convolved on its own), any strides;
// weight: (C, 1, 3, 3); bias: (C,); all of x's dtype (float32, float16, bfloat16; float64 on CPU only).
// Stride 1, zero padding 1. activation: "" (none) or "gelu" (0.5 * z * (1 + erf(z / sqrt(2)))). See
// ssltm_kernels.dwconv3x3 (Python) for the semantics.
//
// The declarations must match the definitions in csrc/dwconv3x3_bindings.cpp, which includes this header
// so that the compiler checks it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace ssltm {

// Returns the output: x's shape, contiguous, x's dtype.
at::Tensor dwconv3x3_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const std::string& activation);

// Returns (dx (x's shape, contiguous, x's dtype), dweight (C, 1, 3, 3), dbias (C,) or nullopt without a
// bias), the last two float32 (float64 for float64 inputs). The activation's input is recomputed from x.
// num_groups > 0 forces the number of pixel groups of the deterministic weight/bias reduction, 0 chooses it.
std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> dwconv3x3_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::string& activation, int64_t num_groups);

}  // namespace ssltm
