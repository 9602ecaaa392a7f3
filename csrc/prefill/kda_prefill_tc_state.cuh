// Tensor-core chunked prefill, pass 2 of 2: the serial part. One CTA per (sequence, head, block
// of BV = 128, 64 or 32 value rows), 8 warps; the launcher picks BV. Per 64-token chunk it reads
// the record the prepare pass wrote (kda_prefill_tc_prepare.cuh; Qe, w, Kd, A_qk in fp16, which
// convert exactly to TF32 operands) and computes, on TF32 tensor cores (mma.sync m16n8k8) with
// fp32 accumulation,
//   U = u - w S^T;  O = Qe S^T + A_qk U;  S <- S diag(EL) + U^T Kd
// The fp32 state stays in registers, as the accumulator fragments of the update: warp (vt, q)
// holds value rows vt*16 .. vt*16+15 and channels q*kCW .. q*kCW+kCW-1, where the kNCW warps of a
// value tile split the channels. A held tile is also, with the contraction index permuted, the A
// fragment of S W^T and S Qe^T, so those products read only W and Qe from shared memory. Each
// warp's products over its channels are partial sums; the value tile's warps hand each other the
// partials of the token tiles the other completes (U, then O). The record is double-buffered: the
// next chunk's is copied in (cp.async) from the start of this one, so its loads have a whole chunk
// step to arrive. One CTA per SM either way (over 128 registers a thread), so the second buffer
// costs no occupancy.
#pragma once

#include "kda_prefill_tc_common.cuh"
#include "kda_prefill_tc_units.cuh"

