// Token-serial KDA recurrence for one (sequence, head, block of BV value rows).
//
// Rows of a V-first state evolve independently given k, g and beta, so a CTA owns BV rows.
// Each warp holds BV/4 rows in registers; lane l owns channels 4l..4l+3 of every row.
// Tokens are staged CT at a time: L2 norms, gates and beta are computed for the whole
// chunk in parallel, then the warps walk the chunk without block-wide barriers.
#pragma once

#include "kda_common.cuh"

namespace kda {

constexpr int kChunk = 16;

template <int BV>
struct RecurrentSmem {
  float qs[kChunk][kHeadDim];  // scale * normalised q
  float kn[kChunk][kHeadDim];  // normalised k
  float al[kChunk][kHeadDim];  // exp(gate), in (0, 1]
  float v[kChunk][BV];
  float o[kChunk][BV];
  float beta[kChunk];
};

// Inputs of one (sequence, head) at its first token; strides are per token, in elements.
// v and o already point at the CTA's first value row.
//
// TokenView is also the default *source* of q, k and v for RowBlock::run: bf16 rows in global
// memory, read by the warp that stages a token (kStages = false), with two members:
//   load_qk(t, c, q, k): raw q and k of token t, channels c..c+3 (before the L2 norm);
//   load_v(t, j):        raw v of token t, row j of the CTA's block.
// A source whose values are costly to produce (the fused decode computes each from the conv
// window) sets kStages = true and provides stage(sm, t0, n) instead: all threads of the CTA
// write the raw q, k, v of tokens t0..t0+n-1 into sm.qs / sm.kn / sm.v, which the staging then
// normalises in place.
struct TokenView {
  static constexpr bool kStages = false;

  const __nv_bfloat16 *q, *k, *g, *v, *beta;
  int64_t sq, sk, sg, sv, sb;
  __nv_bfloat16* o;
  int64_t so;
  int len;

  __device__ __forceinline__ void load_qk(int64_t t, int c, float (&qv)[4], float (&kv)[4]) const {
    const __nv_bfloat16* qp = q + t * sq + c;
    const __nv_bfloat16* kp = k + t * sk + c;
#pragma unroll
    for (int j = 0; j < 4; ++j) { qv[j] = bf2f(qp[j]); kv[j] = bf2f(kp[j]); }
  }
  __device__ __forceinline__ float load_v(int64_t t, int j) const { return bf2f(v[t * sv + j]); }
};

struct GateArgs {
  float a;            // exp(A_log[h])
  bool bounded;
  float lower_bound;
  float scale;
  const float* dt_bias_h;  // dt_bias + h*K
};

// Reduces N per-row partial sums across the warp with about N+4 shuffles instead of
// 5N: each step halves the rows a lane carries. Afterwards the lane holds the full sum of
// row row_of_lane<N>(lane).
template <int N, int OFF>
struct RowReduce {
  static __device__ __forceinline__ float run(float* a, int lane) {
    constexpr int H = N / 2;
    const bool hi = (lane & OFF) != 0;
#pragma unroll
    for (int i = 0; i < H; ++i) {
      const float send = hi ? a[i] : a[i + H];
      const float keep = hi ? a[i + H] : a[i];
      a[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFF);
    }
    return RowReduce<H, OFF / 2>::run(a, lane);
  }
};

template <int OFF>
struct RowReduce<1, OFF> {
  static __device__ __forceinline__ float run(float* a, int /*lane*/) {
    float x = a[0];
#pragma unroll
    for (int o = OFF; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
  }
};

template <int N>
__device__ __forceinline__ int row_of_lane(int lane) {
  int r = 0;
#pragma unroll
  for (int n = N, off = 16; n > 1; n >>= 1, off >>= 1)
    if (lane & off) r += n / 2;
  return r;
}

template <int N>
__host__ __device__ constexpr int lane_of_row(int r) {
  int l = 0;
  for (int n = N, off = 16; n > 1; n >>= 1, off >>= 1)
    if (r & (n / 2)) l |= off;
  return l;
}

template <int BV, int NT = kThreads>
__device__ __forceinline__ void zero_output(const TokenView& tv) {
  const __nv_bfloat16 z = __float2bfloat16(0.f);
  for (int idx = threadIdx.x; idx < tv.len * BV; idx += NT)
    tv.o[(int64_t)(idx / BV) * tv.so + idx % BV] = z;
}

// Stages token t of tv into row i of sm (RecurrentSmem or HeadSmem), one warp, lane l on
// channels 4l..4l+3: q (scaled) and k L2-normalised, the decays exp(gate), beta. q and k come raw
// from src, or (Src::kStages) were written raw into sm.qs / sm.kn by src.stage.
template <class Src, class Smem>
__device__ __forceinline__ void stage_token(const TokenView& tv, const Src& src, const GateArgs& ga,
                                            const float (&dtb)[4], Smem& sm, int i, int64_t t, int lane) {
  const int c = lane * 4;
  const __nv_bfloat16* gp = tv.g + t * tv.sg + c;
  float qv[4], kv[4], gv[4];
  if constexpr (Src::kStages) {
    const float4 q4 = *reinterpret_cast<const float4*>(&sm.qs[i][c]);
    const float4 k4 = *reinterpret_cast<const float4*>(&sm.kn[i][c]);
    qv[0] = q4.x; qv[1] = q4.y; qv[2] = q4.z; qv[3] = q4.w;
    kv[0] = k4.x; kv[1] = k4.y; kv[2] = k4.z; kv[3] = k4.w;
  } else {
    src.load_qk(t, c, qv, kv);
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) gv[j] = bf2f(gp[j]);
  float rq, rk;
  qk_inv_norms(qv, kv, ga.scale, rq, rk);
  float al[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) al[j] = expf(kda_gate(gv[j] + dtb[j], ga.a, ga.bounded, ga.lower_bound));
  *reinterpret_cast<float4*>(&sm.qs[i][c]) = make_float4(qv[0] * rq, qv[1] * rq, qv[2] * rq, qv[3] * rq);
  *reinterpret_cast<float4*>(&sm.kn[i][c]) = make_float4(kv[0] * rk, kv[1] * rk, kv[2] * rk, kv[3] * rk);
  *reinterpret_cast<float4*>(&sm.al[i][c]) = make_float4(al[0], al[1], al[2], al[3]);
  if (lane == 0) sm.beta[i] = sigmoid_stable(bf2f(tv.beta[t * tv.sb]));
}

template <int BV, typename StateT>
struct RowBlock {
  static constexpr int RPW = BV / kWarps;  // rows per warp
  static_assert(RPW >= 1 && RPW <= 32 && (RPW & (RPW - 1)) == 0, "rows per warp");

