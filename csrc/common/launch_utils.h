// Host-side helpers shared by the launchers.
#pragma once

#include <cuda_runtime.h>

namespace kda {

// kernel<<<grid, block, smem, stream>>>(p), allowed to start before the previous kernel in the
// stream has finished (programmatic stream serialization; kda_common.cuh's pdl_wait orders the
// kernel's reads of that kernel's output). Captured into CUDA graphs as a programmatic edge. The
// CPU emulator (tests/emu, which defines KDA_SIMT_EMULATOR) runs kernels in order and launches
// plainly.
template <typename P>
inline cudaError_t launch_overlapping(void (*kernel)(P), dim3 grid, dim3 block, size_t smem,
                                      cudaStream_t stream, const P& p) {
#ifdef KDA_SIMT_EMULATOR
  kernel<<<grid, block, smem, stream>>>(p);
  return cudaSuccess;
#else
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, p);
#endif
}

// Largest value-row block (32, 16 or 8) that still fills the GPU; smaller blocks give more
// CTAs when few (sequence, head) pairs are in flight.
inline int pick_block_rows(long long seq_heads, int num_sms) {
  if (seq_heads * 4 >= num_sms) return 32;
  if (seq_heads * 8 >= num_sms) return 16;
  return 8;
}

}  // namespace kda
