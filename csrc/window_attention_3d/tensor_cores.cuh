// Fused 3D window attention on tensor cores (fp16/bf16): shared-memory layouts of a block and the
// phases around its tile products (TileProduct: WMMA in window_attention_3d.cu, loops in
// window_attention_3d_cpu.cpp). Part of window_attention_3d_core.cuh.
#pragma once

#include <cmath>
#include <cstdint>

#include "arguments.cuh"

namespace ssltm {
namespace wa3d {

// ------------------------------------------------------------------------------------------------
// Tensor-core forward (fp16/bf16): block = (window, head, chunk of kTcQueries queries). The chunk's
// Q rows and all of the window's K/V rows are staged in dynamic shared memory in the input dtype,
// S = Q K^T and O = P V are tile products (WMMA on the GPU, loops in the emulation) with fp32
// results in shared memory, and one thread per query row does the softmax in between.
// Padded keys all share the rows pad_k/pad_v (fp32 parameters): their K/V rows are staged as zeros
// and the softmax phase handles them in fp32 instead (one q . pad_k per query row, and their
// probability mass times pad_v added to the output), so the parameters are never rounded to 16 bits.
// ------------------------------------------------------------------------------------------------
constexpr int kMma = 16;        // edge of a WMMA m16n16k16 tile
constexpr int kTcQueries = 64;  // query rows per block
constexpr int kTcThreads = 128;
constexpr int kTcWarps = kTcThreads / 32;

// Tensor cores take 16-bit inputs (half, bfloat16); fp32 and fp64 inputs keep the CUDA-core kernels.
template <typename scalar_t>
constexpr bool kTensorCoreInput = sizeof(scalar_t) == 2;

// Input dtypes, for the host-side decisions that must not depend on c10 (this header stays plain C++).
enum class InputType { kFloat32, kFloat16, kBFloat16, kFloat64 };

// Compute capability (10 * major + minor) from which WMMA takes the type; 0: never on tensor cores.
SSLTM_HD constexpr int tensor_core_min_arch(InputType t) {
  return t == InputType::kFloat16 ? 70 : t == InputType::kBFloat16 ? 80 : 0;
}

// The tensor-core layouts depend on the element size only: this type stands for half and bfloat16 in
// host-side decisions.
using TcStorage = uint16_t;

SSLTM_HD constexpr int round_up(int x, int multiple) { return (x + multiple - 1) / multiple * multiple; }

// A block's dynamic shared memory handed out region by region, in order, each region 128-byte aligned.
struct SmemRegions {
  int end = 0;  // bytes handed out so far (the end of the last region, rounded up)

  // Byte offset of a new region of `size` bytes.
  SSLTM_HD int take(int size) {
    const int at = end;
    end = round_up(end + size, 128);
    return at;
  }
};

// C = A * B on shared-memory tiles, operands given as byte offsets from the block's shared memory.
// A: m x k row-major (lda elements); B: k x n, row-major (ldb), or with kBTransposed stored as the
// n rows of B^T (ldb), i.e. column-major; C: m x n fp32 row-major (ldc). m, n, k are multiples of
// kMma. Every warp of the block takes part (kTcWarps warps, 16x16 output tiles split among them).
template <typename scalar_t, bool kBTransposed>
struct TileProduct {
  int a, lda, b, ldb, c, ldc;
  int m, n, k;
};

// Dynamic shared-memory layout of one block, a function of (HD, dtype, N) only. Row strides meet
// WMMA's rules (multiples of 16 bytes, 32-byte aligned tile origins) with 16 extra bytes per row so
// that consecutive rows start in different banks.
template <int HD, typename scalar_t>
struct FwdTcLayout {
  static constexpr int kLdRows = HD + 16 / int(sizeof(scalar_t));  // Q, K, V rows (elements)
  static constexpr int kLdO = HD + 4;                               // fp32 output rows
  int Np;          // keys rounded up to kMma; rows N..Np-1 of K and V are zero
  int ld_s, ld_p;  // fp32 score rows, input-dtype probability rows
  // byte offsets; o aliases s (the scores are dead once the probabilities are written)
  int q, k, v, s, p, o;
  int key_off_k, key_off_v, key_bias, key_region;         // per key: source offsets (-1: padded token)
  int query_off, query_row, query_bias, query_region;     // per query row: source offset, output row
  int inv_l, pad_mass;  // per query row: 1 / softmax denominator, unnormalised weight of the padded keys
  int bytes;