  float S[RPW][4];
  int warp, lane;

  __device__ __forceinline__ RowBlock() : warp(threadIdx.x / 32), lane(threadIdx.x % 32) {}

  // base points at row v0 of a [V, K] state; nullptr means a zero state.
  __device__ __forceinline__ void load(const StateT* base) {
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      if (base) {
        StateIO<StateT>::load(base + (int64_t)(warp * RPW + r) * kHeadDim + lane * 4, S[r]);
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) S[r][j] = 0.f;
      }
    }
  }

  __device__ __forceinline__ void store(StateT* base) const {
#pragma unroll
    for (int r = 0; r < RPW; ++r)
      StateIO<StateT>::store(base + (int64_t)(warp * RPW + r) * kHeadDim + lane * 4, S[r]);
  }

  // Token i of the staged tokens in sm (RecurrentSmem or the head kernel's HeadSmem): v and o of
  // this block's rows at columns row0 + warp * RPW + r.
  template <class Smem>
  __device__ __forceinline__ void step(Smem& sm, int i, int row0 = 0) {
    const int c = lane * 4;
    const float4 k4 = *reinterpret_cast<const float4*>(&sm.kn[i][c]);
    const float4 a4 = *reinterpret_cast<const float4*>(&sm.al[i][c]);
    const float4 q4 = *reinterpret_cast<const float4*>(&sm.qs[i][c]);
    const float b = sm.beta[i];
    float p[RPW];
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      S[r][0] *= a4.x; S[r][1] *= a4.y; S[r][2] *= a4.z; S[r][3] *= a4.w;
      p[r] = S[r][0] * k4.x + S[r][1] * k4.y + S[r][2] * k4.z + S[r][3] * k4.w;
    }
    const int myrow = row_of_lane<RPW>(lane);
    const float d = RowReduce<RPW, 16>::run(p, lane);
    const float u = b * (sm.v[i][row0 + warp * RPW + myrow] - d);
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      const float ur = __shfl_sync(0xffffffffu, u, lane_of_row<RPW>(r));
      S[r][0] += ur * k4.x; S[r][1] += ur * k4.y; S[r][2] += ur * k4.z; S[r][3] += ur * k4.w;
      p[r] = S[r][0] * q4.x + S[r][1] * q4.y + S[r][2] * q4.z + S[r][3] * q4.w;
    }
    const float o = RowReduce<RPW, 16>::run(p, lane);
    if ((lane & (32 / RPW - 1)) == 0) sm.o[i][row0 + warp * RPW + myrow] = o;
  }

  // Runs all tokens of tv; sink(t, *this) is called after token t (uniform across the CTA)
  // so callers can store checkpoints or per-token states. q, k, v come from tv's rows.
  template <class Sink>
  __device__ __forceinline__ void run(const TokenView& tv, const GateArgs& ga,
                                      RecurrentSmem<BV>& sm, Sink&& sink) {
    run(tv, tv, ga, sm, static_cast<Sink&&>(sink));
  }

  // As above with q, k, v taken from src (see TokenView); g, beta, o and len from tv.
  template <class Src, class Sink>
  __device__ __forceinline__ void run(const TokenView& tv, const Src& src, const GateArgs& ga,
                                      RecurrentSmem<BV>& sm, Sink&& sink) {
    const int c = lane * 4;
    float dtb[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) dtb[j] = ga.dt_bias_h[c + j];

    for (int t0 = 0; t0 < tv.len; t0 += kChunk) {
      const int n = min(kChunk, tv.len - t0);
      __syncthreads();  // previous chunk fully consumed
      if constexpr (Src::kStages) {
        src.stage(sm, t0, n);
        __syncthreads();
      }
      for (int i = warp; i < n; i += kWarps) stage_token(tv, src, ga, dtb, sm, i, t0 + i, lane);
      if constexpr (!Src::kStages)
        for (int idx = threadIdx.x; idx < n * BV; idx += kThreads)
          sm.v[idx / BV][idx % BV] = src.load_v(t0 + idx / BV, idx % BV);
      __syncthreads();
      for (int i = 0; i < n; ++i) {
        step(sm, i);
        sink(t0 + i, *this);
      }
      __syncthreads();
      for (int idx = threadIdx.x; idx < n * BV; idx += kThreads)
        tv.o[(int64_t)(t0 + idx / BV) * tv.so + idx % BV] = __float2bfloat16(sm.o[idx / BV][idx % BV]);
    }
  }
};

}  // namespace kda
