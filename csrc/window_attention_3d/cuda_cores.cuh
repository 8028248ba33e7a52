// Fused 3D window attention on CUDA cores (every dtype): one thread per query row (forward, dq) or
// key row (dk/dv) sweeping the window in tiles staged in static shared memory. Each function is one
// phase of a kernel of window_attention_3d.cu, run in the same order by window_attention_3d_cpu.cpp.
// Part of window_attention_3d_core.cuh.
#pragma once

#include <cmath>
#include <cstdint>

#include "arguments.cuh"

#if defined(__CUDACC__)
#define SSLTM_UNROLL _Pragma("unroll")
// Loops over head_dim: fully unrolled (rows stay in registers) up to HD = 64; for HD = 128 the rows
// do not fit in registers anyway, and a partial unroll keeps the compile time reasonable.
#define SSLTM_UNROLL_HD _Pragma("unroll (HD <= 64 ? HD : 4)")
#else
#define SSLTM_UNROLL
#define SSLTM_UNROLL_HD
#endif

namespace ssltm {
namespace wa3d {

// Scores kept in registers per online-softmax step of the forward pass.
constexpr int kSub = 16;

// Rows of K/V (forward, dq) or Q/dO (dk/dv) staged in shared memory per tile: 2 * rows * HD fp32
// = 32 KB for every HD, well under the 48 KB static shared-memory limit.
template <int HD>
struct TileRows {
  static constexpr int value = HD >= 128 ? 32 : 64;
};

// ------------------------------------------------------------------------------------------------
// Rows in registers
// ------------------------------------------------------------------------------------------------
template <int HD, typename acc_t>
SSLTM_HD acc_t dot_row(const acc_t (&x)[HD], const acc_t* y) {
  acc_t s = 0;
  SSLTM_UNROLL_HD
  for (int d = 0; d < HD; ++d) s += x[d] * y[d];
  return s;
}

// Load a row of a strided tensor into a zero-padded register array.
template <int HD, typename scalar_t, typename acc_t>
SSLTM_HD void load_row(const scalar_t* src, int64_t off, int hd, acc_t (&dst)[HD]) {
  SSLTM_UNROLL_HD
  for (int d = 0; d < HD; ++d) dst[d] = d < hd ? acc_t(src[off + d]) : acc_t(0);
}

// Row of a key/value token: the tensor row when valid, else the pad vector (zeros when absent).
template <int HD, typename scalar_t, typename acc_t>
SSLTM_HD void load_kv_row(const scalar_t* src, const Strides5& s, const acc_t* pad, const Token& t,
                          int head, int hd, acc_t (&dst)[HD]) {
  if (t.valid) {
    load_row<HD>(src, row_offset(s, t, head), hd, dst);
  } else {
    SSLTM_UNROLL_HD
    for (int d = 0; d < HD; ++d) dst[d] = (d < hd && pad) ? pad[head * hd + d] : acc_t(0);
  }
}

// ------------------------------------------------------------------------------------------------
// Shared-memory tile: `rows` staged rows (a = K or Q, b = V or dO) plus per-row metadata
// ------------------------------------------------------------------------------------------------
template <int HD, typename acc_t>
struct Tile {
  static constexpr int R = TileRows<HD>::value;
  acc_t a[R][HD];
  acc_t b[R][HD];
  int64_t off_a[R];  // source offsets (-1: padded token)
  int64_t off_b[R];
  int key[R];
  int region[R];
  int valid[R];
  acc_t x0[R];  // dk/dv: lse of the query
  acc_t x1[R];  // dk/dv: delta of the query
};

// Rows of the tile that stages a window's rows r0, r0 + 1, ... (N of them in all): R, fewer for the last.
template <int HD, typename acc_t>
SSLTM_HD int staged_rows(int N, int r0) {
  constexpr int R = Tile<HD, acc_t>::R;
  return N - r0 < R ? N - r0 : R;
}

// Phase "stage K/V metadata" (forward, dq): thread r < R describes key row k0 + r.
template <int HD, typename scalar_t, typename acc_t>
SSLTM_HD void stage_kv_meta(const Args<scalar_t, acc_t>& a, const WinPos& wp, int head, int k0, int r,
                            Tile<HD, acc_t>& tile) {
  const int m = k0 + r;
  if (m >= a.g.N) {
    tile.off_a[r] = -1; tile.off_b[r] = -1; tile.key[r] = 0; tile.region[r] = 0; tile.valid[r] = 0;
    return;
  }
  const Token t = token_at(a.g, wp, m);
  tile.off_a[r] = t.valid ? row_offset(a.sk, t, head) : -1;
  tile.off_b[r] = t.valid ? row_offset(a.sv, t, head) : -1;
  tile.key[r] = t.key;
  tile.region[r] = t.region;
  tile.valid[r] = t.valid ? 1 : 0;
}

// Phase "stage K/V rows" (forward, dq): threads tid = 0..nthreads-1 copy the tile's elements,
// consecutive threads reading consecutive elements of a row.
template <int HD, typename scalar_t, typename acc_t>
SSLTM_HD void stage_kv_rows(const Args<scalar_t, acc_t>& a, int head, int k0, int tid, int nthreads,
                            Tile<HD, acc_t>& tile) {
  constexpr int R = Tile<HD, acc_t>::R;
  const int hd = a.g.hd;
  for (int i = tid; i < R * HD; i += nthreads) {
    const int r = i / HD, d = i % HD;
    acc_t kv = 0, vv = 0;
    if (k0 + r < a.g.N && d < hd) {
      if (tile.off_a[r] >= 0) {
        kv = acc_t(a.k[tile.off_a[r] + d]);
        vv = acc_t(a.v[tile.off_b[r] + d]);
      } else {
        kv = a.pad_k ? a.pad_k[head * hd + d] : acc_t(0);
        vv = a.pad_v ? a.pad_v[head * hd + d] : acc_t(0);
      }
    }
    tile.a[r][d] = kv;
    tile.b[r][d] = vv;
  }
}

// ------------------------------------------------------------------------------------------------
// Forward: block = (window, head, chunk of kThreads queries), thread = one query row
// ------------------------------------------------------------------------------------------------
template <int HD, typename acc_t>
struct FwdThread {
  acc_t q[HD];
  acc_t o[HD];
  acc_t mx, l;
  Token tok;
  bool active;  // query exists and is a valid (unpadded) token
};

// Query-row passes: one thread per query row sweeping the window's keys in staged tiles. The
// forward and the dq kernel differ only in their thread state and phase functions, bundled in a pass
// type (ForwardPass, DqPass) so that one kernel (and one emulation loop) serves both.
template <int HD, typename acc_t>
struct ForwardPass {
  using Thread = FwdThread<HD, acc_t>;

