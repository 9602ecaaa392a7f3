// Params crossing the C++ border for the fused decode / verify: conv1d update + SiLU on
// mixed_qkv, KDA decode on the state pool, optional gated RMSNorm. No torch headers.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

#include "../conv/conv1d.h"
#include "kda_decode.h"

namespace kda {

struct KdaDecodeFusedParams {
  // g, beta, A_log, dt_bias, state pool, slots, num_accepted, output, B, T, H, scale and gate
  // bound exactly as for kda_decode, and dec.conv_W / conv_R = conv.W / R (rows without a valid
  // conv slot and window are null); q, k, v are unused (they come from the conv).
  KdaDecodeParams dec;
  // conv.x = mixed_qkv [B, T, 3*H*128] bf16 (x_sb, x_st; channels contiguous; q | k | v
  // column blocks of H*128 each); conv.weight [D, W], conv.bias, conv.pool [S, R, D] with
  // D = 3*H*128; conv.T = T; conv.num_accepted = dec.num_accepted; conv.silu = true.
  // conv.y [B, T, D] bf16 (y_sb, y_st): the pair path's conv outputs (any contents before).
  // conv.slots and the prefill fields are unused: the conv slot is slots[n, 0].
  Conv1dParams conv;
  // The optional gated RMSNorm of the output is dec.norm: the pair path's decode kernel applies it
  // when it is the head kernel, else the norm kernel runs after it.
  // Which path runs (KDA_SERVING_FUSED_DECODE_PATH): kFusedPathAuto (the pair path of
  // kda_decode_fused_kernel.cuh for T <= 8, else the three-kernel path), kFusedPathRows (the
  // three-kernel path) or kFusedPathSingle (for T <= kHeadMaxT one kernel, the head kernel with the
  // conv of its head's channels inside; opt-in: slower than the pair path on every shape of
  // bench_decode on an H100, f47f051).
  int path;
};

constexpr int kFusedPathAuto = 0, kFusedPathRows = 1, kFusedPathSingle = 2;
constexpr int kPairMaxT = 8;

// Whether a call takes the pair path (and needs conv.y).
inline bool fused_uses_pair(int path, int T) { return path == kFusedPathAuto && T <= kPairMaxT; }
// Whether a call takes the single-kernel path.
inline bool fused_uses_single(int path, int T) { return path == kFusedPathSingle && T <= kHeadMaxT; }

cudaError_t kda_decode_fused_launch(const KdaDecodeFusedParams& p, cudaStream_t stream);

}  // namespace kda
