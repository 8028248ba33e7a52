// CPU emulation of the CUDA kernels in dwconv3x3.cu: every kernel runs the same per-thread functions of
// dwconv3x3_core.cuh, block after block and thread after thread, with the block's shared memory as an
// array between what is a __syncthreads() barrier on the GPU. The accumulation type is float for
// float/half/bfloat16 inputs (as on the GPU) and double for double inputs (a precise check of the
// index arithmetic).
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <vector>

#include "dwconv3x3_core.cuh"

namespace ssltm {
namespace dwc {
namespace {

template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// partial_kernel of the .cu
template <typename scalar_t, typename acc_t>
void emulate_partials(const Args<scalar_t, acc_t>& a) {
  std::vector<acc_t> shared(kPartialLanes * kPartialRows * kPartialChannels);
  const int64_t chunks = (a.s.C + kPartialChannels - 1) / kPartialChannels;
  for (int64_t group = 0; group < a.groups; ++group) {
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      for (int tid = 0; tid < kPartialThreads; ++tid) {
        acc_t sums[kPartialRows];
        partial_thread(a, chunk, group, tid, sums);
        for (int r = 0; r < kPartialRows; ++r) shared[shared_index(tid, r)] = sums[r];
      }
      for (int lane = 0; lane < kPartialChannels; ++lane) partial_store(a, chunk, group, lane, shared.data());
    }
  }
}

}  // namespace

void forward_cpu(const Problem& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, static_cast<at::ScalarType>(p.dtype),
                                  "dwconv3x3_forward_cpu", [&] {
    const auto a = make_args<scalar_t, typename AccType<scalar_t>::type>(p);
    const int64_t total = p.s.frames * p.s.H * p.s.W * p.s.C;
    for (int64_t e = 0; e < total; ++e) forward_element(a, e);
  });
}

void backward_cpu(const Problem& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, static_cast<at::ScalarType>(p.dtype),
                                  "dwconv3x3_backward_cpu", [&] {
    const auto a = make_args<scalar_t, typename AccType<scalar_t>::type>(p);
    emulate_partials(a);
    const int64_t total = p.s.frames * p.s.H * p.s.W * p.s.C;
    for (int64_t e = 0; e < total; ++e) dx_element(a, p.gelu ? a.g : a.dout, e);
    for (int64_t e = 0; e < int64_t(kPartialRows) * p.s.C; ++e) final_sum_element(a, e);
  });
}

}  // namespace dwc
}  // namespace ssltm
