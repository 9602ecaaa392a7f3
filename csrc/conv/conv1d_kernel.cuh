// Causal depthwise conv1d kernels (width W <= 4) with a slot-indexed conv-state pool.
//
// Pool rows are oldest first. Prefill: the history before a sequence is rows [0, W-1) of
// pool[slot] (zeros without initial state); afterwards those rows hold the last W-1 inputs
// of (history ++ sequence). Update: with off = num_accepted-1 (0 without it) the window
// history is rows [off, off+W-1), and the new rows are the last R of (window ++ x).
#pragma once

#include "../common/conv_window.cuh"
#include "../common/kda_common.cuh"

namespace kda {

constexpr int kConvThreads = 128;
constexpr int kConvTokensPerCta = 32;

__device__ __forceinline__ int64_t conv_index(const void* p, bool is64, int i) {
  return is64 ? static_cast<const int64_t*>(p)[i] : (int64_t) static_cast<const int32_t*>(p)[i];
}

// The sequence owning token t of a prefill tile (p.N > 0). Rows of x are counted from
// cu_seqlens[0]; bos / eos / end_all are relative to it. Starts at the last n with
// cu(n) <= t_begin (binary search, once per tile); advance(t) walks forward, over empty sequences.
struct ConvSeqCursor {
  const Conv1dParams& p;
  int64_t cu0, bos, eos, end_all;
  int n;

  __device__ __forceinline__ int64_t cu(int i) const {
    return conv_index(p.cu_seqlens, p.cu_seqlens_64, i) - cu0;
  }

  __device__ __forceinline__ ConvSeqCursor(const Conv1dParams& params, int64_t t_begin)
      : p(params), cu0(conv_index(params.cu_seqlens, params.cu_seqlens_64, 0)) {
    int lo = 0, hi = p.N;
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (cu(mid) <= t_begin) lo = mid; else hi = mid;
    }
    n = lo;
    bos = cu(n);
    eos = cu(n + 1);
    end_all = cu(p.N);
  }

  // Moves to the sequence holding t (the last one for padding rows); true when n changed.
  __device__ __forceinline__ bool advance(int64_t t) {
    if (t < eos || n >= p.N - 1) return false;
    while (t >= eos && n < p.N - 1) {
      ++n;
      bos = eos;
      eos = cu(n + 1);
    }
    return true;
  }
};

// Outputs. grid = (ceil(D / 128), ceil(Ttot / 32)). Each thread owns one channel of a
// token tile; the owning sequence is found by binary search once per tile.
__global__ void __launch_bounds__(kConvThreads) conv1d_prefill_out_kernel(const Conv1dParams p) {
  const int d = blockIdx.x * kConvThreads + threadIdx.x;
  if (d >= p.D) return;
  const int64_t t_begin = (int64_t)blockIdx.y * kConvTokensPerCta;
  const int64_t t_end = min(t_begin + kConvTokensPerCta, p.total_tokens);
  __nv_bfloat16* y = static_cast<__nv_bfloat16*>(p.y);
  if (p.N == 0) {  // every row is padding
    for (int64_t t = t_begin; t < t_end; ++t) y[t * p.y_st + d] = __float2bfloat16(0.f);
    return;
  }
  const ConvWeights cw(p, d);
  const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(p.x);

  ConvSeqCursor seq(p, t_begin);
  for (int64_t t = t_begin; t < t_end; ++t) {
    seq.advance(t);
    const int n = seq.n;
    const int64_t bos = seq.bos;
    const int slot = (t < seq.end_all && t >= bos) ? p.slots[n] : 0;
    if (slot <= 0) {  // null slot or padding row
      y[t * p.y_st + d] = __float2bfloat16(0.f);
      continue;
    }
    const bool init = p.has_initial_state[n];
    float acc = cw.b;
#pragma unroll
    for (int j = 0; j < kConvMaxWidth; ++j) {
      if (j >= p.W) break;
      const int64_t src = t - (p.W - 1) + j;
      float xv;
      if (src >= bos) {
        xv = __bfloat162float(x[src * p.x_st + d]);
      } else {
        // History row (W-1) + (src - bos) of rows [0, W-1).
        const int64_t r = (p.W - 1) + (src - bos);
        xv = init ? ld_any(p.pool, (int64_t)slot * p.pool_ss + r * p.pool_sr + d * p.pool_sd, p.pool_bf16) : 0.f;
      }
      acc += cw.w[j] * xv;
    }
    y[t * p.y_st + d] = __float2bfloat16(conv_act(acc, p.silu));
  }
}