namespace kda {
namespace tc {

// Row pitches (in fp16 elements) of the fp16 record arrays in shared memory: rows 4 banks apart,
// so that the 4-byte loads of S W^T's B fragments (8 rows x 4 words per warp), the 2-byte loads of
// Kd's (4 rows x 8 elements) and of A_qk's (8 rows x 4 elements) hit distinct banks (or share a
// word).
constexpr int kLdR = kK + 8;
constexpr int kLdA = kC + 8;

template <int BV>
struct StateTiling {
  static constexpr int kVT = BV / 16;           // 16-row value tiles
  static constexpr int kNCW = kWarp / kVT;      // warps per value tile
  static constexpr int kCW = kK / kNCW;         // channels of the state a warp holds
  static constexpr int kSN = kCW / 8;           // its 8-channel state tiles
  static constexpr int kTN = kC / 8 / kNCW;     // 8-token tiles of U and O a warp completes
  static constexpr int kSlots = kC / 8 - kTN;   // partial tiles it hands to its value tile's other warps
  static constexpr int kLdU = BV + 8;           // U rows 8 banks apart, like kLdR
  static_assert(kVT * kNCW == kWarp && kTN >= 1, "BV = 128, 64 or 32");
};

template <int BV>
struct alignas(128) StateSmem {
  using G = StateTiling<BV>;
  struct Record {  // chunk j's in rec[j % 2]
    __half Qe[kC][kLdR];
    __half W[kC][kLdR];  // w = T beta Ke
    __half Kd[kC][kLdR];
    float U[kC][G::kLdU];  // u (this CTA's value rows), then U = u - w S^T as TF32
    __half Aqk[kC][kLdA];
    float EL[kK];
  } rec[2];
  float4 xch[kWarp][G::kSlots > 0 ? G::kSlots : 1][2][32];  // partial (w S^T, Qe S^T) tiles, per lane
};

// An fp16 [64 x cols] record field into shared rows of pitch ld (copied as 4-byte pairs).
__device__ __forceinline__ void copy_half_rows_async(__half* dst, int ld, const float* rec, int field, int cols) {
  copy_rows_async(reinterpret_cast<float*>(dst), ld / 2, rec + field, cols / 2, kC, cols / 2);
}

// A chunk's record into one buffer: w, Kd, EL, this CTA's columns of u (none for transition rows,
// whose u is 0) and, for a CTA that writes outputs, Qe and A_qk.
template <int BV>
__device__ __forceinline__ void load_record(typename StateSmem<BV>::Record& r, const float* rec, int v0, bool outp,
                                            bool with_u) {
  if (outp) copy_half_rows_async(&r.Qe[0][0], kLdR, rec, kRecQe, kK);
  copy_half_rows_async(&r.W[0][0], kLdR, rec, kRecW, kK);
  copy_half_rows_async(&r.Kd[0][0], kLdR, rec, kRecKd, kK);
  if (with_u) copy_rows_async(&r.U[0][0], StateTiling<BV>::kLdU, rec + kRecU + v0, kK, kC, BV);
  if (outp) copy_half_rows_async(&r.Aqk[0][0], kLdA, rec, kRecAqk, kC);
  copy_rows_async(&r.EL[0], kK, rec + kRecEL, kK, 1, kK);
}

// An fp16 operand as the TF32 bits of the same value (exact: fp16's mantissa is TF32's).
__device__ __forceinline__ uint32_t tf32_of(__half x) { return __float_as_uint(__half2float(x)); }

// A warp's state tiles from / to state rows (row pitch 128): s[j] = S[vr][c], S[vr][c+1],
// S[vr+8][c], S[vr+8][c+1] with c = c0 + 8j (the accumulator layout of mma_tf32).
template <int SN, typename StateT>
__device__ __forceinline__ void load_state_tiles(const StateT* rows, int vr, int c0, float (&s)[SN][4]) {
#pragma unroll
  for (int j = 0; j < SN; ++j) {
    StateIO<StateT>::load2(rows + vr * kK + c0 + 8 * j, s[j][0], s[j][1]);
    StateIO<StateT>::load2(rows + (vr + 8) * kK + c0 + 8 * j, s[j][2], s[j][3]);
  }
}
template <int SN, typename StateT>
__device__ __forceinline__ void store_state_tiles(StateT* rows, int vr, int c0, const float (&s)[SN][4]) {
#pragma unroll
  for (int j = 0; j < SN; ++j) {
    StateIO<StateT>::store2(rows + vr * kK + c0 + 8 * j, s[j][0], s[j][1]);
    StateIO<StateT>::store2(rows + (vr + 8) * kK + c0 + 8 * j, s[j][2], s[j][3]);
  }
}

}  // namespace tc

// grid = (V / BV, H, N), tc::kThr threads, dynamic smem sizeof(tc::StateSmem<BV>); runs after
// kda_prefill_tc_prepare_kernel on the same stream. kSplit (a split call, p.tc_units): grid.z counts
// units from p.tc_unit_first and grid.x covers the transition rows too (2 V / BV; tc_units.cuh).
template <int BV, typename StateT, bool kSplit>
__global__ void __launch_bounds__(tc::kThr, 1) kda_prefill_tc_state_kernel(const KdaPrefillParams p) {
  using namespace tc;
  using G = StateTiling<BV>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  StateSmem<BV>& sm = *reinterpret_cast<StateSmem<BV>*>(smem_raw);
  const int h = blockIdx.y;
  StateUnit unit;
  if (!state_unit<kSplit>(p, blockIdx.x * BV, blockIdx.z, unit)) return;
  const int v0 = unit.v0, n = unit.n;
  const bool outp = unit.flags & kUnitOut;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  TokenView tv = prefill_tokens(p, n, h, v0);
  unit_tokens(tv, unit);
  const int len = tv.len;
  if (p.slots[n] <= 0) {  // null slot: zero output (once per token: only units with outputs)
    if (outp) zero_output<BV, kThr>(tv);
    return;
  }
  const int slot = p.slots[n];
  StateT* dst = prefill_state_rows<StateT>(p, slot, h, v0);
  StateT* ckpt = kSplit ? nullptr : prefill_checkpoint_rows<StateT>(p, n, h, v0);
  const int64_t cbase = chunk_base(p, n, load_index(p.cu_seqlens, p.cu_seqlens_64, 0)) + unit.chunk0;

  const int vt = warp / G::kNCW, q = warp % G::kNCW;
  const int vr = vt * 16 + g;                 // value rows vr and vr + 8 of this lane's fragments
  const int cw0 = q * G::kCW;                 // first channel of this warp's state tiles
  const int cs = cw0 + 2 * t4;                // channel of s[j][0], less 8j
  float s[G::kSN][4];
  if (unit.transition) {  // the identity: row v0 + vr (+ 8) has its 1 in that channel
#pragma unroll
    for (int j = 0; j < G::kSN; ++j) {
      const int c = cs + 8 * j, r = v0 + vr;
      s[j][0] = r == c; s[j][1] = r == c + 1; s[j][2] = r + 8 == c; s[j][3] = r + 8 == c + 1;
    }
  } else if (unit.flags & kUnitInitEntry) {
    load_state_tiles(entry_rows(p, unit.entry_in, h, v0), vr, cs, s);
  } else if ((unit.flags & kUnitInitPool) && p.has_initial_state[n]) {
    load_state_tiles(dst, vr, cs, s);
  } else {
#pragma unroll
    for (int j = 0; j < G::kSN; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
  }
  if (len > 0) load_record<BV>(sm.rec[0], chunk_record(p, cbase, h), v0, outp, !unit.transition);
  cp_async_wait_all();
  __syncthreads();

  KDA_TC_PROFILE_BEGIN();
  for (int t0 = 0, j = 0; t0 < len; t0 += kC, ++j) {
    const int nt = min(kC, len - t0);
    auto& rs = sm.rec[j & 1];
    // The next chunk's record into the other buffer, whose last reads (step 3) were before the
    // previous chunk's final barrier; waited for at this chunk's end.
    if (t0 + kC < len)
      load_record<BV>(sm.rec[(j + 1) & 1], chunk_record(p, cbase + j + 1, h), v0, outp, !unit.transition);

    // 1. Partial X^T = S W^T and Y^T = S Qe^T over this warp's channels, [16 value rows x 64
    //    tokens] as 8 token tiles. A = the state tile, its channels 2t, 2t+1 as k-slots t, t+4;
    //    B = 2 adjacent channels of W / Qe (fp16 pairs from the prepare pass).
    float x[8][4], y[8][4];
#pragma unroll
    for (int jt = 0; jt < 8; ++jt)
#pragma unroll
      for (int e = 0; e < 4; ++e) x[jt][e] = y[jt][e] = 0.f;
#pragma unroll
    for (int js = 0; js < G::kSN; ++js) {
      const uint32_t a[4] = {to_tf32(s[js][0]), to_tf32(s[js][2]), to_tf32(s[js][1]), to_tf32(s[js][3])};
      const int c = cs + 8 * js;
#pragma unroll
      for (int jt = 0; jt < 8; ++jt) {
        const float2 bw = __half22float2(*reinterpret_cast<const __half2*>(&rs.W[8 * jt + g][c]));
        mma_tf32(x[jt], a, __float_as_uint(bw.x), __float_as_uint(bw.y));
      }
      if (outp) {
#pragma unroll
        for (int jt = 0; jt < 8; ++jt) {
          const float2 bq = __half22float2(*reinterpret_cast<const __half2*>(&rs.Qe[8 * jt + g][c]));
          mma_tf32(y[jt], a, __float_as_uint(bq.x), __float_as_uint(bq.y));
        }
      }
    }
    // Token tile jt is completed by warp jt / kTN of the value tile; the others hand it their
    // partials, in slots that skip their own tiles.
    if constexpr (G::kNCW > 1) {
#pragma unroll
      for (int jt = 0; jt < 8; ++jt) {
        const int owner = jt / G::kTN;
        if (owner == q) continue;
        const int slot = owner < q ? jt : jt - G::kTN;
        sm.xch[warp][slot][0][lane] = make_float4(x[jt][0], x[jt][1], x[jt][2], x[jt][3]);
        if (outp) sm.xch[warp][slot][1][lane] = make_float4(y[jt][0], y[jt][1], y[jt][2], y[jt][3]);
      }
    }
    __syncthreads();  // partials in
    KDA_TC_MARK(kPrepPhases);

    // 2. Own token tiles: the value tile's partials summed (in warp order), then U = u - X in
    //    place of u, rounded to TF32 for its two products.
#pragma unroll
    for (int jt = 0; jt < 8; ++jt) {
      if (jt / G::kTN != q) continue;
      if constexpr (G::kNCW > 1) {
#pragma unroll
        for (int q2 = 0; q2 < G::kNCW; ++q2) {
          if (q2 == q) continue;
          const int slot = q < q2 ? jt : jt - G::kTN;
          const float4 px = sm.xch[vt * G::kNCW + q2][slot][0][lane];
          x[jt][0] += px.x; x[jt][1] += px.y; x[jt][2] += px.z; x[jt][3] += px.w;
          if (outp) {
            const float4 py = sm.xch[vt * G::kNCW + q2][slot][1][lane];
            y[jt][0] += py.x; y[jt][1] += py.y; y[jt][2] += py.z; y[jt][3] += py.w;
          }
        }
      }
      float* u0 = &rs.U[8 * jt + 2 * t4][vr];  // x[jt] = X^T[vr][t], [vr][t+1], [vr+8][t], [vr+8][t+1]
      float* u1 = u0 + G::kLdU;
      const bool zu = unit.transition;  // u = 0 (not loaded)
      u0[0] = tf32_round((zu ? 0.f : u0[0]) - x[jt][0]);
      u1[0] = tf32_round((zu ? 0.f : u1[0]) - x[jt][1]);
      u0[8] = tf32_round((zu ? 0.f : u0[8]) - x[jt][2]);
      u1[8] = tf32_round((zu ? 0.f : u1[8]) - x[jt][3]);
    }
    __syncthreads();  // U complete
    KDA_TC_MARK(kPrepPhases + 1);

    // 3. With A = U^T [16 value rows x 8 tokens] per token step ks: O^T += U^T A_qk^T on the own
    //    token tiles (A_qk is 0 above the diagonal: tiles jt >= ks only), and the state update
    //    S <- S diag(EL) + U^T Kd on the warp's state tiles.
#pragma unroll
    for (int js = 0; js < G::kSN; ++js) {
      const float2 el = *reinterpret_cast<const float2*>(&rs.EL[cs + 8 * js]);
      s[js][0] *= el.x; s[js][1] *= el.y; s[js][2] *= el.x; s[js][3] *= el.y;
    }
#pragma unroll
    for (int ks = 0; ks < 8; ++ks) {
      const float* ur = &rs.U[8 * ks + t4][vt * 16 + g];
      const uint32_t a[4] = {__float_as_uint(ur[0]), __float_as_uint(ur[8]), __float_as_uint(ur[4 * G::kLdU]),
                             __float_as_uint(ur[4 * G::kLdU + 8])};
      if (outp) {
#pragma unroll
        for (int jt = ks; jt < 8; ++jt) {
          if (jt / G::kTN != q) continue;
          const __half* ar = &rs.Aqk[8 * jt + g][8 * ks + t4];
          mma_tf32(y[jt], a, tf32_of(ar[0]), tf32_of(ar[4]));
        }
      }
#pragma unroll
      for (int js = 0; js < G::kSN; ++js) {
        const __half* kr = &rs.Kd[8 * ks + t4][cw0 + 8 * js + g];
        mma_tf32(s[js], a, tf32_of(kr[0]), tf32_of(kr[4 * kLdR]));
      }
    }
#pragma unroll
    for (int jt = 0; jt < 8; ++jt) {
      if (!outp || jt / G::kTN != q) continue;
      const int t = 8 * jt + 2 * t4;  // y[jt] = O^T[vr][t], [vr][t+1], [vr+8][t], [vr+8][t+1]
      __nv_bfloat16* o = tv.o + (int64_t)(t0 + t) * p.o_st + vr;
      if (t < nt) { o[0] = __float2bfloat16(y[jt][0]); o[8] = __float2bfloat16(y[jt][2]); }
      if (t + 1 < nt) { o[p.o_st] = __float2bfloat16(y[jt][1]); o[p.o_st + 8] = __float2bfloat16(y[jt][3]); }
    }
    const int tend = t0 + nt;
    if (ckpt && tend % kCheckpointEvery == 0)
      store_state_tiles(ckpt + (int64_t)(tend / kCheckpointEvery - 1) * p.inter_ss, vr, cs, s);
    cp_async_wait_all();  // the next chunk's record (this thread's copies)
    __syncthreads();      // this chunk's buffer free for the one after; the next chunk's record visible
    KDA_TC_MARK(kPrepPhases + 2);
  }
  // Final state (the initial one, or zeros, for an empty sequence).
  if (unit.flags & kUnitFinalPool) store_state_tiles(dst, vr, cs, s);
  if (unit.flags & kUnitFinalEntry) store_state_tiles(entry_rows(p, unit.entry_out, h, blockIdx.x * BV), vr, cs, s);
  KDA_TC_PROFILE_END();
}

}  // namespace kda
