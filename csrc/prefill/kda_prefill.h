// Params crossing the C++ border for varlen KDA prefill. No torch headers.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace kda {

struct KdaPrefillParams {
  // bf16 inputs: q, k, g [Ttot, H, K]; v [Ttot, H, V]; beta [Ttot, H]. Strides in elements,
  // last dim contiguous.
  const void *q, *k, *v, *g, *beta;
  int64_t q_st, q_sh, k_st, k_sh, v_st, v_sh, g_st, g_sh, beta_st, beta_sh;
  const float* A_log;    // [H]
  const float* dt_bias;  // [H*K]
  const void* cu_seqlens;  // [N+1], int32 or int64
  bool cu_seqlens_64;
  // State pool [S, H, V, K]; H, V, K contiguous, slot stride in elements.
  void* state;
  int64_t state_ss;
  bool state_bf16;
  const int32_t* slots;            // [N]
  const bool* has_initial_state;   // [N]
  // Optional checkpoints [M, H, V, K] (pool dtype): state after token 64(i+1)-1 of sequence n
  // goes to row inter_offsets[n] + i.
  void* inter;
  int64_t inter_ss;
  const void* inter_offsets;  // [N], int32 or int64
  bool inter_offsets_64;
  // Output o [Ttot, H, V] bf16.
  void* o;
  int64_t o_st, o_sh;
  int N, H;
  float scale;
  bool has_lower_bound;
  float lower_bound;
  int num_sms;
  // Tensor-core kernel only: fp32 workspace of tc_chunk_slots * H records (at least
  // tc_workspace_floats(Ttot, N, H) floats), reused across calls: the prepare pass writes each
  // chunk's operands, the state pass reads them.
  float* tc_workspace;
  int64_t tc_chunk_slots;
  // Tensor-core kernel, long sequences split into segments (kda_prefill_tc_split.cuh); tc_units
  // nullptr: unsplit. tc_units: [tc_units_a + tc_units_b + tc_units_c][kTcUnitInts] int32, the
  // first state pass's units, then the second's, then one combine entry per split sequence;
  // tc_split_state: fp32 [entries, H, 2 * 128, 128] (tc_split_state_floats).
  const int32_t* tc_units;
  int tc_units_a, tc_units_b, tc_units_c;
  int tc_unit_first;  // set by the launcher: the unit row of blockIdx.z = 0
  float* tc_split_state;
  // Tensor-core kernel: every diagonal block on the exact CUDA-core path instead of tensor cores
  // where its decay allows (KDA_SERVING_TC_DIAG=exact; for comparisons).
  bool tc_diag_exact;
};

constexpr int kCheckpointEvery = 64;

// The tensor-core kernel's workspace: one record of kTcRecordFloats (4-byte units; three fp16
// [64 x 128] fields, an fp32 [64 x 64] one, an fp16 [64 x 64] one and 128 floats,
// kda_prefill_tc_common.cuh)
// per (chunk slot, head); floor(Ttot / 64) + N chunk slots cover any split of Ttot tokens into N
// sequences (kda_prefill_tc_common.cuh chunk_base).
constexpr int64_t kTcRecordFloats = 3 * 64 * 128 / 2 + 64 * 64 + 64 * 64 / 2 + 128;
inline int64_t tc_chunk_slots(int64_t total_tokens, int64_t N) { return total_tokens / 64 + N; }
inline int64_t tc_workspace_floats(int64_t total_tokens, int64_t N, int64_t H) {
  return tc_chunk_slots(total_tokens, N) * H * kTcRecordFloats;
}

// A split call's unit table rows (kda_prefill_tc_split.cuh): {sequence, first chunk, chunks, flags,
// split-state entry read, split-state entry written, 0, 0}; combine rows: {sequence, first entry,
// entries, 0, ...}. Flags say where a unit's state starts and ends and whether it writes outputs.
constexpr int kTcUnitInts = 8;
enum TcUnitFlags : int32_t {
  kUnitInitPool = 1,       // starts from the pool (has_initial_state), else from zeros
  kUnitInitEntry = 2,      // starts from rows 0..127 of its read entry
  kUnitOut = 4,            // writes its tokens' outputs
  kUnitFinalPool = 8,      // writes its final state to the pool
  kUnitFinalEntry = 16,    // writes its final state to rows 0..127 of its written entry
  kUnitTransition = 32,    // also the transition rows 128..255 (identity start, u = 0) to that entry
};
inline int64_t tc_split_state_floats(int64_t entries, int64_t H) { return entries * H * 2 * 128 * 128; }

cudaError_t kda_prefill_launch(const KdaPrefillParams& p, cudaStream_t stream);

}  // namespace kda
