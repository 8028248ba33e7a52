// Fused 3D window attention (Video Swin WindowAttention3D + SwinTransformerBlock3D padding/shift),
// per-thread math and index arithmetic shared by the CUDA kernels (window_attention_3d.cu) and their
// CPU emulation (window_attention_3d_cpu.cpp).
//
// Everything a CUDA thread computes lives here as a "phase" function taking the thread (or row) index
// explicitly. A kernel is a fixed sequence of phases separated by __syncthreads(); the CPU emulation
// runs the same sequence with loops standing in for the threads of a block, so the CPU tests exercise
// this very code. The one step that differs is the tile product of the tensor-core kernels
// (TileProduct): WMMA in the .cu, plain loops in the emulation, both on the operands that shared
// phases staged. The header depends on nothing but the C++ standard library and compiles with both
// nvcc and the host compiler.
//
// Semantics: see notes/contract.md (window enumeration, padded tokens as pad_k/pad_v keys, cyclic
// shift with Swin's region mask, relative-position bias computed from coordinates).
#pragma once

#include <cmath>
#include <cstdint>

#include "common.cuh"

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

// Threads per block for every attention kernel: one query row (forward, dq) or one key row (dk/dv)
// per thread.
constexpr int kThreads = 128;
// Largest supported head_dim. Rows are held in fixed-size arrays of HD = 32, 64 or 128 elements
// (zero-padded beyond head_dim, which leaves every dot product and sum unchanged).
constexpr int kMaxHeadDim = 128;
// Largest window (tokens) accepted. Keeps every per-window index (n * N + m) well inside int32, and
// leaves a dkv_kernel block room for one key's column of dS sums next to its tile (static_assert
// below, with sm_75's 64 KB of shared memory per block).
constexpr int kMaxWindowTokens = 4096;
static_assert(int64_t(kMaxWindowTokens) * kMaxWindowTokens < (int64_t(1) << 31), "window index overflows int32");
// Scores kept in registers per online-softmax step of the forward pass.
constexpr int kSub = 16;

// Rows of K/V (forward, dq) or Q/dO (dk/dv) staged in shared memory per tile: 2 * rows * HD fp32
// = 32 KB for every HD, well under the 48 KB static shared-memory limit.
template <int HD>
struct TileRows {
  static constexpr int value = HD >= 128 ? 32 : 64;
};

// Head-dim bucket dispatch: runs the callable with `HD` as a compile-time constant.
#define SSLTM_DISPATCH_HEAD_DIM(hd, ...)   \
  [&] {                                    \
    if ((hd) <= 32) {                      \
      constexpr int HD = 32;               \
      return __VA_ARGS__();                \
    } else if ((hd) <= 64) {               \
      constexpr int HD = 64;               \
      return __VA_ARGS__();                \
    } else {                               \
      constexpr int HD = 128;              \
      return __VA_ARGS__();                \
    }                                      \
  }()

// ------------------------------------------------------------------------------------------------
// Geometry
// ------------------------------------------------------------------------------------------------
struct Strides5 {  // element strides of a (B, T, H, W, heads, head_dim) tensor, head_dim stride 1
  int64_t b, t, h, w, n;
};

struct Geometry {
  int B, T, H, W, nh, hd;
  int wt, wh, ww;     // effective window
  int st, sh, sw;     // effective shift, 0 <= s < w
  int Tp, Hp, Wp;     // padded extents
  int nWt, nWh, nWw;  // windows per axis
  int nW;             // windows per batch item
  int nwin;           // B * nW
  int N;              // tokens per window
  int bt, bh, bw;     // "bias window": dims used to decode a flat index into bias coordinates
  int ft, fh, fw;     // "table window": the full window the bias table was built for
  int Ntab;           // (2ft-1)(2fh-1)(2fw-1)
  int key_t, key_h;   // (2fh-1)(2fw-1), (2fw-1)
  int c0;             // table index of a zero offset
  int nMask;          // leading dim of attn_mask (0 when absent)
  bool shifted;       // any shift > 0: Swin region mask applies
};

