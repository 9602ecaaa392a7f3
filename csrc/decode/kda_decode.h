// Params crossing the C++ border for KDA decode / speculative verify. No torch headers.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace kda {

// Gated RMSNorm of a decode output over V: out = RMSNorm(o)·weight·sigmoid(gate), gate
// [B, T, H, V] bf16 (last dim contiguous), weight [V] fp32 or bf16. gate == nullptr: none.
struct DecodeNormArgs {
  const void* gate;
  int64_t gate_sb, gate_st, gate_sh;
  const void* weight;
  bool weight_bf16;
  float eps;
};

// Which decode kernel runs (KDA_SERVING_DECODE_GRID): auto, the row-block kernel (one CTA per
// (row, head, 8/16/32 value rows)) or the head kernel (one CTA per (row, head), T <= kHeadMaxT).
constexpr int kDecodeKernelAuto = 0, kDecodeKernelRows = 1, kDecodeKernelHeads = 2;
constexpr int kHeadMaxT = 8;
// auto takes the head kernel from this many (row, head) pairs per SM, for a bf16 pool or with the
// norm fused: below, its CTAs (four 32-row blocks in sequence) leave SMs idle that the row-block
// kernel's 4x more CTAs fill (B16 H8: 1.09-1.35x slower on an H100). From B x H = 512 up, with
// the norm it was 1.00-1.05x faster on fp32 pools and 1.12-1.25x on bf16 ones; without it
// 1.10-1.20x faster on bf16 pools and 1.01-1.03x slower on fp32 ones
// (benchmarks/results/bench_decode-nvidia-h100-80gb-hbm3-c3ff5f8.json).
constexpr int kHeadMinSeqHeadsPerSm = 2;

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
  int kernel;  // kDecodeKernel*
  // Only the head kernel normalises the output (the fused decode sets norm only when
  // decode_uses_head_kernel; kda_decode_launch refuses it otherwise).
  DecodeNormArgs norm;
};

// Whether kda_decode_launch runs the head kernel for p.
inline bool decode_uses_head_kernel(const KdaDecodeParams& p) {
  if (p.T > kHeadMaxT || p.kernel == kDecodeKernelRows) return false;
  if (p.kernel == kDecodeKernelHeads) return true;
  return (p.state_bf16 || p.norm.gate) && (long long)p.B * p.H >= (long long)kHeadMinSeqHeadsPerSm * p.num_sms;
}

cudaError_t kda_decode_launch(const KdaDecodeParams& p, cudaStream_t stream);

}  // namespace kda
