// Fused decode / verify on a thread-block cluster per (row, head): the V / BV CTAs of a head
// (BV value rows each, as the row-block kernel) share the conv outputs through distributed
// shared memory instead of each recomputing the head's 256 q/k channels.
//
// CTA `rank` of the cluster computes q, k and v channels [rank*BV, rank*BV + BV) of its head
// from the conv window (and rewrites those pool columns from the same registers: each channel
// has one owner, so no second kernel orders the write-back after the reads), then copies the
// other ranks' q/k slices from their shared memory. The gated RMSNorm over V adds one more
// exchange: per-token partial sums of squares. Small CTAs (16 KiB of fp32 state at BV = 32)
// keep many in flight per SM, which the one-CTA-per-head kernel (64 KiB, two per SM) cannot.
//
// Launched with programmatic stream serialization: the CTAs wait (pdl_wait) before their first
// global access and let the next kernel launch at once, so a following call's CTAs fill the SMs
// this grid's tail leaves idle.
#pragma once

#include "kda_decode_fused_kernel.cuh"

namespace kda {

constexpr int kClusterMaxT = 8;

}  // namespace kda

// The CPU emulator (tests/emu) runs one CTA at a time and has no clusters: it builds the rest of
// the launcher without this kernel.
#ifndef KDA_SIMT_EMULATOR
#include <cooperative_groups.h>