  SSLTM_HD explicit FwdTcLayout(int N) {
    Np = round_up(N, kMma);
    ld_s = Np + 4;
    ld_p = Np + 16 / int(sizeof(scalar_t));
    SmemRegions regions;
    const int rows_bytes = kLdRows * int(sizeof(scalar_t));
    q = regions.take(kTcQueries * rows_bytes);
    k = regions.take(Np * rows_bytes);
    v = regions.take(Np * rows_bytes);
    const int s_bytes = kTcQueries * ld_s * 4, o_bytes = kTcQueries * kLdO * 4;
    s = regions.take(s_bytes > o_bytes ? s_bytes : o_bytes);
    o = s;
    p = regions.take(kTcQueries * ld_p * int(sizeof(scalar_t)));
    key_off_k = regions.take(Np * 8);
    key_off_v = regions.take(Np * 8);
    key_bias = regions.take(Np * 4);
    key_region = regions.take(Np * 4);
    query_off = regions.take(kTcQueries * 8);
    query_row = regions.take(kTcQueries * 8);
    query_bias = regions.take(kTcQueries * 4);
    query_region = regions.take(kTcQueries * 4);
    inv_l = regions.take(kTcQueries * 4);
    pad_mass = regions.take(kTcQueries * 4);
    bytes = regions.end;
  }

