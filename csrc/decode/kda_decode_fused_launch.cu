// Launch code for the fused decode: a cluster kernel, the one-CTA-per-head kernel, or the
// row-block main kernel (row block and state dtype instantiations) followed by the conv pool
// write-back and the optional gated RMSNorm, in stream order (kda_decode_fused.h kFused*).
#include "kda_decode_cluster_kernel.cuh"
#include "kda_decode_head_kernel.cuh"
#include "../common/launch_utils.h"

namespace kda {

template <typename StateT>
static void launch_head(const KdaDecodeFusedParams& p, cudaStream_t stream) {
  const unsigned grid = (unsigned)((int64_t)p.dec.B * p.dec.H);
  if (p.dec.T == 1) kda_decode_head_kernel<StateT, 1><<<grid, kHeadThreads, 0, stream>>>(p);
  else kda_decode_head_kernel<StateT, kHeadMaxT><<<grid, kHeadThreads, 0, stream>>>(p);
}

// Cluster dims (V / BV, 1, 1) and programmatic stream serialization (see the kernel header).
template <int BV, typename StateT, int MaxT>
static cudaError_t launch_cluster_t(const KdaDecodeFusedParams& p, cudaStream_t stream) {
#ifdef KDA_SIMT_EMULATOR
  (void)p; (void)stream;
  return cudaErrorNotSupported;  // the CPU emulator runs one CTA at a time: no clusters
#else
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = kHeadDim / BV;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[1].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(kHeadDim / BV, p.dec.H, p.dec.B);
  cfg.blockDim = dim3(kThreads);
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 2;
  return cudaLaunchKernelEx(&cfg, kda_decode_cluster_kernel<BV, StateT, MaxT>, p);
#endif
}

template <int BV, typename StateT>
static cudaError_t launch_cluster(const KdaDecodeFusedParams& p, cudaStream_t stream) {
  return p.dec.T == 1 ? launch_cluster_t<BV, StateT, 1>(p, stream) : launch_cluster_t<BV, StateT, kClusterMaxT>(p, stream);
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

// The kernel p.kernel asks for, kFusedRows where it does not apply to T (kda_decode_fused.h).
static int pick_fused_kernel(const KdaDecodeFusedParams& p) {
  const bool short_rows = p.dec.T <= kHeadMaxT && p.dec.T <= kClusterMaxT;
  if (p.kernel == kFusedRows || !short_rows) return kFusedRows;
  if (p.kernel != kFusedAuto) return p.kernel;
#ifdef KDA_SIMT_EMULATOR
  return kFusedHead;  // no clusters in the CPU emulator
#else
  return pick_block_rows((long long)p.dec.B * p.dec.H, p.dec.num_sms) == 32 ? kFusedCluster32 : kFusedCluster16;
#endif
}

cudaError_t kda_decode_fused_launch(const KdaDecodeFusedParams& p, cudaStream_t stream) {
  if (p.dec.B == 0 || p.dec.T == 0 || p.dec.H == 0) return cudaSuccess;
  const bool bf16 = p.dec.state_bf16;
  switch (pick_fused_kernel(p)) {
    case kFusedHead:
      if (bf16) launch_head<__nv_bfloat16>(p, stream);
      else launch_head<float>(p, stream);
      return cudaGetLastError();
    case kFusedCluster16:
      return bf16 ? launch_cluster<16, __nv_bfloat16>(p, stream) : launch_cluster<16, float>(p, stream);
    case kFusedCluster32:
      return bf16 ? launch_cluster<32, __nv_bfloat16>(p, stream) : launch_cluster<32, float>(p, stream);
    default:
      break;
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
