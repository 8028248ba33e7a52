// The soft region pooling's entry points in ssltm_kernels._C (bound by bind_soft_region_pool, called from
// module.cpp): input checks, output/workspace allocation, and dispatch to the CUDA launchers (CUDA
// tensors) or to their CPU emulation (CPU tensors, used to test the kernels' code without a GPU).
//
// Built with -DSSLTM_WITH_CUDA when the CUDA sources are compiled in. With -DSSLTM_NO_PYTHON (the CMake
// library for C++ users) only the C++ functions ssltm::soft_region_pool_forward/backward are compiled.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#ifndef SSLTM_NO_PYTHON
#include <torch/python.h>  // pybind11 + tensor casters, lighter than torch/extension.h
#endif
#include <c10/core/DeviceGuard.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "bindings_common.h"
#include "include/ssltm_kernels/soft_region_pool.h"
#include "soft_region_pool_core.cuh"

namespace ssltm {
namespace srp {
void forward_cpu(const Problem& p);
void backward_cpu(const Problem& p);
#ifdef SSLTM_WITH_CUDA
void forward_cuda(const Problem& p);
void backward_cuda(const Problem& p);
int sm_count_cuda(int device_index);
#endif
}  // namespace srp

namespace {

using srp::Problem;
using srp::Strides3;

Strides3 strides3(const at::Tensor& t) { return Strides3{t.stride(0), t.stride(1), t.stride(2)}; }

// H and W of a (B, X, H, W) tensor read as one axis of H*W positions without a copy
bool mergeable(const at::Tensor& t) { return t.size(2) == 1 || t.size(3) == 1 || t.stride(2) == t.stride(3) * t.size(3); }

void check_inputs(const at::Tensor& logits, const at::Tensor& feats, double scale) {
  TORCH_CHECK(logits.dim() == 4, "soft_region_pool: logits must be 4-D (B, K, H, W), got shape ", logits.sizes());
  TORCH_CHECK(feats.dim() == 4, "soft_region_pool: feats must be 4-D (B, C, H, W), got shape ", feats.sizes());
  TORCH_CHECK(feats.size(0) == logits.size(0) && feats.size(2) == logits.size(2) && feats.size(3) == logits.size(3),
              "soft_region_pool: feats must have the batch and spatial sizes of logits ", logits.sizes(), ", got ",
              feats.sizes());
  TORCH_CHECK(feats.scalar_type() == logits.scalar_type(), "soft_region_pool: feats must have the dtype of logits (",
              logits.scalar_type(), "), got ", feats.scalar_type(), " (feats shape ", feats.sizes(), ")");
  TORCH_CHECK(feats.device() == logits.device(), "soft_region_pool: feats must be on the device of logits (",
              logits.device(), "), got ", feats.device(), " (feats shape ", feats.sizes(), ")");
  check_kernel_device(logits, "soft_region_pool", "logits");
  check_kernel_dtype(logits, "soft_region_pool", "logits/feats", /*float64_on_cpu=*/true);
  TORCH_CHECK(logits.numel() > 0, "soft_region_pool: logits must not be empty, got shape ", logits.sizes());
  TORCH_CHECK(feats.numel() > 0, "soft_region_pool: feats must not be empty, got shape ", feats.sizes());
  const int64_t int_max = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(logits.size(0) <= int_max && logits.size(1) <= int_max && feats.size(1) <= int_max &&
                  logits.size(2) * logits.size(3) <= int_max,
              "soft_region_pool: sizes beyond int32 (logits shape ", logits.sizes(), ", feats shape ", feats.sizes(),
              ")");
  TORCH_CHECK(std::isfinite(scale), "soft_region_pool: scale must be finite, got ", scale);
}

void check_grad_buffer(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.sizes() == like.sizes(), "soft_region_pool: ", name, " must have shape ", like.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.device() == like.device(), "soft_region_pool: ", name,
              " must be ", like.scalar_type(), " on ", like.device(), ", got ", t.scalar_type(), " on ", t.device(),
              " (shape ", t.sizes(), ")");
  TORCH_CHECK(mergeable(t), "soft_region_pool: ", name, " must have strides that merge H and W into one axis, got "
              "strides ", t.strides(), " for shape ", t.sizes());
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, "soft_region_pool: ", name,
              " must not overlap itself, got strides ", t.strides(), " for shape ", t.sizes());
}