  // S (kTcQueries x Np) = Q K^T: K's rows are the columns of B.
  SSLTM_HD TileProduct<scalar_t, true> scores() const {
    return {q, kLdRows, k, kLdRows, s, ld_s, kTcQueries, Np, HD};
  }
  // O (kTcQueries x HD) = P V
  SSLTM_HD TileProduct<scalar_t, false> outputs() const {
    return {p, ld_p, v, kLdRows, o, kLdO, kTcQueries, HD, Np};
  }
};

template <typename T>
SSLTM_HD T* smem_at(unsigned char* smem, int offset) {
  return reinterpret_cast<T*>(smem + offset);
}

// Whether a 16-bit forward runs on tensor cores for this window and head_dim, given the shared memory
// a block may use; otherwise query_rows_kernel (CUDA cores) serves it.
inline bool forward_on_tensor_cores(int N, int hd, int smem_limit) {
  return SSLTM_DISPATCH_HEAD_DIM(hd, [&] { return FwdTcLayout<HD, TcStorage>(N).bytes <= smem_limit; });
}

// Phase "stage metadata": keys tid, tid + nthreads, ... < Np and query row tid < kTcQueries.
template <int HD, typename scalar_t>
SSLTM_HD void fwd_tc_stage_meta(const Args<scalar_t, float>& a, const WinPos& wp, int head, int q0, int tid,
                                int nthreads, const FwdTcLayout<HD, scalar_t>& L, unsigned char* smem) {
  for (int m = tid; m < L.Np; m += nthreads) {
    int64_t off_k = -1, off_v = -1;
    int bias = 0, region = 0;
    if (m < a.g.N) {
      const Token t = token_at(a.g, wp, m);
      if (t.valid) {
        off_k = row_offset(a.sk, t, head);
        off_v = row_offset(a.sv, t, head);
      }
      bias = t.key;
      region = t.region;
    }
    smem_at<int64_t>(smem, L.key_off_k)[m] = off_k;
    smem_at<int64_t>(smem, L.key_off_v)[m] = off_v;
    smem_at<int>(smem, L.key_bias)[m] = bias;
    smem_at<int>(smem, L.key_region)[m] = region;
  }
  if (tid < kTcQueries) {
    const int n = q0 + tid;
    int64_t off = -1, row = -1;
    int bias = 0, region = 0;
    if (n < a.g.N) {
      const Token t = token_at(a.g, wp, n);
      if (t.valid) {
        off = row_offset(a.sq, t, head);
        row = token_flat(a.g, t) * a.g.nh + head;
      }
      bias = t.key;
      region = t.region;
    }
    smem_at<int64_t>(smem, L.query_off)[tid] = off;
    smem_at<int64_t>(smem, L.query_row)[tid] = row;
    smem_at<int>(smem, L.query_bias)[tid] = bias;
    smem_at<int>(smem, L.query_region)[tid] = region;
  }
}

// Phase "stage rows": Q, K, V elements in the input dtype, consecutive threads on consecutive
// elements of a row. Rows of padded keys (handled by the softmax phase), columns hd..HD-1, inactive
// query rows and key rows N..Np-1 are zero.
template <int HD, typename scalar_t>
SSLTM_HD void fwd_tc_stage_rows(const Args<scalar_t, float>& a, int head, int tid, int nthreads,
                                const FwdTcLayout<HD, scalar_t>& L, unsigned char* smem) {
  constexpr int ld = FwdTcLayout<HD, scalar_t>::kLdRows;
  const int hd = a.g.hd;
  const int64_t* query_off = smem_at<int64_t>(smem, L.query_off);
  scalar_t* qs = smem_at<scalar_t>(smem, L.q);
  for (int i = tid; i < kTcQueries * HD; i += nthreads) {
    const int r = i / HD, d = i % HD;
    qs[r * ld + d] = (query_off[r] >= 0 && d < hd) ? a.q[query_off[r] + d] : scalar_t(0.0f);
  }
  const int64_t* off_k = smem_at<int64_t>(smem, L.key_off_k);
  const int64_t* off_v = smem_at<int64_t>(smem, L.key_off_v);
  scalar_t* ks = smem_at<scalar_t>(smem, L.k);
  scalar_t* vs = smem_at<scalar_t>(smem, L.v);
  for (int i = tid; i < L.Np * HD; i += nthreads) {
    const int m = i / HD, d = i % HD;
    const bool tensor_row = m < a.g.N && off_k[m] >= 0 && d < hd;
    ks[m * ld + d] = tensor_row ? a.k[off_k[m] + d] : scalar_t(0.0f);
    vs[m * ld + d] = tensor_row ? a.v[off_v[m] + d] : scalar_t(0.0f);
  }
}

// Phase "softmax" (after S = Q K^T): thread r turns its score row into unnormalised probabilities
// P = exp(s - max) in the input dtype (zero for padded keys, keys N..Np-1 and inactive rows), writes
// lse and keeps 1 / sum and the padded keys' weight for the output phase. The finished scores are
// kept in S between the two sweeps.
template <int HD, typename scalar_t>
SSLTM_HD void fwd_tc_softmax_row(const Args<scalar_t, float>& a, int head, const float* amask_win, int q0,
                                 int r, const FwdTcLayout<HD, scalar_t>& L, unsigned char* smem) {
  const int N = a.g.N;
  float* s = smem_at<float>(smem, L.s) + r * L.ld_s;
  scalar_t* p = smem_at<scalar_t>(smem, L.p) + r * L.ld_p;
  const int64_t row = smem_at<int64_t>(smem, L.query_row)[r];
  if (row < 0) {
    for (int j = 0; j < L.Np; ++j) p[j] = scalar_t(0.0f);
    smem_at<float>(smem, L.inv_l)[r] = 0.0f;
    smem_at<float>(smem, L.pad_mass)[r] = 0.0f;
    return;
  }
  float pad_dot = 0.0f;  // q . pad_k, the dot product of every padded key
  if (a.pad_k) {
    const scalar_t* q = smem_at<scalar_t>(smem, L.q) + r * FwdTcLayout<HD, scalar_t>::kLdRows;
    for (int d = 0; d < a.g.hd; ++d) pad_dot += float(q[d]) * a.pad_k[head * a.g.hd + d];
  }
  const int64_t* key_off = smem_at<int64_t>(smem, L.key_off_k);
  const int qbias = smem_at<int>(smem, L.query_bias)[r];
  const int qregion = smem_at<int>(smem, L.query_region)[r];
  const int* kbias = smem_at<int>(smem, L.key_bias);
  const int* kregion = smem_at<int>(smem, L.key_region);
  const float* am_row = amask_row(amask_win, q0 + r, N);
  float mx = -INFINITY;
  for (int j = 0; j < N; ++j) {
    const float dot = key_off[j] >= 0 ? s[j] : pad_dot;
    s[j] = finish_score(a, head, a.scale * dot, qbias, qregion, kbias[j], kregion[j], am_row, j);
    mx = acc_max(mx, s[j]);
  }
  float l = 0.0f, pad_mass = 0.0f;
  for (int j = 0; j < N; ++j) {
    const float e = acc_exp(s[j] - mx);
    l += e;
    if (key_off[j] >= 0) {
      p[j] = scalar_t(e);
    } else {
      pad_mass += e;
      p[j] = scalar_t(0.0f);
    }
  }
  for (int j = N; j < L.Np; ++j) p[j] = scalar_t(0.0f);
  a.lse[row] = mx + acc_log(l);
  smem_at<float>(smem, L.inv_l)[r] = 1.0f / l;
  smem_at<float>(smem, L.pad_mass)[r] = pad_mass;
}

// Phase "write" (after O = P V): normalised output rows of the active queries, with the padded keys'
// share of pad_v.
template <int HD, typename scalar_t>
SSLTM_HD void fwd_tc_write(const Args<scalar_t, float>& a, int head, int tid, int nthreads,
                           const FwdTcLayout<HD, scalar_t>& L, unsigned char* smem) {
  constexpr int ld = FwdTcLayout<HD, scalar_t>::kLdO;
  const int hd = a.g.hd;
  const int64_t* query_row = smem_at<int64_t>(smem, L.query_row);
  const float* inv_l = smem_at<float>(smem, L.inv_l);
  const float* pad_mass = smem_at<float>(smem, L.pad_mass);
  const float* o = smem_at<float>(smem, L.o);
  for (int i = tid; i < kTcQueries * HD; i += nthreads) {
    const int r = i / HD, d = i % HD;
    if (query_row[r] < 0 || d >= hd) continue;
    const float pad = a.pad_v ? pad_mass[r] * a.pad_v[head * hd + d] : 0.0f;
    a.out[query_row[r] * hd + d] = scalar_t((o[r * ld + d] + pad) * inv_l[r]);
  }
}

// ------------------------------------------------------------------------------------------------
// Tensor-core backward (fp16/bf16). One block per chunk of L.rows rows of one side of the window's
// attention matrix against all Np rows of the other side:
//   dq pass  (kKeyChunk = false): chunk = queries, all rows = keys;   block = (window, head, chunk);
//   dk/dv pass (kKeyChunk = true): chunk = keys, all rows = queries; block = (window group, head,
//   chunk), the group's windows one after another (see plan_backward).
// Seen from the chunk, both passes are the same block algorithm on (chunk x Np) matrices: the dk/dv
// pass works on the transposes S^T = K Q^T, dP^T = V dO^T, so that dK = dS^T Q and dV = P^T dO (like
// dQ = dS K) are products whose B operand is row-major. "a" rows are Q or K, "b" rows dO or V.
// As in the forward, the rows of padded keys (pad_k, pad_v: fp32 parameters) are never rounded to 16
// bits: they are staged as zeros, and their scores use q . pad_k and dO . pad_v computed in fp32 per
// query; the dq pass adds the padded keys' share sum(dS) * pad_k in fp32 when writing dq.
// The dk/dv pass keeps its group sums on chip: with a table gradient an fp32 (Np x rows) block of dS
// summed over the group's windows (ds_sum, the one region that outlives a window), and thread d's
// PadSums of the padded chunk keys' gradients.
// ------------------------------------------------------------------------------------------------
// Chunk rows per block: 32, or 16 where 32 does not fit the shared memory (with the dS sums, N = 196
// and HD = 128 need 16 rows under 227 KB).
constexpr int kTcBwdRowOptions[2] = {32, 16};

template <int HD, typename scalar_t>
struct BwdTcLayout {
  static constexpr int kLdRows = HD + 16 / int(sizeof(scalar_t));  // staged rows (elements)
  static constexpr int kLdOut = HD + 4;                             // fp32 result rows
  int rows;        // chunk rows
  int parts;       // threads per chunk row in the score-gradient phase, each on every parts-th column
  int Np;          // rows of the other side rounded up to kMma; rows N..Np-1 are zero
  int ld_s, ld_p;  // fp32 S/dP rows, input-dtype P/dS rows
  // byte offsets; out_a aliases s and out_b aliases dp (dead once P and dS are written)
  int chunk_a, chunk_b, all_a, all_b, s, dp, p, ds, out_a, out_b;
  // per row of either side: source offsets of the a/b rows (-1: padded token or beyond N), bias key,
  // shift-mask region, and, for query rows, lse, delta, q . pad_k and dO . pad_v
  int chunk_off_a, chunk_off_b, chunk_bias, chunk_region, chunk_lse, chunk_delta, chunk_pad_dot_k, chunk_pad_dot_v;
  int all_off_a, all_off_b, all_bias, all_region, all_lse, all_delta, all_pad_dot_k, all_pad_dot_v;
  int chunk_out_off;  // element offset of a valid chunk token's dq or dk/dv row, else -1
  int pad_ds;         // dq pass: per query row and row part, sum of dS over the padded keys
  int window_bytes;   // bytes [0, window_bytes) are rewritten for every window
  int ds_sum;         // with dS sums: fp32 (Np, rows), element (query j, chunk key r) at j * rows + r
  int bytes;

