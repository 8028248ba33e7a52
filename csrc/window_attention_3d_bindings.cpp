// The window attention's entry points in ssltm_kernels._C (bound by bind_window_attention_3d, called
// from module.cpp): input checks, output/workspace allocation, and dispatch to the CUDA launchers (CUDA
// tensors) or to their CPU emulation (CPU tensors, used to test the kernels' code without a GPU).
//
// Built with -DSSLTM_WITH_CUDA when the CUDA sources are compiled in. With -DSSLTM_NO_PYTHON (the
// CMake library for C++ users) only the C++ functions ssltm::window_attention_3d_forward/backward
// are compiled, without pybind11.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#ifndef SSLTM_NO_PYTHON
#include <torch/python.h>  // pybind11 + tensor casters, lighter than torch/extension.h
#endif
#include <c10/core/DeviceGuard.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "bindings_common.h"
#include "include/ssltm_kernels/window_attention_3d.h"
#include "window_attention_3d_core.cuh"

namespace ssltm {
namespace wa3d {
void forward_cpu(const Problem& p);
void backward_cpu(const Problem& p);
#ifdef SSLTM_WITH_CUDA
void forward_cuda(const Problem& p);
void backward_cuda(const Problem& p);
// The device's shared memory and multiprocessors, and whether the tensor-core backward for the dtype
// and head_dim is compiled for it.
DeviceLimits device_limits_cuda(int device_index, int dtype, int hd);
#endif
}  // namespace wa3d

namespace {

using wa3d::Geometry;
using wa3d::Problem;
using wa3d::Strides5;

wa3d::InputType input_type(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return wa3d::InputType::kFloat16;
    case at::kBFloat16: return wa3d::InputType::kBFloat16;
    case at::kDouble: return wa3d::InputType::kFloat64;
    default: return wa3d::InputType::kFloat32;
  }
}

void check_list(const std::vector<int64_t>& v, const char* name) {
  TORCH_CHECK(v.size() == 3, "window_attention_3d: ", name, " must have 3 entries (t, h, w), got ",
              v.size(), " entries: ", c10::IntArrayRef(v));
}

void check_qkv_like(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.sizes() == q.sizes(), "window_attention_3d: ", name, " must have the shape of q ", q.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "window_attention_3d: ", name, " must have the dtype of q (",
              q.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), "window_attention_3d: ", name, " must be on the device of q (",
              q.device(), "), got ", t.device());
}

void check_last_stride(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.size(-1) == 1 || t.stride(-1) == 1, "window_attention_3d: ", name,
              " must have stride 1 in its last dimension (head_dim), got strides ", t.strides(),
              " for shape ", t.sizes());
}

void check_grad_qkv(const at::Tensor& t, const at::Tensor& q) {
  std::vector<int64_t> want(q.sizes().begin(), q.sizes().end());
  want.insert(want.begin() + 4, 3);
  TORCH_CHECK(t.sizes() == c10::IntArrayRef(want), "window_attention_3d: grad_qkv must have shape (B, T, H, W, 3, "
              "heads, head_dim) = ", c10::IntArrayRef(want), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "window_attention_3d: grad_qkv must have the dtype of q (",
              q.scalar_type(), "), got ", t.scalar_type(), " (shape ", t.sizes(), ")");
  TORCH_CHECK(t.device() == q.device(), "window_attention_3d: grad_qkv must be on the device of q (", q.device(),
              "), got ", t.device(), " (shape ", t.sizes(), ")");
  check_last_stride(t, "grad_qkv");
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, "window_attention_3d: grad_qkv must not "
              "overlap itself, got strides ", t.strides(), " for shape ", t.sizes());
}

