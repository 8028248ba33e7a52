// The Python module ssltm_kernels._C: each op binds its own entry points (csrc/<op>_bindings.cpp).
// CUDA tensors run the CUDA kernels (when built with -DSSLTM_WITH_CUDA), CPU tensors a CPU emulation of
// the same per-thread code, used to test it without a GPU.
#ifndef SSLTM_NO_PYTHON
#include <torch/python.h>

namespace py = pybind11;

namespace ssltm {
void bind_window_attention_3d(py::module_& m);
void bind_dwconv3x3(py::module_& m);
void bind_soft_region_pool(py::module_& m);
void bind_gcc_assign(py::module_& m);
}  // namespace ssltm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ssltm_kernels._C: the fused kernels of ssltm_kernels (CUDA, with a CPU emulation of the same code)";
#ifdef SSLTM_WITH_CUDA
  m.attr("WITH_CUDA") = py::bool_(true);
#else
  m.attr("WITH_CUDA") = py::bool_(false);
#endif
  ssltm::bind_window_attention_3d(m);
  ssltm::bind_dwconv3x3(m);
  ssltm::bind_soft_region_pool(m);
  ssltm::bind_gcc_assign(m);
}
#endif
