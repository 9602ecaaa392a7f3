// Launch code for the causal conv1d kernels.
#include <type_traits>

#include "conv1d_kernel.cuh"

namespace kda {

cudaError_t conv1d_prefill_launch(const Conv1dParams& p, cudaStream_t stream) {
  if (p.D == 0) return cudaSuccess;
  const int dblocks = (p.D + kConvThreads - 1) / kConvThreads;
  if (p.total_tokens > 0 && conv_vec8_ok(p)) {  // 16-byte accesses
    const int groups = p.D / kConvVec;
    const int64_t tiles = (p.total_tokens + kConvVecTokensPerCta - 1) / kConvVecTokensPerCta;
    const dim3 grid((groups + kConvThreads - 1) / kConvThreads, (unsigned)tiles);
    auto launch = [&](auto w, auto silu) {
      conv1d_prefill_out_vec_kernel<decltype(w)::value, decltype(silu)::value><<<grid, kConvThreads, 0, stream>>>(p);
    };
    auto with_width = [&](auto silu) {
      switch (p.W) {  // 1..4, checked by the op
        case 1: launch(std::integral_constant<int, 1>{}, silu); break;
        case 2: launch(std::integral_constant<int, 2>{}, silu); break;
        case 3: launch(std::integral_constant<int, 3>{}, silu); break;
        default: launch(std::integral_constant<int, 4>{}, silu); break;
      }
    };
    if (p.silu) with_width(std::true_type{});
    else with_width(std::false_type{});
  } else if (p.total_tokens > 0) {
    const int64_t tiles = (p.total_tokens + kConvTokensPerCta - 1) / kConvTokensPerCta;
    conv1d_prefill_out_kernel<<<dim3(dblocks, (unsigned)tiles), kConvThreads, 0, stream>>>(p);
  }
  if (p.N > 0) conv1d_prefill_state_kernel<<<dim3(dblocks, p.N), kConvThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t conv1d_update_launch(const Conv1dParams& p, cudaStream_t stream) {
  if (p.D == 0 || p.N == 0) return cudaSuccess;
  if (conv_vec8_ok(p) && (int64_t)p.N * p.D >= p.vec8_min_elems) {  // 16-byte accesses
    const int groups = p.D / kConvVec;
    conv1d_update_vec_kernel<<<dim3((groups + kConvThreads - 1) / kConvThreads, p.N), kConvThreads, 0, stream>>>(p);
  } else {
    const int dblocks = (p.D + kConvThreads - 1) / kConvThreads;
    conv1d_update_kernel<<<dim3(dblocks, p.N), kConvThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace kda
