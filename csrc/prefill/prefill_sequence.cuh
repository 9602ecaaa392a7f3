// Where one prefill CTA's (sequence n, head h, value rows from v0) lives in a KdaPrefillParams
// call: its token inputs and output, its pool rows and its checkpoint rows. Shared by the
// token-serial and both chunked prefill kernels.
#pragma once

#include "../common/kda_recurrent.cuh"
#include "kda_prefill.h"

namespace kda {

// q, k, g, beta of the sequence whose first token is row bos (counted from cu_seqlens[0]) and
// which has len tokens; v and o at value row v0.
__device__ __forceinline__ TokenView prefill_tokens_at(const KdaPrefillParams& p, int64_t bos, int len, int h,
                                                       int v0) {
  auto bf = [](const void* x) { return static_cast<const __nv_bfloat16*>(x); };
  TokenView tv;
  tv.q = bf(p.q) + bos * p.q_st + h * p.q_sh;
  tv.k = bf(p.k) + bos * p.k_st + h * p.k_sh;
  tv.g = bf(p.g) + bos * p.g_st + h * p.g_sh;
  tv.v = bf(p.v) + bos * p.v_st + h * p.v_sh + v0;
  tv.beta = bf(p.beta) + bos * p.beta_st + h * p.beta_sh;
  tv.sq = p.q_st; tv.sk = p.k_st; tv.sg = p.g_st; tv.sv = p.v_st; tv.sb = p.beta_st;
  tv.o = static_cast<__nv_bfloat16*>(p.o) + bos * p.o_st + h * p.o_sh + v0;
  tv.so = p.o_st;
  tv.len = len;
  return tv;
}

// The same for sequence n, from cu_seqlens.
__device__ __forceinline__ TokenView prefill_tokens(const KdaPrefillParams& p, int n, int h, int v0) {
  const int64_t base = load_index(p.cu_seqlens, p.cu_seqlens_64, 0);
  const int64_t bos = load_index(p.cu_seqlens, p.cu_seqlens_64, n) - base;
  const int64_t eos = load_index(p.cu_seqlens, p.cu_seqlens_64, n + 1) - base;
  return prefill_tokens_at(p, bos, (int)(eos - bos), h, v0);
}

// A null slot (<= 0): zero output, no state access; true when the CTA is done.
template <int BV, int NT = kThreads>
__device__ __forceinline__ bool prefill_null_slot(const KdaPrefillParams& p, const TokenView& tv, int n) {
  if (p.slots[n] > 0) return false;
  zero_output<BV, NT>(tv);
  return true;
}

// Rows v0.. of head h in pool slot `slot`.
template <typename StateT>
__device__ __forceinline__ StateT* prefill_state_rows(const KdaPrefillParams& p, int slot, int h, int v0) {
  return static_cast<StateT*>(p.state) + (int64_t)slot * p.state_ss + ((int64_t)h * kHeadDim + v0) * kHeadDim;
}

// The same rows in sequence n's first checkpoint, or nullptr when no checkpoints are asked for.
template <typename StateT>
__device__ __forceinline__ StateT* prefill_checkpoint_rows(const KdaPrefillParams& p, int n, int h, int v0) {
  if (!p.inter) return nullptr;
  return static_cast<StateT*>(p.inter) + load_index(p.inter_offsets, p.inter_offsets_64, n) * p.inter_ss +
         ((int64_t)h * kHeadDim + v0) * kHeadDim;
}

}  // namespace kda
