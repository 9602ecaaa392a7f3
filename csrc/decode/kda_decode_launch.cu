// Launch code for KDA decode: picks the row block and state dtype instantiation.
#include "kda_decode_kernel.cuh"
#include "../common/launch_utils.h"

namespace kda {

template <int BV, typename StateT>
static void launch(const KdaDecodeParams& p, cudaStream_t stream) {
  const dim3 grid(kHeadDim / BV, p.H, p.B);
  kda_decode_kernel<BV, StateT><<<grid, kThreads, 0, stream>>>(p);
}

template <typename StateT>
static void launch_rows(const KdaDecodeParams& p, cudaStream_t stream) {
  switch (pick_block_rows((long long)p.B * p.H, p.num_sms)) {
    case 32: launch<32, StateT>(p, stream); break;
    case 16: launch<16, StateT>(p, stream); break;
    default: launch<8, StateT>(p, stream); break;
  }
}

cudaError_t kda_decode_launch(const KdaDecodeParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.T == 0 || p.H == 0) return cudaSuccess;
  if (p.state_bf16) launch_rows<__nv_bfloat16>(p, stream);
  else launch_rows<float>(p, stream);
  return cudaGetLastError();
}

}  // namespace kda
