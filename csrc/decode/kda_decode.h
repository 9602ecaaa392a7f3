// Params crossing the C++ border for KDA decode / speculative verify. No torch headers.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace kda {

struct KdaDecodeParams {
  // bf16 inputs: q, k, g [B, T, H, K]; v [B, T, H, V]; beta [B, T, H]. Strides in elements,
  // last dim contiguous.
  const void *q, *k, *v, *g, *beta;
  int64_t q_sb, q_st, q_sh;
  int64_t k_sb, k_st, k_sh;
  int64_t v_sb, v_st, v_sh;
  int64_t g_sb, g_st, g_sh;
  int64_t beta_sb, beta_st, beta_sh;
  const float* A_log;    // [H]
  const float* dt_bias;  // [H*K]
  // State pool [S, H, V, K]; H, V, K contiguous, slot stride in elements.
  void* state;
  int64_t state_ss;
  bool state_bf16;
  // slots [B] (plain decode) or [B, slot_cols] (verify, slot_cols >= T).
  const int32_t* slots;
  int64_t slots_sb;
  int slot_cols;
  bool verify;
  const int32_t* num_accepted;  // [B] or nullptr (verify starts from column 0)
  // Output o [B, T, H, V] bf16.
  void* o;
  int64_t o_sb, o_st, o_sh;
  int B, T, H;
  float scale;
  bool has_lower_bound;
  float lower_bound;
  int num_sms;
  // Fused decode only (0 otherwise): conv width and pool rows. A row is then also null when its
  // conv slot slots[n, 0] is <= 0 or its conv window [off, off+W-1) leaves the R rows
  // (decode_start_slot; the fused op's rule for both pools).
  int conv_W, conv_R;
  // Whether the kernel may read slots and state rows before the kernel ahead of it in the stream
  // has finished (programmatic launch): only when that kernel is known to write neither, as the
  // fused decode's conv kernel. Otherwise every global read waits for it.
  bool early_state;
};

cudaError_t kda_decode_launch(const KdaDecodeParams& p, cudaStream_t stream);

}  // namespace kda