  template <typename scalar_t>
  SSLTM_HD static void init(const Args<scalar_t, acc_t>& a, const WinPos& wp, int head, int n, Thread& th) {
    th.active = false;
    th.mx = acc_t(-INFINITY);
    th.l = 0;
    SSLTM_UNROLL_HD
    for (int d = 0; d < HD; ++d) { th.o[d] = 0; th.q[d] = 0; }
    if (n >= a.g.N) return;
    th.tok = token_at(a.g, wp, n);
    th.active = th.tok.valid;
    if (th.active) load_row<HD>(a.q, row_offset(a.sq, th.tok, head), a.g.hd, th.q);
  }

  // Online softmax over the staged keys k0 .. k0+R-1, kSub keys at a time.
  template <typename scalar_t>
  SSLTM_HD static void tile(const Args<scalar_t, acc_t>& a, int head, const float* amask_win, int n, int k0,
                            const Tile<HD, acc_t>& kv, Thread& th) {
    if (!th.active) return;
    const int N = a.g.N;
    const int kcnt = staged_rows<HD, acc_t>(N, k0);
    const float* am_row = amask_row(amask_win, n, N);
    for (int j0 = 0; j0 < kcnt; j0 += kSub) {
      acc_t s[kSub];
      acc_t smax = acc_t(-INFINITY);
      SSLTM_UNROLL
      for (int jj = 0; jj < kSub; ++jj) {
        const int j = j0 + jj;
        s[jj] = acc_t(-INFINITY);
        if (j < kcnt) {
          s[jj] = finish_score(a, head, a.scale * dot_row<HD>(th.q, kv.a[j]), th.tok.key, th.tok.region,
                               kv.key[j], kv.region[j], am_row, k0 + j);
          smax = acc_max(smax, s[jj]);
        }
      }
      const acc_t mnew = acc_max(th.mx, smax);
      const acc_t corr = acc_exp(th.mx - mnew);
      th.l *= corr;
      SSLTM_UNROLL_HD
      for (int d = 0; d < HD; ++d) th.o[d] *= corr;
      SSLTM_UNROLL
      for (int jj = 0; jj < kSub; ++jj) {
        const int j = j0 + jj;
        if (j < kcnt) {
          const acc_t p = acc_exp(s[jj] - mnew);
          th.l += p;
          SSLTM_UNROLL_HD
          for (int d = 0; d < HD; ++d) th.o[d] += p * kv.b[j][d];
        }
      }
      th.mx = mnew;
    }
  }