Strides5 strides5(const at::Tensor& t) {
  return Strides5{t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}

// A float tensor in the accumulation dtype, contiguous (small parameter tensors only).
at::Tensor as_acc(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

struct Checked {
  Geometry g;
  at::ScalarType acc;
  at::Tensor table, pad_k, pad_v, amask;  // converted copies (undefined when absent)
};

Checked check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& bias_table, const std::optional<at::Tensor>& pad_k,
                     const std::optional<at::Tensor>& pad_v, const std::optional<at::Tensor>& attn_mask,
                     const std::vector<int64_t>& window, const std::vector<int64_t>& shift,
                     const std::vector<int64_t>& bias_window, const std::vector<int64_t>& table_window,
                     double scale) {
  TORCH_CHECK(q.dim() == 6, "window_attention_3d: q must be 6-D (B, T, H, W, heads, head_dim), got shape ",
              q.sizes());
  check_qkv_like(k, q, "k");
  check_qkv_like(v, q, "v");
  check_kernel_device(q, "window_attention_3d", "q");
  check_kernel_dtype(q, "window_attention_3d", "q/k/v", /*float64_on_cpu=*/true);
  check_last_stride(q, "q");
  check_last_stride(k, "k");
  check_last_stride(v, "v");
  TORCH_CHECK(q.numel() > 0, "window_attention_3d: q must not be empty, got shape ", q.sizes());
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), W = q.size(3), nh = q.size(4), hd = q.size(5);
  TORCH_CHECK(hd <= wa3d::kMaxHeadDim, "window_attention_3d: head_dim ", hd, " exceeds the maximum ",
              wa3d::kMaxHeadDim, " supported by the CUDA kernels (q shape ", q.sizes(), ")");
  TORCH_CHECK(nh <= 65535, "window_attention_3d: ", nh, " heads exceed the 65535 supported by the CUDA launch "
              "grid (q shape ", q.sizes(), ")");
  check_list(window, "window");
  check_list(shift, "shift");
  check_list(bias_window, "bias_window");
  check_list(table_window, "table_window");
  const char* axes[3] = {"t", "h", "w"};
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK(window[i] >= 1, "window_attention_3d: window must be positive, got ", c10::IntArrayRef(window));
    TORCH_CHECK(shift[i] >= 0 && shift[i] < window[i], "window_attention_3d: shift must satisfy "
                "0 <= shift < window on every axis, got shift ", c10::IntArrayRef(shift), " for window ",
                c10::IntArrayRef(window), " (axis ", axes[i], ")");
    TORCH_CHECK(table_window[i] >= 1 && bias_window[i] >= 1 && bias_window[i] <= table_window[i],
                "window_attention_3d: need 1 <= bias_window <= table_window on every axis, got bias_window ",
                c10::IntArrayRef(bias_window), " and table_window ", c10::IntArrayRef(table_window));
  }
  const int64_t N = window[0] * window[1] * window[2];
  TORCH_CHECK(N <= wa3d::kMaxWindowTokens, "window_attention_3d: window ", c10::IntArrayRef(window), " has ", N,
              " tokens, more than the ", wa3d::kMaxWindowTokens, " supported");
  TORCH_CHECK(N <= bias_window[0] * bias_window[1] * bias_window[2],
              "window_attention_3d: the window's ", N, " tokens do not fit the bias_window ",
              c10::IntArrayRef(bias_window), " used to decode their bias coordinates");
  const int64_t nWin = B * ((T + window[0] - 1) / window[0]) * ((H + window[1] - 1) / window[1]) *
                       ((W + window[2] - 1) / window[2]);
  TORCH_CHECK(nWin <= std::numeric_limits<int32_t>::max() && T + window[0] < (int64_t(1) << 30) &&
                  H + window[1] < (int64_t(1) << 30) && W + window[2] < (int64_t(1) << 30),
              "window_attention_3d: volume too large (q shape ", q.sizes(), ", window ",
              c10::IntArrayRef(window), ")");
  TORCH_CHECK(std::isfinite(scale), "window_attention_3d: scale must be finite, got ", scale);

  Checked c;
  c.acc = acc_dtype(q.scalar_type());
  int64_t nMask = 0;
  if (bias_table.has_value()) {
    const at::Tensor& t = *bias_table;
    const int64_t ntab = (2 * table_window[0] - 1) * (2 * table_window[1] - 1) * (2 * table_window[2] - 1);
    TORCH_CHECK(t.dim() == 2 && t.size(0) == ntab && t.size(1) == nh,
                "window_attention_3d: bias_table must have shape (", ntab, ", ", nh,
                ") = ((2*ft-1)*(2*fh-1)*(2*fw-1), heads) for table_window ", c10::IntArrayRef(table_window),
                ", got ", t.sizes());
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), "window_attention_3d: bias_table must be a floating "
                "tensor, got ", t.scalar_type());
    TORCH_CHECK(t.device() == q.device(), "window_attention_3d: bias_table must be on the device of q (",
                q.device(), "), got ", t.device());
    c.table = as_acc(t, c.acc);
  }
  const std::optional<at::Tensor>* pads[2] = {&pad_k, &pad_v};
  const char* pad_names[2] = {"pad_k", "pad_v"};
  for (int i = 0; i < 2; ++i) {
    if (!pads[i]->has_value()) continue;
    const at::Tensor& t = **pads[i];
    TORCH_CHECK(t.dim() == 2 && t.size(0) == nh && t.size(1) == hd, "window_attention_3d: ", pad_names[i],
                " must have shape (heads, head_dim) = (", nh, ", ", hd, "), got ", t.sizes());
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), "window_attention_3d: ", pad_names[i],
                " must be a floating tensor, got ", t.scalar_type());
    TORCH_CHECK(t.device() == q.device(), "window_attention_3d: ", pad_names[i],
                " must be on the device of q (", q.device(), "), got ", t.device());
    (i == 0 ? c.pad_k : c.pad_v) = as_acc(t, c.acc);
  }
  if (attn_mask.has_value()) {
    const at::Tensor& t = *attn_mask;
    TORCH_CHECK(t.dim() == 3 && t.size(0) >= 1 && t.size(1) == N && t.size(2) == N,
                "window_attention_3d: attn_mask must have shape (nMask, N, N) with N = ", N,
                " tokens per window, got ", t.sizes());
    TORCH_CHECK(nWin % t.size(0) == 0, "window_attention_3d: attn_mask's first dimension ", t.size(0),
                " must divide the number of windows B*nW = ", nWin);
    TORCH_CHECK(t.scalar_type() == at::kFloat, "window_attention_3d: attn_mask must be float32, got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == q.device(), "window_attention_3d: attn_mask must be on the device of q (",
                q.device(), "), got ", t.device());
    c.amask = t.contiguous();
    nMask = t.size(0);
  }
  c.g = wa3d::make_geometry(B, T, H, W, nh, hd, window.data(), shift.data(), bias_window.data(),
                            table_window.data(), nMask);
  return c;
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

Problem make_problem(const Checked& c, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     double scale) {
  Problem p{};
  p.g = c.g;
  p.dtype = static_cast<int>(q.scalar_type());
  p.device_index = q.is_cuda() ? q.get_device() : -1;
  p.scale = scale;
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.sq = strides5(q);
  p.sk = strides5(k);
  p.sv = strides5(v);
  p.table = ptr_or_null(c.table);
  p.pad_k = ptr_or_null(c.pad_k);
  p.pad_v = ptr_or_null(c.pad_v);
  p.amask = c.amask.defined() ? c.amask.const_data_ptr<float>() : nullptr;
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> window_attention_3d_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& bias_table,
    const std::optional<at::Tensor>& pad_k, const std::optional<at::Tensor>& pad_v,
    const std::optional<at::Tensor>& attn_mask, const std::vector<int64_t>& window,
    const std::vector<int64_t>& shift, const std::vector<int64_t>& bias_window,
    const std::vector<int64_t>& table_window, double scale) {
  const Checked c =
      check_inputs(q, k, v, bias_table, pad_k, pad_v, attn_mask, window, shift, bias_window, table_window, scale);
  c10::OptionalDeviceGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty(q.sizes().slice(0, 5), q.options().dtype(c.acc));
  Problem p = make_problem(c, q, k, v, scale);
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr();
  if (q.is_cuda()) {
#ifdef SSLTM_WITH_CUDA
    wa3d::forward_cuda(p);
#endif
  } else {
    wa3d::forward_cpu(p);
  }
  return {out, lse};
}

// grad_qkv: the caller's (B, T, H, W, 3, heads, head_dim) buffer (flash-attention's packed qkv
// gradient): dq, dk, dv are written through strides into its three slices, which are returned, so
// that a fused qkv projection's gradient needs no concatenation.
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>,
           std::optional<at::Tensor>>
window_attention_3d_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                             const std::optional<at::Tensor>& bias_table, const std::optional<at::Tensor>& pad_k,
                             const std::optional<at::Tensor>& pad_v, const std::optional<at::Tensor>& attn_mask,
                             const std::vector<int64_t>& window, const std::vector<int64_t>& shift,
                             const std::vector<int64_t>& bias_window, const std::vector<int64_t>& table_window,
                             double scale, bool need_table_grad, bool need_pad_grad, int64_t num_groups,
                             const std::optional<at::Tensor>& grad_qkv) {
  const Checked c =
      check_inputs(q, k, v, bias_table, pad_k, pad_v, attn_mask, window, shift, bias_window, table_window, scale);
  check_qkv_like(grad_out, q, "grad_out");
  check_qkv_like(out, q, "out");
  check_last_stride(out, "out");
  TORCH_CHECK(lse.sizes() == q.sizes().slice(0, 5), "window_attention_3d: lse must have shape (B, T, H, W, heads) ",
              q.sizes().slice(0, 5), ", got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == c.acc, "window_attention_3d: lse must be ", c.acc, " for ", q.scalar_type(),
              " inputs, got ", lse.scalar_type());
  TORCH_CHECK(lse.device() == q.device(), "window_attention_3d: lse must be on the device of q (", q.device(),
              "), got ", lse.device());
  TORCH_CHECK(num_groups >= 0, "window_attention_3d: num_groups must be >= 0 (0: automatic), got ", num_groups);
  if (grad_qkv.has_value()) check_grad_qkv(*grad_qkv, q);
  // Autograd may hand over a broadcast gradient; the kernels only need unit stride along head_dim.
  const at::Tensor dout = (grad_out.size(-1) == 1 || grad_out.stride(-1) == 1) ? grad_out : grad_out.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  const Geometry& g = c.g;
  const bool table_grad = need_table_grad && bias_table.has_value();
  const bool pad_grad = need_pad_grad && (pad_k.has_value() || pad_v.has_value());

  c10::OptionalDeviceGuard guard(q.device());
  wa3d::DeviceLimits device = wa3d::kEmulatedDevice;
#ifdef SSLTM_WITH_CUDA
  if (q.is_cuda()) device = wa3d::device_limits_cuda(q.get_device(), static_cast<int>(q.scalar_type()), g.hd);
#endif
  const wa3d::BackwardPlan plan =
      wa3d::plan_backward(g, input_type(q.scalar_type()), device, table_grad, pad_grad, num_groups);
  TORCH_CHECK(plan.dkv_rows > 0, "window_attention_3d: the bias-table gradient of a window of ", g.N,
              " tokens with head_dim ", g.hd, " needs more than the ", device.smem_limit,
              " bytes of shared memory per block of ", q.device());

  const auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  const auto acc_opts = q.options().dtype(c.acc);
  at::Tensor dq, dk, dv;
  if (grad_qkv.has_value()) {
    dq = grad_qkv->select(4, 0);
    dk = grad_qkv->select(4, 1);
    dv = grad_qkv->select(4, 2);
  } else {
    dq = at::empty(q.sizes(), opts);
    dk = at::empty(q.sizes(), opts);
    dv = at::empty(q.sizes(), opts);
  }
  at::Tensor delta = at::empty(q.sizes().slice(0, 5), acc_opts);
  // Every element of the partials is stored exactly once by the dk/dv pass (BackwardPlan): no fill.
  std::optional<at::Tensor> dtable, dpad_k, dpad_v;
  at::Tensor wpart, padk_part, padv_part;
  if (table_grad) {
    wpart = at::empty({plan.groups, g.nh, g.N, g.N}, acc_opts);
    dtable = at::empty({g.Ntab, g.nh}, acc_opts);
  }
  if (pad_grad) {
    padk_part = at::empty({plan.groups, g.nh, plan.key_chunks, g.hd}, acc_opts);
    padv_part = at::empty({plan.groups, g.nh, plan.key_chunks, g.hd}, acc_opts);
    dpad_k = at::empty({g.nh, g.hd}, acc_opts);
    dpad_v = at::empty({g.nh, g.hd}, acc_opts);
  }

  Problem p = make_problem(c, q, k, v, scale);
  p.lse = const_cast<void*>(lse_c.const_data_ptr());  // read only in the backward kernels
  p.dout = dout.const_data_ptr();
  p.outp = out.const_data_ptr();
  p.sdo = strides5(dout);
  p.so = strides5(out);
  p.delta = delta.mutable_data_ptr();
  p.dq = dq.mutable_data_ptr();
  p.dk = dk.mutable_data_ptr();
  p.dv = dv.mutable_data_ptr();
  p.sdx = strides5(dq);
  p.wpart = wpart.defined() ? wpart.mutable_data_ptr() : nullptr;
  p.padk_part = padk_part.defined() ? padk_part.mutable_data_ptr() : nullptr;
  p.padv_part = padv_part.defined() ? padv_part.mutable_data_ptr() : nullptr;
  p.dtable = dtable ? dtable->mutable_data_ptr() : nullptr;
  p.dpad_k = dpad_k ? dpad_k->mutable_data_ptr() : nullptr;
  p.dpad_v = dpad_v ? dpad_v->mutable_data_ptr() : nullptr;
  p.plan = plan;
  if (q.is_cuda()) {
#ifdef SSLTM_WITH_CUDA
    wa3d::backward_cuda(p);
#endif
  } else {
    wa3d::backward_cpu(p);
  }
  return {dq, dk, dv, dtable, dpad_k, dpad_v};
}

}  // namespace ssltm

