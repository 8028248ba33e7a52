// The depthwise 3x3 convolution's entry points in ssltm_kernels._C (bound by bind_dwconv3x3, called from
// module.cpp): input checks, output allocation, and dispatch to the CUDA launchers (CUDA tensors) or to
// their CPU emulation (CPU tensors, used to test the kernels' code without a GPU).
//
// Built with -DSSLTM_WITH_CUDA when the CUDA sources are compiled in. With -DSSLTM_NO_PYTHON (the CMake
// library for C++ users) only the C++ functions ssltm::dwconv3x3_forward/backward are compiled.
#include <ATen/ATen.h>
#ifndef SSLTM_NO_PYTHON
#include <torch/python.h>  // pybind11 + tensor casters, lighter than torch/extension.h
#endif
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>

#include "bindings_common.h"
#include "dwconv3x3_core.cuh"
#include "include/ssltm_kernels/dwconv3x3.h"

namespace ssltm {
namespace dwc {
void forward_cpu(const Problem& p);
void backward_cpu(const Problem& p);
#ifdef SSLTM_WITH_CUDA
void forward_cuda(const Problem& p);
void backward_cuda(const Problem& p);
int multiprocessors_cuda(int device_index);
#endif
}  // namespace dwc

namespace {

// Pixel groups of the weight/bias partial sums: on a GPU about 8 blocks per multiprocessor in all; the
// CPU emulation takes a few, so that the reduction across groups is exercised.
constexpr int64_t kBlocksPerMultiprocessor = 8;
constexpr int64_t kEmulatedGroups = 3;

struct Checked {
  dwc::Shape s;
  dwc::Strides sx;
  bool gelu;
  at::Tensor weight, bias;  // contiguous (bias undefined when absent)
};

Checked check_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     const std::string& activation) {
  TORCH_CHECK(x.dim() == 4 || x.dim() == 5, "dwconv3x3: x must be 4-D (B, H, W, C) or 5-D (B, T, H, W, C), got "
              "shape ", x.sizes());
  check_kernel_device(x, "dwconv3x3", "x");
  check_kernel_dtype(x, "dwconv3x3", "x", /*float64_on_cpu=*/true);
  const auto dtype = x.scalar_type();
  TORCH_CHECK(x.numel() > 0, "dwconv3x3: x must not be empty, got shape ", x.sizes());
  const int64_t C = x.size(-1);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 && weight.size(2) == 3 &&
                  weight.size(3) == 3,
              "dwconv3x3: weight must have shape (C, 1, 3, 3) = (", C, ", 1, 3, 3) for x of shape ", x.sizes(),
              ", got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == dtype, "dwconv3x3: weight must have the dtype of x (", dtype, "), got ",
              weight.scalar_type(), " (weight shape ", weight.sizes(), ")");
  TORCH_CHECK(weight.device() == x.device(), "dwconv3x3: weight must be on the device of x (", x.device(), "), got ",
              weight.device(), " (weight shape ", weight.sizes(), ")");
  Checked c;
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == C, "dwconv3x3: bias must have shape (C,) = (", C, ",) for x of shape ",
                x.sizes(), ", got ", b.sizes());
    TORCH_CHECK(b.scalar_type() == dtype, "dwconv3x3: bias must have the dtype of x (", dtype, "), got ",
                b.scalar_type(), " (bias shape ", b.sizes(), ")");
    TORCH_CHECK(b.device() == x.device(), "dwconv3x3: bias must be on the device of x (", x.device(), "), got ",
                b.device(), " (bias shape ", b.sizes(), ")");
    c.bias = b.contiguous();
  }
  TORCH_CHECK(activation.empty() || activation == "gelu", "dwconv3x3: activation must be \"\" (none) or \"gelu\", "
              "got \"", activation, "\"");
  c.gelu = activation == "gelu";
  c.weight = weight.contiguous();
  const bool frames = x.dim() == 5;
  const int64_t B = x.size(0), T = frames ? x.size(1) : 1;
  c.s = dwc::Shape{B * T, T, x.size(-3), x.size(-2), C};
  c.sx = dwc::Strides{x.stride(0), frames ? x.stride(1) : 0, x.stride(-3), x.stride(-2), x.stride(-1)};
  return c;
}

dwc::Problem make_problem(const Checked& c, const at::Tensor& x) {
  dwc::Problem p{};
  p.s = c.s;
  p.sx = c.sx;
  p.dtype = static_cast<int>(x.scalar_type());
  p.device_index = x.is_cuda() ? x.get_device() : -1;
  p.gelu = c.gelu;
  p.x = x.const_data_ptr();
  p.weight = c.weight.const_data_ptr();
  p.bias = c.bias.defined() ? c.bias.const_data_ptr() : nullptr;
  return p;
}

