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

#if defined(__CUDACC__)
#define SSLTM_HD __host__ __device__ __forceinline__
#define SSLTM_UNROLL _Pragma("unroll")
// Loops over head_dim: fully unrolled (rows stay in registers) up to HD = 64; for HD = 128 the rows
// do not fit in registers anyway, and a partial unroll keeps the compile time reasonable.
#define SSLTM_UNROLL_HD _Pragma("unroll (HD <= 64 ? HD : 4)")
#else
#define SSLTM_HD inline
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
// Scores kept in registers per online-softmax step of the forward pass.
constexpr int kSub = 16;

// Rows of K/V (forward, dq) or Q/dO (dk/dv) staged in shared memory per tile: 2 * rows * HD fp32
// = 32 KB for every HD, well under the 48 KB static shared-memory limit.
template <int HD>
struct TileRows {
  static constexpr int value = HD >= 128 ? 32 : 64;
};

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

// Number of window groups of the dk/dv kernel. Each group's windows run one after another in one
// block, whose threads own disjoint slots of the per-group partial buffers (bias-table dS sums and
// pad-key gradients); the groups are then reduced in a fixed order. Without those gradients every
// window is its own group. The result depends only on the problem shape, so the reduction order (and
// the bits of the result) are the same on every run.
inline int choose_groups(const Geometry& g, bool table_grad, bool pad_grad) {
  if (!table_grad && !pad_grad) return g.nwin;
  const int64_t per_group = (table_grad ? (int64_t)g.nh * g.N * g.N : 0) +
                            (pad_grad ? 2 * (int64_t)g.nh * g.N * g.hd : 0);
  const int64_t budget = int64_t(16) << 20;  // elements across all groups (64 MB in fp32)
  int64_t groups = budget / per_group;
  if (groups > 1024) groups = 1024;
  if (groups > g.nwin) groups = g.nwin;
  if (groups < 1) groups = 1;
  return (int)groups;
}

// Windows per group for a requested group count; the effective count is ceil(nwin / size).
inline int group_size_for(const Geometry& g, int groups) { return (g.nwin + groups - 1) / groups; }
inline int groups_for_size(const Geometry& g, int size) { return (g.nwin + size - 1) / size; }

