// Varlen KDA prefill on a slot-indexed state pool: token-serial recurrence per
// (sequence, head, value-row block), optional checkpoints every 64 tokens.
#pragma once

#include "prefill_sequence.cuh"

namespace kda {

// grid = (V / BV, H, N)
template <int BV, typename StateT>
__global__ void __launch_bounds__(kThreads) kda_prefill_kernel(const KdaPrefillParams p) {
  __shared__ RecurrentSmem<BV> sm;
  const int v0 = blockIdx.x * BV, h = blockIdx.y, n = blockIdx.z;
  const TokenView tv = prefill_tokens(p, n, h, v0);
  if (prefill_null_slot<BV>(p, tv, n)) return;
  const int slot = p.slots[n];
  StateT* dst = prefill_state_rows<StateT>(p, slot, h, v0);
  StateT* ckpt = prefill_checkpoint_rows<StateT>(p, n, h, v0);

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