Problem make_problem(const at::Tensor& l3, const at::Tensor& f3, double scale) {
  Problem p{};
  p.B = int(l3.size(0));
  p.K = int(l3.size(1));
  p.C = int(f3.size(1));
  p.N = int(l3.size(2));
  p.dtype = static_cast<int>(l3.scalar_type());
  p.device_index = l3.is_cuda() ? l3.get_device() : -1;
  p.sign = scale >= 0 ? 1.0 : -1.0;
  p.magnitude = std::abs(scale);
  p.scale = scale;
  p.logits = l3.const_data_ptr();
  p.sl = strides3(l3);
  p.feats = f3.const_data_ptr();
  p.sf = strides3(f3);
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> soft_region_pool_forward(const at::Tensor& logits,
                                                                                       const at::Tensor& feats,
                                                                                       double scale, int64_t splits) {
  check_inputs(logits, feats, scale);
  TORCH_CHECK(splits >= 0 && splits <= std::numeric_limits<int32_t>::max(),
              "soft_region_pool: splits must be >= 0 (0: automatic), got ", splits);
  c10::OptionalDeviceGuard guard(logits.device());
  const at::Tensor l3 = logits.flatten(2), f3 = feats.flatten(2);  // views unless H and W do not merge
  Problem p = make_problem(l3, f3, scale);
  const auto acc = acc_dtype(logits.scalar_type());
  int sm_count = 1;  // the emulation runs blocks one after another: no split unless asked
#ifdef SSLTM_WITH_CUDA
  if (logits.is_cuda()) sm_count = srp::sm_count_cuda(p.device_index);
#endif
  p.split_len = srp::plan_split_len(p.N, srp::plan_splits(p.B, p.K, p.C, p.N, sm_count, int(splits)));
  p.splits = srp::ceil_div(p.N, p.split_len);
  at::Tensor out = at::empty({p.B, p.K, p.C}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor stats = at::empty({p.B, p.K, 2}, logits.options().dtype(acc));
  at::Tensor partial;
  if (p.splits > 1) partial = at::empty({p.B, p.splits, p.K, p.C}, logits.options().dtype(acc));
  std::optional<at::Tensor> out_acc;
  if (acc != logits.scalar_type()) out_acc = at::empty({p.B, p.K, p.C}, logits.options().dtype(acc));
  p.out = out.mutable_data_ptr();
  p.out_acc = out_acc ? out_acc->mutable_data_ptr() : nullptr;
  p.stats = stats.mutable_data_ptr();
  p.partial = partial.defined() ? partial.mutable_data_ptr() : nullptr;
  if (logits.is_cuda()) {
#ifdef SSLTM_WITH_CUDA
    srp::forward_cuda(p);
#endif
  } else {
    srp::forward_cpu(p);
  }
  return {out, stats, out_acc};
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> soft_region_pool_backward(
    const at::Tensor& grad_out, const at::Tensor& logits, const at::Tensor& feats, const at::Tensor& out,
    const at::Tensor& stats, double scale, const std::optional<at::Tensor>& dlogits,
    const std::optional<at::Tensor>& dfeats) {
  check_inputs(logits, feats, scale);
  const int64_t B = logits.size(0), K = logits.size(1), C = feats.size(1);
  const auto acc = acc_dtype(logits.scalar_type());
  TORCH_CHECK(K <= srp::kMaxClasses, "soft_region_pool: the CUDA backward takes at most ", srp::kMaxClasses,
              " classes, got logits of shape ", logits.sizes());
  const std::vector<int64_t> bkc{B, K, C};
  for (const at::Tensor* t : {&grad_out, &out}) {
    const char* name = t == &out ? "out" : "grad_out";
    TORCH_CHECK(t->sizes() == c10::IntArrayRef(bkc), "soft_region_pool: ", name, " must have shape (B, K, C) = ",
                c10::IntArrayRef(bkc), ", got ", t->sizes());
    // out may also be the forward's out_acc
    const bool dtype_ok = t->scalar_type() == logits.scalar_type() || (t == &out && t->scalar_type() == acc);
    TORCH_CHECK(dtype_ok && t->device() == logits.device(), "soft_region_pool: ", name, " must be ",
                logits.scalar_type(), t == &out ? " (or the forward's out_acc)" : "", " on ", logits.device(),
                ", got ", t->scalar_type(), " on ", t->device(), " (shape ", t->sizes(), ")");
  }
  TORCH_CHECK(stats.sizes() == c10::IntArrayRef({B, K, 2}), "soft_region_pool: stats must have shape (B, K, 2) = (",
              B, ", ", K, ", 2), got ", stats.sizes());
  TORCH_CHECK(stats.scalar_type() == acc && stats.device() == logits.device(), "soft_region_pool: stats must be ",
              acc, " on ", logits.device(), " for ", logits.scalar_type(), " inputs, got ", stats.scalar_type(), " on ",
              stats.device());
  if (dlogits) check_grad_buffer(*dlogits, logits, "dlogits");
  if (dfeats) check_grad_buffer(*dfeats, feats, "dfeats");
  if (!dlogits && !dfeats) return {std::nullopt, std::nullopt};

  c10::OptionalDeviceGuard guard(logits.device());
  const at::Tensor l3 = logits.flatten(2), f3 = feats.flatten(2);
  const at::Tensor out_c = out.contiguous(), stats_c = stats.contiguous();
  at::Tensor delta = at::empty({B, K}, logits.options().dtype(acc));
  Problem p = make_problem(l3, f3, scale);
  // read only in the backward kernels
  (out.scalar_type() == logits.scalar_type() ? p.out : p.out_acc) = const_cast<void*>(out_c.const_data_ptr());
  p.stats = const_cast<void*>(stats_c.const_data_ptr());
  p.grad_out = grad_out.const_data_ptr();
  p.sdo = strides3(grad_out);
  p.delta = delta.mutable_data_ptr();
  if (dlogits) {
    const at::Tensor d3 = dlogits->flatten(2);  // a view: check_grad_buffer
    p.dlogits = d3.mutable_data_ptr();
    p.sdl = strides3(d3);
  }
  if (dfeats) {
    const at::Tensor d3 = dfeats->flatten(2);
    p.dfeats = d3.mutable_data_ptr();
    p.sdf = strides3(d3);
  }
  if (logits.is_cuda()) {
#ifdef SSLTM_WITH_CUDA
    srp::backward_cuda(p);
#endif
  } else {
    srp::backward_cpu(p);
  }
  return {dlogits, dfeats};
}

}  // namespace ssltm

#ifndef SSLTM_NO_PYTHON
namespace py = pybind11;

namespace ssltm {
void bind_soft_region_pool(py::module_& m) {
  m.attr("SOFT_REGION_POOL_MAX_CLASSES") = py::int_(srp::kMaxClasses);
  m.def("soft_region_pool_forward", &ssltm::soft_region_pool_forward, py::arg("logits"), py::arg("feats"),
        py::arg("scale"), py::arg("splits") = 0,
        "OCR soft region pooling forward. logits (B, K, H, W), feats (B, C, H, W) of one dtype and device, any\n"
        "strides. Returns (out (B, K, C) contiguous in the inputs' dtype, stats (B, K, 2) float32, float64 for\n"
        "float64 inputs: the maximum of sign(scale) * logits and the log of the softmax denominator per (b, k),\n"
        "out_acc: out in float32 for 16-bit inputs, else None).\n"
        "splits > 0 forces the number of position splits (testing); 0 chooses it. CUDA tensors run the CUDA\n"
        "kernels, CPU tensors their emulation.");
  m.def("soft_region_pool_backward", &ssltm::soft_region_pool_backward, py::arg("grad_out"), py::arg("logits"),
        py::arg("feats"), py::arg("out"), py::arg("stats"), py::arg("scale"), py::arg("dlogits") = py::none(),
        py::arg("dfeats") = py::none(),
        "OCR soft region pooling backward. Writes the gradients into dlogits (B, K, H, W) and dfeats\n"
        "(B, C, H, W) (the inputs' dtype and device, H and W mergeable) and returns them; one given as None is\n"
        "not computed. out: the forward's out or out_acc. At most SOFT_REGION_POOL_MAX_CLASSES classes.");
}
}  // namespace ssltm
#endif
