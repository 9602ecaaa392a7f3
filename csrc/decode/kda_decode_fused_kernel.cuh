// Fused decode / verify: causal conv1d update + SiLU on mixed_qkv, then the KDA recurrence on
// the state pool in place, then (optionally) the gated RMSNorm of the output. Stream-ordered
// kernels, none syncing with the host (CUDA-graph safe); the pair path's buffer is the caller's
// (kda_serving.ops._ext passes one per device, reused across calls).
//
// T <= kPairMaxT (decode and verify), the default: two kernels through a bf16 buffer of conv
// outputs [B, T, 3*H*128] (KdaDecodeFusedParams::conv.y), then the norm kernel (3. below) unless
// P2 normalised the output itself:
//
//  P1. kda_fused_conv_vec_kernel, one thread per (row, eight channels), or where the rows are not
//      16-byte aligned kda_fused_conv_kernel, one per (row, channel): the conv outputs of the live
//      rows into conv.y, and the channels' pool columns rewritten from the registers that read
//      them. It releases its dependents at its start.
//  P2. kda_decode_launch's kernel on the column blocks of conv.y, launched to overlap P1: the
//      head kernel (kda_decode_head_kernel.cuh, which applies the norm) or the row-block kernel
//      (kda_decode_kernel.cuh). Its CTAs load their first state rows while P1 runs (P1 writes no
//      state) and wait for P1 before reading q, k, v. dec.conv_W / conv_R make it treat the rows
//      P1 skips as null.
//
// Measured on an H100 (bench_decode, benchmarks/results/bench_decode-*-84aff01.json), one kernel
// for the whole step was slower than this pair at every B >= 64: 1.10-1.34x with one CTA per
// (row, head) (64 KiB of fp32 state, two CTAs per SM), 1.29-1.55x with clusters of four 32-row
// CTAs sharing the conv outputs through distributed shared memory, 1.6-2.0x with the row-block
// kernel below. Small CTAs whose state loads overlap the kernel before them keep more bytes in
// flight.
//
// KDA_SERVING_FUSED_DECODE_PATH=single (opt-in; slower than the pair path on an H100, f47f051),
// T <= kHeadMaxT: one kernel, kda_decode_fused_head_kernel below, the head kernel computing its
// head's conv itself.
//
// T > kPairMaxT: three kernels without the buffer:
//
//  1. kda_decode_fused_kernel, grid (V / BV, H, B) as kda_decode. The CTA computes the conv
//     outputs it needs straight from the conv window and mixed_qkv (all 2·K q/k channels of its
//     head, its own BV v channels; spread over all threads), rounds them to bf16 as the unfused
//     conv op stores them, and feeds them to the shared recurrence (decode_rows). It only
//     *reads* the conv pool.
//  2. kda_fused_conv_state_kernel rewrites the conv pool rows of every live row, one thread per
//     channel (eight where the rows are 16-byte aligned). The write-back cannot sit in kernel 1: a head's q/k windows are read by all
//     V / BV CTAs of that head, and CTAs of one grid have no ordering, so a CTA writing them
//     could overwrite a window a sibling CTA has not read yet. Running after kernel 1 on the
//     same stream, this kernel sees every read done; each channel has exactly one writer
//     thread, which reads its window into registers before rewriting the column.
//  3. kda_fused_norm_kernel (only with out_gate): RMSNorm(o)·w·sigmoid(out_gate) over V per
//     (row, token, head), one warp per 128-wide row, in place on the bf16 output, as the
//     unfused gated_rms_norm does on the output of kda_decode.
//
// Row n is live when its start slot (decode_start_slot, which with dec.conv_W set also needs the
// conv slot slots[n, 0] > 0 and the conv window [off, off+W-1), off = num_accepted[n]-1 (0
// without), inside the R pool rows) is > 0. A row that is not live gets zero output and touches
// neither pool.
#pragma once

