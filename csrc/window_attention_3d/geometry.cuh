// Fused 3D window attention: the sizes every kernel shares, the geometry of a call (windows, shift,
// padding, bias table) and the coordinates of a window's tokens. Part of window_attention_3d_core.cuh;
// plain C++ that compiles with both nvcc and the host compiler.
#pragma once

#include <cstdint>

#include "../common.cuh"

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
// in backward_plan.cuh, with sm_75's 64 KB of shared memory per block).
constexpr int kMaxWindowTokens = 4096;
static_assert(int64_t(kMaxWindowTokens) * kMaxWindowTokens < (int64_t(1) << 31), "window index overflows int32");

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

}  // namespace wa3d
}  // namespace ssltm
