// KDA decode / verify with one CTA per (row, head) for T <= kHeadMaxT, the state walked in four
// 32-value-row blocks: the CTA stages the head's tokens once (norms, decays, beta, all 128 v
// values), loads block r + 1's state rows into registers while it runs block r, and ends with the
// 128-wide output rows, gated-RMS-normalised when p.norm asks for it (the fused decode's norm, so
// no kernel runs after it).
//
// Against the row-block kernel (kda_decode_kernel.cuh: one CTA per 32 value rows, each staging
// the same tokens): a fourth of the staging, a state load always in flight behind the compute, and
// no norm kernel; the price is four dependent blocks per CTA, so launch_rows keeps the row-block
// kernel when few (row, head) pairs are in flight (decode_uses_head_kernel).
#pragma once

#include "../common/gated_norm.cuh"
#include "kda_decode_kernel.cuh"

namespace kda {

constexpr int kHeadBlockRows = 32;
constexpr int kHeadBlocks = kHeadDim / kHeadBlockRows;

struct HeadSmem {
  float qs[kHeadMaxT][kHeadDim];  // scale * normalised q
  float kn[kHeadMaxT][kHeadDim];  // normalised k
  float al[kHeadMaxT][kHeadDim];  // exp(gate)
  float v[kHeadMaxT][kHeadDim];
  float o[kHeadMaxT][kHeadDim];
  float beta[kHeadMaxT];
};

// Row (n, t, h) of the gated norm's gate.
__device__ __forceinline__ const __nv_bfloat16* norm_gate_row(const DecodeNormArgs& nm, int64_t n, int t, int h) {
  return static_cast<const __nv_bfloat16*>(nm.gate) + n * nm.gate_sb + t * nm.gate_st + h * nm.gate_sh;
}

// The T output rows of (n, h) from sm.o, rounded to bf16 as the row-block kernel stores them,
// then normalised when p.norm.gate is set (as the norm kernel would on the stored row). One warp
// per token.
__device__ __forceinline__ void head_store_outputs(const KdaDecodeParams& p, const TokenView& tv, int n, int h,
                                                   const HeadSmem& sm, int warp, int lane) {
  for (int t = warp; t < p.T; t += kWarps) {
    __nv_bfloat16* o = tv.o + (int64_t)t * tv.so;
    const float4 x4 = *reinterpret_cast<const float4*>(&sm.o[t][lane * 4]);
    float xv[4] = {x4.x, x4.y, x4.z, x4.w};
    BfQuad y;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      y.b[j] = __float2bfloat16(xv[j]);
      xv[j] = bf2f(y.b[j]);
    }
    const bool vec_o = reinterpret_cast<uintptr_t>(o) % 8 == 0;  // uniform over the warp
    if (p.norm.gate) {
      const __nv_bfloat16* gt = norm_gate_row(p.norm, n, t, h);
      if (reinterpret_cast<uintptr_t>(gt) % 8 == 0)
        gated_rms_norm_quad<true>(xv, gt, p.norm.weight, p.norm.weight_bf16, p.norm.eps, lane, y);
      else
        gated_rms_norm_quad<false>(xv, gt, p.norm.weight, p.norm.weight_bf16, p.norm.eps, lane, y);
    }
    if (vec_o) store_quad<true>(o, y, lane);
    else store_quad<false>(o, y, lane);
  }
}

// The head kernel's work for (n, h) from its start slot (> 0), on a TokenView whose g, beta and o
// are set. stage_qkv() stages the tokens into sm (qs, kn normalised, al, beta, v) and returns
// once this thread's writes are done; the body syncs the CTA after it. The first state block's
// load is issued before pdl_wait, so with early_state it overlaps the kernel ahead.
template <typename StateT, class StageQKV>
__device__ __forceinline__ void head_decode(const KdaDecodeParams& p, const TokenView& tv, int n, int h, int start,
                                            HeadSmem& sm, StageQKV&& stage_qkv) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  StateT* pool = static_cast<StateT*>(p.state);
  auto block_rows = [&](int s, int r) {
    return pool + (int64_t)s * p.state_ss + ((int64_t)h * kHeadDim + r * kHeadBlockRows) * kHeadDim;
  };
  RowBlock<kHeadBlockRows, StateT> cur, nxt;
  cur.load(block_rows(start, 0));  // before pdl_wait with early_state, as decode_rows
  pdl_wait();
  stage_qkv();
  __syncthreads();

  const int32_t* srow = p.slots + n * p.slots_sb;
#pragma unroll
  for (int r = 0; r < kHeadBlocks; ++r) {
    if (r + 1 < kHeadBlocks) nxt.load(block_rows(start, r + 1));  // in flight during this block
    for (int t = 0; t < p.T; ++t) {
      cur.step(sm, t, r * kHeadBlockRows);
      if (p.verify) {
        const int s = srow[t];
        if (s > 0) cur.store(block_rows(s, r));
      } else if (t == p.T - 1) {
        cur.store(block_rows(start, r));
      }
    }
    if (r + 1 < kHeadBlocks)
#pragma unroll
      for (int i = 0; i < RowBlock<kHeadBlockRows, StateT>::RPW; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) cur.S[i][j] = nxt.S[i][j];
  }
  __syncthreads();
  head_store_outputs(p, tv, n, h, sm, warp, lane);
}

// The T tokens of head h into sm (one warp per token): q and k from src (raw from global memory,
// or already raw in sm.qs / sm.kn when Src::kStages) normalised, decays and beta from tv.
template <class Src>
__device__ __forceinline__ void head_stage_tokens(const KdaDecodeParams& p, const TokenView& tv, const Src& src, int h,
                                                  HeadSmem& sm) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const GateArgs ga{expf(p.A_log[h]), p.has_lower_bound, p.lower_bound, p.scale, p.dt_bias + h * kHeadDim};
  float dtb[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) dtb[j] = ga.dt_bias_h[lane * 4 + j];
  for (int i = warp; i < p.T; i += kWarps) stage_token(tv, src, ga, dtb, sm, i, i, lane);
}

// grid = (H, B), kThreads threads.
template <typename StateT>
__global__ void __launch_bounds__(kThreads) kda_decode_head_kernel(const __grid_constant__ KdaDecodeParams p) {
  __shared__ HeadSmem sm;
  const int h = blockIdx.x, n = blockIdx.y;
  auto bf = [](const void* x) { return static_cast<const __nv_bfloat16*>(x); };
  TokenView tv = decode_token_view(p, n, h, 0);
  tv.q = bf(p.q) + n * p.q_sb + h * p.q_sh;
  tv.k = bf(p.k) + n * p.k_sb + h * p.k_sh;
  tv.v = bf(p.v) + n * p.v_sb + h * p.v_sh;
  tv.sq = p.q_st; tv.sk = p.k_st; tv.sv = p.v_st;

  if (!p.early_state) pdl_wait();
  const int start = decode_start_slot(p, n);
  if (start <= 0) {  // zero output; normalised, zero stays zero
    zero_output<kHeadDim>(tv);
    return;
  }
  head_decode<StateT>(p, tv, n, h, start, sm, [&] {
    head_stage_tokens(p, tv, tv, h, sm);
    for (int idx = threadIdx.x; idx < p.T * kHeadDim; idx += kThreads)
      sm.v[idx / kHeadDim][idx % kHeadDim] = tv.load_v(idx / kHeadDim, idx % kHeadDim);
  });
}

}  // namespace kda
