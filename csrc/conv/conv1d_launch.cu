// Launch code for the causal conv1d kernels.
#include <cstdint>

#include "conv1d_kernel.cuh"

namespace kda {

cudaError_t conv1d_prefill_launch(const Conv1dParams& p, cudaStream_t stream) {
  if (p.D == 0) return cudaSuccess;
  const int dblocks = (p.D + kConvThreads - 1) / kConvThreads;
  if (p.total_tokens > 0) {
    const int64_t tiles = (p.total_tokens + kConvTokensPerCta - 1) / kConvTokensPerCta;
    conv1d_prefill_out_kernel<<<dim3(dblocks, (unsigned)tiles), kConvThreads, 0, stream>>>(p);
  }
  if (p.N > 0) conv1d_prefill_state_kernel<<<dim3(dblocks, p.N), kConvThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// The eight-channel update needs every 8-channel group 16-byte aligned in x, y and the pool.
static bool conv1d_update_vec_ok(const Conv1dParams& p) {
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  auto mult8 = [](int64_t s) { return s % kConvVec == 0; };
  return p.D % kConvVec == 0 && p.pool_sd == 1 && aligned(p.x) && aligned(p.y) && aligned(p.pool) &&
         mult8(p.x_sb) && mult8(p.x_st) && mult8(p.y_sb) && mult8(p.y_st) && mult8(p.pool_ss) &&
         mult8(p.pool_sr);
}

cudaError_t conv1d_update_launch(const Conv1dParams& p, cudaStream_t stream) {
  if (p.D == 0 || p.N == 0) return cudaSuccess;
  if (conv1d_update_vec_ok(p)) {
    const int groups = p.D / kConvVec;
    conv1d_update_vec_kernel<<<dim3((groups + kConvThreads - 1) / kConvThreads, p.N), kConvThreads, 0, stream>>>(p);
  } else {
    const int dblocks = (p.D + kConvThreads - 1) / kConvThreads;
    conv1d_update_kernel<<<dim3(dblocks, p.N), kConvThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace kda
