// Public C++ API of libssltm_kernels (CMake target ssltm_kernels::ssltm_kernels): fused (shifted) 3D
// window attention over channels-last volumes, the functions behind ssltm_kernels._C. CUDA tensors run
// the CUDA kernels (when the library was built with them), CPU tensors a CPU emulation of the same code.
//
// Shapes: q, k, v, grad_out, out: (B, T, H, W, heads, head_dim) with stride 1 along head_dim;
// window, shift, bias_window, table_window: 3 entries (t, h, w), 0 <= shift < window; bias_table:
// ((2*ft-1)*(2*fh-1)*(2*fw-1), heads) for table_window (ft, fh, fw); pad_k, pad_v: (heads, head_dim),
// the key / value of padded tokens; attn_mask: (nMask, N, N) float32, N = wt*wh*ww, window i (over
// batch and windows) adding attn_mask[i % nMask]. See ssltm_kernels.window_attention_3d (Python) for
// the semantics; bias_window = table_window = window for a plain volume.
//
// The declarations must match the definitions in csrc/window_attention_3d_bindings.cpp, which includes this header so
// that the compiler checks it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace ssltm {

// Returns (out (B, T, H, W, heads, head_dim) contiguous in q's dtype, lse (B, T, H, W, heads) float32,
// float64 for float64 CPU inputs), lse being what the backward takes.
std::tuple<at::Tensor, at::Tensor> window_attention_3d_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& bias_table,
    const std::optional<at::Tensor>& pad_k, const std::optional<at::Tensor>& pad_v,
    const std::optional<at::Tensor>& attn_mask, const std::vector<int64_t>& window,
    const std::vector<int64_t>& shift, const std::vector<int64_t>& bias_window,
    const std::vector<int64_t>& table_window, double scale);

// Returns (dq, dk, dv, dtable, dpad_k, dpad_v): dq/dk/dv contiguous in q's dtype; dtable (Ntab, heads)
// when need_table_grad and bias_table is given, dpad_k/dpad_v (heads, head_dim) when need_pad_grad and
// pad_k or pad_v is given, else nullopt (float32, float64 for float64 inputs). num_groups > 0 forces the
// number of window groups of the deterministic bias/pad gradient reduction, 0 chooses it. grad_qkv: an
// optional (B, T, H, W, 3, heads, head_dim) buffer of q's dtype (a packed qkv projection's gradient):
// dq, dk, dv are written into its three slices and returned as views of it; nullopt allocates them.
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>,
           std::optional<at::Tensor>>
window_attention_3d_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                             const std::optional<at::Tensor>& bias_table, const std::optional<at::Tensor>& pad_k,
                             const std::optional<at::Tensor>& pad_v, const std::optional<at::Tensor>& attn_mask,
                             const std::vector<int64_t>& window, const std::vector<int64_t>& shift,
                             const std::vector<int64_t>& bias_window, const std::vector<int64_t>& table_window,
                             double scale, bool need_table_grad, bool need_pad_grad, int64_t num_groups,
                             const std::optional<at::Tensor>& grad_qkv);

}  // namespace ssltm
