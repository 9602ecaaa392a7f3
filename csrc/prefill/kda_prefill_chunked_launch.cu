// Launch code for the chunked varlen KDA prefill (kda_prefill_chunked_kernel.cuh).
#include "kda_prefill_chunked_kernel.cuh"

namespace kda {

template <int BV, typename StateT>
static cudaError_t launch_chunked(const KdaPrefillParams& p, cudaStream_t stream) {
  constexpr int smem = (int)sizeof(ChunkSmem<BV>);
  // Over 48 KiB of shared memory: opt in (cheap; set on every launch so any device gets it).
  const cudaError_t attr = cudaFuncSetAttribute(
      kda_prefill_chunked_kernel<BV, StateT>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (attr != cudaSuccess) return attr;
  const dim3 grid(kHeadDim / BV, p.H, p.N);
  kda_prefill_chunked_kernel<BV, StateT><<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// 64 value rows per CTA (two CTAs per head) when that fills the GPU, else 32.
template <typename StateT>
static cudaError_t launch_chunked_rows(const KdaPrefillParams& p, cudaStream_t stream) {
  if ((long long)p.N * p.H * 2 >= p.num_sms) return launch_chunked<64, StateT>(p, stream);
  return launch_chunked<32, StateT>(p, stream);
}

cudaError_t launch_kda_prefill_chunked(const KdaPrefillParams& p, cudaStream_t stream) {
  if (p.N == 0 || p.H == 0) return cudaSuccess;
  return p.state_bf16 ? launch_chunked_rows<__nv_bfloat16>(p, stream)
                      : launch_chunked_rows<float>(p, stream);
}

}  // namespace kda