// ------------------------------------------------------------------------------------------------
// Scalar helpers (exact expf/logf on the device: the build does not use --use_fast_math)
// ------------------------------------------------------------------------------------------------
SSLTM_HD float acc_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}
SSLTM_HD double acc_exp(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}
SSLTM_HD float acc_log(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return std::log(x);
#endif
}
SSLTM_HD double acc_log(double x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  return std::log(x);
#endif
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
  scalar_t* dq;          // contiguous (B,T,H,W,nh,hd)
  scalar_t* dk;
  scalar_t* dv;
  acc_t* wpart;          // (groups, nh, N, N) zero-initialised, or nullptr: per-group sums of dS
  acc_t* padk_part;      // (groups, nh, N, hd) zero-initialised, or nullptr
  acc_t* padv_part;
  int groups, group_size;
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
// Shared memory per block that the emulation assumes (H100/H200 opt-in limit, 227 KB); the CUDA
// launcher asks the device instead.
constexpr int kEmulatedSharedMemoryLimit = 227 * 1024;

// Tensor cores take 16-bit inputs (half, bfloat16); fp32 and fp64 inputs keep the CUDA-core kernels.
template <typename scalar_t>
constexpr bool kTensorCoreInput = sizeof(scalar_t) == 2;

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

// Whether the forward runs on tensor cores for this input dtype and window, given the shared memory
// a block may use; otherwise query_rows_kernel (CUDA cores) serves it.
template <int HD, typename scalar_t>
SSLTM_HD bool forward_on_tensor_cores(const Geometry& g, int smem_limit) {
  return kTensorCoreInput<scalar_t> && FwdTcLayout<HD, scalar_t>(g.N).bytes <= smem_limit;
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
  scalar_t* dst = a.dq + (token_flat(a.g, th.tok) * a.g.nh + head) * a.g.hd;
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
// Backward dk/dv: block = (window group, head, key chunk), thread = one key row; the group's
// windows are processed one after another. Per-group partial sums (bias-table dS, pad-key
// gradients) live in slots owned by exactly one thread, so no atomics are needed.
// ------------------------------------------------------------------------------------------------
template <int HD, typename acc_t>
struct DkvThread {
  acc_t k[HD];
  acc_t v[HD];
  acc_t dk[HD];
  acc_t dv[HD];
  Token tok;
  bool in_range;  // m < N (padded keys take part: they are pad_k/pad_v rows)
};

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

// wpart_head: this (group, head)'s N x N slice of the dS sums, or nullptr.
template <int HD, typename scalar_t, typename acc_t>
SSLTM_HD void dkv_tile(const Args<scalar_t, acc_t>& a, int head, const float* amask_win, int m, int q0,
                       const Tile<HD, acc_t>& tile, acc_t* wpart_head, DkvThread<HD, acc_t>& th) {
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
    if (wpart_head) wpart_head[int64_t(n) * N + m] += ds;
  }
}

// padk_head / padv_head: this (group, head)'s (N, hd) slices of the pad partials, or nullptr.
template <int HD, typename scalar_t, typename acc_t>
SSLTM_HD void dkv_end_window(const Args<scalar_t, acc_t>& a, int head, int m, acc_t* padk_head,
                             acc_t* padv_head, const DkvThread<HD, acc_t>& th) {
  if (!th.in_range) return;
  const int hd = a.g.hd;
  if (th.tok.valid) {
    const int64_t off = (token_flat(a.g, th.tok) * a.g.nh + head) * hd;
    SSLTM_UNROLL_HD
    for (int d = 0; d < HD; ++d) {
      if (d >= hd) continue;
      a.dk[off + d] = scalar_t(a.scale * th.dk[d]);
      a.dv[off + d] = scalar_t(th.dv[d]);
    }
  } else if (padk_head) {
    SSLTM_UNROLL_HD
    for (int d = 0; d < HD; ++d) {
      if (d >= hd) continue;
      padk_head[int64_t(m) * hd + d] += a.scale * th.dk[d];
      padv_head[int64_t(m) * hd + d] += th.dv[d];
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Tensor-core backward (fp16/bf16). One block per chunk of kTcBwdRows rows of one side of the
// window's attention matrix against all Np rows of the other side:
//   dq pass  (kKeyChunk = false): chunk = queries, all rows = keys;   block = (window, head, chunk);
//   dk/dv pass (kKeyChunk = true): chunk = keys, all rows = queries; block = (window group, head,
//   chunk), the group's windows one after another (see choose_groups).
// Seen from the chunk, both passes are the same block algorithm on (chunk x Np) matrices: the dk/dv
// pass works on the transposes S^T = K Q^T, dP^T = V dO^T, so that dK = dS^T Q and dV = P^T dO (like
// dQ = dS K) are products whose B operand is row-major. "a" rows are Q or K, "b" rows dO or V.
// As in the forward, the rows of padded keys (pad_k, pad_v: fp32 parameters) are never rounded to 16
// bits: they are staged as zeros, and their scores use q . pad_k and dO . pad_v computed in fp32 per
// query; the dq pass adds the padded keys' share sum(dS) * pad_k in fp32 when writing dq.
// ------------------------------------------------------------------------------------------------
constexpr int kTcBwdRows = 32;  // chunk rows per block: keeps the largest layout (N = 196, HD = 128) under 227 KB
// Threads per chunk row in the score-gradient phase, each taking every kTcBwdRowParts-th column
constexpr int kTcBwdRowParts = kTcThreads / kTcBwdRows;

template <int HD, typename scalar_t>
struct BwdTcLayout {
  static constexpr int kLdRows = HD + 16 / int(sizeof(scalar_t));  // staged rows (elements)
  static constexpr int kLdOut = HD + 4;                             // fp32 result rows
  int Np;          // rows of the other side rounded up to kMma; rows N..Np-1 are zero
  int ld_s, ld_p;  // fp32 S/dP rows, input-dtype P/dS rows
  // byte offsets; out_a aliases s and out_b aliases dp (dead once P and dS are written)
  int chunk_a, chunk_b, all_a, all_b, s, dp, p, ds, out_a, out_b;
  // per row of either side: source offsets of the a/b rows (-1: padded token or beyond N), bias key,
  // shift-mask region, and, for query rows, lse, delta, q . pad_k and dO . pad_v
  int chunk_off_a, chunk_off_b, chunk_bias, chunk_region, chunk_lse, chunk_delta, chunk_pad_dot_k, chunk_pad_dot_v;
  int all_off_a, all_off_b, all_bias, all_region, all_lse, all_delta, all_pad_dot_k, all_pad_dot_v;
  int chunk_out_row;  // output row of a valid chunk token, else -1
  int pad_ds;         // dq pass: per query row and row part, sum of dS over the padded keys
  int bytes;

  SSLTM_HD explicit BwdTcLayout(int N) {
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
    chunk_a = take(kTcBwdRows * rows_bytes);
    chunk_b = take(kTcBwdRows * rows_bytes);
    all_a = take(Np * rows_bytes);
    all_b = take(Np * rows_bytes);
    const int s_bytes = kTcBwdRows * ld_s * 4, out_bytes = kTcBwdRows * kLdOut * 4;
    s = take(s_bytes > out_bytes ? s_bytes : out_bytes);
    dp = take(s_bytes > out_bytes ? s_bytes : out_bytes);
    out_a = s;
    out_b = dp;
    p = take(kTcBwdRows * ld_p * int(sizeof(scalar_t)));
    ds = take(kTcBwdRows * ld_p * int(sizeof(scalar_t)));
    chunk_off_a = take(kTcBwdRows * 8);
    chunk_off_b = take(kTcBwdRows * 8);
    chunk_out_row = take(kTcBwdRows * 8);
    chunk_bias = take(kTcBwdRows * 4);
    chunk_region = take(kTcBwdRows * 4);
    chunk_lse = take(kTcBwdRows * 4);
    chunk_delta = take(kTcBwdRows * 4);
    chunk_pad_dot_k = take(kTcBwdRows * 4);
    chunk_pad_dot_v = take(kTcBwdRows * 4);
    pad_ds = take(kTcBwdRows * kTcBwdRowParts * 4);
    all_off_a = take(Np * 8);
    all_off_b = take(Np * 8);
    all_bias = take(Np * 4);
    all_region = take(Np * 4);
    all_lse = take(Np * 4);
    all_delta = take(Np * 4);
    all_pad_dot_k = take(Np * 4);
    all_pad_dot_v = take(Np * 4);
    bytes = end;
  }

  // S (chunk x Np) = A_chunk A_all^T and dP = B_chunk B_all^T: the all-rows are the columns of B.
  SSLTM_HD TileProduct<scalar_t, true> scores() const {
    return {chunk_a, kLdRows, all_a, kLdRows, s, ld_s, kTcBwdRows, Np, HD};
  }
  SSLTM_HD TileProduct<scalar_t, true> score_grads() const {
    return {chunk_b, kLdRows, all_b, kLdRows, dp, ld_s, kTcBwdRows, Np, HD};
  }
  // dQ or dK (unscaled) = dS A_all; dV = P B_all
  SSLTM_HD TileProduct<scalar_t, false> a_grads() const {
    return {ds, ld_p, all_a, kLdRows, out_a, kLdOut, kTcBwdRows, HD, Np};
  }
  SSLTM_HD TileProduct<scalar_t, false> b_grads() const {
    return {p, ld_p, all_b, kLdRows, out_b, kLdOut, kTcBwdRows, HD, Np};
  }
};

// Whether the backward runs on tensor cores (both passes share the layout); otherwise the CUDA-core
// query_rows_kernel<DqPass> and dkv_kernel serve it.
template <int HD, typename scalar_t>
SSLTM_HD bool backward_on_tensor_cores(const Geometry& g, int smem_limit) {
  return kTensorCoreInput<scalar_t> && BwdTcLayout<HD, scalar_t>(g.N).bytes <= smem_limit;
}

// Per-row metadata of one token of either side.
struct BwdTcRowMeta {
  int64_t off_a, off_b, out_row;
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
  r.out_row = row;
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

// Phase "stage metadata": rows tid, tid + nthreads, ... < Np of the other side and chunk row
// tid < kTcBwdRows (first token c0).
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
  if (tid < kTcBwdRows) {
    const BwdTcRowMeta r = bwd_tc_row_meta(a, wp, head, c0 + tid, !kKeyChunk, !kKeyChunk);
    smem_at<int64_t>(smem, L.chunk_off_a)[tid] = r.off_a;
    smem_at<int64_t>(smem, L.chunk_off_b)[tid] = r.off_b;
    smem_at<int64_t>(smem, L.chunk_out_row)[tid] = r.out_row;
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
  for (int i = tid; i < kTcBwdRows * HD; i += nthreads) {
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

// Phase "score gradients" (after S and dP): thread tid takes chunk row r = tid % kTcBwdRows, columns
// part, part + kTcBwdRowParts, ... (part = tid / kTcBwdRows), and turns them into P = exp(S - lse) and
// dS = P (dP - delta), in the input dtype for the products (zero for padded queries and beyond N) and
// in fp32 for the bias gradient. Padded keys take their dot products from the fp32 pad dots. In the
// dq pass their P/dS entries are zero (their K rows are zero anyway) and their dS sum goes to the
// thread's pad_ds slot; in the dk/dv pass row r is key c0 + r and each (query, key) slot of
// wpart_head (or nullptr) belongs to one thread.
template <int HD, typename scalar_t, bool kKeyChunk>
SSLTM_HD void bwd_tc_score_grads(const Args<scalar_t, float>& a, int head, const float* amask_win, int c0,
                                 int tid, const BwdTcLayout<HD, scalar_t>& L, unsigned char* smem,
                                 float* wpart_head) {
  const int N = a.g.N;
  const int r = tid % kTcBwdRows, part = tid / kTcBwdRows;
  const int c = c0 + r;
  const float* s = smem_at<float>(smem, L.s) + r * L.ld_s;
  const float* dp = smem_at<float>(smem, L.dp) + r * L.ld_s;
  scalar_t* p_row = smem_at<scalar_t>(smem, L.p) + r * L.ld_p;
  scalar_t* ds_row = smem_at<scalar_t>(smem, L.ds) + r * L.ld_p;
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
  for (int j = part; j < L.Np; j += kTcBwdRowParts) {
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
      if (kKeyChunk && wpart_head) wpart_head[int64_t(n) * N + m] += ds;
      if (!kKeyChunk && key_padded) {
        pad_ds += ds;
        p = 0.0f;
        ds = 0.0f;
      }
    }
    p_row[j] = scalar_t(p);
    ds_row[j] = scalar_t(ds);
  }
  if (!kKeyChunk) smem_at<float>(smem, L.pad_ds)[part * kTcBwdRows + r] = pad_ds;
}

// Phase "write" (after the a/b products). dq pass: dq = scale * (dS K + pad_ds * pad_k) for valid
// queries. dk/dv pass: dk = scale * dS^T Q and dv = P^T dO for valid keys; a padded key's are added
// into its slot of the group's pad partials (padk_head / padv_head, or nullptr).
template <int HD, typename scalar_t, bool kKeyChunk>
SSLTM_HD void bwd_tc_write(const Args<scalar_t, float>& a, int head, int c0, int tid, int nthreads,
                           const BwdTcLayout<HD, scalar_t>& L, unsigned char* smem, float* padk_head,
                           float* padv_head) {
  constexpr int ld = BwdTcLayout<HD, scalar_t>::kLdOut;
  const int hd = a.g.hd;
  const int64_t* out_row = smem_at<int64_t>(smem, L.chunk_out_row);
  const float* ga = smem_at<float>(smem, L.out_a);
  const float* gb = smem_at<float>(smem, L.out_b);
  for (int i = tid; i < kTcBwdRows * HD; i += nthreads) {
    const int r = i / HD, d = i % HD;
    if (d >= hd || c0 + r >= a.g.N) continue;
    const int64_t row = out_row[r];
    if (!kKeyChunk) {
      if (row < 0) continue;
      float pad = 0.0f;
      if (a.pad_k) {
        float pad_ds = 0.0f;
        for (int part = 0; part < kTcBwdRowParts; ++part) pad_ds += smem_at<float>(smem, L.pad_ds)[part * kTcBwdRows + r];
        pad = pad_ds * a.pad_k[head * hd + d];
      }
      a.dq[row * hd + d] = scalar_t(a.scale * (ga[r * ld + d] + pad));
    } else if (row >= 0) {
      a.dk[row * hd + d] = scalar_t(a.scale * ga[r * ld + d]);
      a.dv[row * hd + d] = scalar_t(gb[r * ld + d]);
    } else if (padk_head) {
      padk_head[int64_t(c0 + r) * hd + d] += a.scale * ga[r * ld + d];
      padv_head[int64_t(c0 + r) * hd + d] += gb[r * ld + d];
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Fixed-order reductions (one output element per thread)
// ------------------------------------------------------------------------------------------------
// Sum over groups of element i of a (groups, len) buffer.
template <typename acc_t>
SSLTM_HD acc_t sum_groups(const acc_t* part, int groups, int64_t len, int64_t i) {
  acc_t s = 0;
  for (int g = 0; g < groups; ++g) s += part[int64_t(g) * len + i];
  return s;
}

// Gradient of table[idx, head] from the window-summed dS (nh, N, N): sum over query n of
// dS[n, m] where m is the key whose bias coordinates are c(n) - delta(idx), if it exists.
template <typename acc_t>
SSLTM_HD acc_t table_grad_elem(const Geometry& g, const acc_t* wsum, int idx, int head) {
  const int dt = idx / g.key_t - (g.ft - 1);
  const int dh = (idx / g.key_h) % (2 * g.fh - 1) - (g.fh - 1);
  const int dw = idx % g.key_h - (g.fw - 1);
  const acc_t* w = wsum + int64_t(head) * g.N * g.N;
  acc_t s = 0;
  for (int n = 0; n < g.N; ++n) {
    const int ct = n / (g.bh * g.bw) - dt;
    const int ch = (n / g.bw) % g.bh - dh;
    const int cw = n % g.bw - dw;
    if (ct < 0 || ch < 0 || cw < 0 || ct >= g.bt || ch >= g.bh || cw >= g.bw) continue;
    const int m = (ct * g.bh + ch) * g.bw + cw;
    if (m >= g.N) continue;
    s += w[int64_t(n) * g.N + m];
  }
  return s;
}

// Gradient of pad[head, d]: sum over groups, then over key slots, of the (groups, nh, N, hd) partials.
template <typename acc_t>
SSLTM_HD acc_t pad_grad_elem(const Geometry& g, int groups, const acc_t* part, int head, int d) {
  acc_t s = 0;
  for (int grp = 0; grp < groups; ++grp) {
    const acc_t* p = part + ((int64_t(grp) * g.nh + head) * g.N) * g.hd + d;
    for (int m = 0; m < g.N; ++m) s += p[int64_t(m) * g.hd];
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
  void* wpart;      // (groups, nh, N, N) zeros, or nullptr
  void* wsum;       // (nh, N, N) when groups > 1, else nullptr (wpart is used directly)
  void* padk_part;  // (groups, nh, N, hd) zeros, or nullptr
  void* padv_part;
  void* dtable;     // (Ntab, nh), or nullptr
  void* dpad_k;     // (nh, hd), or nullptr
  void* dpad_v;
  int groups, group_size;
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
  a.wpart = static_cast<acc_t*>(p.wpart);
  a.padk_part = static_cast<acc_t*>(p.padk_part);
  a.padv_part = static_cast<acc_t*>(p.padv_part);
  a.groups = p.groups;
  a.group_size = p.group_size;
  return a;
}

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

}  // namespace wa3d
}  // namespace ssltm
