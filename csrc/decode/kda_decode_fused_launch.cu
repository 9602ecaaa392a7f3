// Launch code for the fused decode: the one-CTA-per-head kernel, or the row-block main kernel
// (row block and state dtype instantiations) followed by the conv pool write-back and the
// optional gated RMSNorm, in stream order.
#include "kda_decode_head_kernel.cuh"
#include "../common/launch_utils.h"

namespace kda {

template <typename StateT>
static void launch_head(const KdaDecodeFusedParams& p, cudaStream_t stream) {
  const unsigned grid = (unsigned)((int64_t)p.dec.B * p.dec.H);
  if (p.dec.T == 1) kda_decode_head_kernel<StateT, 1><<<grid, kHeadThreads, 0, stream>>>(p);
  else kda_decode_head_kernel<StateT, kHeadMaxT><<<grid, kHeadThreads, 0, stream>>>(p);
}

template <int BV, typename StateT>
static void launch_main(const KdaDecodeFusedParams& p, cudaStream_t stream) {
  const dim3 grid(kHeadDim / BV, p.dec.H, p.dec.B);
  kda_decode_fused_kernel<BV, StateT><<<grid, kThreads, 0, stream>>>(p);
}

template <typename StateT>
static void launch_rows(const KdaDecodeFusedParams& p, cudaStream_t stream) {
  switch (pick_block_rows((long long)p.dec.B * p.dec.H, p.dec.num_sms)) {
    case 32: launch_main<32, StateT>(p, stream); break;
    case 16: launch_main<16, StateT>(p, stream); break;
    default: launch_main<8, StateT>(p, stream); break;
  }
}

cudaError_t kda_decode_fused_launch(const KdaDecodeFusedParams& p, cudaStream_t stream) {
  if (p.dec.B == 0 || p.dec.T == 0 || p.dec.H == 0) return cudaSuccess;
  if (p.dec.T <= kHeadMaxT && (int64_t)p.dec.B * p.dec.H >= p.head_min_seq_heads) {
    if (p.dec.state_bf16) launch_head<__nv_bfloat16>(p, stream);
    else launch_head<float>(p, stream);
    return cudaGetLastError();
  }
  if (p.dec.state_bf16) launch_rows<__nv_bfloat16>(p, stream);
  else launch_rows<float>(p, stream);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  // Only after every CTA of the main kernel has read its conv windows (see the kernel header).
  if (conv_vec8_ok(p.conv)) {  // 16-byte accesses
    const int groups = p.conv.D / kConvVec;
    kda_fused_conv_state_kernel<true><<<dim3((groups + kThreads - 1) / kThreads, p.dec.B), kThreads, 0, stream>>>(p);
  } else {
    kda_fused_conv_state_kernel<false><<<dim3((p.conv.D + kThreads - 1) / kThreads, p.dec.B), kThreads, 0, stream>>>(p);
  }
  if (p.out_gate) {
    const long long rows = (long long)p.dec.B * p.dec.T * p.dec.H;
    kda_fused_norm_kernel<<<(unsigned)((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace kda
