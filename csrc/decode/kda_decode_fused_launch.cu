// Launch code for the fused decode (kda_decode_fused_kernel.cuh): the pair path (conv kernel,
// then kda_decode overlapping it) for T <= kPairMaxT, the opt-in single kernel, or the row-block
// main kernel followed by the conv pool write-back; then the gated RMSNorm where no kernel applied
// it, in stream order.
#include "kda_decode_fused_kernel.cuh"
#include "../common/launch_utils.h"

namespace kda {

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

static cudaError_t launch_three_kernels(const KdaDecodeFusedParams& p, cudaStream_t stream) {
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
  return cudaGetLastError();
}

// P1 and P2 of the pair path: kda_decode reads q, k, v from the column blocks of conv.y.
static cudaError_t launch_pair(const KdaDecodeFusedParams& p, cudaStream_t stream) {
  if (conv_vec8_ok(p.conv)) {
    const int groups = p.conv.D / kConvVec;
    kda_fused_conv_vec_kernel<<<dim3((groups + kThreads - 1) / kThreads, p.dec.B), kThreads, 0, stream>>>(p);
  } else {
    const dim3 grid((p.conv.D + kThreads - 1) / kThreads, p.dec.B);
    if (p.dec.T == 1) kda_fused_conv_kernel<1><<<grid, kThreads, 0, stream>>>(p);
    else kda_fused_conv_kernel<kPairMaxT><<<grid, kThreads, 0, stream>>>(p);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  KdaDecodeParams dec = p.dec;
  const auto* y = static_cast<const __nv_bfloat16*>(p.conv.y);
  const int64_t HK = (int64_t)p.dec.H * kHeadDim;
  dec.q = y; dec.k = y + HK; dec.v = y + 2 * HK;
  dec.q_sb = dec.k_sb = dec.v_sb = p.conv.y_sb;
  dec.q_st = dec.k_st = dec.v_st = p.conv.y_st;
  dec.q_sh = dec.k_sh = dec.v_sh = kHeadDim;
  dec.early_state = true;  // P1 writes no state: the state rows load while it runs
  if (!decode_uses_head_kernel(dec)) dec.norm.gate = nullptr;  // the norm kernel runs after it
  return kda_decode_launch(dec, stream);
}

static cudaError_t launch_single(const KdaDecodeFusedParams& p, cudaStream_t stream) {
  const dim3 grid(p.dec.H, p.dec.B);
  if (p.dec.state_bf16) kda_decode_fused_head_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(p);
  else kda_decode_fused_head_kernel<float><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t kda_decode_fused_launch(const KdaDecodeFusedParams& p, cudaStream_t stream) {
  if (p.dec.B == 0 || p.dec.T == 0 || p.dec.H == 0) return cudaSuccess;
  const bool pair = fused_uses_pair(p.path, p.dec.T), single = fused_uses_single(p.path, p.dec.T);
  const cudaError_t err = single ? launch_single(p, stream) : pair ? launch_pair(p, stream) : launch_three_kernels(p, stream);
  if (err != cudaSuccess) return err;
  // The head kernels normalised the output already.
  if (p.dec.norm.gate && !single && !(pair && decode_uses_head_kernel(p.dec))) {
    const long long rows = (long long)p.dec.B * p.dec.T * p.dec.H;
    kda_fused_norm_kernel<<<(unsigned)((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace kda