#include "../common/conv_window.cuh"
#include "../common/gated_norm.cuh"
#include "kda_decode_fused.h"
#include "kda_decode_head_kernel.cuh"

namespace kda {

struct FusedRow {
  int start;      // state slot to start from
  int conv_slot;  // conv pool row
  int off;        // first window row
  bool live;
};

__device__ __forceinline__ FusedRow fused_row(const KdaDecodeFusedParams& p, int n) {
  FusedRow r;
  r.start = decode_start_slot(p.dec, n);
  r.conv_slot = p.dec.slots[n * p.dec.slots_sb];
  r.off = p.conv.num_accepted ? p.conv.num_accepted[n] - 1 : 0;
  r.live = r.start > 0;  // conv slot and window checked there too (dec.conv_W)
  return r;
}

// Source of q, k, v for RowBlock::run: conv + SiLU of mixed_qkv row n with the conv window of
// its slot, head h, value rows from v0. Channel blocks: q at h*K, k at H*K + h*K, v at 2*H*K + h*V.
// Staged (kStages): per token, thread c computes q and k channel c and (c < BV) v channel c, all
// loads of its two or three outputs issued before the first is used (one warp computing 8 outputs
// per lane in sequence was 3.7x slower than the unfused pair; a strided loop 1.5x).
struct ConvQKVSource {
  static constexpr bool kStages = true;
  const Conv1dParams& cp;
  const __nv_bfloat16* x;  // mixed_qkv row n, token 0, channel 0
  int64_t pool_base;       // conv_slot * pool_ss
  int off;
  int cq, ck, cv;          // first q, k, v channel of this CTA

  // The inputs of one conv output (channel d, new token t): weights, bias, window values.
  struct TapIn {
    float w[kConvMaxWidth], b, xv[kConvMaxWidth];
  };
  __device__ __forceinline__ TapIn load(int d, int64_t t) const {
    TapIn in;
    const ConvWeights cw(cp, d);
    const int64_t base = pool_base + (int64_t)d * cp.pool_sd;
#pragma unroll
    for (int j = 0; j < kConvMaxWidth; ++j) {
      in.w[j] = cw.w[j];
      const int e = (int)t - (cp.W - 1) + j;  // < 0: history row off + (W-1) + e of the window
      in.xv[j] = j >= cp.W ? 0.f
                 : e >= 0  ? __bfloat162float(x[(int64_t)e * cp.x_st + d])
                           : ld_any(cp.pool, base + (int64_t)(off + cp.W - 1 + e) * cp.pool_sr, cp.pool_bf16);
    }
    in.b = cw.b;
    return in;
  }
  // The conv update kernels' arithmetic (bias, then the taps oldest first), rounded to bf16 as
  // the unfused conv op stores it.
  __device__ __forceinline__ float finish(const TapIn& in) const {
    float acc = in.b;
#pragma unroll
    for (int j = 0; j < kConvMaxWidth; ++j)
      if (j < cp.W) acc += in.w[j] * in.xv[j];
    return bf2f(__float2bfloat16(conv_act(acc, cp.silu)));
  }

