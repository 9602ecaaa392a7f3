// Params crossing the C++ border for the causal depthwise conv1d (prefill and decode update).
// No torch headers.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace kda {

struct Conv1dParams {
  // x, y bf16: prefill [Ttot, D] (token stride x_st / y_st); update [B, T, D] (x_sb, x_st, ...).
  // Channels contiguous.
  const void* x;
  int64_t x_sb, x_st;
  void* y;
  int64_t y_sb, y_st;
  const void* weight;  // [D, W] contiguous, fp32 or bf16
  const void* bias;    // [D] or nullptr, same dtype as weight
  bool weight_bf16;
  // Conv pool [S, R, D], fp32 or bf16, strides in elements.
  void* pool;
  int64_t pool_ss, pool_sr, pool_sd;
  bool pool_bf16;
  const int32_t* slots;  // [N] / [B]
  // Prefill only.
  const void* cu_seqlens;  // [N+1], int32 or int64
  bool cu_seqlens_64;
  const bool* has_initial_state;  // [N]
  int64_t total_tokens;           // rows of x
  // Update only.
  const int32_t* num_accepted;  // [B] or nullptr
  int N;  // sequences (prefill) or batch rows (update)
  int T;  // tokens per row (update)
  int D, W, R;
  bool silu;
  // Decode update: the eight-channel kernel runs only when N * D reaches this (where the rows are
  // aligned). 0: whenever aligned. The extension sets kConvVec8MinElems.
  int64_t vec8_min_elems;
};

// On an H100 (bench_decode, CUDA-graph replay) the eight-channel update was 20% faster than the
// one-channel kernel at B = 256 with 3 x 32 x 128 channels (N * D = 3.1M), equal at N * D = 786K
// and 2 us slower at B <= 16, where it leaves most SMs without a CTA.
constexpr int64_t kConvVec8MinElems = int64_t(1) << 20;

cudaError_t conv1d_prefill_launch(const Conv1dParams& p, cudaStream_t stream);
cudaError_t conv1d_update_launch(const Conv1dParams& p, cudaStream_t stream);

}  // namespace kda
