// Gated RMSNorm over the 128-wide rows of [M, H, 128] bf16 tensors: the prefill output's
// RMSNorm(o)·w·sigmoid(out_gate) per head (the fused decode runs the same row code).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace kda {

struct GatedRmsNormParams {
  const void* x;     // [M, H, 128] bf16, strides (x_s0, x_s1, 1) in elements
  const void* gate;  // same shape, its own strides
  void* out;         // same shape, its own strides; may be x
  int64_t x_s0, x_s1, g_s0, g_s1, o_s0, o_s1;
  int64_t M;
  int H;
  const void* weight;  // [128] fp32 or bf16
  bool weight_bf16;
  bool vec;  // every row of x, gate and out starts 8-byte aligned (set by the caller)
  float eps;
};

cudaError_t gated_rms_norm_launch(const GatedRmsNormParams& p, cudaStream_t stream);

}  // namespace kda
