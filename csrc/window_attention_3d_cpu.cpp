// CPU emulation of the CUDA kernels in window_attention_3d.cu.
//
// Not a second implementation: every block runs the same phase functions of
// window_attention_3d_core.cuh in the same order as the kernels, with loops over the threads of a
// block between what are __syncthreads() barriers on the GPU. Blocks run one after another. The
// accumulation type is float for float/half/bfloat16 inputs (as on the GPU) and double for double
// inputs (a precise check of the index arithmetic).
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <vector>

#include "window_attention_3d_core.cuh"

namespace ssltm {
namespace wa3d {
namespace {

int attention_chunks(const Geometry& g) { return (g.N + kThreads - 1) / kThreads; }

// query_rows_kernel of the .cu, block after block, thread after thread between the barriers
template <int HD, template <int, typename> class Pass, typename scalar_t, typename acc_t>
void emulate_query_rows(const Args<scalar_t, acc_t>& a) {
  using TileT = Tile<HD, acc_t>;
  using P = Pass<HD, acc_t>;
  auto tile = std::make_unique<TileT>();
  std::vector<typename P::Thread> th(kThreads);
  for (int win = 0; win < a.g.nwin; ++win) {
    for (int head = 0; head < a.g.nh; ++head) {
      for (int chunk = 0; chunk < attention_chunks(a.g); ++chunk) {
        const WinPos wp = window_pos(a.g, win);
        const float* am = amask_window(a, win);
        for (int tid = 0; tid < kThreads; ++tid) P::init(a, wp, head, chunk * kThreads + tid, th[tid]);
        for (int k0 = 0; k0 < a.g.N; k0 += TileT::R) {
          for (int tid = 0; tid < TileT::R; ++tid) stage_kv_meta(a, wp, head, k0, tid, *tile);
          for (int tid = 0; tid < kThreads; ++tid) stage_kv_rows(a, head, k0, tid, kThreads, *tile);
          for (int tid = 0; tid < kThreads; ++tid) P::tile(a, head, am, chunk * kThreads + tid, k0, *tile, th[tid]);
        }
        for (int tid = 0; tid < kThreads; ++tid) P::finish(a, head, th[tid]);
      }
    }
  }
}

// tile_product of the .cu for the whole block in one call, after checking what WMMA requires of its
// operands (32-byte aligned tile origins, row strides in multiples of 16 bytes, whole tiles) and
// that the result overwrites neither operand nor leaves the block's shared memory.
template <typename scalar_t, bool kBTransposed>
void emulate_tile_product(const TileProduct<scalar_t, kBTransposed>& p, unsigned char* smem, int smem_bytes) {
  constexpr int elem = int(sizeof(scalar_t));
  const int a_end = p.a + ((p.m - 1) * p.lda + p.k) * elem;
  const int b_end = p.b + (kBTransposed ? (p.n - 1) * p.ldb + p.k : (p.k - 1) * p.ldb + p.n) * elem;
  const int c_end = p.c + ((p.m - 1) * p.ldc + p.n) * 4;
  TORCH_CHECK(p.m % kMma == 0 && p.n % kMma == 0 && p.k % kMma == 0, "tile product: partial tiles");
  TORCH_CHECK(p.a % 32 == 0 && p.b % 32 == 0 && p.c % 32 == 0, "tile product: misaligned operand");
  TORCH_CHECK((p.lda * elem) % 16 == 0 && (p.ldb * elem) % 16 == 0 && (p.ldc * 4) % 16 == 0,
              "tile product: row stride not a multiple of 16 bytes");
  TORCH_CHECK((c_end <= p.a || p.c >= a_end) && (c_end <= p.b || p.c >= b_end), "tile product: C overlaps A or B");
  TORCH_CHECK(a_end <= smem_bytes && b_end <= smem_bytes && c_end <= smem_bytes, "tile product: out of bounds");
  const scalar_t* A = reinterpret_cast<const scalar_t*>(smem + p.a);
  const scalar_t* B = reinterpret_cast<const scalar_t*>(smem + p.b);
  float* C = reinterpret_cast<float*>(smem + p.c);
  for (int i = 0; i < p.m; ++i) {
    for (int j = 0; j < p.n; ++j) {
      float acc = 0.0f;
      for (int k = 0; k < p.k; ++k) {
        acc += float(A[i * p.lda + k]) * float(kBTransposed ? B[j * p.ldb + k] : B[k * p.ldb + j]);
      }
      C[i * p.ldc + j] = acc;
    }
  }
}

// Shared memory starts undefined on the GPU (and keeps what earlier phases left): NaN bytes make a
// read before a write visible.
void poison(std::vector<unsigned char>& smem, size_t begin, size_t end) {
  std::fill(smem.begin() + begin, smem.begin() + end, static_cast<unsigned char>(0xFF));
}

// forward_tc_kernel of the .cu
template <int HD, typename scalar_t>
void emulate_forward_tc(const Args<scalar_t, float>& a) {
  const FwdTcLayout<HD, scalar_t> layout(a.g.N);
  std::vector<unsigned char> smem(size_t(layout.bytes));
  for (int win = 0; win < a.g.nwin; ++win) {
    for (int head = 0; head < a.g.nh; ++head) {
      for (int q0 = 0; q0 < a.g.N; q0 += kTcQueries) {
        poison(smem, 0, smem.size());
        const WinPos wp = window_pos(a.g, win);
        for (int tid = 0; tid < kTcThreads; ++tid)
          fwd_tc_stage_meta(a, wp, head, q0, tid, kTcThreads, layout, smem.data());
        for (int tid = 0; tid < kTcThreads; ++tid) fwd_tc_stage_rows(a, head, tid, kTcThreads, layout, smem.data());
        emulate_tile_product(layout.scores(), smem.data(), layout.bytes);
        for (int r = 0; r < kTcQueries; ++r)
          fwd_tc_softmax_row(a, head, amask_window(a, win), q0, r, layout, smem.data());
        emulate_tile_product(layout.outputs(), smem.data(), layout.bytes);
        for (int tid = 0; tid < kTcThreads; ++tid) fwd_tc_write(a, head, tid, kTcThreads, layout, smem.data());
      }
    }
  }
}

// forward_cuda's choice between the tensor-core and the CUDA-core kernel, for the emulated device
template <int HD, typename scalar_t, typename acc_t>
void emulate_forward(const Args<scalar_t, acc_t>& a) {
  if constexpr (kTensorCoreInput<scalar_t>) {
    if (forward_on_tensor_cores(a.g.N, a.g.hd, kEmulatedDevice.smem_limit)) return emulate_forward_tc<HD>(a);
  }
  emulate_query_rows<HD, ForwardPass>(a);
}

// backward_tc_kernel of the .cu: the dq pass (kKeyChunk = false, one window per block) or the dk/dv
// pass (a window group per block)
template <int HD, typename scalar_t, bool kKeyChunk>
void emulate_backward_tc(const Args<scalar_t, float>& a) {
  const BwdTcLayout<HD, scalar_t> layout(a.g.N, kKeyChunk ? a.plan.dkv_rows : a.plan.dq_rows, kKeyChunk && a.wpart);
  std::vector<unsigned char> smem(size_t(layout.bytes));
  std::vector<PadSums<float>> pad(kTcThreads);
  const int blocks = kKeyChunk ? a.plan.groups : a.g.nwin;
  const int windows = kKeyChunk ? a.plan.group_size : 1;
  for (int block = 0; block < blocks; ++block) {
    for (int head = 0; head < a.g.nh; ++head) {
      for (int chunk = 0; chunk * layout.rows < a.g.N; ++chunk) {
        const int c0 = chunk * layout.rows;
        const GroupOut<float> out = kKeyChunk ? group_out(a, block, head, chunk) : GroupOut<float>{};
        poison(smem, 0, smem.size());
        if (kKeyChunk) {
          for (int tid = 0; tid < kTcThreads; ++tid) bwd_tc_begin_group(tid, layout, smem.data(), pad[tid]);
        }
        for (int j = 0; j < windows; ++j) {
          const int win = block * windows + j;
          if (win >= a.g.nwin) break;
          poison(smem, 0, size_t(layout.window_bytes));
          const WinPos wp = window_pos(a.g, win);
          for (int tid = 0; tid < kTcThreads; ++tid)
            bwd_tc_stage_meta<HD, scalar_t, kKeyChunk>(a, wp, head, c0, tid, kTcThreads, layout, smem.data());
          for (int tid = 0; tid < kTcThreads; ++tid)
            bwd_tc_stage_rows<HD, scalar_t, kKeyChunk>(a, tid, kTcThreads, layout, smem.data());
          emulate_tile_product(layout.scores(), smem.data(), layout.bytes);
          emulate_tile_product(layout.score_grads(), smem.data(), layout.bytes);
          for (int tid = 0; tid < kTcThreads; ++tid)
            bwd_tc_score_grads<HD, scalar_t, kKeyChunk>(a, head, amask_window(a, win), c0, tid, layout, smem.data());
          emulate_tile_product(layout.a_grads(), smem.data(), layout.bytes);
          if (kKeyChunk) emulate_tile_product(layout.b_grads(), smem.data(), layout.bytes);
          for (int tid = 0; tid < kTcThreads; ++tid)
            bwd_tc_write<HD, scalar_t, kKeyChunk>(a, head, c0, tid, kTcThreads, layout, smem.data(),
                                                  out.pad_k ? &pad[tid] : nullptr);
        }
        if (kKeyChunk) {
          for (int tid = 0; tid < kTcThreads; ++tid) bwd_tc_end_group(a, c0, tid, layout, smem.data(), out, pad[tid]);
        }
      }
    }
  }
}

// dkv_kernel of the .cu; the dS sums stand in for its dynamic shared memory
template <int HD, typename scalar_t, typename acc_t>
void emulate_dkv(const Args<scalar_t, acc_t>& a) {
  using TileT = Tile<HD, acc_t>;
  auto tile = std::make_unique<TileT>();
  std::vector<DkvThread<HD, acc_t>> th(kThreads);
  std::vector<acc_t> ds_sums(size_t(a.g.N) * a.plan.dkv_rows);
  const int N = a.g.N;
  for (int grp = 0; grp < a.plan.groups; ++grp) {
    for (int head = 0; head < a.g.nh; ++head) {
      for (int chunk = 0; chunk < a.plan.key_chunks; ++chunk) {
        const GroupOut<acc_t> out = group_out(a, grp, head, chunk);
        auto ds_col = [&](int tid) { return out.ds && tid < a.plan.dkv_rows ? ds_sums.data() + tid : nullptr; };
        auto key = [&](int tid) { return dkv_key(a, chunk, tid); };
        std::fill(ds_sums.begin(), ds_sums.end(), std::numeric_limits<acc_t>::quiet_NaN());
        for (int tid = 0; tid < kThreads; ++tid) dkv_begin_group(a, ds_col(tid), th[tid]);
        for (int j = 0; j < a.plan.group_size; ++j) {
          const int win = grp * a.plan.group_size + j;
          if (win >= a.g.nwin) break;
          const WinPos wp = window_pos(a.g, win);
          const float* am = amask_window(a, win);
          for (int tid = 0; tid < kThreads; ++tid) dkv_begin_window(a, wp, head, key(tid), th[tid]);
          for (int q0 = 0; q0 < N; q0 += TileT::R) {
            for (int tid = 0; tid < TileT::R; ++tid) stage_q_meta(a, wp, head, q0, tid, *tile);
            for (int tid = 0; tid < kThreads; ++tid) stage_q_rows(a, tid, kThreads, *tile);
            for (int tid = 0; tid < kThreads; ++tid) dkv_tile(a, head, am, key(tid), q0, *tile, ds_col(tid), th[tid]);
          }
          for (int tid = 0; tid < kThreads; ++tid) dkv_end_window(a, head, th[tid]);
          if (out.pad_k && window_has_padding(a.g, wp)) {
            for (int base = 0; base < a.plan.dkv_rows; base += TileT::R) {
              for (int tid = 0; tid < kThreads; ++tid) dkv_stage_pad(a, tid, base, th[tid], *tile);
              for (int tid = 0; tid < kThreads; ++tid) dkv_sum_pad(a, tid, *tile, th[tid]);
            }
          }
        }
        for (int tid = 0; tid < kThreads; ++tid) dkv_end_group(a, key(tid), tid, ds_col(tid), out, th[tid]);
      }
    }
  }
}

// backward_cuda's kernels: the plan's
template <int HD, typename scalar_t, typename acc_t>
void emulate_backward(const Args<scalar_t, acc_t>& a) {
  if constexpr (kTensorCoreInput<scalar_t>) {
    if (a.plan.tensor_cores) {
      emulate_backward_tc<HD, scalar_t, false>(a);
      emulate_backward_tc<HD, scalar_t, true>(a);
      return;
    }
  }
  emulate_query_rows<HD, DqPass>(a);
  emulate_dkv<HD>(a);
}

// table_grad_kernel and pad_grad_kernel of the .cu; the lanes' shares are added in the order of the
// kernel's warp shuffles (lane l takes lane l + offset's partial sum, offsets 16, 8, 4, 2, 1)
template <typename acc_t>
void emulate_reductions(const Problem& p) {
  const Geometry& g = p.g;
  if (p.wpart) {
    const acc_t* wpart = static_cast<const acc_t*>(p.wpart);
    acc_t* dtable = static_cast<acc_t*>(p.dtable);
    for (int i = 0; i < g.Ntab * g.nh; ++i) {
      acc_t lanes[kTableLanes];
      for (int lane = 0; lane < kTableLanes; ++lane)
        lanes[lane] = table_grad_lane(g, p.plan.groups, wpart, i / g.nh, i % g.nh, lane);
      for (int offset = kTableLanes / 2; offset > 0; offset /= 2) {
        for (int lane = 0; lane < offset; ++lane) lanes[lane] += lanes[lane + offset];
      }
      dtable[i] = lanes[0];
    }
  }
  if (p.padk_part) {
    acc_t* dk = static_cast<acc_t*>(p.dpad_k);
    acc_t* dv = static_cast<acc_t*>(p.dpad_v);
    for (int i = 0; i < g.nh * g.hd; ++i) {
      dk[i] = pad_grad_elem(g, p.plan, static_cast<const acc_t*>(p.padk_part), i / g.hd, i % g.hd);
      dv[i] = pad_grad_elem(g, p.plan, static_cast<const acc_t*>(p.padv_part), i / g.hd, i % g.hd);
    }
  }
}

}  // namespace

void forward_cpu(const Problem& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16,
                                  static_cast<at::ScalarType>(p.dtype), "window_attention_3d_forward_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const auto a = make_args<scalar_t, acc_t>(p);
    SSLTM_DISPATCH_HEAD_DIM(p.g.hd, [&] { emulate_forward<HD>(a); });
  });
}

void backward_cpu(const Problem& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16,
                                  static_cast<at::ScalarType>(p.dtype), "window_attention_3d_backward_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const auto a = make_args<scalar_t, acc_t>(p);
    // the partials are not zero-filled (every element has one store): NaN makes a missing one visible
    const Geometry& g = p.g;
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    if (a.wpart) std::fill_n(a.wpart, int64_t(a.plan.groups) * g.nh * g.N * g.N, nan);
    if (a.padk_part) {
      const int64_t len = int64_t(a.plan.groups) * g.nh * a.plan.key_chunks * g.hd;
      std::fill_n(a.padk_part, len, nan);
      std::fill_n(a.padv_part, len, nan);
    }
    SSLTM_DISPATCH_HEAD_DIM(p.g.hd, [&] { emulate_backward<HD>(a); });
    emulate_reductions<acc_t>(p);
  });
}

}  // namespace wa3d
}  // namespace ssltm
