// Gated RMSNorm of one 128-wide bf16 row by one warp: out = RMSNorm(x)·w·sigmoid(gate), in fp32.
// Lane l owns elements 4l..4l+3 and reads them all before writing, so out may alias x.
#pragma once

#include "conv_window.cuh"
#include "kda_common.cuh"

namespace kda {

union BfQuad {  // four bf16 moved as one 8-byte word
  uint2 u;
  __nv_bfloat16 b[4];
};

// The normalised, gated values y of one lane's four elements xv (bf16 values as floats) of a
// row whose lane 4l..4l+3 elements the warp holds; gate (8-byte aligned when Vec) at the same
// elements.
template <bool Vec>
__device__ __forceinline__ void gated_rms_norm_quad(const float (&xv)[4], const __nv_bfloat16* gate,
                                                    const void* weight, bool weight_bf16, float eps, int lane,
                                                    BfQuad& y) {
  const int c0 = lane * 4;
  BfQuad gq;
  if constexpr (Vec) {
    gq.u = *reinterpret_cast<const uint2*>(gate + c0);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) gq.b[j] = gate[c0 + j];
  }
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) ss += xv[j] * xv[j];
  const float r = rsqrtf(warp_sum(ss) / kHeadDim + eps);
#pragma unroll
  for (int j = 0; j < 4; ++j)
    y.b[j] = __float2bfloat16(xv[j] * r * ld_any(weight, c0 + j, weight_bf16) * sigmoid_stable(bf2f(gq.b[j])));
}

// Four bf16 values to out + 4 lane (one 8-byte store when Vec).
template <bool Vec>
__device__ __forceinline__ void store_quad(__nv_bfloat16* out, const BfQuad& y, int lane) {
  if constexpr (Vec) {
    *reinterpret_cast<uint2*>(out + lane * 4) = y.u;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) out[lane * 4 + j] = y.b[j];
  }
}

// Vec: x, gate and out are 8-byte aligned, so each lane moves its four elements in one access.
template <bool Vec>
__device__ __forceinline__ void gated_rms_norm_row(const __nv_bfloat16* x, const __nv_bfloat16* gate,
                                                   __nv_bfloat16* out, const void* weight, bool weight_bf16,
                                                   float eps, int lane) {
  const int c0 = lane * 4;
  BfQuad xq, yq;
  if constexpr (Vec) {
    xq.u = *reinterpret_cast<const uint2*>(x + c0);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) xq.b[j] = x[c0 + j];
  }
  float xv[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) xv[j] = bf2f(xq.b[j]);
  gated_rms_norm_quad<Vec>(xv, gate, weight, weight_bf16, eps, lane, yq);
  store_quad<Vec>(out, yq, lane);
}

}  // namespace kda
