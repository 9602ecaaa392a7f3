// Helpers for the causal depthwise conv1d (width W <= 4) on a slot-indexed conv pool, shared by
// the conv kernels and the fused decode: device functions, and conv_vec8_ok for the launchers.
// No torch headers, no kernels here.
//
// Pool rows are oldest first. An update of T new tokens with window offset off reads the history
// rows [off, off+W-1) of pool[slot]; rows [0, n) then hold the last n of (window ++ x), with
// n = W-1 for plain updates and min(R, W-2+T) for speculative ones (see conv_update_store).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "../conv/conv1d.h"
#include "kda_common.cuh"

namespace kda {

constexpr int kConvMaxWidth = 4;

__device__ __forceinline__ float ld_any(const void* p, int64_t i, bool is_bf16) {
  return is_bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i])
                 : static_cast<const float*>(p)[i];
}

__device__ __forceinline__ void st_any(void* p, int64_t i, float v, bool is_bf16) {
  if (is_bf16) static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16(v);
  else static_cast<float*>(p)[i] = v;
}

__device__ __forceinline__ float conv_act(float y, bool silu) {
  // x * sigmoid(x) with a non-positive exponent, from the MUFU ex2 and an approximate division
  // (a few ulp of fp32; every caller rounds the result to bf16): the accurate expf and IEEE
  // division took most of the eight-channel conv prefill kernel's instructions. e^-|y| below
  // 2^-126 (|y| > 87) is 0 rather than subnormal: y e r is then 0 instead of below 1e-36.
  if (!silu) return y;
  const float e = ex2_ftz(-fabsf(y) * 1.4426950408889634f);  // e^-|y| in [0, 1]
  const float r = __fdividef(1.f, 1.f + e);
  return y >= 0.f ? y * r : y * e * r;
}

struct ConvWeights {
  float w[kConvMaxWidth];
  float b;
  __device__ __forceinline__ ConvWeights(const Conv1dParams& p, int d) {
#pragma unroll
    for (int j = 0; j < kConvMaxWidth; ++j)
      w[j] = j < p.W ? ld_any(p.weight, (int64_t)d * p.W + j, p.weight_bf16) : 0.f;
    b = p.bias ? ld_any(p.bias, d, p.weight_bf16) : 0.f;
  }
};

// The W-1 history rows of one channel's window starting at row off (base = slot * pool_ss +
// d * pool_sd), oldest first; entries past W-2 are zero.
__device__ __forceinline__ void load_window(const Conv1dParams& p, int64_t base, int off,
                                            float (&win)[kConvMaxWidth]) {
#pragma unroll
  for (int j = 0; j < kConvMaxWidth; ++j)
    win[j] = j < p.W - 1 ? ld_any(p.pool, base + (int64_t)(off + j) * p.pool_sr, p.pool_bf16) : 0.f;
}

// Rewrites one channel's pool column after an update of p.T tokens: rows [0, n) get the last n
// elements of (window ++ x), n = W-1 for plain updates and min(R, W-2+T) with num_accepted
// (vLLM's speculative layout: window[1:] ++ x, so next step's window at row a-1 ends at the
// a-th accepted input); later rows are left alone. ``hist`` holds the window as read before any
// write (hist[0..W-2], oldest first), so no row is read after being overwritten.
__device__ __forceinline__ void conv_update_store(const Conv1dParams& p, int64_t base,
                                                  const float (&hist)[kConvMaxWidth],
                                                  const __nv_bfloat16* x, int64_t x_st) {
  const int n = p.num_accepted ? min(p.R, p.W - 2 + p.T) : p.W - 1;
  for (int i = 0; i < n; ++i) {
    const int e = p.W - 1 + p.T - n + i;  // index into window ++ x, always >= 0
    float v = 0.f;
    if (e >= p.W - 1) {
      v = __bfloat162float(x[(int64_t)(e - (p.W - 1)) * x_st]);
    } else {
#pragma unroll
      for (int j = 0; j < kConvMaxWidth - 1; ++j)
        if (j == e) v = hist[j];
    }
    st_any(p.pool, base + (int64_t)i * p.pool_sr, v, p.pool_bf16);
  }
}

