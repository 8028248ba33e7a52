// Calls the fused 3D window attention of libssltm_kernels from C++ on small CPU tensors (the library
// runs its CPU emulation of the CUDA kernels for them), forward and backward, checks that every result
// is finite and prints a summary. Exits non-zero on a non-finite result or an exception.
#include <ssltm_kernels/window_attention_3d.h>

#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <exception>
#include <optional>
#include <string>
#include <vector>

namespace {

bool report(const std::string& name, const at::Tensor& t) {
  const bool finite = at::isfinite(t).all().item<bool>();
  std::printf("%-8s shape %-26s sum %+.6f  %s\n", name.c_str(), c10::str(t.sizes()).c_str(),
              t.sum().item<double>(), finite ? "finite" : "NOT FINITE");
  return finite;
}

}  // namespace

int main() try {
  at::manual_seed(0);
  // one clip of 3 x 5 x 5 tokens, 2 heads of 8 channels, windows of 2 x 3 x 3 shifted by (1, 1, 1): every
  // axis pads (the pad rows attend as pad_k / pad_v) and the shift wraps, so every code path runs
  const int64_t B = 1, T = 3, H = 5, W = 5, heads = 2, head_dim = 8;
  const std::vector<int64_t> window{2, 3, 3}, shift{1, 1, 1};
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor q = at::randn({B, T, H, W, heads, head_dim}, opts);
  const at::Tensor k = at::randn({B, T, H, W, heads, head_dim}, opts);
  const at::Tensor v = at::randn({B, T, H, W, heads, head_dim}, opts);
  const int64_t table_size = (2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1);
  const at::Tensor table = 0.02 * at::randn({table_size, heads}, opts);
  const at::Tensor pad_k = at::randn({heads, head_dim}, opts), pad_v = at::randn({heads, head_dim}, opts);
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));

  // a plain volume: the bias window and the table's window are the attention window
  const auto [out, lse] = ssltm::window_attention_3d_forward(q, k, v, table, pad_k, pad_v, std::nullopt, window,
                                                             shift, window, window, scale);
  const at::Tensor grad_out = at::randn_like(out);
  const auto [dq, dk, dv, dtable, dpad_k, dpad_v] = ssltm::window_attention_3d_backward(
      grad_out, q, k, v, out, lse, table, pad_k, pad_v, std::nullopt, window, shift, window, window, scale,
      /*need_table_grad=*/true, /*need_pad_grad=*/true, /*num_groups=*/0, /*grad_qkv=*/std::nullopt);

  bool ok = report("out", out) & report("lse", lse) & report("dq", dq) & report("dk", dk) & report("dv", dv);
  for (const auto& [name, grad] : {std::pair{"dtable", dtable}, {"dpad_k", dpad_k}, {"dpad_v", dpad_v}}) {
    if (!grad) {
      std::printf("%-8s missing\n", name);
      ok = false;
    } else {
      ok &= report(name, *grad);
    }
  }

  // the same backward writing dq, dk, dv into one packed (B, T, H, W, 3, heads, head_dim) buffer, the
  // gradient of a fused qkv projection
  const at::Tensor grad_qkv = at::empty({B, T, H, W, 3, heads, head_dim}, opts);
  ssltm::window_attention_3d_backward(grad_out, q, k, v, out, lse, table, pad_k, pad_v, std::nullopt, window, shift,
                                      window, window, scale, false, false, 0, grad_qkv);
  const bool packed = at::allclose(grad_qkv.select(4, 0), dq) && at::allclose(grad_qkv.select(4, 1), dk) &&
                      at::allclose(grad_qkv.select(4, 2), dv);
  std::printf("grad_qkv %s\n", packed ? "matches dq, dk, dv" : "DIFFERS from dq, dk, dv");
  ok &= packed;
  std::printf("%s\n", ok ? "window_attention_demo: ok" : "window_attention_demo: FAILED");
  return ok ? 0 : 1;
} catch (const std::exception& error) {
  std::fprintf(stderr, "window_attention_demo: %s\n", error.what());
  return 1;
}