namespace kda {

// Distributed shared memory of the cluster (sm_90).
__device__ __forceinline__ void cluster_barrier() { cooperative_groups::this_cluster().sync(); }

template <typename T>
__device__ __forceinline__ T* cluster_peer(T* p, int rank) {
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
}

// grid = (V / BV, H, B) with cluster dims (V / BV, 1, 1), kThreads threads, T <= MaxT.
template <int BV, typename StateT, int MaxT>
__global__ void __launch_bounds__(kThreads)
kda_decode_cluster_kernel(const __grid_constant__ KdaDecodeFusedParams p) {
  constexpr int kRanks = kHeadDim / BV;
  constexpr int kTokPerWarp = (MaxT + kWarps - 1) / kWarps;
  constexpr int kOut = (MaxT * BV + kThreads - 1) / kThreads;  // outputs per thread
  static_assert(3 * BV <= kThreads, "one conv channel per thread");
  __shared__ RecurrentSmem<BV> sm;
  __shared__ float ss_part[kChunk];
  const KdaDecodeParams& dp = p.dec;
  const Conv1dParams& cp = p.conv;
  const int rank = blockIdx.x, v0 = rank * BV, h = blockIdx.y, n = blockIdx.z, T = dp.T;
  pdl_wait();
  pdl_release_dependents();
  const TokenView tv = decode_token_view(dp, n, h, v0);
  const FusedRow r = fused_row(p, n);
  if (!r.live) {  // the same for every CTA of the cluster: no barrier is left waiting
    zero_output<BV>(tv);
    return;
  }
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, c = lane * 4;
  StateT* pool = static_cast<StateT*>(dp.state);
  const int64_t rows_off = ((int64_t)h * kHeadDim + v0) * kHeadDim;
  auto slot_rows = [&](int s) { return pool + (int64_t)s * dp.state_ss + rows_off; };
  const int32_t* srow = dp.slots + n * dp.slots_sb;

  // 1. Loads: state rows; conv channel (thread tid < 3*BV: block tid / BV of q | k | v, channel
  // v0 + tid % BV); g, beta, out_gate, norm weight of tokens warp + kWarps*i; verify slots.
  RowBlock<BV, StateT> rb;
  rb.load(slot_rows(r.start));
  const int blk = tid / BV, j = tid % BV;
  const bool conv_thread = tid < 3 * BV;
  const int d = blk * dp.H * kHeadDim + h * kHeadDim + v0 + j;
  const int64_t cbase = (int64_t)r.conv_slot * cp.pool_ss + (int64_t)d * cp.pool_sd;
  ConvChannel<MaxT> ch;
  if (conv_thread)
    ch.load(cp, static_cast<const __nv_bfloat16*>(cp.x) + (int64_t)n * cp.x_sb, cbase, r.off, d, T);

  float gv[kTokPerWarp][4] = {}, braw[kTokPerWarp] = {}, dtb[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) dtb[q] = dp.dt_bias[h * kHeadDim + c + q];
#pragma unroll
  for (int i = 0; i < kTokPerWarp; ++i) {
    const int t = warp + kWarps * i;
    if (t < T) {
#pragma unroll
      for (int q = 0; q < 4; ++q) gv[i][q] = bf2f(tv.g[t * tv.sg + c + q]);
      braw[i] = bf2f(tv.beta[t * tv.sb]);
    }
  }
  // Output idx = tid + k*kThreads of step 6 (token idx / BV, row idx % BV): gate and norm weight.
  float og[kOut] = {}, nw[kOut] = {};
  if (p.out_gate) {
#pragma unroll
    for (int k = 0; k < kOut; ++k) {
      const int idx = tid + k * kThreads, ot = idx / BV, orow = idx % BV;
      if (ot < T) {
        og[k] = bf2f(static_cast<const __nv_bfloat16*>(p.out_gate)[n * p.gate_sb + ot * p.gate_st + h * p.gate_sh +
                                                                     v0 + orow]);
        nw[k] = ld_any(p.norm_weight, v0 + orow, p.norm_weight_bf16);
      }
    }
  }
  int out_slot[MaxT];
#pragma unroll
  for (int t = 0; t < MaxT; ++t) out_slot[t] = dp.verify && t < T ? srow[t] : 0;
  const float a = expf(dp.A_log[h]);

  // 2. This rank's conv outputs (raw, rounded to bf16 as the conv op stores them) and pool columns.
  if (conv_thread) {
#pragma unroll
    for (int t = 0; t < MaxT; ++t) {
      if (t < T) {
        const float y = ch.out(t, cp);
        if (blk == 0) sm.qs[t][v0 + j] = y;
        else if (blk == 1) sm.kn[t][v0 + j] = y;
        else sm.v[t][j] = y;
      }
    }
    ch.store_pool(cp, cbase, T, cp.num_accepted ? min(cp.R, cp.W - 2 + T) : cp.W - 1);
  }
  cluster_barrier();  // every rank's slices written

  // 3. The other ranks' q / k slices, then a barrier so none is normalised in place (or its CTA
  // gone) while a peer still reads it.
  for (int idx = tid; idx < 2 * T * kHeadDim; idx += kThreads) {
    const int arr = idx / (T * kHeadDim), t = (idx / kHeadDim) % T, ch_ = idx % kHeadDim;
    const int owner = ch_ / BV;
    if (owner == rank) continue;
    float* mine = arr == 0 ? &sm.qs[t][ch_] : &sm.kn[t][ch_];
    *mine = *cluster_peer(mine, owner);
  }
  cluster_barrier();

  // 4. Tokens warp + kWarps*i: L2 norms, decays, beta (RowBlock::run's arithmetic).
#pragma unroll
  for (int i = 0; i < kTokPerWarp; ++i) {
    const int t = warp + kWarps * i;
    if (t < T) {
      const float4 q4 = *reinterpret_cast<const float4*>(&sm.qs[t][c]);
      const float4 k4 = *reinterpret_cast<const float4*>(&sm.kn[t][c]);
      const float qv[4] = {q4.x, q4.y, q4.z, q4.w}, kv[4] = {k4.x, k4.y, k4.z, k4.w};
      float rq, rk;
      qk_inv_norms(qv, kv, dp.scale, rq, rk);
      float al[4];
#pragma unroll
      for (int q = 0; q < 4; ++q)
        al[q] = expf(kda_gate(gv[i][q] + dtb[q], a, dp.has_lower_bound, dp.lower_bound));
      *reinterpret_cast<float4*>(&sm.qs[t][c]) = make_float4(qv[0] * rq, qv[1] * rq, qv[2] * rq, qv[3] * rq);
      *reinterpret_cast<float4*>(&sm.kn[t][c]) = make_float4(kv[0] * rk, kv[1] * rk, kv[2] * rk, kv[3] * rk);
      *reinterpret_cast<float4*>(&sm.al[t][c]) = make_float4(al[0], al[1], al[2], al[3]);
      if (lane == 0) sm.beta[t] = sigmoid_stable(braw[i]);
    }
  }
  __syncthreads();

  // 5. The recurrence; verify stores the state after token t in slots[n, t] (> 0), decode the
  // final state in the start slot.
#pragma unroll 1
  for (int t = 0; t < T; ++t) {
    rb.step(sm, t);
    if (dp.verify) {
      int s = 0;
#pragma unroll
      for (int q = 0; q < MaxT; ++q)
        if (q == t) s = out_slot[q];
      if (s > 0) rb.store(slot_rows(s));
    }
  }
  if (!dp.verify) rb.store(slot_rows(r.start));
  __syncthreads();

  // 6. Outputs (bf16 as kda_decode stores them). With the gated RMSNorm: per-token partial sums
  // of squares of this rank's rows, summed over the ranks in rank order (the same in every CTA).
  float o[kOut];
#pragma unroll
  for (int k = 0; k < kOut; ++k) {
    const int idx = tid + k * kThreads;
    o[k] = idx < T * BV ? bf2f(__float2bfloat16(sm.o[idx / BV][idx % BV])) : 0.f;
  }
  if (p.out_gate) {
#pragma unroll
    for (int k = 0; k < kOut; ++k) {
      const int idx = tid + k * kThreads;
      if (idx < T * BV) sm.al[idx / BV][idx % BV] = o[k] * o[k];  // al is free after the recurrence
    }
    __syncthreads();
    if (tid < T) {
      float ss = 0.f;
      for (int q = 0; q < BV; ++q) ss += sm.al[tid][q];
      ss_part[tid] = ss;
    }
    cluster_barrier();
    float ss[kOut] = {};
#pragma unroll
    for (int k = 0; k < kOut; ++k) {
      const int idx = tid + k * kThreads;
      if (idx < T * BV)
        for (int q = 0; q < kRanks; ++q) ss[k] += *cluster_peer(&ss_part[idx / BV], q);
    }
    cluster_barrier();  // no CTA leaves while a peer reads its partial sums
#pragma unroll
    for (int k = 0; k < kOut; ++k) o[k] = o[k] * rsqrtf(ss[k] / kHeadDim + p.norm_eps) * nw[k] * sigmoid_stable(og[k]);
  }
#pragma unroll
  for (int k = 0; k < kOut; ++k) {
    const int idx = tid + k * kThreads;
    if (idx < T * BV) tv.o[(int64_t)(idx / BV) * tv.so + idx % BV] = __float2bfloat16(o[k]);
  }
}

}  // namespace kda
#endif  // KDA_SIMT_EMULATOR
