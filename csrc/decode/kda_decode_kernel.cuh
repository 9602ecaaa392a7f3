// KDA decode and speculative verify on a slot-indexed state pool, updated in place.
#pragma once

#include "../common/kda_recurrent.cuh"
#include "kda_decode.h"

namespace kda {

// Slot the start state of row n is read from; <= 0 means null (zero output, no state access).
// Verify: slots[n, num_accepted[n]-1] (column 0 without num_accepted); an out-of-range count is null.
// With conv_W > 0 (fused decode) a row without a valid conv slot and window is null too.
__device__ __forceinline__ int decode_start_slot(const KdaDecodeParams& p, int n) {
  const int32_t* srow = p.slots + n * p.slots_sb;
  const int a = p.num_accepted ? p.num_accepted[n] : 1;
  int s = !p.verify ? srow[0] : (a >= 1 && a <= p.slot_cols) ? srow[a - 1] : 0;
  if (p.conv_W > 0 && (srow[0] <= 0 || a < 1 || a - 1 + p.conv_W - 1 > p.conv_R)) s = 0;
  return s;
}

// The recurrence of one CTA = (V block blockIdx.x, head blockIdx.y, row blockIdx.z) from the
// state in slot ``start`` (> 0): plain decode writes the final state back to ``start``, verify
// writes the state after token t to slots[n, t] when > 0. q, k, v come from ``src`` (see
// TokenView in kda_recurrent.cuh); g, beta and the output from tv.
template <int BV, typename StateT, class Src>
__device__ __forceinline__ void decode_rows(const KdaDecodeParams& p, const TokenView& tv,
                                            const Src& src, int start, RecurrentSmem<BV>& sm) {
  const int v0 = blockIdx.x * BV, h = blockIdx.y, n = blockIdx.z;
  const int32_t* srow = p.slots + n * p.slots_sb;
  StateT* pool = static_cast<StateT*>(p.state);
  const int64_t row_off = ((int64_t)h * kHeadDim + v0) * kHeadDim;
  auto slot_rows = [&](int s) { return pool + (int64_t)s * p.state_ss + row_off; };

  GateArgs ga{expf(p.A_log[h]), p.has_lower_bound, p.lower_bound, p.scale, p.dt_bias + h * kHeadDim};
  RowBlock<BV, StateT> rb;
  // With early_state the kernel this one overlaps writes no state (kda_decode.h), so the rows load
  // before pdl_wait; q, k, v may be that kernel's output.
  rb.load(slot_rows(start));
  pdl_wait();
  if (p.verify) {
    rb.run(tv, src, ga, sm, [&](int t, const RowBlock<BV, StateT>& b) {
      const int s = srow[t];
      if (s > 0) b.store(slot_rows(s));
    });
  } else {
    const int last = p.T - 1;
    rb.run(tv, src, ga, sm, [&](int t, const RowBlock<BV, StateT>& b) {
      if (t == last) b.store(slot_rows(start));
    });
  }
}

// g, beta and output of row n, head h, from the CTA's first value row v0. q, k, v are left null.
__device__ __forceinline__ TokenView decode_token_view(const KdaDecodeParams& p, int n, int h, int v0) {
  auto bf = [](const void* x) { return static_cast<const __nv_bfloat16*>(x); };
  TokenView tv{};
  tv.g = bf(p.g) + n * p.g_sb + h * p.g_sh;
  tv.beta = bf(p.beta) + n * p.beta_sb + h * p.beta_sh;
  tv.sg = p.g_st; tv.sb = p.beta_st;
  tv.o = static_cast<__nv_bfloat16*>(p.o) + n * p.o_sb + h * p.o_sh + v0;
  tv.so = p.o_st;
  tv.len = p.T;
  return tv;
}

// grid = (V / BV, H, B)
template <int BV, typename StateT>
__global__ void __launch_bounds__(kThreads) kda_decode_kernel(const KdaDecodeParams p) {
  __shared__ RecurrentSmem<BV> sm;
  const int v0 = blockIdx.x * BV, h = blockIdx.y, n = blockIdx.z;
  auto bf = [](const void* x) { return static_cast<const __nv_bfloat16*>(x); };

  TokenView tv = decode_token_view(p, n, h, v0);
  tv.q = bf(p.q) + n * p.q_sb + h * p.q_sh;
  tv.k = bf(p.k) + n * p.k_sb + h * p.k_sh;
  tv.v = bf(p.v) + n * p.v_sb + h * p.v_sh + v0;
  tv.sq = p.q_st; tv.sk = p.k_st; tv.sv = p.v_st;

  if (!p.early_state) pdl_wait();
  const int start = decode_start_slot(p, n);
  if (start <= 0) {
    zero_output<BV>(tv);
    return;
  }
  decode_rows<BV, StateT>(p, tv, tv, start, sm);
}

}  // namespace kda
