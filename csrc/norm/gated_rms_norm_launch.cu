// Launch code for the standalone gated RMSNorm: one warp per (m, h) row.
#include "../common/gated_norm.cuh"
#include "gated_rms_norm.h"

namespace kda {

template <bool Vec>
__global__ void __launch_bounds__(kThreads) gated_rms_norm_kernel(const GatedRmsNormParams p) {
  const int64_t row = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  if (row >= p.M * p.H) return;
  const int64_t m = row / p.H;
  const int h = (int)(row % p.H);
  const auto* x = static_cast<const __nv_bfloat16*>(p.x) + m * p.x_s0 + h * p.x_s1;
  const auto* g = static_cast<const __nv_bfloat16*>(p.gate) + m * p.g_s0 + h * p.g_s1;
  auto* o = static_cast<__nv_bfloat16*>(p.out) + m * p.o_s0 + h * p.o_s1;
  gated_rms_norm_row<Vec>(x, g, o, p.weight, p.weight_bf16, p.eps, threadIdx.x % 32);
}

cudaError_t gated_rms_norm_launch(const GatedRmsNormParams& p, cudaStream_t stream) {
  const int64_t rows = p.M * p.H;
  if (rows == 0) return cudaSuccess;
  const unsigned grid = (unsigned)((rows + kWarps - 1) / kWarps);
  if (p.vec)
    gated_rms_norm_kernel<true><<<grid, kThreads, 0, stream>>>(p);
  else
    gated_rms_norm_kernel<false><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace kda
