// The GCC assignment's entry points in ssltm_kernels._C (bound by bind_gcc_assign, called from
// module.cpp): input checks, output/workspace allocation, and dispatch to the CUDA launchers (CUDA
// tensors) or to their CPU emulation (CPU tensors, used to test the kernels' code without a GPU).
//
// Built with -DSSLTM_WITH_CUDA when the CUDA sources are compiled in. With -DSSLTM_NO_PYTHON (the
// CMake library for C++ users) only the C++ functions ssltm::gcc_assign_forward/backward are compiled.
#include <ATen/ATen.h>
#ifndef SSLTM_NO_PYTHON
#include <torch/python.h>  // pybind11 + tensor casters, lighter than torch/extension.h
#endif
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <utility>

#include "bindings_common.h"
#include "gcc_assign_core.cuh"
#include "include/ssltm_kernels/gcc_assign.h"

namespace ssltm {
namespace gcc {
void forward_cpu(const Problem& p);
void backward_cpu(const Problem& p);
#ifdef SSLTM_WITH_CUDA
void forward_cuda(const Problem& p);
void backward_cuda(const Problem& p);
#endif
}  // namespace gcc

namespace {

gcc::Strides3 strides3(const at::Tensor& t) { return gcc::Strides3{t.stride(0), t.stride(1), t.stride(2)}; }

void check_inputs(const at::Tensor& feats, const at::Tensor& centers, const at::Tensor& valid) {
  TORCH_CHECK(feats.dim() == 3, "gcc_assign: feats must be 3-D (B, K, D), got shape ", feats.sizes());
  TORCH_CHECK(centers.dim() == 3, "gcc_assign: centers must be 3-D (T, K, D), got shape ", centers.sizes());
  TORCH_CHECK(centers.size(1) == feats.size(1) && centers.size(2) == feats.size(2),
              "gcc_assign: centers must have shape (T, K, D) = (T, ", feats.size(1), ", ", feats.size(2),
              ") to match feats ", feats.sizes(), ", got ", centers.sizes());
  TORCH_CHECK(valid.dim() == 2 && valid.size(0) == feats.size(0) && valid.size(1) == feats.size(1),
              "gcc_assign: valid must have shape (B, K) = (", feats.size(0), ", ", feats.size(1),
              ") to match feats ", feats.sizes(), ", got ", valid.sizes());
  TORCH_CHECK(valid.scalar_type() == at::kBool, "gcc_assign: valid must be bool, got ", valid.scalar_type(),
              " of shape ", valid.sizes());
  TORCH_CHECK(feats.numel() > 0 && centers.numel() > 0, "gcc_assign: feats and centers must not be empty, got "
              "feats ", feats.sizes(), " and centers ", centers.sizes());
  check_kernel_dtype(feats, "gcc_assign", "feats", /*float64_on_cpu=*/false);
  const auto dtype = feats.scalar_type();
  TORCH_CHECK(centers.scalar_type() == dtype, "gcc_assign: centers must have the dtype of feats (", dtype,
              "), got ", centers.scalar_type(), " of shape ", centers.sizes());
  check_kernel_device(feats, "gcc_assign", "feats");
  TORCH_CHECK(centers.device() == feats.device(), "gcc_assign: centers must be on the device of feats (",
              feats.device(), "), got ", centers.device(), " (shape ", centers.sizes(), ")");
  TORCH_CHECK(valid.device() == feats.device(), "gcc_assign: valid must be on the device of feats (",
              feats.device(), "), got ", valid.device(), " (shape ", valid.sizes(), ")");
  TORCH_CHECK(gcc::fwd_blocks(gcc::Sizes{feats.size(0), feats.size(1), 1, 1}) <= std::numeric_limits<int32_t>::max() &&
                  gcc::bwd_blocks(gcc::Sizes{1, feats.size(1), 1, feats.size(2)}) <= std::numeric_limits<int32_t>::max() &&
                  feats.size(0) * feats.size(1) < (int64_t(1) << 31),
              "gcc_assign: feats of shape ", feats.sizes(), " is too large for the kernels' launch grid");
}

void check_scalar(const at::Tensor& t, const at::Tensor& feats, const char* name) {
  TORCH_CHECK(t.numel() == 1 && t.dim() == 0, "gcc_assign: ", name, " must be a 0-dim tensor, got shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "gcc_assign: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == feats.device(), "gcc_assign: ", name, " must be on the device of feats (",
              feats.device(), "), got ", t.device());
}

gcc::Problem make_problem(const at::Tensor& feats, const at::Tensor& centers, const at::Tensor& valid) {
  gcc::Problem p{};
  p.n = gcc::Sizes{feats.size(0), feats.size(1), centers.size(0), feats.size(2)};
  p.dtype = static_cast<int>(feats.scalar_type());
  p.device_index = feats.is_cuda() ? feats.get_device() : -1;
  p.feats = feats.const_data_ptr();
  p.centers = centers.const_data_ptr();
  p.valid = valid.const_data_ptr<bool>();
  p.sf = strides3(feats);
  p.sc = strides3(centers);
  p.sv_b = valid.stride(0);
  p.sv_k = valid.stride(1);
  return p;
}

// The forward's ticket counter on the current stream of a CUDA device: one int32 kept for the life of
// the process, zero between launches (each launch's last block resets it), so a launch needs no memset.
// One per stream, so that launches on concurrent streams do not share one. The map is never destroyed:
// its tensors must not be freed after the CUDA allocator at exit.
unsigned int* ticket_counter(const at::Tensor& like) {
  static std::mutex mutex;
  static auto* counters = new std::map<std::pair<c10::DeviceIndex, c10::StreamId>, at::Tensor>();
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(like.device().type())->getStream(like.device());
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& counter = (*counters)[{like.device().index(), stream.id()}];
  if (!counter.defined()) counter = at::zeros({1}, like.options().dtype(at::kInt));
  return reinterpret_cast<unsigned int*>(counter.mutable_data_ptr<int>());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gcc_assign_forward(const at::Tensor& feats,
                                                                              const at::Tensor& centers,
                                                                              const at::Tensor& valid) {
  check_inputs(feats, centers, valid);
  c10::OptionalDeviceGuard guard(feats.device());
  const int64_t B = feats.size(0), K = feats.size(1), D = feats.size(2);
  at::Tensor index = at::empty({B, K}, feats.options().dtype(at::kLong));
  at::Tensor nearest = at::empty({B, K, D}, centers.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor loss = at::empty({}, feats.options().dtype(at::kFloat));
  at::Tensor norm = at::empty({}, feats.options().dtype(at::kFloat));
  gcc::Problem p = make_problem(feats, centers, valid);
  // every block stores its two entries before the last one reads them: no fill
  at::Tensor shares = at::empty({2 * gcc::fwd_blocks(p.n)}, feats.options().dtype(at::kFloat));
  p.index = index.mutable_data_ptr<int64_t>();
  p.nearest = nearest.mutable_data_ptr();
  p.shares = shares.mutable_data_ptr<float>();
  p.loss = loss.mutable_data_ptr<float>();
  p.norm = norm.mutable_data_ptr<float>();
  if (feats.is_cuda()) {
#ifdef SSLTM_WITH_CUDA
    p.counter = ticket_counter(feats);
    gcc::forward_cuda(p);
#endif
  } else {
    gcc::forward_cpu(p);
  }
  return {index, nearest, loss, norm};
}

at::Tensor gcc_assign_backward(const std::optional<at::Tensor>& grad_nearest,
                               const std::optional<at::Tensor>& grad_loss, const at::Tensor& feats,
                               const at::Tensor& centers, const at::Tensor& valid, const at::Tensor& index,
                               const at::Tensor& norm) {
  check_inputs(feats, centers, valid);
  TORCH_CHECK(index.sizes() == valid.sizes() && index.scalar_type() == at::kLong && index.device() == feats.device(),
              "gcc_assign: index must be the forward's (B, K) = ", valid.sizes(), " int64 tensor on ", feats.device(),
              ", got ", index.scalar_type(), " of shape ", index.sizes(), " on ", index.device());
  check_scalar(norm, feats, "norm");
  if (grad_nearest.has_value()) {
    const at::Tensor& g = *grad_nearest;
    TORCH_CHECK(g.sizes() == feats.sizes(), "gcc_assign: grad_nearest must have the shape of feats ", feats.sizes(),
                ", got ", g.sizes());
    TORCH_CHECK(g.scalar_type() == centers.scalar_type(), "gcc_assign: grad_nearest must have the dtype of centers (",
                centers.scalar_type(), "), got ", g.scalar_type(), " of shape ", g.sizes());
    TORCH_CHECK(g.device() == feats.device(), "gcc_assign: grad_nearest must be on the device of feats (",
                feats.device(), "), got ", g.device(), " (shape ", g.sizes(), ")");
  }
  if (grad_loss.has_value()) check_scalar(*grad_loss, feats, "grad_loss");
  c10::OptionalDeviceGuard guard(feats.device());
  at::Tensor dcenters = at::empty(centers.sizes(), centers.options().memory_format(at::MemoryFormat::Contiguous));
  const at::Tensor index_c = index.contiguous();
  gcc::Problem p = make_problem(feats, centers, valid);
  p.index_in = index_c.const_data_ptr<int64_t>();
  p.norm_in = norm.const_data_ptr<float>();
  p.grad_loss = grad_loss.has_value() ? grad_loss->const_data_ptr<float>() : nullptr;
  if (grad_nearest.has_value()) {
    p.grad_nearest = grad_nearest->const_data_ptr();
    p.sg = strides3(*grad_nearest);
  }
  p.dcenters = dcenters.mutable_data_ptr();
  if (feats.is_cuda()) {
#ifdef SSLTM_WITH_CUDA
    gcc::backward_cuda(p);
#endif
  } else {
    gcc::backward_cpu(p);
  }
  return dcenters;
}

}  // namespace ssltm

#ifndef SSLTM_NO_PYTHON
namespace py = pybind11;

namespace ssltm {
void bind_gcc_assign(py::module_& m) {
  m.def("gcc_assign_forward", &ssltm::gcc_assign_forward, py::arg("feats"), py::arg("centers"), py::arg("valid"),
        "GCC nearest-cluster assignment forward. feats (B, K, D), centers (T, K, D) of one dtype (float32,\n"
        "float16, bfloat16), valid (B, K) bool. Returns (index (B, K) int64, nearest (B, K, D) in centers'\n"
        "dtype, loss, norm), loss and norm 0-dim float32, norm = 1 / (n_valid * D) or 0. CUDA tensors run\n"
        "the CUDA kernel (one launch), CPU tensors its emulation.");
  m.def("gcc_assign_backward", &ssltm::gcc_assign_backward, py::arg("grad_nearest"), py::arg("grad_loss"),
        py::arg("feats"), py::arg("centers"), py::arg("valid"), py::arg("index"), py::arg("norm"),
        "GCC nearest-cluster assignment backward: dcenters (T, K, D) in centers' dtype from grad_nearest\n"
        "(B, K, D) and grad_loss (0-dim float32), either None; index and norm from the forward. No\n"
        "gradient of feats (stop-gradient). One launch on CUDA tensors, deterministic.");
}
}  // namespace ssltm
#endif