constexpr int kConvVecTokensPerCta = 64;

// The window before token t of the sequence starting at bos, eight channels from d0: its inputs
// where they exist, else history rows [0, kW-1) of pool[slot] (zeros without initial state).
template <int kW>
__device__ __forceinline__ void conv_prefill_window8(const Conv1dParams& p, const __nv_bfloat16* x, int d0,
                                                     int64_t t, int64_t bos, bool init, int slot,
                                                     float (&win)[kConvMaxWidth - 1][kConvVec]) {
#pragma unroll
  for (int j = 0; j < kConvMaxWidth - 1; ++j) {
    const int64_t src = t - (kW - 1) + j;
    if (j < kW - 1 && src >= bos) {
      ld8(x, src * p.x_st + d0, true, win[j]);
    } else if (j < kW - 1 && init) {
      ld8(p.pool, (int64_t)slot * p.pool_ss + ((kW - 1) + (src - bos)) * p.pool_sr + d0, p.pool_bf16, win[j]);
    } else {
#pragma unroll
      for (int c = 0; c < kConvVec; ++c) win[j][c] = 0.f;
    }
  }
}

// The eight-channel kernel's x rows in flight: two stages of kConvStage tokens, copied to shared
// memory with cp.async; each thread copies and reads only its own 16 bytes per token, so no
// barrier orders them, only its own waits. 2 x 8 x 128 x 16 B = 32 KB per CTA.
constexpr int kConvStage = 8;

