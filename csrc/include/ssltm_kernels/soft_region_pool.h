// Public C++ API of libssltm_kernels (CMake target ssltm_kernels::ssltm_kernels): OCR soft region pooling
// (OCRNet's SpatialGather_Module), the functions behind ssltm_kernels._C. CUDA tensors run the CUDA
// kernels (when the library was built with them), CPU tensors a CPU emulation of the same code.
//
// Shapes: logits (B, K, H, W) class scores, feats (B, C, H, W) features of the same dtype and device,
// any strides (H and W are read as one axis of N = H*W positions when their strides allow it, else the
// tensor is copied first). out[b, k, c] = sum_n softmax_n(scale * logits[b, k, :])[n] * feats[b, c, n].
// See ssltm_kernels.soft_region_pool (Python) for the semantics.
//
// The declarations must match the definitions in csrc/soft_region_pool_bindings.cpp, which includes this
// header so that the compiler checks it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace ssltm {

// Returns (out (B, K, C) contiguous in the inputs' dtype, stats (B, K, 2) float32, float64 for float64 CPU
// inputs: per (b, k) the maximum M of sign(scale) * logits and the log of the softmax denominator, out_acc:
// for float16/bfloat16 inputs out in float32, else nullopt); the backward takes stats and out_acc (or out).
// splits > 0 forces the number of position splits of the forward (testing), 0 chooses it.
std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> soft_region_pool_forward(const at::Tensor& logits,
                                                                                       const at::Tensor& feats,
                                                                                       double scale,
                                                                                       int64_t splits = 0);

// Writes the gradients into dlogits (B, K, H, W) and dfeats (B, C, H, W) (of the inputs' dtype and device;
// any strides whose H and W merge into one axis) and returns them; a gradient given as nullopt is not
// computed. grad_out: (B, K, C); stats: the forward's; out: the forward's out_acc where it has one (a Delta
// free of the output's rounding), else its out. At most 256 classes.
std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> soft_region_pool_backward(
    const at::Tensor& grad_out, const at::Tensor& logits, const at::Tensor& feats, const at::Tensor& out,
    const at::Tensor& stats, double scale, const std::optional<at::Tensor>& dlogits,
    const std::optional<at::Tensor>& dfeats);

}  // namespace ssltm
