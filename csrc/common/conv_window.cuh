// Device helpers for the causal depthwise conv1d (width W <= 4) on a slot-indexed conv pool,
// shared by the conv kernels and the fused decode. No torch headers, no kernels here.
//
// Pool rows are oldest first. An update of T new tokens with window offset off reads the history
// rows [off, off+W-1) of pool[slot]; rows [0, n) then hold the last n of (window ++ x), with
// n = W-1 for plain updates and min(R, W-2+T) for speculative ones (see conv_update_store).
#pragma once

#include <cuda_bf16.h>
#include "../conv/conv1d.h"

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
  // x * sigmoid(x) with a non-positive exponent.
  if (!silu) return y;
  if (y >= 0.f) return y / (1.f + expf(-y));
  const float e = expf(y);
  return y * e / (1.f + e);
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

// Update output of new token t for one channel d, computed directly from its W inputs:
// base = slot * pool_ss + d * pool_sd; x points at channel d of token 0 (token stride x_st).
__device__ __forceinline__ float conv_update_tap(const Conv1dParams& p, int d, int64_t base, int off,
                                                 const __nv_bfloat16* x, int64_t x_st, int t) {
  const ConvWeights cw(p, d);
  float acc = cw.b;
#pragma unroll
  for (int j = 0; j < kConvMaxWidth; ++j) {
    if (j >= p.W) break;
    const int e = t - (p.W - 1) + j;  // < 0: history row off + (W-1) + e of the window
    const float xv = e >= 0 ? __bfloat162float(x[(int64_t)e * x_st])
                            : ld_any(p.pool, base + (int64_t)(off + p.W - 1 + e) * p.pool_sr, p.pool_bf16);
    acc += cw.w[j] * xv;
  }
  return conv_act(acc, p.silu);
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

}  // namespace kda
