// Host-side helpers shared by the launchers.
#pragma once

namespace kda {

// Largest value-row block (32, 16 or 8) that still fills the GPU; smaller blocks give more
// CTAs when few (sequence, head) pairs are in flight.
inline int pick_block_rows(long long seq_heads, int num_sms) {
  if (seq_heads * 4 >= num_sms) return 32;
  if (seq_heads * 8 >= num_sms) return 16;
  return 8;
}

}  // namespace kda