#ifndef SSLTM_NO_PYTHON
namespace py = pybind11;

namespace {

// window_attention_3d_cuda_kernels: the families the launchers pick, from plain numbers (no device
// needed, no CUDA build needed).
std::tuple<std::string, std::string> cuda_kernel_families(const std::string& dtype, int64_t tokens, int64_t head_dim,
                                                          int64_t shared_memory, int64_t arch) {
  using ssltm::wa3d::InputType;
  InputType t;
  if (dtype == "float32") {
    t = InputType::kFloat32;
  } else if (dtype == "float16") {
    t = InputType::kFloat16;
  } else if (dtype == "bfloat16") {
    t = InputType::kBFloat16;
  } else {
    TORCH_CHECK(false, "window_attention_3d_cuda_kernels: dtype must be \"float32\", \"float16\" or \"bfloat16\", got \"",
                dtype, "\"");
  }
  TORCH_CHECK(tokens >= 1 && tokens <= ssltm::wa3d::kMaxWindowTokens, "window_attention_3d_cuda_kernels: tokens must be in [1, ",
              ssltm::wa3d::kMaxWindowTokens, "], got ", tokens);
  TORCH_CHECK(head_dim >= 1 && head_dim <= ssltm::wa3d::kMaxHeadDim,
              "window_attention_3d_cuda_kernels: head_dim must be in [1, ", ssltm::wa3d::kMaxHeadDim, "], got ", head_dim);
  TORCH_CHECK(shared_memory >= 0 && shared_memory <= std::numeric_limits<int>::max(),
              "window_attention_3d_cuda_kernels: shared_memory must be a byte count >= 0, got ", shared_memory);
  TORCH_CHECK(arch >= 0 && arch <= 1000, "window_attention_3d_cuda_kernels: arch must be a compute capability "
              "10 * major + minor (e.g. 90), got ", arch);
  const auto f = ssltm::wa3d::kernel_families(t, int(tokens), int(head_dim), int(shared_memory), int(arch));
  auto name = [](bool tensor_cores) { return std::string(tensor_cores ? "tensor_cores" : "cuda_cores"); };
  return {name(f.forward_tensor_cores), name(f.backward_tensor_cores)};
}

}  // namespace