  SSLTM_HD BwdTcLayout(int N, int chunk_rows, bool ds_sums) {
    rows = chunk_rows;
    parts = kTcThreads / rows;
    Np = round_up(N, kMma);
    ld_s = Np + 4;
    ld_p = Np + 16 / int(sizeof(scalar_t));
    SmemRegions regions;
    const int rows_bytes = kLdRows * int(sizeof(scalar_t));
    chunk_a = regions.take(rows * rows_bytes);
    chunk_b = regions.take(rows * rows_bytes);
    all_a = regions.take(Np * rows_bytes);
    all_b = regions.take(Np * rows_bytes);
    const int s_bytes = rows * ld_s * 4, out_bytes = rows * kLdOut * 4;
    s = regions.take(s_bytes > out_bytes ? s_bytes : out_bytes);
    dp = regions.take(s_bytes > out_bytes ? s_bytes : out_bytes);
    out_a = s;
    out_b = dp;
    p = regions.take(rows * ld_p * int(sizeof(scalar_t)));
    ds = regions.take(rows * ld_p * int(sizeof(scalar_t)));
    chunk_off_a = regions.take(rows * 8);
    chunk_off_b = regions.take(rows * 8);
    chunk_out_off = regions.take(rows * 8);
    chunk_bias = regions.take(rows * 4);
    chunk_region = regions.take(rows * 4);
    chunk_lse = regions.take(rows * 4);
    chunk_delta = regions.take(rows * 4);
    chunk_pad_dot_k = regions.take(rows * 4);
    chunk_pad_dot_v = regions.take(rows * 4);
    pad_ds = regions.take(rows * parts * 4);
    all_off_a = regions.take(Np * 8);
    all_off_b = regions.take(Np * 8);
    all_bias = regions.take(Np * 4);
    all_region = regions.take(Np * 4);
    all_lse = regions.take(Np * 4);
    all_delta = regions.take(Np * 4);
    all_pad_dot_k = regions.take(Np * 4);
    all_pad_dot_v = regions.take(Np * 4);
    window_bytes = regions.end;
    ds_sum = ds_sums ? regions.take(Np * rows * 4) : -1;
    bytes = regions.end;
  }