// Outputs, eight channels per thread (conv_vec8_ok), for width kW = p.W and activation kSilu =
// p.silu (compile-time: the runtime width's selects and the per-channel branch on silu were
// about a third of the loop's instructions). grid = (ceil(D / 1024), ceil(Ttot / 64)). The W-1
// inputs before each token stay in registers, so a token costs one 16-byte load and one
// 16-byte store (the one-channel kernel above re-reads W two-byte inputs per token); the taps
// are summed in the same order, so both give the same bits. The loads run 8 to 16 tokens ahead
// (two cp.async stages), where a register prefetch of one token left a thread one 16-byte load
// in flight.
template <int kW, bool kSilu>
__global__ void __launch_bounds__(kConvThreads) conv1d_prefill_out_vec_kernel(const Conv1dParams p) {
  __shared__ __align__(16) uint4 stage[2][kConvStage][kConvThreads];
  const int d0 = (blockIdx.x * kConvThreads + threadIdx.x) * kConvVec;
  if (d0 >= p.D) return;
  const int64_t t_begin = (int64_t)blockIdx.y * kConvVecTokensPerCta;
  const int64_t t_end = min(t_begin + kConvVecTokensPerCta, p.total_tokens);
  __nv_bfloat16* y = static_cast<__nv_bfloat16*>(p.y);
  const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(p.x);
  float zero[kConvVec];
#pragma unroll
  for (int c = 0; c < kConvVec; ++c) zero[c] = 0.f;
  if (p.N == 0) {  // every row is padding
    for (int64_t t = t_begin; t < t_end; ++t) st8(y, t * p.y_st + d0, true, zero);
    return;
  }
  // Stage s <- x rows of tokens tb .. tb + kConvStage - 1 (those before t_end); one group each.
  auto fill = [&](int s, int64_t tb) {
    const __nv_bfloat16* src = x + tb * p.x_st + d0;
#pragma unroll
    for (int i = 0; i < kConvStage; ++i, src += p.x_st)
      if (tb + i < t_end) cp_async16(&stage[s][i][threadIdx.x], src);
    cp_async_commit();
  };
  fill(0, t_begin);
  fill(1, t_begin + kConvStage);
  const ConvTaps8 taps(p, d0);
  ConvSeqCursor seq(p, t_begin);
  int slot = p.slots[seq.n];
  float win[kConvMaxWidth - 1][kConvVec];  // inputs t-(W-1) .. t-1 of sequence seq.n, oldest first
  conv_prefill_window8<kW>(p, x, d0, t_begin, seq.bos, slot > 0 && p.has_initial_state[seq.n], slot, win);
  __nv_bfloat16* yp = y + t_begin * p.y_st + d0;  // stepped per token
  for (int64_t tb = t_begin; tb < t_end; tb += kConvStage) {
    const int s = (int)((tb - t_begin) / kConvStage) & 1;
    cp_async_wait<1>();  // stage s is in (the other may still be in flight)
#pragma unroll 2
    for (int i = 0; i < kConvStage; ++i, yp += p.y_st) {
      const int64_t t = tb + i;
      if (t >= t_end) break;
      float xt[kConvVec], out[kConvVec];
      const uint4 raw = stage[s][i][threadIdx.x];
      const unsigned w4[4] = {raw.x, raw.y, raw.z, raw.w};
      unpack_bf16(w4, xt);
      if (seq.advance(t)) {
        slot = p.slots[seq.n];
        conv_prefill_window8<kW>(p, x, d0, t, seq.bos, slot > 0 && p.has_initial_state[seq.n], slot, win);
      }
      if (slot <= 0 || t >= seq.end_all) {  // null slot or padding row
        st8(yp, 0, true, zero);
        continue;
      }
      conv_step8<kW, kSilu>(taps, win, xt, out);
      st8(yp, 0, true, out);
    }
    fill(s, tb + 2 * kConvStage);  // this thread has read its stage-s slots (same addresses, in order)
  }
  cp_async_wait<0>();  // no copy may land after the CTA's shared memory is handed on
}

// State shift-in, launched after the output kernel so that every history read is done.
// grid = (ceil(D / 128), N). Row i gets element len+i of (history ++ sequence), i < W-1;
// reading index len+i >= i keeps the ascending in-place update safe.
__global__ void __launch_bounds__(kConvThreads) conv1d_prefill_state_kernel(const Conv1dParams p) {
  const int d = blockIdx.x * kConvThreads + threadIdx.x;
  const int n = blockIdx.y;
  if (d >= p.D) return;
  const int slot = p.slots[n];
  if (slot <= 0) return;
  const int64_t bos = conv_index(p.cu_seqlens, p.cu_seqlens_64, n) -
                      conv_index(p.cu_seqlens, p.cu_seqlens_64, 0);
  const int64_t len = conv_index(p.cu_seqlens, p.cu_seqlens_64, n + 1) -
                      conv_index(p.cu_seqlens, p.cu_seqlens_64, n);
  const bool init = p.has_initial_state[n];
  const int hist = p.W - 1;
  const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(p.x);
  const int64_t base = (int64_t)slot * p.pool_ss + d * p.pool_sd;
  for (int i = 0; i < hist; ++i) {
    const int64_t c = len + i;
    float v;
    if (c < hist) v = init ? ld_any(p.pool, base + c * p.pool_sr, p.pool_bf16) : 0.f;
    else v = __bfloat162float(x[(bos + c - hist) * p.x_st + d]);
    st_any(p.pool, base + i * p.pool_sr, v, p.pool_bf16);
  }
}

