// Fused 3D window attention: the typed arguments of every kernel, with the backward's plan they carry,
// the score of a (query, key) pair that both kernel families finish the same way, and the untyped
// Problem that the bindings fill. Part of window_attention_3d_core.cuh.
#pragma once

#include <cstdint>

#include "geometry.cuh"

namespace ssltm {
namespace wa3d {

// How the backward runs (plan_backward in backward_plan.cuh). The dk/dv pass runs one block per
// (window group, head, key chunk); each block accumulates its slice of the group's sums on chip over
// the group's windows and stores it once at the end, so the partial buffers need no zero fill and are
// never re-read.
struct BackwardPlan {
  bool tensor_cores;  // backward_tc_kernel for both passes, else query_rows_kernel<DqPass> and dkv_kernel
  int dq_rows;        // tensor cores: chunk rows per block of the dq pass
  int dkv_rows;       // keys per block of the dk/dv pass (tensor-core chunk rows, or dkv_kernel's keys)
  int key_chunks;     // dk/dv blocks per (group, head): ceil(N / dkv_rows)
  int dkv_smem;       // dynamic shared memory of a dk/dv block, bytes
  int groups, group_size;  // window groups of the dk/dv pass and windows per group
};

// ------------------------------------------------------------------------------------------------
// Arguments of every kernel (typed view of the tensors; nullptr for absent optional inputs)
// ------------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
struct Args {
  Geometry g;
  acc_t scale;
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v;
  Strides5 sq, sk, sv;
  const acc_t* table;   // (Ntab, nh) contiguous, or nullptr
  const acc_t* pad_k;   // (nh, hd) contiguous, or nullptr (zeros)
  const acc_t* pad_v;   // (nh, hd) contiguous, or nullptr (zeros)
  const float* amask;   // (nMask, N, N) contiguous, or nullptr
  // forward output / backward input
  scalar_t* out;        // forward: contiguous (B,T,H,W,nh,hd)
  acc_t* lse;           // contiguous (B,T,H,W,nh)
  // backward
  const scalar_t* dout;  // strided like q
  const scalar_t* outp;  // forward output, strided
  Strides5 sdo, so;
  acc_t* delta;          // workspace (B,T,H,W,nh): rowsum(dO * out)
  // (B,T,H,W,nh,hd) with strides sdx, shared by the three: contiguous tensors, or the slices of one
  // packed (B,T,H,W,3,nh,hd) gradient
  scalar_t* dq;
  scalar_t* dk;
  scalar_t* dv;
  Strides5 sdx;
  acc_t* wpart;          // (groups, nh, N, N), or nullptr: per group, dS summed over its windows
  acc_t* padk_part;      // (groups, nh, key_chunks, hd), or nullptr: per dk/dv block, summed over its
  acc_t* padv_part;      //   padded keys and its group's windows
  BackwardPlan plan;
};

// Where a dk/dv block (group grp, head, key chunk) stores its sums, nullptr where not requested: the
// group's (N, N) slice of dS sums (the block writes its keys' columns) and its row of the pad partials.
template <typename acc_t>
struct GroupOut {
  acc_t* ds;
  acc_t* pad_k;
  acc_t* pad_v;
};

template <typename scalar_t, typename acc_t>
SSLTM_HD GroupOut<acc_t> group_out(const Args<scalar_t, acc_t>& a, int grp, int head, int chunk) {
  const int64_t slot = int64_t(grp) * a.g.nh + head;
  const int64_t pad_row = (slot * a.plan.key_chunks + chunk) * a.g.hd;
  return {a.wpart ? a.wpart + slot * a.g.N * a.g.N : nullptr, a.padk_part ? a.padk_part + pad_row : nullptr,
          a.padv_part ? a.padv_part + pad_row : nullptr};
}

// A dk/dv block's sums of the padded keys' gradients over its keys and windows: thread d < hd holds
// column d, added to in a fixed order.
template <typename acc_t>
struct PadSums {
  acc_t k, v;
};

// Additive attn_mask rows of a window (nullptr when absent).
template <typename scalar_t, typename acc_t>
SSLTM_HD const float* amask_window(const Args<scalar_t, acc_t>& a, int win) {
  return a.amask ? a.amask + int64_t(win % a.g.nMask) * a.g.N * a.g.N : nullptr;
}

// Query n's row of a window's attn_mask rows (nullptr when absent).
SSLTM_HD const float* amask_row(const float* amask_win, int n, int N) {
  return amask_win ? amask_win + int64_t(n) * N : nullptr;
}

template <typename T>
SSLTM_HD T acc_max(T a, T b) { return a > b ? a : b; }

// Full score of query n against key m given the scaled dot product; addition order is fixed:
// ((scale*dot + bias) + region mask) + attn_mask.
template <typename scalar_t, typename acc_t>
SSLTM_HD acc_t finish_score(const Args<scalar_t, acc_t>& a, int head, acc_t s, int qkey, int qregion,
                            int kkey, int kregion, const float* amask_row, int m) {
  if (a.table) s += a.table[int64_t(qkey - kkey + a.g.c0) * a.g.nh + head];
  if (qregion != kregion) s += acc_t(-100);
  if (amask_row) s += acc_t(amask_row[m]);
  return s;
}

// ------------------------------------------------------------------------------------------------
// Untyped problem description filled by the bindings and consumed by the CUDA launchers and the
// CPU emulation (keeps ATen out of this header and the launchers' signatures simple).
// ------------------------------------------------------------------------------------------------
struct Problem {
  Geometry g;
  int dtype;          // c10::ScalarType of q/k/v
  int device_index;   // CUDA device (-1 on CPU)
  double scale;
  const void* q; const void* k; const void* v;
  Strides5 sq, sk, sv;
  const void* table; const void* pad_k; const void* pad_v;  // accumulation dtype, contiguous
  const float* amask;
  void* out; void* lse;
  const void* dout; const void* outp;
  Strides5 sdo, so;
  void* delta; void* dq; void* dk; void* dv;
  Strides5 sdx;     // of dq, dk and dv
  void* wpart;      // (groups, nh, N, N), or nullptr
  void* padk_part;  // (groups, nh, key_chunks, hd), or nullptr
  void* padv_part;
  void* dtable;     // (Ntab, nh), or nullptr
  void* dpad_k;     // (nh, hd), or nullptr
  void* dpad_v;
  BackwardPlan plan;
};

template <typename scalar_t, typename acc_t>
inline Args<scalar_t, acc_t> make_args(const Problem& p) {
  Args<scalar_t, acc_t> a;
  a.g = p.g;
  a.scale = acc_t(p.scale);
  a.q = static_cast<const scalar_t*>(p.q);
  a.k = static_cast<const scalar_t*>(p.k);
  a.v = static_cast<const scalar_t*>(p.v);
  a.sq = p.sq; a.sk = p.sk; a.sv = p.sv;
  a.table = static_cast<const acc_t*>(p.table);
  a.pad_k = static_cast<const acc_t*>(p.pad_k);
  a.pad_v = static_cast<const acc_t*>(p.pad_v);
  a.amask = p.amask;
  a.out = static_cast<scalar_t*>(p.out);
  a.lse = static_cast<acc_t*>(p.lse);
  a.dout = static_cast<const scalar_t*>(p.dout);
  a.outp = static_cast<const scalar_t*>(p.outp);
  a.sdo = p.sdo; a.so = p.so;
  a.delta = static_cast<acc_t*>(p.delta);
  a.dq = static_cast<scalar_t*>(p.dq);
  a.dk = static_cast<scalar_t*>(p.dk);
  a.dv = static_cast<scalar_t*>(p.dv);
  a.sdx = p.sdx;
  a.wpart = static_cast<acc_t*>(p.wpart);
  a.padk_part = static_cast<acc_t*>(p.padk_part);
  a.padv_part = static_cast<acc_t*>(p.padv_part);
  a.plan = p.plan;
  return a;
}

}  // namespace wa3d
}  // namespace ssltm