namespace ssltm {
void bind_window_attention_3d(py::module_& m) {
  m.attr("MAX_HEAD_DIM") = py::int_(ssltm::wa3d::kMaxHeadDim);
  m.attr("MAX_WINDOW_TOKENS") = py::int_(ssltm::wa3d::kMaxWindowTokens);
  m.def("window_attention_3d_forward", &ssltm::window_attention_3d_forward, py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("bias_table"), py::arg("pad_k"), py::arg("pad_v"), py::arg("attn_mask"),
        py::arg("window"), py::arg("shift"), py::arg("bias_window"), py::arg("table_window"), py::arg("scale"),
        "Fused 3D window attention forward. q, k, v: (B, T, H, W, heads, head_dim), stride 1 along\n"
        "head_dim. Returns (out (B, T, H, W, heads, head_dim) contiguous in q's dtype,\n"
        "lse (B, T, H, W, heads) float32, float64 for float64 inputs). CUDA tensors run the CUDA kernels,\n"
        "CPU tensors their emulation.");
  m.def("window_attention_3d_backward", &ssltm::window_attention_3d_backward, py::arg("grad_out"), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("bias_table"), py::arg("pad_k"),
        py::arg("pad_v"), py::arg("attn_mask"), py::arg("window"), py::arg("shift"), py::arg("bias_window"),
        py::arg("table_window"), py::arg("scale"), py::arg("need_table_grad"), py::arg("need_pad_grad"),
        py::arg("num_groups") = 0, py::arg("grad_qkv") = py::none(),
        "Fused 3D window attention backward. Returns (dq, dk, dv, dtable, dpad_k, dpad_v): dq/dk/dv\n"
        "contiguous in q's dtype, or, when grad_qkv (B, T, H, W, 3, heads, head_dim) in q's dtype with\n"
        "stride 1 along head_dim is given, written into grad_qkv[..., 0, :, :], [..., 1, :, :],\n"
        "[..., 2, :, :] and returned as those views; dtable (Ntab, heads) when need_table_grad and\n"
        "bias_table is given, dpad_k/dpad_v (heads, head_dim) when need_pad_grad and pad_k or pad_v is\n"
        "given, else None (float32, float64 for float64 inputs). num_groups > 0 forces the number of\n"
        "window groups of the deterministic bias/pad reductions (testing); 0 chooses it.");
  m.def("window_attention_3d_cuda_kernels", &cuda_kernel_families, py::arg("dtype"), py::arg("tokens"),
        py::arg("head_dim"), py::arg("shared_memory"), py::arg("arch"),
        "The CUDA kernel families (\"tensor_cores\" or \"cuda_cores\") that the forward and the backward\n"
        "launch for dtype \"float32\", \"float16\" or \"bfloat16\", a window of `tokens` tokens, head_dim,\n"
        "a device with `shared_memory` bytes of opt-in shared memory per block and compute capability\n"
        "`arch` (10 * major + minor), decided by the launchers' own rules. A build whose kernels target an\n"
        "older architecture than the device's may take the CUDA cores where this says tensor cores.");
}
}  // namespace ssltm
#endif
