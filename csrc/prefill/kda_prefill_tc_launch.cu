// Launch code for the tensor-core chunked KDA prefill (kda_prefill_tc_kernel.cuh).
#include "kda_prefill_tc_kernel.cuh"

namespace kda {

template <typename StateT>
static cudaError_t launch_tc(const KdaPrefillParams& p, cudaStream_t stream) {
  constexpr int smem = (int)sizeof(tc::Smem);
  static_assert(smem <= 227 * 1024, "shared memory of one CTA exceeds what Hopper grants");
  // Over 48 KiB of shared memory: opt in (cheap; set on every launch so any device gets it).
  const cudaError_t attr = cudaFuncSetAttribute(kda_prefill_tc_kernel<StateT>,
                                                cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (attr != cudaSuccess) return attr;
  const dim3 grid(kHeadDim / tc::kBV, p.H, p.N);
  kda_prefill_tc_kernel<StateT><<<grid, tc::kThr, smem, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_kda_prefill_tc(const KdaPrefillParams& p, cudaStream_t stream) {
  if (p.N == 0 || p.H == 0) return cudaSuccess;
  return p.state_bf16 ? launch_tc<__nv_bfloat16>(p, stream) : launch_tc<float>(p, stream);
}

}  // namespace kda
