// Fused decode / verify with one CTA per (row, head): conv update + SiLU of the head's 3 x 128
// channels, the recurrence over all 128 value rows, the conv pool write-back and the optional
// gated RMSNorm, in one kernel.
//
// Why one CTA per head: it owns every channel of its head, so each conv output is computed once
// (the row-block kernel of kda_decode_fused_kernel.cuh recomputes the head's 256 q/k channels in
// each of its V / BV CTAs), the thread that read a channel's window rewrites it (no second kernel
// to order the write-back after every read) and the output norm over V sees the whole row (no
// third kernel). 8 warps of 16 state rows each; at most 8 tokens, one per warp in the per-token
// stages. Every global load is issued before the first is used.
#pragma once

#include "kda_decode_fused_kernel.cuh"

namespace kda {

constexpr int kHeadWarps = 8;
constexpr int kHeadThreads = kHeadWarps * 32;
constexpr int kHeadMaxT = kHeadWarps;

// grid = B * H (row n = blockIdx.x / H, head h = blockIdx.x % H), kHeadThreads threads, T <= MaxT
// (1 for decode: the registers of the longer windows would spill).
template <typename StateT, int MaxT>
__global__ void __launch_bounds__(kHeadThreads, 2)
kda_decode_head_kernel(const __grid_constant__ KdaDecodeFusedParams p) {
  __shared__ RecurrentSmem<kHeadDim> sm;
  const KdaDecodeParams& dp = p.dec;
  const Conv1dParams& cp = p.conv;
  const int h = blockIdx.x % dp.H, n = blockIdx.x / dp.H, T = dp.T;
  const TokenView tv = decode_token_view(dp, n, h, 0);
  const FusedRow r = fused_row(p, n);
  if (!r.live) {
    zero_output<kHeadDim, kHeadThreads>(tv);
    return;
  }
  const int tid = threadIdx.x, warp = tid / 32, c = (tid % 32) * 4;
  StateT* pool = static_cast<StateT*>(dp.state);
  const int64_t head_off = (int64_t)h * kHeadDim * kHeadDim;
  auto slot_state = [&](int s) { return pool + (int64_t)s * dp.state_ss + head_off; };
  const int32_t* srow = dp.slots + n * dp.slots_sb;

  // 1. Loads: the state rows; the conv inputs (thread tid < 128: q channel tid and v channel tid,
  // else k channel tid - 128); g, beta, out_gate and norm weight of token `warp`; verify slots.
  RowBlock<kHeadDim, StateT, kHeadWarps> rb;
  rb.load(slot_state(r.start));
  const int HK = dp.H * kHeadDim;
  const bool q_thread = tid < kHeadDim;
  const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(cp.x) + (int64_t)n * cp.x_sb;
  const int64_t cbase = (int64_t)r.conv_slot * cp.pool_ss;
  const int d0 = q_thread ? h * kHeadDim + tid : HK + h * kHeadDim + (tid - kHeadDim);
  const int d1 = 2 * HK + h * kHeadDim + tid;
  ConvChannel<MaxT> ch0, ch1;
  ch0.load(cp, x, cbase + (int64_t)d0 * cp.pool_sd, r.off, d0, T);
  if (q_thread) ch1.load(cp, x, cbase + (int64_t)d1 * cp.pool_sd, r.off, d1, T);

  const bool has_tok = warp < T;
  float gv[4] = {}, og[4] = {}, nw[4] = {}, dtb[4], braw = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) dtb[j] = dp.dt_bias[h * kHeadDim + c + j];
  if (has_tok) {
#pragma unroll
    for (int j = 0; j < 4; ++j) gv[j] = bf2f(tv.g[warp * tv.sg + c + j]);
    braw = bf2f(tv.beta[warp * tv.sb]);
    if (p.out_gate) {
      const __nv_bfloat16* gt = static_cast<const __nv_bfloat16*>(p.out_gate) + n * p.gate_sb +
                                warp * p.gate_st + h * p.gate_sh;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        og[j] = bf2f(gt[c + j]);
        nw[j] = ld_any(p.norm_weight, c + j, p.norm_weight_bf16);
      }
    }
  }
  int out_slot[MaxT];
