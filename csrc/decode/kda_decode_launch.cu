// Launch code for KDA decode: picks the kernel (head or row-block), the row block and the state
// dtype instantiation.
#include "kda_decode_head_kernel.cuh"
#include "../common/launch_utils.h"

namespace kda {

// Overlapping launch: the CTAs start while the kernel before them finishes. They wait for it before
// any global read, or (early_state: the fused decode's conv kernel, which releases its dependents
// at its start and writes no state) only before reading q, k, v.
template <int BV, typename StateT>
static cudaError_t launch(const KdaDecodeParams& p, cudaStream_t stream) {
  const dim3 grid(kHeadDim / BV, p.H, p.B);
  return launch_overlapping(kda_decode_kernel<BV, StateT>, grid, dim3(kThreads), 0, stream, p);
}

template <typename StateT>
static cudaError_t launch_rows(const KdaDecodeParams& p, cudaStream_t stream) {
  if (decode_uses_head_kernel(p))
    return launch_overlapping(kda_decode_head_kernel<StateT>, dim3(p.H, p.B), dim3(kThreads), 0, stream, p);
  if (p.norm.gate) return cudaErrorInvalidValue;  // only the head kernel normalises
  switch (pick_block_rows((long long)p.B * p.H, p.num_sms)) {
    case 32: return launch<32, StateT>(p, stream);
    case 16: return launch<16, StateT>(p, stream);
    default: return launch<8, StateT>(p, stream);
  }
}

cudaError_t kda_decode_launch(const KdaDecodeParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.T == 0 || p.H == 0) return cudaSuccess;
  const cudaError_t err = p.state_bf16 ? launch_rows<__nv_bfloat16>(p, stream) : launch_rows<float>(p, stream);
  return err != cudaSuccess ? err : cudaGetLastError();
}

}  // namespace kda