// Decode update for x [B, T, D]. grid = (ceil(D / 128), B); one thread per (row, channel)
// reads its window first, then rewrites its pool column in place.
__global__ void __launch_bounds__(kConvThreads) conv1d_update_kernel(const Conv1dParams p) {
  pdl_release_dependents();  // the decode after it reads its state rows meanwhile (kda_decode_launch.cu)
  const int d = blockIdx.x * kConvThreads + threadIdx.x;
  const int b = blockIdx.y;
  if (d >= p.D) return;
  const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(p.x) + (int64_t)b * p.x_sb + d;
  __nv_bfloat16* y = static_cast<__nv_bfloat16*>(p.y) + (int64_t)b * p.y_sb + d;
  const int slot = p.slots[b];
  const int off = p.num_accepted ? p.num_accepted[b] - 1 : 0;
  // Null slot, or an offset whose window leaves the pool: zero output, pool untouched.
  if (slot <= 0 || off < 0 || off + p.W - 1 > p.R) {
    for (int t = 0; t < p.T; ++t) y[(int64_t)t * p.y_st] = __float2bfloat16(0.f);
    return;
  }
  const int64_t base = (int64_t)slot * p.pool_ss + d * p.pool_sd;
  const ConvWeights cw(p, d);
  float hist[kConvMaxWidth];  // the window as read, for the state write-back
  load_window(p, base, off, hist);
  float win[kConvMaxWidth];   // win[0..W-2] history, oldest first, shifted per token
#pragma unroll
  for (int j = 0; j < kConvMaxWidth; ++j) win[j] = hist[j];
  for (int t = 0; t < p.T; ++t) {
    const float xt = __bfloat162float(x[(int64_t)t * p.x_st]);
    float acc = cw.b;
#pragma unroll
    for (int j = 0; j < kConvMaxWidth - 1; ++j)
      if (j < p.W - 1) acc += cw.w[j] * win[j];
#pragma unroll
    for (int j = 0; j < kConvMaxWidth; ++j)
      if (j == p.W - 1) acc += cw.w[j] * xt;  // constant indices keep win/w in registers
    y[(int64_t)t * p.y_st] = __float2bfloat16(conv_act(acc, p.silu));
#pragma unroll
    for (int j = 0; j < kConvMaxWidth - 1; ++j)
      win[j] = j < p.W - 2 ? win[(j + 1) % (kConvMaxWidth - 1)] : (j == p.W - 2 ? xt : win[j]);
  }
  // New rows from the registers: no row is read after being overwritten.
  conv_update_store(p, base, hist, x, p.x_st);
}

// Decode update as conv1d_update_kernel, eight channels per thread with 16-byte accesses: the
// one-channel kernel moves 2 bytes per load and was latency-bound (about 4x its HBM floor at
// B = 64 on an H100). Same arithmetic per channel, same results. grid = (ceil(D / 8 / 128), B).
__global__ void __launch_bounds__(kConvThreads) conv1d_update_vec_kernel(const Conv1dParams p) {
  pdl_release_dependents();
  const int d0 = (blockIdx.x * kConvThreads + threadIdx.x) * kConvVec;
  const int b = blockIdx.y;
  if (d0 >= p.D) return;
  const int64_t xb = (int64_t)b * p.x_sb + d0, yb = (int64_t)b * p.y_sb + d0;
  const int slot = p.slots[b];
  const int off = p.num_accepted ? p.num_accepted[b] - 1 : 0;
  float v[kConvVec];
  if (slot <= 0 || off < 0 || off + p.W - 1 > p.R) {  // zero output, pool untouched
#pragma unroll
    for (int c = 0; c < kConvVec; ++c) v[c] = 0.f;
    for (int t = 0; t < p.T; ++t) st8(p.y, yb + (int64_t)t * p.y_st, true, v);
    return;
  }
  conv_update_row8(p, (int64_t)slot * p.pool_ss + d0, off, d0, xb, yb);
}

}  // namespace kda