#pragma unroll
  for (int t = 0; t < MaxT; ++t) out_slot[t] = dp.verify && t < T ? srow[t] : 0;
  const float a = expf(dp.A_log[h]);

  // 2. Conv outputs into shared memory (raw, as the staged source of RowBlock::run leaves them),
  // then the channels' pool columns rewritten from the registers.
#pragma unroll
  for (int t = 0; t < MaxT; ++t) {
    if (t < T) {
      const float y0 = ch0.out(t, cp);
      if (q_thread) {
        sm.qs[t][tid] = y0;
        sm.v[t][tid] = ch1.out(t, cp);
      } else {
        sm.kn[t][tid - kHeadDim] = y0;
      }
    }
  }
  const int nrows = cp.num_accepted ? min(cp.R, cp.W - 2 + T) : cp.W - 1;
  ch0.store_pool(cp, cbase + (int64_t)d0 * cp.pool_sd, T, nrows);
  if (q_thread) ch1.store_pool(cp, cbase + (int64_t)d1 * cp.pool_sd, T, nrows);
  __syncthreads();

  // 3. Token `warp`: L2 norms, decays, beta (RowBlock::run's arithmetic).
  if (has_tok) {
    const int i = warp;
    const float4 q4 = *reinterpret_cast<const float4*>(&sm.qs[i][c]);
    const float4 k4 = *reinterpret_cast<const float4*>(&sm.kn[i][c]);
    const float qv[4] = {q4.x, q4.y, q4.z, q4.w}, kv[4] = {k4.x, k4.y, k4.z, k4.w};
    float rq, rk;
    qk_inv_norms(qv, kv, dp.scale, rq, rk);
    float al[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) al[j] = expf(kda_gate(gv[j] + dtb[j], a, dp.has_lower_bound, dp.lower_bound));
    *reinterpret_cast<float4*>(&sm.qs[i][c]) = make_float4(qv[0] * rq, qv[1] * rq, qv[2] * rq, qv[3] * rq);
    *reinterpret_cast<float4*>(&sm.kn[i][c]) = make_float4(kv[0] * rk, kv[1] * rk, kv[2] * rk, kv[3] * rk);
    *reinterpret_cast<float4*>(&sm.al[i][c]) = make_float4(al[0], al[1], al[2], al[3]);
    if (c == 0) sm.beta[i] = sigmoid_stable(braw);
  }
  __syncthreads();

  // 4. The recurrence; verify stores the state after token t in slots[n, t] (> 0), decode the
  // final state in the start slot.
#pragma unroll 1
  for (int t = 0; t < T; ++t) {
    rb.step(sm, t);
    if (dp.verify) {
      int s = 0;
#pragma unroll
      for (int j = 0; j < MaxT; ++j)
        if (j == t) s = out_slot[j];
      if (s > 0) rb.store(slot_state(s));
    }
  }
  if (!dp.verify) rb.store(slot_state(r.start));
  __syncthreads();

  // 5. Output of token `warp`, rounded to bf16 as kda_decode stores it; then the gated RMSNorm of
  // kda_fused_norm_kernel on those values.
  if (has_tok) {
    const float4 o4 = *reinterpret_cast<const float4*>(&sm.o[warp][c]);
    float o[4] = {bf2f(__float2bfloat16(o4.x)), bf2f(__float2bfloat16(o4.y)), bf2f(__float2bfloat16(o4.z)),
                  bf2f(__float2bfloat16(o4.w))};
    if (p.out_gate) {
      float ss = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) ss += o[j] * o[j];
      ss = warp_sum(ss);
      const float rr = rsqrtf(ss / kHeadDim + p.norm_eps);
#pragma unroll
      for (int j = 0; j < 4; ++j) o[j] = o[j] * rr * nw[j] * sigmoid_stable(og[j]);
    }
    __nv_bfloat16* op = tv.o + (int64_t)warp * tv.so + c;
#pragma unroll
    for (int j = 0; j < 4; ++j) op[j] = __float2bfloat16(o[j]);
  }
}

}  // namespace kda