// Host-side construction; the caller has validated the arguments.
inline Geometry make_geometry(int64_t B, int64_t T, int64_t H, int64_t W, int64_t nh, int64_t hd,
                              const int64_t* window, const int64_t* shift, const int64_t* bias_window,
                              const int64_t* table_window, int64_t nMask) {
  Geometry g{};
  g.B = (int)B; g.T = (int)T; g.H = (int)H; g.W = (int)W; g.nh = (int)nh; g.hd = (int)hd;
  g.wt = (int)window[0]; g.wh = (int)window[1]; g.ww = (int)window[2];
  g.st = (int)shift[0]; g.sh = (int)shift[1]; g.sw = (int)shift[2];
  g.nWt = (g.T + g.wt - 1) / g.wt; g.nWh = (g.H + g.wh - 1) / g.wh; g.nWw = (g.W + g.ww - 1) / g.ww;
  g.Tp = g.nWt * g.wt; g.Hp = g.nWh * g.wh; g.Wp = g.nWw * g.ww;
  g.nW = g.nWt * g.nWh * g.nWw;
  g.nwin = g.B * g.nW;
  g.N = g.wt * g.wh * g.ww;
  g.bt = (int)bias_window[0]; g.bh = (int)bias_window[1]; g.bw = (int)bias_window[2];
  g.ft = (int)table_window[0]; g.fh = (int)table_window[1]; g.fw = (int)table_window[2];
  g.key_h = 2 * g.fw - 1;
  g.key_t = (2 * g.fh - 1) * g.key_h;
  g.Ntab = (2 * g.ft - 1) * g.key_t;
  g.c0 = (g.ft - 1) * g.key_t + (g.fh - 1) * g.key_h + (g.fw - 1);
  g.nMask = (int)nMask;
  g.shifted = g.st > 0 || g.sh > 0 || g.sw > 0;
  return g;
}

template <typename T>
SSLTM_HD T acc_max(T a, T b) { return a > b ? a : b; }

// ------------------------------------------------------------------------------------------------
// Token coordinates
// ------------------------------------------------------------------------------------------------
struct WinPos {  // a window: batch item and the shifted-padded coordinates of its first token
  int b, t0, h0, w0;
};

SSLTM_HD WinPos window_pos(const Geometry& g, int win) {
  const int iw = win % g.nWw;
  int r = win / g.nWw;
  const int ih = r % g.nWh;
  r /= g.nWh;
  const int it = r % g.nWt;
  WinPos p;
  p.b = r / g.nWt;
  p.t0 = it * g.wt;
  p.h0 = ih * g.wh;
  p.w0 = iw * g.ww;
  return p;
}

struct Token {
  int b, ot, oh, ow;  // original coordinates (meaningful when valid)
  int key;            // bias key: bias index of (n, m) = key(n) - key(m) + c0
  int region;         // Swin shift-mask region id (0 when not shifted)
  bool valid;         // inside the unpadded volume
};

// Swin's region of one axis: 0 when unshifted, else (p >= P - w) + (p >= P - s).
SSLTM_HD int region_axis(int p, int P, int w, int s) {
  if (s == 0) return 0;
  return (p >= P - w ? 1 : 0) + (p >= P - s ? 1 : 0);
}

// Bias coordinates of a flat in-window index, decoded with the bias-window dims, folded into one
// linear key (the table index is linear in the coordinate difference).
SSLTM_HD int bias_key(const Geometry& g, int n) {
  const int ct = n / (g.bh * g.bw);
  const int ch = (n / g.bw) % g.bh;
  const int cw = n % g.bw;
  return ct * g.key_t + ch * g.key_h + cw;
}

