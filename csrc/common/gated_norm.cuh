// Gated RMSNorm of one 128-wide bf16 row by one warp: out = RMSNorm(x)·w·sigmoid(gate), in fp32.
// Lane l owns elements 4l..4l+3 and reads them all before writing, so out may alias x.
#pragma once

#include "conv_window.cuh"
#include "kda_common.cuh"

namespace kda {

// Vec: x, gate and out are 8-byte aligned, so each lane moves its four elements in one access.
template <bool Vec>
__device__ __forceinline__ void gated_rms_norm_row(const __nv_bfloat16* x, const __nv_bfloat16* gate,
                                                   __nv_bfloat16* out, const void* weight, bool weight_bf16,
                                                   float eps, int lane) {
  const int c0 = lane * 4;
  union Quad {  // four bf16 moved as one 8-byte word
    uint2 u;
    __nv_bfloat16 b[4];
  };
  Quad xq, gq, yq;
  if constexpr (Vec) {
    xq.u = *reinterpret_cast<const uint2*>(x + c0);
    gq.u = *reinterpret_cast<const uint2*>(gate + c0);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) { xq.b[j] = x[c0 + j]; gq.b[j] = gate[c0 + j]; }
  }
  float xv[4], ss = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    xv[j] = bf2f(xq.b[j]);
    ss += xv[j] * xv[j];
  }
  const float r = rsqrtf(warp_sum(ss) / kHeadDim + eps);
#pragma unroll
  for (int j = 0; j < 4; ++j)
    yq.b[j] = __float2bfloat16(xv[j] * r * ld_any(weight, c0 + j, weight_bf16) * sigmoid_stable(bf2f(gq.b[j])));
  if constexpr (Vec) {
    *reinterpret_cast<uint2*>(out + c0) = yq.u;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) out[c0 + j] = yq.b[j];
  }
}

}  // namespace kda