  // S (chunk x Np) = A_chunk A_all^T and dP = B_chunk B_all^T: the all-rows are the columns of B.
  SSLTM_HD TileProduct<scalar_t, true> scores() const {
    return {chunk_a, kLdRows, all_a, kLdRows, s, ld_s, rows, Np, HD};
  }
  SSLTM_HD TileProduct<scalar_t, true> score_grads() const {
    return {chunk_b, kLdRows, all_b, kLdRows, dp, ld_s, rows, Np, HD};
  }
  // dQ or dK (unscaled) = dS A_all; dV = P B_all
  SSLTM_HD TileProduct<scalar_t, false> a_grads() const {
    return {ds, ld_p, all_a, kLdRows, out_a, kLdOut, rows, HD, Np};
  }
  SSLTM_HD TileProduct<scalar_t, false> b_grads() const {
    return {p, ld_p, all_b, kLdRows, out_b, kLdOut, rows, HD, Np};
  }
};

// Chunk rows of a tensor-core backward pass whose layout (with or without the dS sums) fits the
// shared memory of a block, 0 when no option fits.
template <int HD, typename scalar_t>
inline int bwd_tc_rows(int N, int smem_limit, bool ds_sums) {
  for (const int rows : kTcBwdRowOptions) {
    if (BwdTcLayout<HD, scalar_t>(N, rows, ds_sums).bytes <= smem_limit) return rows;
  }
  return 0;
}

// Whether a 16-bit backward runs on tensor cores for this window and head_dim, given the shared
// memory a block may use; otherwise the CUDA-core query_rows_kernel<DqPass> and dkv_kernel serve it.
// Decided with the dS sums (the dk/dv pass's largest layout), so that the family does not depend on
// which gradients are requested.
inline bool backward_on_tensor_cores(int N, int hd, int smem_limit) {
  return SSLTM_DISPATCH_HEAD_DIM(hd, [&] { return bwd_tc_rows<HD, TcStorage>(N, smem_limit, true) > 0; });
}

// Per-row metadata of one token of either side.
struct BwdTcRowMeta {
  int64_t off_a, off_b, out_off;
  int bias, region;
  float lse, delta, pad_dot_k, pad_dot_v;
};

// Metadata of in-window token n (n >= N: a zero row). Query rows carry lse, delta (computed and
// written by the dq pass, read back by the dk/dv pass) and their fp32 dot products with the pad rows.
template <typename scalar_t>
SSLTM_HD BwdTcRowMeta bwd_tc_row_meta(const Args<scalar_t, float>& a, const WinPos& wp, int head, int n,
                                      bool is_query, bool writes_delta) {
  BwdTcRowMeta r{-1, -1, -1, 0, 0, 0.0f, 0.0f, 0.0f, 0.0f};
  if (n >= a.g.N) return r;
  const Token t = token_at(a.g, wp, n);
  r.bias = t.key;
  r.region = t.region;
  if (!t.valid) return r;
  const int hd = a.g.hd;
  const int64_t row = token_flat(a.g, t) * a.g.nh + head;
  r.out_off = row_offset(a.sdx, t, head);
  r.off_a = row_offset(is_query ? a.sq : a.sk, t, head);
  r.off_b = row_offset(is_query ? a.sdo : a.sv, t, head);
  if (!is_query) return r;
  r.lse = a.lse[row];
  if (writes_delta) {
    const int64_t ooff = row_offset(a.so, t, head);
    for (int d = 0; d < hd; ++d) r.delta += float(a.dout[r.off_b + d]) * float(a.outp[ooff + d]);
    a.delta[row] = r.delta;
  } else {
    r.delta = a.delta[row];
  }
  for (int d = 0; d < hd; ++d) {
    if (a.pad_k) r.pad_dot_k += float(a.q[r.off_a + d]) * a.pad_k[head * hd + d];
    if (a.pad_v) r.pad_dot_v += float(a.dout[r.off_b + d]) * a.pad_v[head * hd + d];
  }
  return r;
}

// Phase "begin group" (dk/dv pass): thread tid zeroes the entries of the dS sums it owns in the
// score-gradient phase (chunk row tid % rows, every parts-th query from tid / rows) and its pad sums.
template <int HD, typename scalar_t>
SSLTM_HD void bwd_tc_begin_group(int tid, const BwdTcLayout<HD, scalar_t>& L, unsigned char* smem,
                                 PadSums<float>& pad) {
  if (L.ds_sum >= 0) {
    float* ds_sum = smem_at<float>(smem, L.ds_sum);
    const int r = tid % L.rows;
    for (int j = tid / L.rows; j < L.Np; j += L.parts) ds_sum[j * L.rows + r] = 0.0f;
  }
  pad.k = 0.0f;
  pad.v = 0.0f;
}

// Phase "stage metadata": rows tid, tid + nthreads, ... < Np of the other side and chunk row
// tid < rows (first token c0).
template <int HD, typename scalar_t, bool kKeyChunk>
SSLTM_HD void bwd_tc_stage_meta(const Args<scalar_t, float>& a, const WinPos& wp, int head, int c0, int tid,
                                int nthreads, const BwdTcLayout<HD, scalar_t>& L, unsigned char* smem) {
  for (int i = tid; i < L.Np; i += nthreads) {
    const BwdTcRowMeta r = bwd_tc_row_meta(a, wp, head, i, kKeyChunk, false);
    smem_at<int64_t>(smem, L.all_off_a)[i] = r.off_a;
    smem_at<int64_t>(smem, L.all_off_b)[i] = r.off_b;
    smem_at<int>(smem, L.all_bias)[i] = r.bias;
    smem_at<int>(smem, L.all_region)[i] = r.region;
    smem_at<float>(smem, L.all_lse)[i] = r.lse;
    smem_at<float>(smem, L.all_delta)[i] = r.delta;
    smem_at<float>(smem, L.all_pad_dot_k)[i] = r.pad_dot_k;
    smem_at<float>(smem, L.all_pad_dot_v)[i] = r.pad_dot_v;
  }
  if (tid < L.rows) {
    const BwdTcRowMeta r = bwd_tc_row_meta(a, wp, head, c0 + tid, !kKeyChunk, !kKeyChunk);
    smem_at<int64_t>(smem, L.chunk_off_a)[tid] = r.off_a;
    smem_at<int64_t>(smem, L.chunk_off_b)[tid] = r.off_b;
    smem_at<int64_t>(smem, L.chunk_out_off)[tid] = r.out_off;
    smem_at<int>(smem, L.chunk_bias)[tid] = r.bias;
    smem_at<int>(smem, L.chunk_region)[tid] = r.region;
    smem_at<float>(smem, L.chunk_lse)[tid] = r.lse;
    smem_at<float>(smem, L.chunk_delta)[tid] = r.delta;
    smem_at<float>(smem, L.chunk_pad_dot_k)[tid] = r.pad_dot_k;
    smem_at<float>(smem, L.chunk_pad_dot_v)[tid] = r.pad_dot_v;
  }
}

// Phase "stage rows": chunk and all-rows a/b rows in the input dtype, consecutive threads on
// consecutive elements of a row; rows without a source (padded tokens, beyond N) and columns
// hd..HD-1 are zero.
template <int HD, typename scalar_t, bool kKeyChunk>
SSLTM_HD void bwd_tc_stage_rows(const Args<scalar_t, float>& a, int tid, int nthreads,
                                const BwdTcLayout<HD, scalar_t>& L, unsigned char* smem) {
  constexpr int ld = BwdTcLayout<HD, scalar_t>::kLdRows;
  const int hd = a.g.hd;
  const scalar_t* chunk_src_a = kKeyChunk ? a.k : a.q;
  const scalar_t* chunk_src_b = kKeyChunk ? a.v : a.dout;
  const scalar_t* all_src_a = kKeyChunk ? a.q : a.k;
  const scalar_t* all_src_b = kKeyChunk ? a.dout : a.v;
  const int64_t* chunk_off_a = smem_at<int64_t>(smem, L.chunk_off_a);
  const int64_t* chunk_off_b = smem_at<int64_t>(smem, L.chunk_off_b);
  scalar_t* chunk_a = smem_at<scalar_t>(smem, L.chunk_a);
  scalar_t* chunk_b = smem_at<scalar_t>(smem, L.chunk_b);
  for (int i = tid; i < L.rows * HD; i += nthreads) {
    const int r = i / HD, d = i % HD;
    const bool staged = chunk_off_a[r] >= 0 && d < hd;
    chunk_a[r * ld + d] = staged ? chunk_src_a[chunk_off_a[r] + d] : scalar_t(0.0f);
    chunk_b[r * ld + d] = staged ? chunk_src_b[chunk_off_b[r] + d] : scalar_t(0.0f);
  }
  const int64_t* all_off_a = smem_at<int64_t>(smem, L.all_off_a);
  const int64_t* all_off_b = smem_at<int64_t>(smem, L.all_off_b);
  scalar_t* all_a = smem_at<scalar_t>(smem, L.all_a);
  scalar_t* all_b = smem_at<scalar_t>(smem, L.all_b);
  for (int i = tid; i < L.Np * HD; i += nthreads) {
    const int r = i / HD, d = i % HD;
    const bool staged = all_off_a[r] >= 0 && d < hd;
    all_a[r * ld + d] = staged ? all_src_a[all_off_a[r] + d] : scalar_t(0.0f);
    all_b[r * ld + d] = staged ? all_src_b[all_off_b[r] + d] : scalar_t(0.0f);
  }
}

// Phase "score gradients" (after S and dP): thread tid takes chunk row r = tid % rows, columns
// part, part + parts, ... (part = tid / rows), and turns them into P = exp(S - lse) and
// dS = P (dP - delta), in the input dtype for the products (zero for padded queries and beyond N) and
// in fp32 for the bias gradient. Padded keys take their dot products from the fp32 pad dots. In the
// dq pass their P/dS entries are zero (their K rows are zero anyway) and their dS sum goes to the
// thread's pad_ds slot; in the dk/dv pass row r is key c0 + r and the thread adds its entries' fp32
// dS to the ones it owns in the dS sums (when the layout has them).
template <int HD, typename scalar_t, bool kKeyChunk>
SSLTM_HD void bwd_tc_score_grads(const Args<scalar_t, float>& a, int head, const float* amask_win, int c0,
                                 int tid, const BwdTcLayout<HD, scalar_t>& L, unsigned char* smem) {
  const int N = a.g.N;
  const int r = tid % L.rows, part = tid / L.rows;
  const int c = c0 + r;
  const float* s = smem_at<float>(smem, L.s) + r * L.ld_s;
  const float* dp = smem_at<float>(smem, L.dp) + r * L.ld_s;
  scalar_t* p_row = smem_at<scalar_t>(smem, L.p) + r * L.ld_p;
  scalar_t* ds_row = smem_at<scalar_t>(smem, L.ds) + r * L.ld_p;
  float* ds_sum = kKeyChunk && L.ds_sum >= 0 ? smem_at<float>(smem, L.ds_sum) : nullptr;
  const bool chunk_valid = smem_at<int64_t>(smem, L.chunk_off_a)[r] >= 0;
  const int chunk_bias = smem_at<int>(smem, L.chunk_bias)[r];
  const int chunk_region = smem_at<int>(smem, L.chunk_region)[r];
  const int64_t* all_off = smem_at<int64_t>(smem, L.all_off_a);
  const int* all_bias = smem_at<int>(smem, L.all_bias);
  const int* all_region = smem_at<int>(smem, L.all_region);
  // the query side's per-row values: all rows in the dk/dv pass, the chunk in the dq pass
  const float* q_lse = smem_at<float>(smem, kKeyChunk ? L.all_lse : L.chunk_lse);
  const float* q_delta = smem_at<float>(smem, kKeyChunk ? L.all_delta : L.chunk_delta);
  const float* q_pad_dot_k = smem_at<float>(smem, kKeyChunk ? L.all_pad_dot_k : L.chunk_pad_dot_k);
  const float* q_pad_dot_v = smem_at<float>(smem, kKeyChunk ? L.all_pad_dot_v : L.chunk_pad_dot_v);
  float pad_ds = 0.0f;
  for (int j = part; j < L.Np; j += L.parts) {
    const int n = kKeyChunk ? j : c, m = kKeyChunk ? c : j;  // query and key of entry (r, j)
    const int qi = kKeyChunk ? j : r;                        // the query's slot in the q_* arrays
    const bool query_valid = kKeyChunk ? all_off[j] >= 0 : chunk_valid;
    const bool key_padded = kKeyChunk ? !chunk_valid : all_off[j] < 0;
    float p = 0.0f, ds = 0.0f;
    if (n < N && m < N && query_valid) {
      const float dot = key_padded ? q_pad_dot_k[qi] : s[j];
      const float dpv = key_padded ? q_pad_dot_v[qi] : dp[j];
      const float* am_row = amask_row(amask_win, n, N);
      const int j_bias = all_bias[j], j_region = all_region[j];
      const float score = kKeyChunk
          ? finish_score(a, head, a.scale * dot, j_bias, j_region, chunk_bias, chunk_region, am_row, m)
          : finish_score(a, head, a.scale * dot, chunk_bias, chunk_region, j_bias, j_region, am_row, m);
      p = acc_exp(score - q_lse[qi]);
      ds = p * (dpv - q_delta[qi]);
      if (ds_sum) ds_sum[j * L.rows + r] += ds;
      if (!kKeyChunk && key_padded) {
        pad_ds += ds;
        p = 0.0f;
        ds = 0.0f;
      }
    }
    p_row[j] = scalar_t(p);
    ds_row[j] = scalar_t(ds);
  }
  if (!kKeyChunk) smem_at<float>(smem, L.pad_ds)[part * L.rows + r] = pad_ds;
}

// Phase "write" (after the a/b products). dq pass: dq = scale * (dS K + pad_ds * pad_k) for valid
// queries. dk/dv pass: dk = scale * dS^T Q and dv = P^T dO for valid keys; with pad gradients
// requested (pad, else nullptr), thread d < hd adds column d of the padded chunk keys' dk, dv to its
// pad sums, in row order.
template <int HD, typename scalar_t, bool kKeyChunk>
SSLTM_HD void bwd_tc_write(const Args<scalar_t, float>& a, int head, int c0, int tid, int nthreads,
                           const BwdTcLayout<HD, scalar_t>& L, unsigned char* smem, PadSums<float>* pad) {
  constexpr int ld = BwdTcLayout<HD, scalar_t>::kLdOut;
  const int hd = a.g.hd;
  const int64_t* out_off = smem_at<int64_t>(smem, L.chunk_out_off);
  const float* ga = smem_at<float>(smem, L.out_a);
  const float* gb = smem_at<float>(smem, L.out_b);
  for (int i = tid; i < L.rows * HD; i += nthreads) {
    const int r = i / HD, d = i % HD;
    if (d >= hd || c0 + r >= a.g.N) continue;
    const int64_t off = out_off[r];
    if (off < 0) continue;
    if (!kKeyChunk) {
      float pad_dq = 0.0f;
      if (a.pad_k) {
        float pad_ds = 0.0f;
        for (int part = 0; part < L.parts; ++part) pad_ds += smem_at<float>(smem, L.pad_ds)[part * L.rows + r];
        pad_dq = pad_ds * a.pad_k[head * hd + d];
      }
      a.dq[off + d] = scalar_t(a.scale * (ga[r * ld + d] + pad_dq));
    } else {
      a.dk[off + d] = scalar_t(a.scale * ga[r * ld + d]);
      a.dv[off + d] = scalar_t(gb[r * ld + d]);
    }
  }
  if (kKeyChunk && pad && tid < hd) {
    for (int r = 0; r < L.rows && c0 + r < a.g.N; ++r) {
      if (out_off[r] >= 0) continue;
      pad->k += a.scale * ga[r * ld + tid];
      pad->v += gb[r * ld + tid];
    }
  }
}

// Phase "end group" (dk/dv pass): thread tid stores the dS sums it owns into the group's (N, N) slice
// (columns c0 .. c0 + rows - 1) and thread d < hd its pad sums into the block's row, one plain store
// each.
template <int HD, typename scalar_t>
SSLTM_HD void bwd_tc_end_group(const Args<scalar_t, float>& a, int c0, int tid, const BwdTcLayout<HD, scalar_t>& L,
                               unsigned char* smem, const GroupOut<float>& out, const PadSums<float>& pad) {
  const int N = a.g.N;
  const int r = tid % L.rows;
  if (out.ds && c0 + r < N) {
    const float* ds_sum = smem_at<float>(smem, L.ds_sum);
    for (int n = tid / L.rows; n < N; n += L.parts) out.ds[int64_t(n) * N + c0 + r] = ds_sum[n * L.rows + r];
  }
  if (out.pad_k && tid < a.g.hd) {
    out.pad_k[tid] = pad.k;
    out.pad_v[tid] = pad.v;
  }
}
}  // namespace wa3d
}  // namespace ssltm
