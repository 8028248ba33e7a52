// Public C++ API of libssltm_kernels (CMake target ssltm_kernels::ssltm_kernels): the GCC
// nearest-cluster assignment of SSLTM (Eq. 8, 9), the functions behind ssltm_kernels._C. CUDA tensors
// run the CUDA kernels (when the library was built with them), CPU tensors a CPU emulation of the same
// code.
//
// Shapes: feats (B, K, D), centers (T, K, D), both float32, float16 or bfloat16 of one dtype, any
// strides; valid (B, K) bool. For each (b, j): index[b, j] = the cluster t of centers[:, j] at the least
// L2 distance from feats[b, j] (fp32 accumulation, the lowest index on ties), nearest[b, j] =
// centers[index[b, j], j], and loss = sum over valid (b, j) of ||nearest[b, j] - feats[b, j]||^2 /
// (n_valid * D), 0 without a valid entry. See ssltm_kernels.gcc_assign (Python) for the semantics.
//
// The declarations must match the definitions in csrc/gcc_assign_bindings.cpp, which includes this
// header so that the compiler checks it.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace ssltm {

// Returns (index (B, K) int64, nearest (B, K, D) contiguous in centers' dtype, loss, norm), loss and
// norm 0-dim float32, norm = 1 / (n_valid * D) (0 without a valid entry), what the backward takes.
// One kernel launch on CUDA tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gcc_assign_forward(const at::Tensor& feats,
                                                                              const at::Tensor& centers,
                                                                              const at::Tensor& valid);

// Returns dcenters (T, K, D), contiguous in centers' dtype: the gradient reaching centers from
// grad_nearest (B, K, D) (the gradient of nearest, any strides) and grad_loss (0-dim float32, the
// gradient of the loss); either may be absent. feats receives no gradient (stop-gradient). index and
// norm are the forward's. One kernel launch on CUDA tensors; deterministic (sums in order of b).
at::Tensor gcc_assign_backward(const std::optional<at::Tensor>& grad_nearest,
                               const std::optional<at::Tensor>& grad_loss, const at::Tensor& feats,
                               const at::Tensor& centers, const at::Tensor& valid, const at::Tensor& index,
                               const at::Tensor& norm);

}  // namespace ssltm
