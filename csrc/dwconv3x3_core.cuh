// Fused depthwise 3x3 convolution (+ optional exact GELU) of SegFormer's Mix-FFN on channels-last frames:
// the per-thread code shared by the CUDA kernels (dwconv3x3.cu) and their CPU emulation
// (dwconv3x3_cpu.cpp), which runs the same functions with loops standing in for blocks and threads.
//
// Semantics (see ssltm_kernels/ops/dwconv3x3.py): x (B, T, H, W, C) with any strides, weight (C, 1, 3, 3)
// contiguous, tap k = 3 * i + j multiplying the pixel at offset (i - 1, j - 1), zero padding 1, optional
// bias (C,), optional GELU 0.5 * z * (1 + erf(z / sqrt(2))). Outputs are contiguous. Accumulation in
// float (double for double inputs on the CPU).
//
// Backward: g = dout * gelu'(z) (z recomputed from the same 9 loads of x that the weight gradient needs;
// g = dout without an activation), dx[p] = sum_k w[k] * g[p - offset_k], dweight[c, k] = sum_p g[p, c] *
// x[p + offset_k, c], dbias[c] = sum_p g[p, c]. The weight and bias sums are deterministic: each block
// sums a fixed range of pixels for 32 channels, its pixel lanes are combined in lane order, and the
// blocks' partial sums are added in block order by a last kernel. No atomics.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SSLTM_DW_HD __host__ __device__ __forceinline__
#else
#define SSLTM_DW_HD inline
#endif