// Eight consecutive channels as one 16-byte (bf16) or two 16-byte (fp32) accesses; i is a
// multiple of 8 elements from a 16-byte aligned base (conv_vec8_ok checks).
constexpr int kConvVec = 8;

__device__ __forceinline__ void ld8(const void* base, int64_t i, bool is_bf16, float (&v)[kConvVec]) {
  if (is_bf16) {
    const uint4 u = *reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(base) + i);
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
    unpack_bf16(w, v);
  } else {
    const float4* f = reinterpret_cast<const float4*>(static_cast<const float*>(base) + i);
    const float4 a = f[0], b = f[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  }
}

__device__ __forceinline__ void st8(void* base, int64_t i, bool is_bf16, const float (&v)[kConvVec]) {
  if (is_bf16) {
    unsigned w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k)
      w[k] = (unsigned)__bfloat16_as_ushort(__float2bfloat16(v[2 * k])) |
             ((unsigned)__bfloat16_as_ushort(__float2bfloat16(v[2 * k + 1])) << 16);
    *reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(base) + i) = make_uint4(w[0], w[1], w[2], w[3]);
  } else {
    float4* f = reinterpret_cast<float4*>(static_cast<float*>(base) + i);
    f[0] = make_float4(v[0], v[1], v[2], v[3]);
    f[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
}

// Whether every 8-channel group of x [.., D] (token and row strides x_st, x_sb), y and the pool
// is 16-byte aligned, so ld8 / st8 apply (host side; y may be null).
inline bool conv_vec8_ok(const Conv1dParams& p) {
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  auto mult8 = [](int64_t s) { return s % kConvVec == 0; };
  return p.D % kConvVec == 0 && p.pool_sd == 1 && aligned(p.x) && aligned(p.pool) &&
         (p.y == nullptr || (aligned(p.y) && mult8(p.y_sb) && mult8(p.y_st))) && mult8(p.x_sb) &&
         mult8(p.x_st) && mult8(p.pool_ss) && mult8(p.pool_sr);
}

// The taps of eight channels from d0 and one token step over them. wh: the taps on the W-1
// inputs before the token; wx: the tap on the token (loaded at its runtime index, so no register
// array is indexed at run time). The taps are summed oldest first, as ConvWeights' users do.
struct ConvTaps8 {
  float wh[kConvMaxWidth - 1][kConvVec], wx[kConvVec], b[kConvVec];

  __device__ __forceinline__ ConvTaps8(const Conv1dParams& p, int d0) {
#pragma unroll
    for (int c = 0; c < kConvVec; ++c) {
      const int64_t row = (int64_t)(d0 + c) * p.W;
#pragma unroll
      for (int j = 0; j < kConvMaxWidth - 1; ++j)
        wh[j][c] = j < p.W - 1 ? ld_any(p.weight, row + j, p.weight_bf16) : 0.f;
      wx[c] = ld_any(p.weight, row + p.W - 1, p.weight_bf16);
      b[c] = p.bias ? ld_any(p.bias, d0 + c, p.weight_bf16) : 0.f;
    }
  }

  // out = act(conv) of token xt after the window win (oldest first); then xt enters the window.
  __device__ __forceinline__ void step(const Conv1dParams& p, float (&win)[kConvMaxWidth - 1][kConvVec],
                                       const float (&xt)[kConvVec], float (&out)[kConvVec]) const {
#pragma unroll
    for (int c = 0; c < kConvVec; ++c) {
      float acc = b[c];
#pragma unroll
      for (int j = 0; j < kConvMaxWidth - 1; ++j)
        if (j < p.W - 1) acc += wh[j][c] * win[j][c];
      acc += wx[c] * xt[c];
      out[c] = conv_act(acc, p.silu);
    }
#pragma unroll
    for (int j = 0; j < kConvMaxWidth - 1; ++j)
#pragma unroll
      for (int c = 0; c < kConvVec; ++c)
        win[j][c] = j < p.W - 2 ? win[(j + 1) % (kConvMaxWidth - 1)][c] : (j == p.W - 2 ? xt[c] : win[j][c]);
  }
};

// ConvTaps8::step for a width kW and activation known at compile time (the conv prefill's
// kernel): the same sum in the same order, so the same bits, without step's selects on the
// runtime width (about 70 of its instructions per token) or a branch per channel on silu.
template <int kW, bool kSilu>
__device__ __forceinline__ void conv_step8(const ConvTaps8& taps, float (&win)[kConvMaxWidth - 1][kConvVec],
                                           const float (&xt)[kConvVec], float (&out)[kConvVec]) {
  static_assert(kW >= 1 && kW <= kConvMaxWidth, "conv width 1..4");
#pragma unroll
  for (int c = 0; c < kConvVec; ++c) {
    float acc = taps.b[c];
#pragma unroll
    for (int j = 0; j < kW - 1; ++j) acc += taps.wh[j][c] * win[j][c];
    acc += taps.wx[c] * xt[c];
    out[c] = conv_act(acc, kSilu);
  }
#pragma unroll
  for (int j = 0; j + 1 < kW - 1; ++j)
#pragma unroll
    for (int c = 0; c < kConvVec; ++c) win[j][c] = win[j + 1][c];
  if constexpr (kW > 1) {
#pragma unroll
    for (int c = 0; c < kConvVec; ++c) win[kW - 2][c] = xt[c];
  }
}

// The W-1 history rows of the window starting at row off, eight channels from base
// (= slot * pool_ss + d0); rows past W-2 are zero.
__device__ __forceinline__ void load_window8(const Conv1dParams& p, int64_t base, int off,
                                             float (&win)[kConvMaxWidth - 1][kConvVec]) {
#pragma unroll
  for (int j = 0; j < kConvMaxWidth - 1; ++j) {
    if (j < p.W - 1) {
      ld8(p.pool, base + (int64_t)(off + j) * p.pool_sr, p.pool_bf16, win[j]);
    } else {
#pragma unroll
      for (int c = 0; c < kConvVec; ++c) win[j][c] = 0.f;
    }
  }
}

// conv_update_store for the eight channels from d0 (base = slot * pool_ss + d0, x at channel d0
// of token 0): hist[j] holds row j of the window as read before any write.
__device__ __forceinline__ void conv_update_store8(const Conv1dParams& p, int64_t base,
                                                   const float (&hist)[kConvMaxWidth - 1][kConvVec],
                                                   const __nv_bfloat16* x, int64_t x_st) {
  const int n = p.num_accepted ? min(p.R, p.W - 2 + p.T) : p.W - 1;
  float v[kConvVec];
  for (int i = 0; i < n; ++i) {
    const int e = p.W - 1 + p.T - n + i;  // index into window ++ x
    if (e >= p.W - 1) {
      ld8(x, (int64_t)(e - (p.W - 1)) * x_st, true, v);
    } else {
#pragma unroll
      for (int j = 0; j < kConvMaxWidth - 1; ++j)
        if (j == e) {
#pragma unroll
          for (int c = 0; c < kConvVec; ++c) v[c] = hist[j][c];
        }
    }
    st8(p.pool, base + (int64_t)i * p.pool_sr, p.pool_bf16, v);
  }
}

// The decode / verify update of eight channels from d0 of one row whose window starts at pool row
// off (base = slot * pool_ss + d0; xb, yb: the row's token 0 at channel d0 in x and y): the T
// outputs into y (bf16), then the pool rows rewritten from the window as read. Shared by the conv
// op's vector kernel and the fused decode's conv kernel, so both give the same bits.
__device__ __forceinline__ void conv_update_row8(const Conv1dParams& p, int64_t base, int off, int d0, int64_t xb,
                                                 int64_t yb) {
  const ConvTaps8 taps(p, d0);
  float hist[kConvMaxWidth - 1][kConvVec];  // the window as read, for the write-back
  load_window8(p, base, off, hist);
  float win[kConvMaxWidth - 1][kConvVec];   // history, oldest first, shifted per token
#pragma unroll
  for (int j = 0; j < kConvMaxWidth - 1; ++j)
#pragma unroll
    for (int c = 0; c < kConvVec; ++c) win[j][c] = hist[j][c];
  for (int t = 0; t < p.T; ++t) {
    float xt[kConvVec], v[kConvVec];
    ld8(p.x, xb + (int64_t)t * p.x_st, true, xt);
    taps.step(p, win, xt, v);
    st8(p.y, yb + (int64_t)t * p.y_st, true, v);
  }
  conv_update_store8(p, base, hist, static_cast<const __nv_bfloat16*>(p.x) + xb, p.x_st);
}

// One conv channel of a decode / verify row, over T <= MaxT tokens, in registers (the fused
// decode kernels). f holds the W-1 window rows right-aligned in its first kConvHist entries,
// then x of the T tokens; the taps are right-aligned the same way, so output t reads f[t + i] at
// compile-time indices whatever W is. Taps before ``lead`` are skipped, which keeps the sum in
// the conv kernels' order (bias, then taps oldest first).
constexpr int kConvHist = kConvMaxWidth - 1;

template <int MaxT>
struct ConvChannel {
  float w[kConvMaxWidth], b;
  float f[kConvHist + MaxT];

  __device__ __forceinline__ void load(const Conv1dParams& cp, const __nv_bfloat16* x, int64_t base,
                                       int off, int d, int T) {
    const int lead = kConvMaxWidth - cp.W;
#pragma unroll
    for (int i = 0; i < kConvMaxWidth; ++i)
      w[i] = i >= lead ? ld_any(cp.weight, (int64_t)d * cp.W + (i - lead), cp.weight_bf16) : 0.f;
    b = cp.bias ? ld_any(cp.bias, d, cp.weight_bf16) : 0.f;
#pragma unroll
    for (int e = 0; e < kConvHist; ++e)
      f[e] = e >= lead ? ld_any(cp.pool, base + (int64_t)(off + e - lead) * cp.pool_sr, cp.pool_bf16) : 0.f;
#pragma unroll
    for (int t = 0; t < MaxT; ++t) f[kConvHist + t] = t < T ? bf2f(x[(int64_t)t * cp.x_st + d]) : 0.f;
  }

  // Output of token t (a compile-time index in the caller's unrolled loop), rounded to bf16 as
  // the unfused conv op stores it.
  __device__ __forceinline__ float out(int t, const Conv1dParams& cp) const {
    const int lead = kConvMaxWidth - cp.W;
    float acc = b;
#pragma unroll
    for (int i = 0; i < kConvMaxWidth; ++i)
      if (i >= lead) acc += w[i] * f[t + i];
    return bf2f(__float2bfloat16(conv_act(acc, cp.silu)));
  }

  // conv_update_store from registers: rows [0, nrows) get the last nrows entries of window ++ x.
  __device__ __forceinline__ void store_pool(const Conv1dParams& cp, int64_t base, int T, int nrows) const {
    const int first = kConvHist + T - nrows;  // >= lead: only loaded entries are written
#pragma unroll
    for (int e = 0; e < kConvHist + MaxT; ++e) {
      const int row = e - first;
      if (row >= 0 && row < nrows) st_any(cp.pool, base + (int64_t)row * cp.pool_sr, f[e], cp.pool_bf16);
    }
  }
};

}  // namespace kda
