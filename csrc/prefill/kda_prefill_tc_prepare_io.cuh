// The tensor-core prepare pass's global-memory traffic (kda_prefill_tc_prepare.cuh): a chunk's
// q, k, g and beta loads (vector loads where every row is aligned, else 2-byte loads), kept raw
// until used, and the coalesced stores of its workspace record.
#pragma once

#include "kda_prefill_tc_common.cuh"

namespace kda {
namespace tc {

constexpr float kLog2e = 1.4426950408889634f;  // e^x = 2^(x kLog2e): the MUFU forms below

// sigmoid(z) = 1 / (1 + 2^(-z log2 e)) from MUFU ex2 and the approximate reciprocal (about 1e-7
// relative error), straight-line: as an IEEE division it was a range test, a branch around a slow
// path and a Newton step. A denominator of inf (or past 2^126) gives 0, the limit; 2^t below
// 2^-126 only meets 1 + it.
__device__ __forceinline__ float sigmoid_fast(float z) {
  return __fdividef(1.f, 1.f + ex2_ftz(-z * kLog2e));
}

// The decay a_t = exp(gate) of one channel, from the MUFU ex2 / lg2 approximations (about 1e-6
// relative error on a_t) instead of expf / log1pf, which took a third of the inputs phase's
// instructions. Kimi gate: exp(-a softplus(x)) = 2^(-a log2(1 + 2^(x log2 e))), softplus(x) = x
// beyond 15 (to fp32 precision, a select, no branch); bounded gate: exp(lb sigmoid(a x)). The
// gate is a template parameter so that the caller's loop has no per-element test of it.
template <bool kBounded>
__device__ __forceinline__ float decay_of_gate(float x, float a, float lower_bound) {
  float log2_decay;
  if constexpr (kBounded) {
    log2_decay = lower_bound * kLog2e * sigmoid_fast(a * x);
  } else {
    const float t = x * kLog2e;
    const float sp2 = x > 15.f ? t : __log2f(1.f + ex2_ftz(t));  // softplus(x) log2 e
    log2_decay = -a * sp2;
  }
  // A decay below 2^-126 comes out 0 instead of subnormal (exp2f's range test and two multiplies):
  // the state it meets is wiped to within 1e-38 either way.
  return ex2_ftz(log2_decay);
}

// Rows of `base` (row stride st elements) start `bytes`-aligned at every token.
__host__ __device__ __forceinline__ bool rows_aligned(const __nv_bfloat16* base, int64_t st, int bytes) {
  return reinterpret_cast<uintptr_t>(base) % bytes == 0 && (st * 2) % bytes == 0;
}

// Rows of every sequence and head start `bytes`-aligned.
__host__ __device__ __forceinline__ bool head_rows_aligned(const void* base, int64_t st, int64_t sh, int bytes) {
  return rows_aligned(static_cast<const __nv_bfloat16*>(base), st, bytes) && (sh * 2) % bytes == 0;
}

// q, k, g rows of every sequence and head start 8-byte aligned: a lane's 4 channels are one
// 8-byte load, which the prepare pass can keep in flight while it works on the previous chunk. The
// launcher then runs the prepare kernel built for aligned rows, which holds no 2-byte load path
// (with a runtime flag both paths' loads were issued, one set predicated off: four times the load
// instructions the inputs need).
__host__ __device__ __forceinline__ bool qkg_rows_aligned(const KdaPrefillParams& p) {
  return head_rows_aligned(p.q, p.q_st, p.q_sh, 8) && head_rows_aligned(p.k, p.k_st, p.k_sh, 8) &&
         head_rows_aligned(p.g, p.g_st, p.g_sh, 8);
}

// A chunk's q, k, g, beta as loaded (bf16), one warp per token t0 + warp + kPrepWarp m, 4 channels
// per lane from c4, zero past the end, and its head's dt_bias, A_log: kept raw so that the loads
// can be issued a chunk ahead and only waited for when unpacked. Row pointers stepped per token.
template <int kPer>
struct RawChunkInputs {
  uint2 q[kPer], k[kPer], g[kPer];
  __nv_bfloat16 beta[kPer];
  float4 dt_bias;  // the head's dt_bias at channels c4 .. c4+3
  float A_log;
};

template <int kPer>
__device__ __forceinline__ void issue_chunk_loads(const KdaPrefillParams& p, const TokenView& tv, int h, int t0,
                                                  int nt, int warp, int c4, bool vec, RawChunkInputs<kPer>& r) {
  // The head's gate parameters too: loaded when the item starts, they waited behind the previous
  // item's record stores until its decays needed them.
  const float* db = p.dt_bias + h * kHeadDim + c4;  // 4-byte loads: a view need not be 16-byte aligned
  r.dt_bias = make_float4(db[0], db[1], db[2], db[3]);
  r.A_log = p.A_log[h];
  const int64_t t = t0 + warp;
  const __nv_bfloat16 *qp = tv.q + t * p.q_st + c4, *kp = tv.k + t * p.k_st + c4;
  const __nv_bfloat16 *gp = tv.g + t * p.g_st + c4, *bp = tv.beta + t * p.beta_st;
#pragma unroll
  for (int m = 0; m < kPer; ++m) {
    if (warp + m * kPrepWarp < nt) {
      r.q[m] = ld_raw4(qp, vec);
      r.k[m] = ld_raw4(kp, vec);
      r.g[m] = ld_raw4(gp, vec);
      r.beta[m] = *bp;
    } else {
      r.q[m] = r.k[m] = r.g[m] = make_uint2(0u, 0u);
      r.beta[m] = __float2bfloat16(0.f);
    }
    qp += kPrepWarp * p.q_st; kp += kPrepWarp * p.k_st; gp += kPrepWarp * p.g_st; bp += kPrepWarp * p.beta_st;
  }
}

template <int kPer>
__device__ __forceinline__ void unpack_chunk_inputs(const RawChunkInputs<kPer>& r, float (&qv)[kPer][4],
                                                    float (&kv)[kPer][4], float (&gv)[kPer][4], float (&bv)[kPer]) {
#pragma unroll
  for (int m = 0; m < kPer; ++m) {
    const unsigned q[2] = {r.q[m].x, r.q[m].y}, k[2] = {r.k[m].x, r.k[m].y}, g[2] = {r.g[m].x, r.g[m].y};
    unpack_bf16(q, qv[m]);
    unpack_bf16(k, kv[m]);
    unpack_bf16(g, gv[m]);
    bv[m] = bf2f(r.beta[m]);
  }
}

// The first prepare work item (chunk slot item / H, head item % H) at or after `item`, stepping by
// `stride`, that has tokens to prepare, with its sequence n, chunk slot and head; `items` when
// none is left.
__device__ __forceinline__ int64_t next_prep_item(const KdaPrefillParams& p, const ItemDiv& div, int64_t item,
                                                  int64_t stride, int64_t items, int64_t base_tok, int& n,
                                                  int64_t& cslot, int& h) {
  for (; item < items; item += stride) {
    div.split(item, cslot, h);
    n = chunk_sequence(p, cslot, base_tok);
    const int64_t len = load_index(p.cu_seqlens, p.cu_seqlens_64, n + 1) - load_index(p.cu_seqlens, p.cu_seqlens_64, n);
    if ((cslot - chunk_base(p, n, base_tok)) * kC < len && p.slots[n] > 0) return item;
  }
  return items;
}

// A prepare work item as find_prep_item wrote it to shared memory: item (`items` when the CTA has
// none left), its chunk slot and head, its sequence's first token (from cu_seqlens[0]) and length,
// and the chunk's first token in the sequence.
struct PrepItem {
  int64_t item, cslot, bos;
  int h, len, t0;
};

// next_prep_item from `from`, with what the item's loads and stores need: one lane's global-memory
// lookups (dependent loads, and a binary search over the sequences), done while its warp has
// nothing else to wait for.
__device__ __forceinline__ PrepItem find_prep_item(const KdaPrefillParams& p, const ItemDiv& div, int64_t from,
                                                   int64_t stride, int64_t items, int64_t base_tok) {
  PrepItem e{};
  int n = 0;
  e.item = next_prep_item(p, div, from, stride, items, base_tok, n, e.cslot, e.h);
  if (e.item < items) {
    const int64_t b = load_index(p.cu_seqlens, p.cu_seqlens_64, n);
    e.bos = b - base_tok;
    e.len = (int)(load_index(p.cu_seqlens, p.cu_seqlens_64, n + 1) - b);
    e.t0 = (int)(e.cslot - chunk_base(p, n, base_tok)) * kC;
  }
  return e;
}

// T beta = T diag(beta), TF32-rounded as the state pass multiplies it, into the record: the
// diagonal blocks here, by threads `thread` of `threads` (16-byte pieces; T's diagonal blocks are
// final after 4a), the blocks below them by 4b as it forms them (t_beta_pair); those above are
// zero and never read, so not written. beta is 0 past the end.
template <class Smem>
__device__ __forceinline__ void store_t_beta_diagonal(Smem& sm, float* rec, int thread, int threads) {
  constexpr int kPer = kBlk * kBlk / 4;  // pieces per block
#pragma unroll 1
  for (int idx = thread; idx < kNB * kPer; idx += threads) {
    const int b = idx / kPer, i = b * kBlk + idx % kPer / (kBlk / 4), j = b * kBlk + idx % (kBlk / 4) * 4;
    const float4 t = *reinterpret_cast<const float4*>(&sm.r1.tu.T[i][j]);
    const float4 be = *reinterpret_cast<const float4*>(&sm.beta[j]);
    *reinterpret_cast<float4*>(rec + kRecTb + i * kC + j) =
        make_float4(tf32_round(t.x * be.x), tf32_round(t.y * be.y), tf32_round(t.z * be.z), tf32_round(t.w * be.w));
  }
}

// Two entries T[i][j], T[i][j + 1] (TF32-rounded) times beta_j, beta_j+1 into the record.
__device__ __forceinline__ void t_beta_pair(float* rec, int i, int j, float t0, float t1, float2 be) {
  *reinterpret_cast<float2*>(rec + kRecTb + i * kC + j) = make_float2(tf32_round(t0 * be.x), tf32_round(t1 * be.y));
}

// A [64 x cols] shared fp32 array (row pitch ld) to an fp16 record field, coalesced, by threads
// `thread` of `threads`; with `scale` ([kNB x cols], row = the token's block) times scale first.
// A thread takes 4 values at column c and 4 at c + cols / 2 (two 8-byte stores): the lanes of a
// row then read consecutive 16-byte pieces, where 8 consecutive values per thread (one 16-byte
// store) put the lanes 32 bytes apart and doubled the shared-memory wavefronts of these reads
// (ncu at 61086cc).
template <bool kUnbump = false>  // src holds tf32_bump'ed values
__device__ __forceinline__ void store_rows_half(__half* dst, const float* src, int ld, int cols, const float* scale,
                                                int thread, int threads) {
  const int per_row = cols / 8, half = cols / 2;
#pragma unroll 1
  for (int idx = thread; idx < kC * per_row; idx += threads) {
    const int i = idx / per_row, c = idx % per_row * 4;
    float4 a = *reinterpret_cast<const float4*>(src + i * ld + c);
    float4 b = *reinterpret_cast<const float4*>(src + i * ld + c + half);
    if constexpr (kUnbump) {
      a = make_float4(tf32_unbump(a.x), tf32_unbump(a.y), tf32_unbump(a.z), tf32_unbump(a.w));
      b = make_float4(tf32_unbump(b.x), tf32_unbump(b.y), tf32_unbump(b.z), tf32_unbump(b.w));
    }
    if (scale) {
      const float4 sa = *reinterpret_cast<const float4*>(scale + i / kBlk * cols + c);
      const float4 sb = *reinterpret_cast<const float4*>(scale + i / kBlk * cols + c + half);
      a = make_float4(a.x * sa.x, a.y * sa.y, a.z * sa.z, a.w * sa.w);
      b = make_float4(b.x * sb.x, b.y * sb.y, b.z * sb.z, b.w * sb.w);
    }
    *reinterpret_cast<uint2*>(dst + i * cols + c) = make_uint2(half2_bits(a.x, a.y), half2_bits(a.z, a.w));
    *reinterpret_cast<uint2*>(dst + i * cols + c + half) = make_uint2(half2_bits(b.x, b.y), half2_bits(b.z, b.w));
  }
}

// The same for Kd^T (kKdChannelMajor): a [64 x 128] shared fp32 array (row pitch ld) times scale
// ([kNB x 128], row = the token's block) to an fp16 record field stored channel-major, [128 x 64].
// A thread takes 8 tokens of one channel (consecutive threads on consecutive channels, so the
// shared reads hit distinct banks) and stores them as one 16-byte piece.
__device__ __forceinline__ void store_cols_half(__half* dst, const float* src, int ld, const float* scale, int thread,
                                                int threads) {
#pragma unroll 1
  for (int idx = thread; idx < kK * kC / 8; idx += threads) {
    const int c = idx % kK, i0 = idx / kK * 8;
    const float sc = scale[i0 / kBlk * kK + c];
    float v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = src[(i0 + e) * ld + c] * sc;
    *reinterpret_cast<uint4*>(dst + c * kC + i0) =
        make_uint4(half2_bits(v[0], v[1]), half2_bits(v[2], v[3]), half2_bits(v[4], v[5]), half2_bits(v[6], v[7]));
  }
}

}  // namespace tc
}  // namespace kda
