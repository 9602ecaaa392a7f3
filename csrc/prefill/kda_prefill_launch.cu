// Launch code for varlen KDA prefill: picks the row block and state dtype instantiation.
#include "kda_prefill_kernel.cuh"
#include "../common/launch_utils.h"

namespace kda {

template <int BV, typename StateT>
static void launch(const KdaPrefillParams& p, cudaStream_t stream) {
  const dim3 grid(kHeadDim / BV, p.H, p.N);
  kda_prefill_kernel<BV, StateT><<<grid, kThreads, 0, stream>>>(p);
}

template <typename StateT>
static void launch_rows(const KdaPrefillParams& p, cudaStream_t stream) {
  switch (pick_block_rows((long long)p.N * p.H, p.num_sms)) {
    case 32: launch<32, StateT>(p, stream); break;
    case 16: launch<16, StateT>(p, stream); break;
    default: launch<8, StateT>(p, stream); break;
  }
}

cudaError_t kda_prefill_launch(const KdaPrefillParams& p, cudaStream_t stream) {
  if (p.N == 0 || p.H == 0) return cudaSuccess;
  if (p.state_bf16) launch_rows<__nv_bfloat16>(p, stream);
  else launch_rows<float>(p, stream);
  return cudaGetLastError();
}

}  // namespace kda