// Token n (0 <= n < N) of a window: shifted padded coords p, original coords o = (p + s) mod P.
SSLTM_HD Token token_at(const Geometry& g, const WinPos& wp, int n) {
  const int c = n % g.ww;
  const int r = n / g.ww;
  const int bb = r % g.wh;
  const int a = r / g.wh;
  const int pt = wp.t0 + a, ph = wp.h0 + bb, pw = wp.w0 + c;
  Token t;
  t.b = wp.b;
  t.ot = (pt + g.st) % g.Tp;
  t.oh = (ph + g.sh) % g.Hp;
  t.ow = (pw + g.sw) % g.Wp;
  t.valid = t.ot < g.T && t.oh < g.H && t.ow < g.W;
  t.region = g.shifted ? 9 * region_axis(pt, g.Tp, g.wt, g.st) + 3 * region_axis(ph, g.Hp, g.wh, g.sh) +
                             region_axis(pw, g.Wp, g.ww, g.sw)
                       : 0;
  t.key = bias_key(g, n);
  return t;
}

// Flat (b, t, h, w) index of a valid token in the contiguous outputs.
SSLTM_HD int64_t token_flat(const Geometry& g, const Token& t) {
  return ((int64_t(t.b) * g.T + t.ot) * g.H + t.oh) * g.W + t.ow;
}

// Element offset of a token's row for one head in a strided (B,T,H,W,heads,head_dim) tensor.
SSLTM_HD int64_t row_offset(const Strides5& s, const Token& t, int head) {
  return int64_t(t.b) * s.b + int64_t(t.ot) * s.t + int64_t(t.oh) * s.h + int64_t(t.ow) * s.w +
         int64_t(head) * s.n;
}

// Whether any token of the window is padding (the same answer for every thread of a block).
SSLTM_HD bool axis_padded(int p0, int w, int s, int P, int L) {
  for (int i = 0; i < w; ++i) {
    if ((p0 + i + s) % P >= L) return true;
  }
  return false;
}
SSLTM_HD bool window_has_padding(const Geometry& g, const WinPos& wp) {
  return axis_padded(wp.t0, g.wt, g.st, g.Tp, g.T) || axis_padded(wp.h0, g.wh, g.sh, g.Hp, g.H) ||
         axis_padded(wp.w0, g.ww, g.sw, g.Wp, g.W);
}

// How the backward runs (plan_backward below). The dk/dv pass runs one block per (window group, head,
// key chunk); each block accumulates its slice of the group's sums on chip over the group's windows
// and stores it once at the end, so the partial buffers need no zero fill and are never re-read.
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