int64_t choose_groups(const at::Tensor& x, const dwc::Shape& s, int64_t num_groups) {
  const int64_t pixels = s.frames * s.H * s.W;
  if (num_groups > 0) return std::min(num_groups, pixels);
  int64_t groups = kEmulatedGroups;
#ifdef SSLTM_WITH_CUDA
  if (x.is_cuda()) {
    const int64_t chunks = (s.C + dwc::kPartialChannels - 1) / dwc::kPartialChannels;
    const int64_t blocks = kBlocksPerMultiprocessor * dwc::multiprocessors_cuda(x.get_device());
    groups = std::max<int64_t>(1, (blocks + chunks - 1) / chunks);
  }
#endif
  return std::min({groups, pixels, int64_t(65535)});
}

}  // namespace

at::Tensor dwconv3x3_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const std::string& activation) {
  const Checked c = check_inputs(x, weight, bias, activation);
  c10::OptionalDeviceGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  dwc::Problem p = make_problem(c, x);
  p.out = out.mutable_data_ptr();
  if (x.is_cuda()) {
#ifdef SSLTM_WITH_CUDA
    dwc::forward_cuda(p);
#endif
  } else {
    dwc::forward_cpu(p);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> dwconv3x3_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::string& activation, int64_t num_groups) {
  const Checked c = check_inputs(x, weight, bias, activation);
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "dwconv3x3: grad_out must have the shape of x ", x.sizes(), ", got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "dwconv3x3: grad_out must have the dtype of x (",
              x.scalar_type(), "), got ", grad_out.scalar_type(), " (grad_out shape ", grad_out.sizes(), ")");
  TORCH_CHECK(grad_out.device() == x.device(), "dwconv3x3: grad_out must be on the device of x (", x.device(),
              "), got ", grad_out.device(), " (grad_out shape ", grad_out.sizes(), ")");
  TORCH_CHECK(num_groups >= 0, "dwconv3x3: num_groups must be >= 0 (0: automatic), got ", num_groups);
  const at::Tensor dout = grad_out.contiguous();  // autograd may hand over a broadcast gradient
  c10::OptionalDeviceGuard guard(x.device());
  const auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  const auto acc_opts = x.options().dtype(acc_dtype(x.scalar_type()));
  const int64_t C = c.s.C;
  dwc::Problem p = make_problem(c, x);
  p.groups = choose_groups(x, c.s, num_groups);
  // every element of the partials, g and dx is stored exactly once by the kernels: no fill
  at::Tensor dx = at::empty(x.sizes(), opts);
  at::Tensor g = c.gelu ? at::empty(x.sizes(), opts) : at::Tensor();
  at::Tensor partial = at::empty({p.groups, dwc::kPartialRows, C}, acc_opts);
  at::Tensor dweight = at::empty({C, 1, 3, 3}, acc_opts);
  at::Tensor dbias = at::empty({C}, acc_opts);
  p.dout = dout.const_data_ptr();
  p.g = g.defined() ? g.mutable_data_ptr() : nullptr;
  p.dx = dx.mutable_data_ptr();
  p.partial = partial.mutable_data_ptr();
  p.dweight = dweight.mutable_data_ptr();
  p.dbias = dbias.mutable_data_ptr();
  if (x.is_cuda()) {
#ifdef SSLTM_WITH_CUDA
    dwc::backward_cuda(p);
#endif
  } else {
    dwc::backward_cpu(p);
  }
  return {dx, dweight, bias.has_value() ? std::optional<at::Tensor>(dbias) : std::nullopt};
}

}  // namespace ssltm

#ifndef SSLTM_NO_PYTHON
namespace py = pybind11;

namespace ssltm {
void bind_dwconv3x3(py::module_& m) {
  m.def("dwconv3x3_forward", &ssltm::dwconv3x3_forward, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("activation"),
        "Fused depthwise 3x3 convolution (stride 1, zero padding 1) + optional GELU (activation \"\" or\n"
        "\"gelu\") over channels-last x (B, H, W, C) or (B, T, H, W, C), any strides; weight (C, 1, 3, 3),\n"
        "bias (C,) or None, of x's dtype. Returns the output, contiguous, x's shape and dtype. CUDA tensors\n"
        "run the CUDA kernels, CPU tensors their emulation.");
  m.def("dwconv3x3_backward", &ssltm::dwconv3x3_backward, py::arg("grad_out"), py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("activation"), py::arg("num_groups") = 0,
        "Backward of dwconv3x3_forward. Returns (dx contiguous in x's dtype, dweight (C, 1, 3, 3), dbias (C,)\n"
        "or None without a bias), the last two float32 (float64 for float64 inputs), deterministic.\n"
        "num_groups > 0 forces the number of pixel groups of the weight/bias reduction (testing).");
}
}  // namespace ssltm
#endif