  template <typename scalar_t>
  SSLTM_HD static void finish(const Args<scalar_t, acc_t>& a, int head, const Thread& th) {
    if (!th.active) return;
    const int64_t row = token_flat(a.g, th.tok) * a.g.nh + head;
    const acc_t inv = acc_t(1) / th.l;
    scalar_t* dst = a.out + row * a.g.hd;
    SSLTM_UNROLL_HD
    for (int d = 0; d < HD; ++d) {
      if (d < a.g.hd) dst[d] = scalar_t(th.o[d] * inv);
    }
    a.lse[row] = th.mx + acc_log(th.l);
  }
};

// ------------------------------------------------------------------------------------------------
// Backward dq: block = (window, head, query chunk), thread = one query row. Also writes delta.
// ------------------------------------------------------------------------------------------------
template <int HD, typename acc_t>
struct DqThread {
  acc_t q[HD];
  acc_t g[HD];   // dO row
  acc_t dq[HD];
  acc_t lse, delta;
  Token tok;
  bool active;
};

template <int HD, typename acc_t>
struct DqPass {
  using Thread = DqThread<HD, acc_t>;

  template <typename scalar_t>
  SSLTM_HD static void init(const Args<scalar_t, acc_t>& a, const WinPos& wp, int head, int n, Thread& th) {
    th.active = false;
    th.lse = 0;
    th.delta = 0;
    SSLTM_UNROLL_HD
    for (int d = 0; d < HD; ++d) { th.q[d] = 0; th.g[d] = 0; th.dq[d] = 0; }
    if (n >= a.g.N) return;
    th.tok = token_at(a.g, wp, n);
    th.active = th.tok.valid;
    if (!th.active) return;
    load_row<HD>(a.q, row_offset(a.sq, th.tok, head), a.g.hd, th.q);
    load_row<HD>(a.dout, row_offset(a.sdo, th.tok, head), a.g.hd, th.g);
    const int64_t ooff = row_offset(a.so, th.tok, head);
    acc_t delta = 0;
    SSLTM_UNROLL_HD
    for (int d = 0; d < HD; ++d) {
      if (d < a.g.hd) delta += th.g[d] * acc_t(a.outp[ooff + d]);
    }
    const int64_t row = token_flat(a.g, th.tok) * a.g.nh + head;
    th.delta = delta;
    th.lse = a.lse[row];
    a.delta[row] = delta;
  }

  template <typename scalar_t>
  SSLTM_HD static void tile(const Args<scalar_t, acc_t>& a, int head, const float* amask_win, int n, int k0,
                            const Tile<HD, acc_t>& kv, Thread& th) {
    if (!th.active) return;
    const int N = a.g.N;
    const int kcnt = staged_rows<HD, acc_t>(N, k0);
    const float* am_row = amask_row(amask_win, n, N);
    for (int j = 0; j < kcnt; ++j) {
      const acc_t s = finish_score(a, head, a.scale * dot_row<HD>(th.q, kv.a[j]), th.tok.key,
                                   th.tok.region, kv.key[j], kv.region[j], am_row, k0 + j);
      const acc_t p = acc_exp(s - th.lse);
      const acc_t dp = dot_row<HD>(th.g, kv.b[j]);
      const acc_t ds = p * (dp - th.delta);
      SSLTM_UNROLL_HD
      for (int d = 0; d < HD; ++d) th.dq[d] += ds * kv.a[j][d];
    }
  }

