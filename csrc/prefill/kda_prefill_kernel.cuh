// Varlen KDA prefill on a slot-indexed state pool: token-serial recurrence per
// (sequence, head, value-row block), optional checkpoints every 64 tokens.
#pragma once

#include "../common/kda_recurrent.cuh"
#include "kda_prefill.h"

namespace kda {

// grid = (V / BV, H, N)
template <int BV, typename StateT>
__global__ void __launch_bounds__(kThreads) kda_prefill_kernel(const KdaPrefillParams p) {
  __shared__ RecurrentSmem<BV> sm;
  const int v0 = blockIdx.x * BV, h = blockIdx.y, n = blockIdx.z;
  auto bf = [](const void* x) { return static_cast<const __nv_bfloat16*>(x); };

  // Rows of q/k/v/... are counted from cu_seqlens[0].
  const int64_t base = load_index(p.cu_seqlens, p.cu_seqlens_64, 0);
  const int64_t bos = load_index(p.cu_seqlens, p.cu_seqlens_64, n) - base;
  const int64_t eos = load_index(p.cu_seqlens, p.cu_seqlens_64, n + 1) - base;

  TokenView tv;
  tv.q = bf(p.q) + bos * p.q_st + h * p.q_sh;
  tv.k = bf(p.k) + bos * p.k_st + h * p.k_sh;
  tv.g = bf(p.g) + bos * p.g_st + h * p.g_sh;
  tv.v = bf(p.v) + bos * p.v_st + h * p.v_sh + v0;
  tv.beta = bf(p.beta) + bos * p.beta_st + h * p.beta_sh;
  tv.sq = p.q_st; tv.sk = p.k_st; tv.sg = p.g_st; tv.sv = p.v_st; tv.sb = p.beta_st;
  tv.o = static_cast<__nv_bfloat16*>(p.o) + bos * p.o_st + h * p.o_sh + v0;
  tv.so = p.o_st;
  tv.len = (int)(eos - bos);

  const int slot = p.slots[n];
  if (slot <= 0) {
    zero_output<BV>(tv);
    return;
  }

  const int64_t row_off = ((int64_t)h * kHeadDim + v0) * kHeadDim;
  StateT* dst = static_cast<StateT*>(p.state) + (int64_t)slot * p.state_ss + row_off;
  StateT* ckpt = nullptr;
  if (p.inter) {
    ckpt = static_cast<StateT*>(p.inter) +
           load_index(p.inter_offsets, p.inter_offsets_64, n) * p.inter_ss + row_off;
  }

  GateArgs ga{expf(p.A_log[h]), p.has_lower_bound, p.lower_bound, p.scale, p.dt_bias + h * kHeadDim};
  RowBlock<BV, StateT> rb;
  rb.load(p.has_initial_state[n] ? dst : nullptr);
  const int last = tv.len - 1;
  const int64_t ckpt_ss = p.inter_ss;
  rb.run(tv, ga, sm, [&](int t, const RowBlock<BV, StateT>& b) {
    if (ckpt && (t + 1) % kCheckpointEvery == 0)
      b.store(ckpt + (int64_t)((t + 1) / kCheckpointEvery - 1) * ckpt_ss);
    if (t == last) b.store(dst);
  });
  if (tv.len == 0) rb.store(dst);  // empty sequence: final state is the initial one
}

}  // namespace kda