namespace ssltm {
namespace dwc {

constexpr int kThreads = 256;            // elementwise kernels (forward, dx, final sums): one element per thread
constexpr int kPartialChannels = 32;     // partial-sum blocks: consecutive channels, one warp's width ...
constexpr int kPartialLanes = 8;         // ... times this many pixel lanes
constexpr int kPartialThreads = kPartialChannels * kPartialLanes;
constexpr int kPartialRows = 10;         // 9 weight taps and the bias

struct Shape {
  int64_t frames, T, H, W, C;  // frames = B * T
};

struct Strides {  // element strides of x (B, T, H, W, C)
  int64_t b, t, h, w, c;
};

// Type-erased problem, filled by the bindings and handed to the launchers (CUDA) or the emulation (CPU).
struct Problem {
  Shape s;
  Strides sx;
  int dtype;  // at::ScalarType of x
  int device_index;
  bool gelu;
  int64_t groups;  // pixel groups of the weight/bias partial sums (backward)
  const void* x;
  const void* weight;  // (C, 9) contiguous, x's dtype
  const void* bias;    // (C,) contiguous or nullptr
  void* out;           // forward: (frames, H, W, C) contiguous
  const void* dout;    // backward: (frames, H, W, C) contiguous
  void* g;             // backward with GELU: dout * gelu'(z), contiguous, x's dtype
  void* dx;            // backward: contiguous
  void* partial;       // backward: (groups, kPartialRows, C) accumulation dtype
  void* dweight;       // backward: (C, 9) accumulation dtype
  void* dbias;         // backward: (C,) accumulation dtype
};

template <typename scalar_t, typename acc_t>
struct Args {
  Shape s;
  Strides sx;
  bool gelu;
  int64_t groups;
  const scalar_t* x;
  const scalar_t* weight;
  const scalar_t* bias;
  scalar_t* out;
  const scalar_t* dout;
  scalar_t* g;
  scalar_t* dx;
  acc_t* partial;
  acc_t* dweight;
  acc_t* dbias;
};

template <typename scalar_t, typename acc_t>
inline Args<scalar_t, acc_t> make_args(const Problem& p) {
  Args<scalar_t, acc_t> a;
  a.s = p.s;
  a.sx = p.sx;
  a.gelu = p.gelu;
  a.groups = p.groups;
  a.x = static_cast<const scalar_t*>(p.x);
  a.weight = static_cast<const scalar_t*>(p.weight);
  a.bias = static_cast<const scalar_t*>(p.bias);
  a.out = static_cast<scalar_t*>(p.out);
  a.dout = static_cast<const scalar_t*>(p.dout);
  a.g = static_cast<scalar_t*>(p.g);
  a.dx = static_cast<scalar_t*>(p.dx);
  a.partial = static_cast<acc_t*>(p.partial);
  a.dweight = static_cast<acc_t*>(p.dweight);
  a.dbias = static_cast<acc_t*>(p.dbias);
  return a;
}

// ------------------------------------------------------------------------------------------------
// Math
// ------------------------------------------------------------------------------------------------
SSLTM_DW_HD float erf_acc(float v) { return erff(v); }
SSLTM_DW_HD double erf_acc(double v) { return erf(v); }
SSLTM_DW_HD float exp_acc(float v) { return expf(v); }
SSLTM_DW_HD double exp_acc(double v) { return exp(v); }

template <typename acc_t>
SSLTM_DW_HD acc_t gelu(acc_t z) {
  return acc_t(0.5) * z * (acc_t(1) + erf_acc(z * acc_t(0.70710678118654752440)));
}

// d gelu / dz = Phi(z) + z * phi(z)
template <typename acc_t>
SSLTM_DW_HD acc_t gelu_grad(acc_t z) {
  return acc_t(0.5) * (acc_t(1) + erf_acc(z * acc_t(0.70710678118654752440))) +
         z * acc_t(0.39894228040143267794) * exp_acc(acc_t(-0.5) * z * z);
}

// ------------------------------------------------------------------------------------------------
// Addressing
// ------------------------------------------------------------------------------------------------
struct Pixel {
  int64_t f, h, w;
};

// Pixel `pixel` of the contiguous (frames, H, W) enumeration.
SSLTM_DW_HD Pixel pixel_at(const Shape& s, int64_t pixel) {
  Pixel p;
  p.w = pixel % s.W;
  pixel /= s.W;
  p.h = pixel % s.H;
  p.f = pixel / s.H;
  return p;
}

SSLTM_DW_HD bool inside(const Shape& s, int64_t h, int64_t w) { return h >= 0 && h < s.H && w >= 0 && w < s.W; }

SSLTM_DW_HD int64_t x_offset(const Shape& s, const Strides& sx, int64_t f, int64_t h, int64_t w, int64_t c) {
  return (f / s.T) * sx.b + (f % s.T) * sx.t + h * sx.h + w * sx.w + c * sx.c;
}

SSLTM_DW_HD int64_t contiguous_offset(const Shape& s, int64_t f, int64_t h, int64_t w, int64_t c) {
  return ((f * s.H + h) * s.W + w) * s.C + c;
}

// The 9 taps of x around pixel p in channel c (zero outside the frame) and the conv output before the
// activation.
template <typename scalar_t, typename acc_t>
SSLTM_DW_HD acc_t load_taps(const Args<scalar_t, acc_t>& a, const Pixel& p, int64_t c, acc_t (&xs)[9]) {
  acc_t z = a.bias != nullptr ? static_cast<acc_t>(a.bias[c]) : acc_t(0);
  for (int k = 0; k < 9; ++k) {
    const int64_t h = p.h + k / 3 - 1, w = p.w + k % 3 - 1;
    xs[k] = inside(a.s, h, w) ? static_cast<acc_t>(a.x[x_offset(a.s, a.sx, p.f, h, w, c)]) : acc_t(0);
    z += xs[k] * static_cast<acc_t>(a.weight[c * 9 + k]);
  }
  return z;
}

// ------------------------------------------------------------------------------------------------
// Forward: element e of the contiguous output
// ------------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
SSLTM_DW_HD void forward_element(const Args<scalar_t, acc_t>& a, int64_t e) {
  const int64_t c = e % a.s.C;
  acc_t xs[9];
  const acc_t z = load_taps(a, pixel_at(a.s, e / a.s.C), c, xs);
  a.out[e] = scalar_t(a.gelu ? gelu(z) : z);
}

// ------------------------------------------------------------------------------------------------
// Backward, partial sums: block (chunk, group) of kPartialThreads threads; thread tid is channel
// chunk * 32 + tid % 32 and pixel lane tid / 32 of the group's pixel range. With GELU it also writes g.
// ------------------------------------------------------------------------------------------------
SSLTM_DW_HD int64_t group_begin(int64_t pixels, int64_t groups, int64_t group) { return group * pixels / groups; }

template <typename scalar_t, typename acc_t>
SSLTM_DW_HD void partial_thread(const Args<scalar_t, acc_t>& a, int64_t chunk, int64_t group, int tid,
                                acc_t (&sums)[kPartialRows]) {
  for (int r = 0; r < kPartialRows; ++r) sums[r] = acc_t(0);
  const int64_t c = chunk * kPartialChannels + tid % kPartialChannels;
  if (c >= a.s.C) return;
  const int64_t pixels = a.s.frames * a.s.H * a.s.W;
  const int64_t end = group_begin(pixels, a.groups, group + 1);
  for (int64_t pixel = group_begin(pixels, a.groups, group) + tid / kPartialChannels; pixel < end;
       pixel += kPartialLanes) {
    acc_t xs[9];
    const acc_t z = load_taps(a, pixel_at(a.s, pixel), c, xs);
    const int64_t e = pixel * a.s.C + c;
    acc_t g = static_cast<acc_t>(a.dout[e]);
    if (a.gelu) {
      g *= gelu_grad(z);
      a.g[e] = scalar_t(g);
    }
    for (int k = 0; k < 9; ++k) sums[k] += g * xs[k];
    sums[9] += g;
  }
}

// After a barrier: channel lane `lane` adds the block's pixel lanes in lane order. `shared` holds every
// thread's sums, (kPartialLanes, kPartialRows, kPartialChannels).
template <typename scalar_t, typename acc_t>
SSLTM_DW_HD void partial_store(const Args<scalar_t, acc_t>& a, int64_t chunk, int64_t group, int lane,
                               const acc_t* shared) {
  const int64_t c = chunk * kPartialChannels + lane;
  if (c >= a.s.C) return;
  for (int r = 0; r < kPartialRows; ++r) {
    acc_t total = acc_t(0);
    for (int l = 0; l < kPartialLanes; ++l) total += shared[(l * kPartialRows + r) * kPartialChannels + lane];
    a.partial[(group * kPartialRows + r) * a.s.C + c] = total;
  }
}

SSLTM_DW_HD int shared_index(int tid, int row) {
  return ((tid / kPartialChannels) * kPartialRows + row) * kPartialChannels + tid % kPartialChannels;
}

// ------------------------------------------------------------------------------------------------
// Backward, dx: element e of the contiguous dx, from g (dout without an activation)
// ------------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
SSLTM_DW_HD void dx_element(const Args<scalar_t, acc_t>& a, const scalar_t* g, int64_t e) {
  const int64_t c = e % a.s.C;
  const Pixel p = pixel_at(a.s, e / a.s.C);
  acc_t dx = acc_t(0);
  for (int k = 0; k < 9; ++k) {
    const int64_t h = p.h - (k / 3 - 1), w = p.w - (k % 3 - 1);
    if (inside(a.s, h, w)) {
      dx += static_cast<acc_t>(g[contiguous_offset(a.s, p.f, h, w, c)]) * static_cast<acc_t>(a.weight[c * 9 + k]);
    }
  }
  a.dx[e] = scalar_t(dx);
}

// ------------------------------------------------------------------------------------------------
// Backward, final sums: element e of (kPartialRows, C): the groups' partial sums in group order
// ------------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
SSLTM_DW_HD void final_sum_element(const Args<scalar_t, acc_t>& a, int64_t e) {
  const int64_t row = e / a.s.C, c = e % a.s.C;
  acc_t total = acc_t(0);
  for (int64_t group = 0; group < a.groups; ++group) total += a.partial[(group * kPartialRows + row) * a.s.C + c];
  if (row < 9) {
    a.dweight[c * 9 + row] = total;
  } else {
    a.dbias[c] = total;
  }
}

}  // namespace dwc
}  // namespace ssltm