template <int HD, typename scalar_t, typename acc_t>
SSLTM_HD void fwd_init(const Args<scalar_t, acc_t>& a, const WinPos& wp, int head, int n,
                       FwdThread<HD, acc_t>& th) {
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
template <int HD, typename scalar_t, typename acc_t>
SSLTM_HD void fwd_tile(const Args<scalar_t, acc_t>& a, int head, const float* amask_win, int n, int k0,
                       const Tile<HD, acc_t>& tile, FwdThread<HD, acc_t>& th) {
  if (!th.active) return;
  constexpr int R = Tile<HD, acc_t>::R;
  const int N = a.g.N;
  const int kcnt = N - k0 < R ? N - k0 : R;
  const float* am_row = amask_win ? amask_win + int64_t(n) * N : nullptr;
  for (int j0 = 0; j0 < kcnt; j0 += kSub) {
    acc_t s[kSub];
    acc_t smax = acc_t(-INFINITY);
    SSLTM_UNROLL
    for (int jj = 0; jj < kSub; ++jj) {
      const int j = j0 + jj;
      s[jj] = acc_t(-INFINITY);
      if (j < kcnt) {
        s[jj] = finish_score(a, head, a.scale * dot_row<HD>(th.q, tile.a[j]), th.tok.key, th.tok.region,
                             tile.key[j], tile.region[j], am_row, k0 + j);
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
        for (int d = 0; d < HD; ++d) th.o[d] += p * tile.b[j][d];
      }
    }
    th.mx = mnew;
  }
}

template <int HD, typename scalar_t, typename acc_t>
SSLTM_HD void fwd_finish(const Args<scalar_t, acc_t>& a, int head, const FwdThread<HD, acc_t>& th) {
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
    int end = 0;
    auto take = [&end](int size) {
      const int at = end;
      end = round_up(end + size, 128);
      return at;
    };
    const int rows_bytes = kLdRows * int(sizeof(scalar_t));
    q = take(kTcQueries * rows_bytes);
    k = take(Np * rows_bytes);
    v = take(Np * rows_bytes);
    const int s_bytes = kTcQueries * ld_s * 4, o_bytes = kTcQueries * kLdO * 4;
    s = take(s_bytes > o_bytes ? s_bytes : o_bytes);
    o = s;
    p = take(kTcQueries * ld_p * int(sizeof(scalar_t)));
    key_off_k = take(Np * 8);
    key_off_v = take(Np * 8);
    key_bias = take(Np * 4);
    key_region = take(Np * 4);
    query_off = take(kTcQueries * 8);
    query_row = take(kTcQueries * 8);
    query_bias = take(kTcQueries * 4);
    query_region = take(kTcQueries * 4);
    inv_l = take(kTcQueries * 4);
    pad_mass = take(kTcQueries * 4);
    bytes = end;
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
  const float* am_row = amask_win ? amask_win + int64_t(q0 + r) * N : nullptr;
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

template <int HD, typename scalar_t, typename acc_t>
SSLTM_HD void dq_init(const Args<scalar_t, acc_t>& a, const WinPos& wp, int head, int n,
                      DqThread<HD, acc_t>& th) {
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

template <int HD, typename scalar_t, typename acc_t>
SSLTM_HD void dq_tile(const Args<scalar_t, acc_t>& a, int head, const float* amask_win, int n, int k0,
                      const Tile<HD, acc_t>& tile, DqThread<HD, acc_t>& th) {
  if (!th.active) return;
  constexpr int R = Tile<HD, acc_t>::R;
  const int N = a.g.N;
  const int kcnt = N - k0 < R ? N - k0 : R;
  const float* am_row = amask_win ? amask_win + int64_t(n) * N : nullptr;
  for (int j = 0; j < kcnt; ++j) {
    const acc_t s = finish_score(a, head, a.scale * dot_row<HD>(th.q, tile.a[j]), th.tok.key,
                                 th.tok.region, tile.key[j], tile.region[j], am_row, k0 + j);
    const acc_t p = acc_exp(s - th.lse);
    const acc_t dp = dot_row<HD>(th.g, tile.b[j]);
    const acc_t ds = p * (dp - th.delta);
    SSLTM_UNROLL_HD
    for (int d = 0; d < HD; ++d) th.dq[d] += ds * tile.a[j][d];
  }
}

template <int HD, typename scalar_t, typename acc_t>
SSLTM_HD void dq_finish(const Args<scalar_t, acc_t>& a, int head, const DqThread<HD, acc_t>& th) {
  if (!th.active) return;
  scalar_t* dst = a.dq + row_offset(a.sdx, th.tok, head);
  SSLTM_UNROLL_HD
  for (int d = 0; d < HD; ++d) {
    if (d < a.g.hd) dst[d] = scalar_t(a.scale * th.dq[d]);
  }
}

// Query-row passes: one thread per query row sweeping the window's keys in staged tiles. The
// forward and the dq kernel differ only in their thread state and phase functions, bundled here so
// that one kernel (and one emulation loop) serves both.
template <int HD, typename acc_t>
struct ForwardPass {
  using Thread = FwdThread<HD, acc_t>;
  template <typename scalar_t>
  SSLTM_HD static void init(const Args<scalar_t, acc_t>& a, const WinPos& wp, int head, int n, Thread& th) {
    fwd_init(a, wp, head, n, th);
  }
  template <typename scalar_t>
  SSLTM_HD static void tile(const Args<scalar_t, acc_t>& a, int head, const float* amask_win, int n, int k0,
                            const Tile<HD, acc_t>& kv, Thread& th) {
    fwd_tile(a, head, amask_win, n, k0, kv, th);
  }
  template <typename scalar_t>
  SSLTM_HD static void finish(const Args<scalar_t, acc_t>& a, int head, const Thread& th) {
    fwd_finish(a, head, th);
  }
};

template <int HD, typename acc_t>
struct DqPass {
  using Thread = DqThread<HD, acc_t>;
  template <typename scalar_t>
  SSLTM_HD static void init(const Args<scalar_t, acc_t>& a, const WinPos& wp, int head, int n, Thread& th) {
    dq_init(a, wp, head, n, th);
  }
  template <typename scalar_t>
  SSLTM_HD static void tile(const Args<scalar_t, acc_t>& a, int head, const float* amask_win, int n, int k0,
                            const Tile<HD, acc_t>& kv, Thread& th) {
    dq_tile(a, head, amask_win, n, k0, kv, th);
  }
  template <typename scalar_t>
  SSLTM_HD static void finish(const Args<scalar_t, acc_t>& a, int head, const Thread& th) {
    dq_finish(a, head, th);
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
  constexpr int R = Tile<HD, acc_t>::R;
  const int N = a.g.N;
  const int qcnt = N - q0 < R ? N - q0 : R;
  for (int j = 0; j < qcnt; ++j) {
    if (!tile.valid[j]) continue;
    const int n = q0 + j;
    const float* am_row = amask_win ? amask_win + int64_t(n) * N : nullptr;
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
    int end = 0;
    auto take = [&end](int size) {
      const int at = end;
      end = round_up(end + size, 128);
      return at;
    };
    const int rows_bytes = kLdRows * int(sizeof(scalar_t));
    chunk_a = take(rows * rows_bytes);
    chunk_b = take(rows * rows_bytes);
    all_a = take(Np * rows_bytes);
    all_b = take(Np * rows_bytes);
    const int s_bytes = rows * ld_s * 4, out_bytes = rows * kLdOut * 4;
    s = take(s_bytes > out_bytes ? s_bytes : out_bytes);
    dp = take(s_bytes > out_bytes ? s_bytes : out_bytes);
    out_a = s;
    out_b = dp;
    p = take(rows * ld_p * int(sizeof(scalar_t)));
    ds = take(rows * ld_p * int(sizeof(scalar_t)));
    chunk_off_a = take(rows * 8);
    chunk_off_b = take(rows * 8);
    chunk_out_off = take(rows * 8);
    chunk_bias = take(rows * 4);
    chunk_region = take(rows * 4);
    chunk_lse = take(rows * 4);
    chunk_delta = take(rows * 4);
    chunk_pad_dot_k = take(rows * 4);
    chunk_pad_dot_v = take(rows * 4);
    pad_ds = take(rows * parts * 4);
    all_off_a = take(Np * 8);
    all_off_b = take(Np * 8);
    all_bias = take(Np * 4);
    all_region = take(Np * 4);
    all_lse = take(Np * 4);
    all_delta = take(Np * 4);
    all_pad_dot_k = take(Np * 4);
    all_pad_dot_v = take(Np * 4);
    window_bytes = end;
    ds_sum = ds_sums ? take(Np * rows * 4) : -1;
    bytes = end;
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
      const float* am_row = amask_win ? amask_win + int64_t(n) * N : nullptr;
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

// ------------------------------------------------------------------------------------------------
// Backward plan (host code: the bindings plan with the device's limits, or the emulation's)
// ------------------------------------------------------------------------------------------------
struct DeviceLimits {
  int smem_limit;     // shared memory a block may opt in to, bytes
  int sm_count;       // multiprocessors
  bool tensor_cores;  // the tensor-core backward is compiled for (and runs on) the device for the dtype
};

// Shared memory and multiprocessors that the emulation assumes (an H100/H200's opt-in limit, 227 KB;
// few SMs, so that the test shapes get several window groups of several windows).
constexpr DeviceLimits kEmulatedDevice{227 * 1024, 4, true};

// Static shared memory of a dkv_kernel block (its tile).
inline int dkv_tile_bytes(int hd, int acc_bytes) {
  return SSLTM_DISPATCH_HEAD_DIM(hd, [&] {
    return acc_bytes == 8 ? int(sizeof(Tile<HD, double>)) : int(sizeof(Tile<HD, float>));
  });
}
static_assert(sizeof(Tile<kMaxHeadDim, float>) + kMaxWindowTokens * sizeof(float) <= 64 * 1024,
              "a dkv_kernel block must fit one key's column of dS sums next to its tile in sm_75's 64 KB");

// Blocks of 128 threads that one multiprocessor can hold at most (2048 threads).
constexpr int kMaxBlocksPerSm = 2048 / kThreads;

// Kernels and window groups of the backward. dkv_rows = 0 means that no block fits the shared memory.
//
// Groups: enough dk/dv blocks to give every multiprocessor as many blocks as its shared memory holds
// (one wave; each block then runs its group's windows in turn), but at most as many that the dS sums,
// groups * heads * N * N fp32, stay within half the bytes of q. Without a table or pad gradient there
// is nothing to sum and every window is its own group.
// At the stride-4 shape of SSLTM (B = 2, T = 4, H = W = 120, 1 head, head_dim 32, window 4x7x7:
// 648 windows of 196 tokens, q 7.4 MB in bf16) on an H100 (132 SMs, 227 KB): tensor-core dk/dv
// blocks of 32 keys (7 per group, 154 KB of shared memory each, one per SM) give 18 groups of 36
// windows, 2.8 MB of dS sums (0.38x q) and 32 KB of pad sums. Before: 324 groups, 50 MB of dS sums
// (6.8x q) zero-filled and read-modify-written per window, 16 MB of pad sums, a 150 KB group sum.
inline BackwardPlan plan_backward(const Geometry& g, InputType t, const DeviceLimits& dev, bool table_grad,
                                  bool pad_grad, int64_t forced_groups) {
  BackwardPlan plan{};
  const int acc_bytes = t == InputType::kFloat64 ? 8 : 4;
  const int in_bytes = t == InputType::kFloat64 ? 8 : t == InputType::kFloat32 ? 4 : 2;
  plan.tensor_cores = dev.tensor_cores && tensor_core_min_arch(t) > 0 &&
                      backward_on_tensor_cores(g.N, g.hd, dev.smem_limit);
  int block_bytes;
  if (plan.tensor_cores) {
    SSLTM_DISPATCH_HEAD_DIM(g.hd, [&] {
      plan.dq_rows = bwd_tc_rows<HD, TcStorage>(g.N, dev.smem_limit, false);
      plan.dkv_rows = bwd_tc_rows<HD, TcStorage>(g.N, dev.smem_limit, table_grad);
      plan.dkv_smem = BwdTcLayout<HD, TcStorage>(g.N, plan.dkv_rows, table_grad).bytes;
    });
    block_bytes = plan.dkv_smem;
  } else {
    const int tile_bytes = dkv_tile_bytes(g.hd, acc_bytes);
    plan.dkv_rows = kThreads;
    if (table_grad) {
      // each key's column of dS sums takes N entries: as many keys as fit, in whole warps where possible
      int keys = (dev.smem_limit - tile_bytes) / (g.N * acc_bytes);
      if (keys > kThreads) {
        keys = kThreads;
      } else if (keys > 32) {
        keys = keys / 32 * 32;
      }
      plan.dkv_rows = keys > 0 ? keys : 0;
    }
    plan.dkv_smem = table_grad ? g.N * plan.dkv_rows * acc_bytes : 0;
    block_bytes = tile_bytes + plan.dkv_smem;
  }
  if (plan.dkv_rows == 0) return plan;
  plan.key_chunks = (g.N + plan.dkv_rows - 1) / plan.dkv_rows;
  int64_t groups = g.nwin;
  if (forced_groups > 0 && (table_grad || pad_grad)) {
    groups = forced_groups;
  } else if (table_grad || pad_grad) {
    int per_sm = dev.smem_limit / block_bytes;
    per_sm = per_sm < 1 ? 1 : per_sm > kMaxBlocksPerSm ? kMaxBlocksPerSm : per_sm;
    groups = int64_t(dev.sm_count) * per_sm / (int64_t(g.nh) * plan.key_chunks);
    if (table_grad) {
      const int64_t q_bytes = int64_t(g.B) * g.T * g.H * g.W * g.nh * g.hd * in_bytes;
      const int64_t cap = q_bytes / 2 / (int64_t(g.nh) * g.N * g.N * acc_bytes);
      if (groups > cap) groups = cap;
    }
  }
  if (groups > g.nwin) groups = g.nwin;
  if (groups < 1) groups = 1;
  plan.group_size = int((g.nwin + groups - 1) / groups);
  plan.groups = (g.nwin + plan.group_size - 1) / plan.group_size;
  return plan;
}

// Kernel families (tensor cores or not) of the forward and the backward for a device with smem_limit
// bytes of opt-in shared memory per block and compute capability arch (10 * major + minor). The CUDA
// launchers decide the same way, with the kernels' compiled architecture in place of arch.
struct KernelFamilies {
  bool forward_tensor_cores, backward_tensor_cores;
};

inline KernelFamilies kernel_families(InputType t, int N, int hd, int smem_limit, int arch) {
  const int min_arch = tensor_core_min_arch(t);
  const bool wmma = min_arch > 0 && arch >= min_arch;
  return {wmma && forward_on_tensor_cores(N, hd, smem_limit), wmma && backward_on_tensor_cores(N, hd, smem_limit)};
}

// ------------------------------------------------------------------------------------------------
// Gradients of the bias table and the pad rows from the group partials (fixed-order reductions)
// ------------------------------------------------------------------------------------------------
constexpr int kTableLanes = 32;  // threads (a warp) per table entry

// Lane `lane`'s share of the gradient of table[idx, head]: over queries n = lane, lane + kTableLanes,
// ..., the dS sums of groups 0, 1, ... at (n, m), m being the key whose bias coordinates are
// c(n) - delta(idx), if it exists. The lanes' shares are then added in a fixed tree order
// (table_grad_kernel's warp shuffles, replayed by the emulation).
template <typename acc_t>
SSLTM_HD acc_t table_grad_lane(const Geometry& g, int groups, const acc_t* wpart, int idx, int head, int lane) {
  const int dt = idx / g.key_t - (g.ft - 1);
  const int dh = (idx / g.key_h) % (2 * g.fh - 1) - (g.fh - 1);
  const int dw = idx % g.key_h - (g.fw - 1);
  const int64_t slice = int64_t(g.N) * g.N;
  const int64_t group_stride = int64_t(g.nh) * slice;
  const acc_t* w = wpart + head * slice;
  acc_t s = 0;
  for (int n = lane; n < g.N; n += kTableLanes) {
    const int ct = n / (g.bh * g.bw) - dt;
    const int ch = (n / g.bw) % g.bh - dh;
    const int cw = n % g.bw - dw;
    if (ct < 0 || ch < 0 || cw < 0 || ct >= g.bt || ch >= g.bh || cw >= g.bw) continue;
    const int m = (ct * g.bh + ch) * g.bw + cw;
    if (m >= g.N) continue;
    for (int grp = 0; grp < groups; ++grp) s += w[grp * group_stride + int64_t(n) * g.N + m];
  }
  return s;
}

// Gradient of pad[head, d]: sum over groups, then over a group's dk/dv blocks, of the
// (groups, nh, key_chunks, hd) partials.
template <typename acc_t>
SSLTM_HD acc_t pad_grad_elem(const Geometry& g, const BackwardPlan& plan, const acc_t* part, int head, int d) {
  acc_t s = 0;
  for (int grp = 0; grp < plan.groups; ++grp) {
    const acc_t* p = part + ((int64_t(grp) * g.nh + head) * plan.key_chunks) * g.hd + d;
    for (int c = 0; c < plan.key_chunks; ++c) s += p[int64_t(c) * g.hd];
  }
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
