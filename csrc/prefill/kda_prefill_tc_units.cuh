// What one state-pass CTA of the tensor-core prefill works on: a whole sequence (unsplit call) or
// one unit of a split call (kda_prefill.h kTcUnitInts rows; the planner is
// kda_serving/ops/tc_split.py, the maths docs/long-context-split.md). Within a segment the state
// is affine in the state it starts from, S_end = S_start P + B, so a split sequence runs as
//   pass A: segment 0 from the real initial state (outputs, end state to entry 0), and every
//           middle segment j from zero (B_j) and from the identity with u = 0 (the transition
//           rows, P_j), both to entry j, without outputs;
//   combine: S_start(j+1) = S_start(j) P_j + B_j in fp32 (kda_prefill_tc_split.cuh), in place;
//   pass B: segments 1.. from their start states, with outputs; the last one writes the pool.
// The pool is read only in pass A and written only in pass B, so no CTA races another.
#pragma once

#include "kda_prefill_tc_common.cuh"

namespace kda {
namespace tc {

struct StateUnit {
  int n;            // sequence
  int chunk0;       // first chunk of the sequence this unit runs
  int chunks;       // at most this many chunks
  int flags;        // TcUnitFlags
  int entry_in, entry_out;
  int v0;           // first value row of this CTA (of the transition rows when `transition`)
  bool transition;  // identity start, u = 0, rows 128.. of the written entry
};

// The unit of CTA (row offset r0 = blockIdx.x * BV, z = blockIdx.z); false when the CTA has no
// work (transition rows of a unit without them). Unsplit (kSplit false), every field is a
// constant but the sequence, so the unsplit kernel compiles to what it was before splits existed.
template <bool kSplit>
__device__ __forceinline__ bool state_unit(const KdaPrefillParams& p, int r0, int z, StateUnit& u) {
  if constexpr (!kSplit) {
    u.n = z; u.chunk0 = 0; u.chunks = 1 << 30; u.flags = kUnitInitPool | kUnitOut | kUnitFinalPool;
    u.entry_in = u.entry_out = -1; u.v0 = r0; u.transition = false;
    return true;
  }
  const int32_t* row = p.tc_units + (int64_t)(p.tc_unit_first + z) * kTcUnitInts;
  u.n = row[0]; u.chunk0 = row[1]; u.chunks = row[2]; u.flags = row[3];
  u.entry_in = row[4]; u.entry_out = row[5];
  u.transition = r0 >= kHeadDim;
  u.v0 = u.transition ? r0 - kHeadDim : r0;
  return !u.transition || (u.flags & kUnitTransition);
}

// The unit's tokens of a sequence's TokenView: its v and output rows and its length (the state
// pass reads nothing else of it).
__device__ __forceinline__ void unit_tokens(TokenView& tv, const StateUnit& u) {
  const int64_t first = (int64_t)u.chunk0 * kC;
  tv.v += first * tv.sv;
  tv.o += first * tv.so;
  const int64_t rest = tv.len - first;
  tv.len = (int)(rest < 0 ? 0 : rest < (int64_t)u.chunks * kC ? rest : (int64_t)u.chunks * kC);
}

// Rows r0.. (of 2 x 128) of head h in split-state entry e.
__device__ __forceinline__ float* entry_rows(const KdaPrefillParams& p, int e, int h, int r0) {
  return p.tc_split_state + ((int64_t)(e * p.H + h) * 2 * kHeadDim + r0) * kHeadDim;
}

}  // namespace tc
}  // namespace kda