  template <int BV>
  __device__ __forceinline__ void stage(RecurrentSmem<BV>& sm, int64_t t0, int n) const {
    static_assert(kThreads == kHeadDim, "one q and one k channel per thread");
    const int c = threadIdx.x;
    const bool has_v = c < BV;
    for (int i = 0; i < n; ++i) {
      const TapIn q = load(cq + c, t0 + i), k = load(ck + c, t0 + i);
      TapIn v{};
      if (has_v) v = load(cv + c, t0 + i);
      sm.qs[i][c] = finish(q);
      sm.kn[i][c] = finish(k);
      if (has_v) sm.v[i][c] = finish(v);
    }
  }
};

// grid = (V / BV, H, B)
template <int BV, typename StateT>
__global__ void __launch_bounds__(kThreads)
kda_decode_fused_kernel(const __grid_constant__ KdaDecodeFusedParams p) {
  __shared__ RecurrentSmem<BV> sm;
  const int v0 = blockIdx.x * BV, h = blockIdx.y, n = blockIdx.z;
  const TokenView tv = decode_token_view(p.dec, n, h, v0);
  const FusedRow r = fused_row(p, n);
  if (!r.live) {
    zero_output<BV>(tv);
    return;
  }
  const int HK = p.dec.H * kHeadDim;
  const ConvQKVSource src{p.conv,
                          static_cast<const __nv_bfloat16*>(p.conv.x) + n * p.conv.x_sb,
                          (int64_t)r.conv_slot * p.conv.pool_ss,
                          r.off,
                          h * kHeadDim,
                          HK + h * kHeadDim,
                          2 * HK + h * kHeadDim + v0};
  decode_rows<BV, StateT>(p.dec, tv, src, r.start, sm);
}

// q, k and v already raw in the head kernel's shared memory (stage_token's Src::kStages).
struct StagedQKV {
  static constexpr bool kStages = true;
};

// The single-kernel path (kFusedPathSingle, T <= kHeadMaxT): the head kernel, its CTA computing the
// conv of its head's q, k and v channels (thread c: channel c of each, one after the other, as P1
// computes them) into shared memory and rewriting their conv pool columns, which no other CTA
// reads. grid = (H, B).
template <typename StateT>
__global__ void __launch_bounds__(kThreads)
kda_decode_fused_head_kernel(const __grid_constant__ KdaDecodeFusedParams p) {
  __shared__ HeadSmem sm;
  const int h = blockIdx.x, n = blockIdx.y;
  const TokenView tv = decode_token_view(p.dec, n, h, 0);
  const FusedRow r = fused_row(p, n);
  if (!r.live) {
    zero_output<kHeadDim>(tv);
    return;
  }
  const Conv1dParams& cp = p.conv;
  const int HK = p.dec.H * kHeadDim, c = threadIdx.x, T = p.dec.T;
  const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(cp.x) + (int64_t)n * cp.x_sb;
  const int64_t pool_base = (int64_t)r.conv_slot * cp.pool_ss;
  const int nrows = cp.num_accepted ? min(cp.R, cp.W - 2 + T) : cp.W - 1;
  head_decode<StateT>(p.dec, tv, n, h, r.start, sm, [&] {
#pragma unroll 1
    for (int part = 0; part < 3; ++part) {
      float(*dst)[kHeadDim] = part == 0 ? sm.qs : part == 1 ? sm.kn : sm.v;
      const int d = part * HK + h * kHeadDim + c;
      const int64_t base = pool_base + (int64_t)d * cp.pool_sd;
      ConvChannel<kHeadMaxT> ch;
      ch.load(cp, x, base, r.off, d, T);
#pragma unroll
      for (int t = 0; t < kHeadMaxT; ++t)
        if (t < T) dst[t][c] = ch.out(t, cp);
      ch.store_pool(cp, base, T, nrows);
    }
    __syncthreads();  // every channel's raw q, k in shared memory before the norms
    head_stage_tokens(p.dec, tv, StagedQKV{}, h, sm);
  });
}

// P1 of the pair path. grid = (ceil(D / kThreads), B); T <= MaxT.
template <int MaxT>
__global__ void __launch_bounds__(kThreads)
kda_fused_conv_kernel(const __grid_constant__ KdaDecodeFusedParams p) {
  pdl_release_dependents();
  const Conv1dParams& cp = p.conv;
  const int d = blockIdx.x * kThreads + threadIdx.x, n = blockIdx.y, T = cp.T;
  if (d >= cp.D) return;
  const FusedRow r = fused_row(p, n);
  if (!r.live) return;
  const int64_t base = (int64_t)r.conv_slot * cp.pool_ss + (int64_t)d * cp.pool_sd;
  ConvChannel<MaxT> ch;
  ch.load(cp, static_cast<const __nv_bfloat16*>(cp.x) + (int64_t)n * cp.x_sb, base, r.off, d, T);
  __nv_bfloat16* y = static_cast<__nv_bfloat16*>(cp.y) + (int64_t)n * cp.y_sb + d;
#pragma unroll
  for (int t = 0; t < MaxT; ++t)
    if (t < T) y[(int64_t)t * cp.y_st] = __float2bfloat16(ch.out(t, cp));
  ch.store_pool(cp, base, T, cp.num_accepted ? min(cp.R, cp.W - 2 + T) : cp.W - 1);
}

// P1 as kda_fused_conv_kernel, eight channels per thread with 16-byte accesses where
// conv_vec8_ok: the unfused conv op's vector kernel's update (conv_update_row8), so the same bits
// in conv.y and the pool. A thread per channel spent most of P1 on 2-byte loads and their
// address arithmetic, while its CTAs held the SM slots the decode CTAs wait for.
// grid = (ceil(D / (kThreads * 8)), B).
__global__ void __launch_bounds__(kThreads)
kda_fused_conv_vec_kernel(const __grid_constant__ KdaDecodeFusedParams p) {
  pdl_release_dependents();
  const Conv1dParams& cp = p.conv;
  const int d0 = (blockIdx.x * kThreads + threadIdx.x) * kConvVec, n = blockIdx.y;
  if (d0 >= cp.D) return;
  const FusedRow r = fused_row(p, n);
  if (!r.live) return;
  conv_update_row8(cp, (int64_t)r.conv_slot * cp.pool_ss + d0, r.off, d0, (int64_t)n * cp.x_sb + d0,
                   (int64_t)n * cp.y_sb + d0);
}

// Conv pool write-back after kernel 1. One thread per channel, or (Vec8, where conv_vec8_ok)
// per eight channels with 16-byte accesses. grid = (ceil(D / (kThreads * channels)), B).
template <bool Vec8>
__global__ void __launch_bounds__(kThreads)
kda_fused_conv_state_kernel(const __grid_constant__ KdaDecodeFusedParams p) {
  const Conv1dParams& cp = p.conv;
  constexpr int kCh = Vec8 ? kConvVec : 1;
  const int d = (blockIdx.x * kThreads + threadIdx.x) * kCh;
  const int n = blockIdx.y;
  if (d >= cp.D) return;
  const FusedRow r = fused_row(p, n);
  if (!r.live) return;
  const int64_t base = (int64_t)r.conv_slot * cp.pool_ss + (int64_t)d * cp.pool_sd;
  const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(cp.x) + n * cp.x_sb + d;
  if constexpr (Vec8) {
    float hist[kConvMaxWidth - 1][kConvVec];
    load_window8(cp, base, r.off, hist);
    conv_update_store8(cp, base, hist, x, cp.x_st);
  } else {
    float hist[kConvMaxWidth];
    load_window(cp, base, r.off, hist);
    conv_update_store(cp, base, hist, x, cp.x_st);
  }
}

// Gated RMSNorm of the output, in place. One warp per (n, t, h); grid = ceil(B*T*H / kWarps).
__global__ void __launch_bounds__(kThreads)
kda_fused_norm_kernel(const __grid_constant__ KdaDecodeFusedParams p) {
  const KdaDecodeParams& dp = p.dec;
  const int64_t row = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= (int64_t)dp.B * dp.T * dp.H) return;
  const int h = (int)(row % dp.H);
  const int64_t nt = row / dp.H;
  const int t = (int)(nt % dp.T);
  const int64_t n = nt / dp.T;
  __nv_bfloat16* o = static_cast<__nv_bfloat16*>(dp.o) + n * dp.o_sb + t * dp.o_st + h * dp.o_sh;
  const DecodeNormArgs& nm = dp.norm;
  gated_rms_norm_row<false>(o, norm_gate_row(nm, n, t, h), o, nm.weight, nm.weight_bf16, nm.eps, lane);
}

}  // namespace kda