  template <typename scalar_t>
  SSLTM_HD static void finish(const Args<scalar_t, acc_t>& a, int head, const Thread& th) {
    if (!th.active) return;
    scalar_t* dst = a.dq + row_offset(a.sdx, th.tok, head);
    SSLTM_UNROLL_HD
    for (int d = 0; d < HD; ++d) {
      if (d < a.g.hd) dst[d] = scalar_t(a.scale * th.dq[d]);
    }
  }
};

// ------------------------------------------------------------------------------------------------
// Backward dk/dv: block = (window group, head, chunk of plan.dkv_rows keys), thread tid < dkv_rows =
// one key row; the group's windows are processed one after another. With a table gradient, each key
// thread owns a column of the block's dS sums (shared memory, element n at ds_col[n * dkv_rows]); the
// padded keys' gradients are summed over the block's keys through the tile (dkv_stage_pad,
// dkv_sum_pad) into thread d's PadSums. Every sum has one owner and a fixed order: no atomics.
// ------------------------------------------------------------------------------------------------
template <int HD, typename acc_t>
struct DkvThread {
  acc_t k[HD];
  acc_t v[HD];
  acc_t dk[HD];
  acc_t dv[HD];
  Token tok;
  bool in_range;  // the thread has a key m < N (padded keys take part: they are pad_k/pad_v rows)
  PadSums<acc_t> pad;
};

// Key of thread tid in dk/dv block `chunk`; N for threads without one.
template <typename scalar_t, typename acc_t>
SSLTM_HD int dkv_key(const Args<scalar_t, acc_t>& a, int chunk, int tid) {
  const int m = chunk * a.plan.dkv_rows + tid;
  return tid < a.plan.dkv_rows && m < a.g.N ? m : a.g.N;
}

// Phase "begin group": zero the thread's column of dS sums (ds_col, or nullptr) and its pad sums.
template <int HD, typename scalar_t, typename acc_t>
SSLTM_HD void dkv_begin_group(const Args<scalar_t, acc_t>& a, acc_t* ds_col, DkvThread<HD, acc_t>& th) {
  if (ds_col) {
    for (int n = 0; n < a.g.N; ++n) ds_col[int64_t(n) * a.plan.dkv_rows] = 0;
  }
  th.pad.k = 0;
  th.pad.v = 0;
}

template <int HD, typename scalar_t, typename acc_t>
SSLTM_HD void dkv_begin_window(const Args<scalar_t, acc_t>& a, const WinPos& wp, int head, int m,
                               DkvThread<HD, acc_t>& th) {
  SSLTM_UNROLL_HD
  for (int d = 0; d < HD; ++d) { th.k[d] = 0; th.v[d] = 0; th.dk[d] = 0; th.dv[d] = 0; }
  th.in_range = m < a.g.N;
  if (!th.in_range) return;
  th.tok = token_at(a.g, wp, m);
  load_kv_row<HD>(a.k, a.sk, a.pad_k, th.tok, head, a.g.hd, th.k);
  load_kv_row<HD>(a.v, a.sv, a.pad_v, th.tok, head, a.g.hd, th.v);
}

// Phase "stage Q/dO metadata": thread r < R describes query row q0 + r (lse and delta included).
template <int HD, typename scalar_t, typename acc_t>
SSLTM_HD void stage_q_meta(const Args<scalar_t, acc_t>& a, const WinPos& wp, int head, int q0, int r,
                           Tile<HD, acc_t>& tile) {
  const int n = q0 + r;
  tile.off_a[r] = -1; tile.off_b[r] = -1; tile.key[r] = 0; tile.region[r] = 0; tile.valid[r] = 0;
  tile.x0[r] = 0; tile.x1[r] = 0;
  if (n >= a.g.N) return;
  const Token t = token_at(a.g, wp, n);
  tile.key[r] = t.key;
  tile.region[r] = t.region;
  if (!t.valid) return;
  const int64_t row = token_flat(a.g, t) * a.g.nh + head;
  tile.valid[r] = 1;
  tile.off_a[r] = row_offset(a.sq, t, head);
  tile.off_b[r] = row_offset(a.sdo, t, head);
  tile.x0[r] = a.lse[row];
  tile.x1[r] = a.delta[row];
}

template <int HD, typename scalar_t, typename acc_t>
SSLTM_HD void stage_q_rows(const Args<scalar_t, acc_t>& a, int tid, int nthreads, Tile<HD, acc_t>& tile) {
  constexpr int R = Tile<HD, acc_t>::R;
  const int hd = a.g.hd;
  for (int i = tid; i < R * HD; i += nthreads) {
    const int r = i / HD, d = i % HD;
    acc_t qv = 0, gv = 0;
    if (tile.valid[r] && d < hd) {
      qv = acc_t(a.q[tile.off_a[r] + d]);
      gv = acc_t(a.dout[tile.off_b[r] + d]);
    }
    tile.a[r][d] = qv;
    tile.b[r][d] = gv;
  }
}

// ds_col: the thread's column of the block's dS sums, or nullptr.
template <int HD, typename scalar_t, typename acc_t>
SSLTM_HD void dkv_tile(const Args<scalar_t, acc_t>& a, int head, const float* amask_win, int m, int q0,
                       const Tile<HD, acc_t>& tile, acc_t* ds_col, DkvThread<HD, acc_t>& th) {
  if (!th.in_range) return;
  const int N = a.g.N;
  const int qcnt = staged_rows<HD, acc_t>(N, q0);
  for (int j = 0; j < qcnt; ++j) {
    if (!tile.valid[j]) continue;
    const int n = q0 + j;
    const float* am_row = amask_row(amask_win, n, N);
    const acc_t s = finish_score(a, head, a.scale * dot_row<HD>(th.k, tile.a[j]), tile.key[j],
                                 tile.region[j], th.tok.key, th.tok.region, am_row, m);
    const acc_t p = acc_exp(s - tile.x0[j]);
    const acc_t dp = dot_row<HD>(th.v, tile.b[j]);
    const acc_t ds = p * (dp - tile.x1[j]);
    SSLTM_UNROLL_HD
    for (int d = 0; d < HD; ++d) {
      th.dv[d] += p * tile.b[j][d];
      th.dk[d] += ds * tile.a[j][d];
    }
    if (ds_col) ds_col[int64_t(n) * a.plan.dkv_rows] += ds;
  }
}

// Phase "end window": dk, dv of a valid key.
template <int HD, typename scalar_t, typename acc_t>
SSLTM_HD void dkv_end_window(const Args<scalar_t, acc_t>& a, int head, const DkvThread<HD, acc_t>& th) {
  if (!th.in_range || !th.tok.valid) return;
  const int64_t off = row_offset(a.sdx, th.tok, head);
  SSLTM_UNROLL_HD
  for (int d = 0; d < HD; ++d) {
    if (d >= a.g.hd) continue;
    a.dk[off + d] = scalar_t(a.scale * th.dk[d]);
    a.dv[off + d] = scalar_t(th.dv[d]);
  }
}

// Phase "stage padded-key gradients" (windows with padding, pad gradients requested), for the block's
// threads base .. base + R - 1: each puts its key's dk, dv in tile row tid - base, zeros unless the key
// is a padded token.
template <int HD, typename scalar_t, typename acc_t>
SSLTM_HD void dkv_stage_pad(const Args<scalar_t, acc_t>& a, int tid, int base, const DkvThread<HD, acc_t>& th,
                            Tile<HD, acc_t>& tile) {
  constexpr int R = Tile<HD, acc_t>::R;
  const int r = tid - base;
  if (r < 0 || r >= R) return;
  const bool padded = th.in_range && !th.tok.valid;
  SSLTM_UNROLL_HD
  for (int d = 0; d < HD; ++d) {
    tile.a[r][d] = padded ? a.scale * th.dk[d] : acc_t(0);
    tile.b[r][d] = padded ? th.dv[d] : acc_t(0);
  }
}

// Phase "sum padded-key gradients": thread d < hd adds column d of the staged rows, in row order.
template <int HD, typename scalar_t, typename acc_t>
SSLTM_HD void dkv_sum_pad(const Args<scalar_t, acc_t>& a, int tid, const Tile<HD, acc_t>& tile,
                          DkvThread<HD, acc_t>& th) {
  if (tid >= a.g.hd) return;
  for (int r = 0; r < Tile<HD, acc_t>::R; ++r) {
    th.pad.k += tile.a[r][tid];
    th.pad.v += tile.b[r][tid];
  }
}

// Phase "end group": the thread's column of dS sums into the group's slice (key m < N) and thread
// d < hd's pad sums into the block's row, one plain store each.
template <int HD, typename scalar_t, typename acc_t>
SSLTM_HD void dkv_end_group(const Args<scalar_t, acc_t>& a, int m, int tid, const acc_t* ds_col,
                            const GroupOut<acc_t>& out, const DkvThread<HD, acc_t>& th) {
  const int N = a.g.N;
  if (out.ds && ds_col && m < N) {
    for (int n = 0; n < N; ++n) out.ds[int64_t(n) * N + m] = ds_col[int64_t(n) * a.plan.dkv_rows];
  }
  if (out.pad_k && tid < a.g.hd) {
    out.pad_k[tid] = th.pad.k;
    out.pad_v[tid] = th.pad.v;
  }
}
}  // namespace wa3d
}  // namespace ssltm
