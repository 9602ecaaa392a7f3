// Tensor-core chunked prefill, pass 1 of 2: everything of a 64-token chunk that does not depend
// on the state, for all chunks of all sequences at once. A work item is a (chunk slot, head), one
// CTA of kPrepWarp (16) warps per SM walks items; an item reads the chunk's q, k, g, beta once
// and writes one workspace record (kda_prefill_tc_common.cuh): Qe, Kd, A_qk, the chunk's total
// decay EL, T beta = T diag(beta) and Ke (kWy false) or the WY factor w = T beta Ke (kWy), so that
// the serial state pass (kda_prefill_tc_state.cuh) is left with U = T beta (v - Ke S^T), or
// U = T beta v - w S^T, then O = Qe S^T + A_qk U and S <- S diag(EL) + U^T Kd.
//
// With a_t = exp(g_t) <= 1 per channel, Ploc/Rloc the forward/backward running products of a_t
// inside a 16-token block, Ptot the block totals and pre_I / post_J the products of the totals
// before block I / after block J:
//   Qr = q Ploc, Kq = k Ploc, Kb = k Rloc                              (factors <= 1)
//   A_qk, A_kk off-diagonal block (I, J<I) = [Qr_I; Kq_I] . (Kb_J * prod_{J<M<I} Ptot_M)^T
//   A_qk, A_kk diagonal block I = (Qr_I s_I) . (Kb_I s_I)^T, s = Ptot_I^-1/2 per channel, on
//     tensor cores where every channel's Ptot_I >= 2^-120 (both factors within 2^+-60, so each
//     product keeps its relative precision), else exact on CUDA cores with running products
//     E_ij = prod a_t. Such a block's Qr, Kq, Kb are kept times s (2c) and the factors that
//     meet them (3b's multipliers, pre, post) times 1 / s.
//   T = (I + beta A_kk)^-1 (fp32, blocked forward substitution; beta folded into A_kk's stores)
//   Qe = Qr pre, Ke = Kq pre, Kd = Kb post (applied as they are stored / used), EL = prod Ptot
// Every decay factor is a product of values <= 1, so no gate, bounded or not, overflows.
// kda_serving/ops/tensorcore_mirror.py is this algorithm in torch; docs/kernels.md derives it.
#pragma once

#include <limits>
#include <type_traits>

#include "kda_prefill_tc_common.cuh"
#include "kda_prefill_tc_prepare_io.cuh"
#include "kda_prefill_tc_wy.cuh"

namespace kda {
namespace tc {

struct alignas(128) PrepSmem {
  float Qr[kC][kLdK];  // q Ploc (stored as Qe = Qr pre)
  float Kq[kC][kLdK];  // k Ploc
  float Kb[kC][kLdK];  // k Rloc (stored as Kd = Kb post), then (kWy) beta Ke (6a, kda_prefill_tc_wy.cuh)
  union {
    float al[kC][kK];  // a_t, until the decayed operands are built (2c)
    struct {
      float T[kC][kLdC];  // (I + beta A_kk)^-1
      float X[kC][kLdC];  // 4b: warp J's X tile in rows 16 J .. 16 J + 15
    } tu;
  } r1;
  float Aqk[kC][kLdC];
  float Akk[kC][kLdC];
  float Ptot[kNB][kK];
  float pre[kNB][kK];
  float post[kNB][kK];
  float isc[kNB][kK];  // 1 / s: Ptot^1/2 for a block on the diagonal fast path, else 1
  // 3b's job (I, J < I), per channel: (1 / s_J, prod_{J<M<I} Ptot_M / s_I), one 8-byte load.
  float2 jm[kNB * (kNB - 1) / 2][kK];
  float EL[kK];
  float beta[kC];
  float dqk[kC];  // q_i . k_i (scale in q) in fp32: A_qk's diagonal entries on the fast path
  PrepItem items[2];  // item j of the CTA's walk in items[j % 2] (the lookup lane writes j + 2 in 3b)
};

// Diagonal blocks whose decay over the block is at least this in every channel run on tensor
// cores, each channel's operands scaled by s = Ptot^-1/2 <= 2^60: q Ploc_i s and k Rloc_j s lie
// within 2^+-60 (times |q|, |k| <= 1), so neither overflows nor loses its relative precision, and
// even the masked entries above the diagonal (at most 2^120) stay finite. A bounded gate's block
// (16 tokens of at least e^-5) always qualifies.
constexpr float kDiagTcMin = 0x1p-120f;

// s = Ptot^-1/2 for a channel of a block on the diagonal fast path, else 1; and 1 / s = Ptot s.
// 2b and 2c each take them from Ptot (no barrier between them to share one).
__device__ __forceinline__ float diag_scale(float ptot, bool fast) { return fast ? rsqrtf(ptot) : 1.f; }
__device__ __forceinline__ float diag_unscale(float ptot, bool fast) { return fast ? ptot * rsqrtf(ptot) : 1.f; }

// Bit b set: block b's diagonal block runs on tensor cores (every channel's Ptot[b] >= kDiagTcMin).
// The same value in every lane (one warp vote per block); lane L reads channels 4L .. 4L+3.
__device__ __forceinline__ unsigned diag_tc_mask(const float (&Ptot)[kNB][kK], int lane) {
  unsigned mask = 0;
#pragma unroll
  for (int b = 0; b < kNB; ++b) {
    const float4 p = *reinterpret_cast<const float4*>(&Ptot[b][lane * 4]);
    const bool ok = p.x >= kDiagTcMin && p.y >= kDiagTcMin && p.z >= kDiagTcMin && p.w >= kDiagTcMin;
    mask |= (__all_sync(0xffffffffu, ok) ? 1u : 0u) << b;
  }
  return mask;
}

// 3b's off-diagonal job -> block (I, J < I): (1,0) (2,0) (2,1) (3,0) (3,1) (3,2), the order of 2b's
// multiplier table sm.jm.
__device__ __forceinline__ void off_diag_block(int job, int& I, int& J) {
  I = 1;
  J = job;
  while (J >= I) { J -= I; ++I; }
}

}  // namespace tc

// Persistent: grid = min(work items, SMs), tc::kPrepThr threads, dynamic smem sizeof(tc::PrepSmem);
// CTA b takes work items b, b + grid, ... (item = chunk slot * H + head). Slots past a sequence's
// chunks, and sequences with a null slot, have nothing to do. The next item's q, k, g, beta loads
// are issued as soon as this item's are unpacked, so their latency overlaps this item's work
// instead of stalling the CTA (one per SM); that takes 8-byte aligned rows (qkg_rows_aligned),
// else the 2-byte loads wait where they are issued.
// kAligned: every q, k, g row 8-byte aligned (qkg_rows_aligned, checked by the launcher), so only
// vector loads are built; else each sequence's rows are checked here.
// kWy: the record's kRecKw field takes w = T beta Ke (state CTAs of 64 or 32 rows) instead of Ke.
template <bool kAligned, bool kWy>
__global__ void __launch_bounds__(tc::kPrepThr, 1) kda_prefill_tc_prepare_kernel(const KdaPrefillParams p) {
  using namespace tc;
  constexpr int kPer = kC / kPrepWarp;  // tokens per warp in the per-token passes
  constexpr int kGroups = kPrepThr / kK;  // thread groups of the per-channel passes
  constexpr int kBPG = kNB / kGroups;     // blocks per group
  extern __shared__ __align__(128) unsigned char smem_raw[];
  PrepSmem& sm = *reinterpret_cast<PrepSmem*>(smem_raw);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  if (p.N == 0) return;
  const int64_t base_tok = load_index(p.cu_seqlens, p.cu_seqlens_64, 0);
  const int64_t items = p.tc_chunk_slots * p.H, stride = grid_ctas();
  const int ch = tid % kK;          // channel of this thread in the per-channel passes
  const int grp = tid / kK;         // which kBPG blocks of the chunk it walks
  const int c4 = lane * 4;          // first of the 4 channels of this lane in the per-token passes
  const bool vec = kAligned || qkg_rows_aligned(p);
  // Phase 3b's warps 0 .. kStoreWarps - 1 run only off-diagonal units, about half the work of a
  // diagonal one: they also store the record's Qe and Kd there (3b).
  constexpr int kStoreWarps = kPrepWarp - kNB;
  // The CTA's items, looked up by one lane (kLookup) two items ahead into shared memory: item j
  // in sm.items[j % 2], item j + 2 found in phase 3b of item j (after the reads of item j's entry,
  // in a warp with time to spare there), so no other warp waits for a lookup.
  const ItemDiv div(p.H);
  constexpr int kLookup = (kStoreWarps - 1) * 32;
  if (tid == kLookup) {
    sm.items[0] = find_prep_item(p, div, blockIdx.x, stride, items, base_tok);
    sm.items[1] = find_prep_item(p, div, sm.items[0].item + stride, stride, items, base_tok);
  }
  __syncthreads();
  RawChunkInputs<kPer> raw;
  auto issue_item_loads = [&](const PrepItem& e) {  // item e's q, k, g, beta (none when e is past the end)
    if (e.item < items)
      issue_chunk_loads(p, prefill_tokens_at(p, e.bos, e.len, e.h, 0), e.h, e.t0, min(kC, e.len - e.t0), warp, c4,
                        vec, raw);
  };
  issue_item_loads(sm.items[0]);

  KDA_TC_PROFILE_BEGIN();
  for (int it = 0;; ++it) {
    const PrepItem cur = sm.items[it & 1];
    if (cur.item >= items) break;
    const int64_t cslot = cur.cslot;
    const int h = cur.h, t0 = cur.t0;
    const TokenView tv = prefill_tokens_at(p, cur.bos, cur.len, h, 0);
    const int nt = min(kC, tv.len - t0);
    const float a_h = expf(raw.A_log);
    const float dtb4[4] = {raw.dt_bias.x, raw.dt_bias.y, raw.dt_bias.z, raw.dt_bias.w};

    // 1. The chunk's inputs into shared memory, read from global memory once: q, k L2-normalised
    //    and not yet decayed in Qr, Kq; the per-token decays a_t in al (1 past the end); beta.
    //    One warp per token, 4 channels per lane. (a) The raw values, loaded one item ahead (with
    //    unaligned rows the 2-byte loads wait there), are unpacked; the 16 squared norms of the
    //    warp's 8 tokens are reduced together (one reduce-scatter, RowReduce, instead of 16
    //    dependent 5-shuffle sums) and q, k go to shared memory normalised, beta through its
    //    sigmoid. (b) Gates one token at a time in a loop that is not unrolled (unrolled, this pass
    //    was once half of the kernel's machine code, docs/kernels.md). Each lane reads back only
    //    what it wrote.
    {
      float qv[kPer][4], kv[kPer][4], gv[kPer][4], bv[kPer];
      unpack_chunk_inputs(raw, qv, kv, gv, bv);
      float part[2 * kPer];  // [m]: |q_m|^2 of this lane's channels, [kPer + m]: |k_m|^2
#pragma unroll
      for (int m = 0; m < kPer; ++m) {
        part[m] = qv[m][0] * qv[m][0] + qv[m][1] * qv[m][1] + qv[m][2] * qv[m][2] + qv[m][3] * qv[m][3];
        part[kPer + m] = kv[m][0] * kv[m][0] + kv[m][1] * kv[m][1] + kv[m][2] * kv[m][2] + kv[m][3] * kv[m][3];
      }
      // Lane m < kPer: beta of token warp + kPrepWarp m (0 past the end), one sigmoid per warp
      // instead of one per token in lane 0.
      float braw = bv[0];
#pragma unroll
      for (int m = 1; m < kPer; ++m) braw = lane == m ? bv[m] : braw;
      const int bi = warp + kPrepWarp * lane;
      const float bsig = bi < nt ? sigmoid_fast(braw) : 0.f;
      const int row = row_of_lane<2 * kPer>(lane);  // the norm this lane completes
      const float inv = rsqrtf(RowReduce<2 * kPer, 16>::run(part, lane) + 1e-6f) * (row < kPer ? p.scale : 1.f);
      // The previous item's last reads of the shared arrays (6b) are done before these writes; a
      // warp that finished 6b early has unpacked and reduced meanwhile.
      __syncthreads();
#pragma unroll
      for (int m = 0; m < kPer; ++m) {
        const int i = warp + m * kPrepWarp;
        const float rq = __shfl_sync(0xffffffffu, inv, lane_of_row<2 * kPer>(m));
        const float rk = __shfl_sync(0xffffffffu, inv, lane_of_row<2 * kPer>(kPer + m));
        *reinterpret_cast<float4*>(&sm.Qr[i][c4]) =
            make_float4(qv[m][0] * rq, qv[m][1] * rq, qv[m][2] * rq, qv[m][3] * rq);
        *reinterpret_cast<float4*>(&sm.Kq[i][c4]) =
            make_float4(kv[m][0] * rk, kv[m][1] * rk, kv[m][2] * rk, kv[m][3] * rk);
        *reinterpret_cast<float4*>(&sm.r1.al[i][c4]) = make_float4(gv[m][0], gv[m][1], gv[m][2], gv[m][3]);
      }
      if (lane < kPer) sm.beta[bi] = bsig;
      KDA_TC_MARK(0);  // the profile build's thread 0 only: no barrier at these two marks
      issue_item_loads(sm.items[(it + 1) & 1]);
      KDA_TC_MARK(1);
      // The gate's form and a token's liveness are the same in every lane: tested per token, not
      // per element.
      auto decays = [&](auto bounded) {
#pragma unroll 1
        for (int m = 0; m < kPer; ++m) {
          const int i = warp + m * kPrepWarp;
          float4 a4 = make_float4(1.f, 1.f, 1.f, 1.f);  // past the end: no decay
          if (i < nt) {
            const float4 g4 = *reinterpret_cast<const float4*>(&sm.r1.al[i][c4]);
            constexpr bool kB = decltype(bounded)::value;
            a4 = make_float4(decay_of_gate<kB>(g4.x + dtb4[0], a_h, p.lower_bound),
                             decay_of_gate<kB>(g4.y + dtb4[1], a_h, p.lower_bound),
                             decay_of_gate<kB>(g4.z + dtb4[2], a_h, p.lower_bound),
                             decay_of_gate<kB>(g4.w + dtb4[3], a_h, p.lower_bound));
          }
          *reinterpret_cast<float4*>(&sm.r1.al[i][c4]) = a4;
        }
      };
      if (p.has_lower_bound) decays(std::true_type{});
      else decays(std::false_type{});
    }
    __syncthreads();
    KDA_TC_MARK(2);

    // q_i . k_i of every token in fp32 (kPrepThr / kC threads per token), for A_qk's diagonal
    // entries on the fast path: a token's own term, which from TF32 operands kept only about 3e-5
    // absolute, too little where q and k are near orthogonal and that term is most of the output
    // (a one-token sequence without a state measured 4-6e-3 relative error).
    {
      constexpr int kTpt = kPrepThr / kC;
      const int i = tid / kTpt, part = tid % kTpt;
      float d = 0.f;
#pragma unroll
      for (int c = part * 4; c < kK; c += 4 * kTpt) {
        const float4 q4 = *reinterpret_cast<const float4*>(&sm.Qr[i][c]);
        const float4 k4 = *reinterpret_cast<const float4*>(&sm.Kq[i][c]);
        d += q4.x * k4.x + q4.y * k4.y + q4.z * k4.z + q4.w * k4.w;
      }
#pragma unroll
      for (int o = kTpt / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
      if (part == 0) sm.dqk[i] = d;
    }

    // 2a. Block totals of the decays; thread = (channel, kBPG blocks).
    for (int b = grp * kBPG; b < (grp + 1) * kBPG; ++b) {
      float P = 1.f;
      for (int i = b * kBlk; i < (b + 1) * kBlk; ++i) P *= sm.r1.al[i][ch];
      sm.Ptot[b][ch] = P;
    }
    __syncthreads();
    KDA_TC_MARK(3);
    const unsigned diag_tc = p.tc_diag_exact ? 0u : diag_tc_mask(sm.Ptot, lane);  // diagonals 3b computes

    // 3a. Diagonal blocks on CUDA cores where a block's decay is too steep for 3b's factoring
    //     (often none), from the undecayed q, k in shared memory. Item = (block,
    //     pair of columns j1 = jj, j2 = 15 - jj of it): their lower triangles hold 17 rows
    //     together, so a pair costs 17 row steps where two separate columns would cost 32. Each
    //     lane holds 4 channels; step 0 / 1 are the diagonal entries (q_j . k_j, E = 1), steps
    //     2..16 walk j1's rows below the diagonal, then j2's, with the running product
    //     E = prod_{j<t<=i} a_t. The 17 + 15 partial dot products (A_qk for every step, A_kk for
    //     steps 2..16) stay in registers; one reduce-scatter over the warp (RowReduce, 31 shuffles)
    //     then leaves lane L with the full sum of value L. Rows past the end are zero in Qr / Kq.
    for (int pair = warp; pair < kNB * kBlk / 2; pair += kPrepWarp) {
      if (diag_tc >> (pair / (kBlk / 2)) & 1u) continue;  // the same in every lane
      const int i0 = pair / (kBlk / 2) * kBlk, jj = pair % (kBlk / 2);
      const int j1 = i0 + jj, j2 = i0 + kBlk - 1 - jj;
      const int sw = kBlk + 1 - jj;  // first step of column j2's rows below its diagonal
      const float4 k14 = *reinterpret_cast<const float4*>(&sm.Kq[j1][c4]);
      const float4 k24 = *reinterpret_cast<const float4*>(&sm.Kq[j2][c4]);
      const float4 q14 = *reinterpret_cast<const float4*>(&sm.Qr[j1][c4]);
      const float4 q24 = *reinterpret_cast<const float4*>(&sm.Qr[j2][c4]);
      const float kj1[4] = {k14.x, k14.y, k14.z, k14.w}, kj2[4] = {k24.x, k24.y, k24.z, k24.w};
      float part[2 * kBlk];  // [0, 17): A_qk of steps 0..16, [17, 32): A_kk of steps 2..16
      part[0] = q14.x * kj1[0] + q14.y * kj1[1] + q14.z * kj1[2] + q14.w * kj1[3];
      part[1] = q24.x * kj2[0] + q24.y * kj2[1] + q24.z * kj2[2] + q24.w * kj2[3];
      float E[4] = {1.f, 1.f, 1.f, 1.f};
#pragma unroll
      for (int st = 2; st <= kBlk; ++st) {
        const bool second = st >= sw;
        const int i = i0 + (second ? st - 1 : jj + st - 1);
        const float4 q4 = *reinterpret_cast<const float4*>(&sm.Qr[i][c4]);
        const float4 k4 = *reinterpret_cast<const float4*>(&sm.Kq[i][c4]);
        const float4 a4 = *reinterpret_cast<const float4*>(&sm.r1.al[i][c4]);
        const float qi[4] = {q4.x, q4.y, q4.z, q4.w}, ki[4] = {k4.x, k4.y, k4.z, k4.w};
        const float ai[4] = {a4.x, a4.y, a4.z, a4.w};
        float sq = 0.f, sk = 0.f;
#pragma unroll
        for (int x = 0; x < 4; ++x) {
          E[x] = (st == sw ? 1.f : E[x]) * ai[x];
          const float kjx = (second ? kj2[x] : kj1[x]) * E[x];
          sq += qi[x] * kjx;
          sk += ki[x] * kjx;
        }
        part[st] = sq;
        part[kBlk - 1 + st] = sk;
      }
      const float sum = RowReduce<2 * kBlk, 16>::run(part, lane);  // of value row_of_lane<32>(lane) = lane
      const int st = lane <= kBlk ? lane : lane - (kBlk - 1);  // the step lane L's sum belongs to
      const bool second = st == 1 || st >= sw;
      const int i = i0 + (st == 0 ? jj : st == 1 ? kBlk - 1 - jj : second ? st - 1 : jj + st - 1);
      if (lane <= kBlk) sm.Aqk[i][second ? j2 : j1] = sum;
      else sm.Akk[i][second ? j2 : j1] = sum * sm.beta[i];
      // The pair's entries above the diagonal (and A_kk's diagonal) are zero: A_qk rows 0..jj-1
      // of j1 and 0..14-jj of j2 (15 lanes); A_kk rows 0..jj of j1 and 0..15-jj of j2 (17 lanes).
      if (lane < kBlk - 1) sm.Aqk[i0 + (lane < jj ? lane : lane - jj)][lane < jj ? j1 : j2] = 0.f;
      if (lane <= kBlk) sm.Akk[i0 + (lane <= jj ? lane : lane - jj - 1)][lane <= jj ? j1 : j2] = 0.f;
    }
    // 3a's reads of the undecayed q, k before 2c scales them in place; with no steep block (the
    // usual case) there were none. diag_tc is the same in every thread, so all or none wait.
    if (diag_tc != (1u << kNB) - 1) __syncthreads();
    KDA_TC_MARK(4);

    // 2b. Products of block totals before / after each block, and the chunk total; the scale
    //     1 / s of each block (diag_scale), and pre, post times it, which is how they meet the
    //     scaled operands (Qe = Qr pre, Ke = Kq pre, Kd = Kb post).
    if (tid < kK) {
      float x = 1.f;
      for (int b = 0; b < kNB; ++b) {
        const float isc = diag_unscale(sm.Ptot[b][ch], diag_tc >> b & 1u);
        sm.isc[b][ch] = isc;
        sm.pre[b][ch] = x * isc;
        x *= sm.Ptot[b][ch];
      }
      sm.EL[ch] = x;
      x = 1.f;
      for (int b = kNB - 1; b >= 0; --b) { sm.post[b][ch] = x * sm.isc[b][ch]; x *= sm.Ptot[b][ch]; }
      // 3b's multipliers between blocks, in 3b's job order (1,0) (2,0) (2,1) (3,0) (3,1) (3,2).
      for (int I = 1, job = 0; I < kNB; ++I)
        for (int J = 0; J < I; ++J, ++job) {
          float m = sm.isc[I][ch];
          for (int M = J + 1; M < I; ++M) m *= sm.Ptot[M][ch];
          sm.jm[job][ch] = make_float2(sm.isc[J][ch], m);
        }
    }
    // 2c. Block-local decayed operands, in place, times the block's s: Kb = k Rloc s (backward
    //     products, from the undecayed Kq), then Qr = q Ploc s and Kq = k Ploc s (forward). The
    //     block's decays and k in registers, read once: both walks read them, and 2c is bound by
    //     shared-memory bandwidth (96 instead of 128 accesses per thread).
    for (int b = grp * kBPG; b < (grp + 1) * kBPG; ++b) {
      const float sc = diag_scale(sm.Ptot[b][ch], diag_tc >> b & 1u);
      float a[kBlk], kr[kBlk];
#pragma unroll
      for (int j = 0; j < kBlk; ++j) {
        a[j] = sm.r1.al[b * kBlk + j][ch];
        kr[j] = sm.Kq[b * kBlk + j][ch];
      }
      float R = sc;
#pragma unroll
      for (int j = kBlk - 1; j >= 0; --j) {
        sm.Kb[b * kBlk + j][ch] = kr[j] * R;
        R *= a[j];
      }
      float P = sc;
#pragma unroll
      for (int i = 0; i < kBlk; ++i) {
        P *= a[i];
        sm.Qr[b * kBlk + i][ch] = tf32_bump(sm.Qr[b * kBlk + i][ch] * P);  // 3b's A operands (tf32_bump)
        sm.Kq[b * kBlk + i][ch] = tf32_bump(kr[i] * P);
      }
    }
    __syncthreads();
    KDA_TC_MARK(5);

    float* rec = chunk_record(p, cslot, h);
    // 3b. Blocks below the diagonal (I > J) and the diagonal blocks 3a left, on tensor cores
    //     (mma.sync m16n8k8, TF32): job (I, J), A = Qr_I / Kq_I [16 tokens x 8 channels] per
    //     k-step, B = (Kb_J scaled by prod_{J<M<I} Ptot_M / (s_I s_J); on the diagonal by nothing,
    //     s_I^2 = 1 / Ptot_I being in the operands)^T, 8-token tiles of J. A_kk rows are stored
    //     times beta; on the diagonal only the causal part (A_qk: j <= i, A_kk: j < i). A_qk's
    //     blocks above the diagonal are zeroed.
    {
      constexpr int kOff = kNB * (kNB - 1) / 2;  // 6 jobs below the diagonal, then kNB diagonal ones
      // Unit = one 8-token tile (nt) of an off-diagonal job (2 kOff units), then a diagonal job
      // with both tiles: 16 units, one per warp of 16, where whole jobs left 6 warps idle.
      auto product = [&](auto ntc, int I, int J, int job, int nt0) {
        constexpr int kNT = decltype(ntc)::value;
        constexpr bool diag = kNT == 2;  // a diagonal job takes both tiles, an off-diagonal unit one
        float accq[kNT][4] = {}, acck[kNT][4] = {};
        // ldmatrix rows of this lane: A (x4) row 16 I + L % 16, words 4 (L / 16) on; B row
        // 16 J + 8 (nt0 + L / 16) + L % 8, words 4 (L / 8 % 2) on (x2 reads lanes 0..15 only).
        const int ar = I * kBlk + lane % 16, aw = lane / 16 * 4;
        const SmemAddr qrow = smem_addr(&sm.Qr[ar][aw]), krow = smem_addr(&sm.Kq[ar][aw]);
        const SmemAddr brow = smem_addr(&sm.Kb[J * kBlk + 8 * (nt0 + lane / 16) + lane % 8][lane / 8 % 2 * 4]);
#pragma unroll 2
        for (int kk = 0; kk < kK; kk += 8) {
          const int c0 = kk + t4;  // this lane's channels c0, c0 + 4 of the k-step
          // Kb_J (k Rloc s_J) times 1 / s_J first, back to a value <= 1, then times
          // prod_{J<M<I} Ptot_M / s_I <= 1: a B operand that underflows then carried a term
          // below 2^-66 (A <= 2^60), where one product of both scales could have underflowed alone.
          float2 f0 = make_float2(1.f, 1.f), f1 = f0;
          if constexpr (!diag) {
            f0 = sm.jm[job][c0];
            f1 = sm.jm[job][c0 + 4];
          }
          uint32_t aq[4], ak[4];
          ldsm_words_x4(aq, qrow + 4 * kk);  // stored bumped (2c): operands as they are
          ldsm_words_x4(ak, krow + 4 * kk);
          uint32_t kb[2 * kNT];  // tile t's (c0, c0 + 4) in kb[2 t], kb[2 t + 1]
          if constexpr (kNT == 1) ldsm_words_x2(kb, brow + 4 * kk);
          else ldsm_words_x4(kb, brow + 4 * kk);
#pragma unroll
          for (int t = 0; t < kNT; ++t) {
            const uint32_t b0 = to_tf32(__uint_as_float(kb[2 * t]) * f0.x * f0.y);
            const uint32_t b1 = to_tf32(__uint_as_float(kb[2 * t + 1]) * f1.x * f1.y);
            mma_tf32(accq[t], aq, b0, b1);
            mma_tf32(acck[t], ak, b0, b1);
          }
        }
        const float b_lo = sm.beta[I * kBlk + g], b_hi = sm.beta[I * kBlk + g + 8];
#pragma unroll
        for (int t = 0; t < kNT; ++t) {
          const int nt = nt0 + t, r = I * kBlk + g, c = J * kBlk + 8 * nt + 2 * t4;
          float q4[4] = {accq[t][0], accq[t][1], accq[t][2], accq[t][3]};
          float k4[4] = {acck[t][0] * b_lo, acck[t][1] * b_lo, acck[t][2] * b_hi, acck[t][3] * b_hi};
          if constexpr (diag) {  // local row g / g + 8, local column 8 nt + 2 t4 + e
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int lr = g + (e >= 2 ? 8 : 0), lc = 8 * nt + 2 * t4 + (e & 1);
              if (lc > lr) q4[e] = 0.f;
              if (lc == lr) q4[e] = sm.dqk[I * kBlk + lr];
              if (lc >= lr) k4[e] = 0.f;
            }
          }
          *reinterpret_cast<float2*>(&sm.Aqk[r][c]) = make_float2(q4[0], q4[1]);
          *reinterpret_cast<float2*>(&sm.Aqk[r + 8][c]) = make_float2(q4[2], q4[3]);
          *reinterpret_cast<float2*>(&sm.Akk[r][c]) = make_float2(k4[0], k4[1]);
          *reinterpret_cast<float2*>(&sm.Akk[r + 8][c]) = make_float2(k4[2], k4[3]);
        }
      };
      for (int unit = warp; unit < 2 * kOff + kNB; unit += kPrepWarp) {
        if (unit < 2 * kOff) {
          const int job = unit / 2;
          int I, J;
          off_diag_block(job, I, J);
          product(std::integral_constant<int, 1>{}, I, J, job, unit % 2);
        } else {
          const int I = unit - 2 * kOff;
          if (diag_tc >> I & 1u) product(std::integral_constant<int, 2>{}, I, I, 0, 0);  // else 3a computed it
        }
      }
      if (tid == kLookup)  // item it + 2, into the entry of item it (read by every thread before 1a's barrier)
        sm.items[it & 1] = find_prep_item(p, div, sm.items[(it + 1) & 1].item + stride, stride, items, base_tok);
      // The record's Qe = Qr pre, Kd = Kb post and (unless kWy) Ke = Kq pre (scaled as they are
      // stored), final since 2c, by the warps of off-diagonal units once their product is done: in
      // phase 5 they were 32 of the 40 KB that every warp stored there while threads 0..63 solved.
      // With kWy the barrier after 3b orders these reads of Kb before phase 6a overwrites it.
      if (warp < kStoreWarps) {
        store_rows_half<true>(rec_half(rec, kRecQe), &sm.Qr[0][0], kLdK, kK, &sm.pre[0][0], tid, kStoreWarps * 32);
        if constexpr (!kWy)
          store_rows_half<true>(rec_half(rec, kRecKw), &sm.Kq[0][0], kLdK, kK, &sm.pre[0][0], tid, kStoreWarps * 32);
        if constexpr (kKdChannelMajor)
          store_cols_half(rec_half(rec, kRecKd), &sm.Kb[0][0], kLdK, &sm.post[0][0], tid, kStoreWarps * 32);
        else
          store_rows_half(rec_half(rec, kRecKd), &sm.Kb[0][0], kLdK, kK, &sm.post[0][0], tid, kStoreWarps * 32);
      }
      // A_qk's blocks above the diagonal go to the record as zeros (the state pass multiplies the
      // whole matrix), 4 per store; A_kk's are never read (4a and 4b take its blocks on and below
      // the diagonal), so they are left as they are.
      for (int idx = tid; idx < kOff * kBlk * kBlk / 4; idx += kPrepThr) {
        const int job = idx / (kBlk * kBlk / 4), r = idx / (kBlk / 4) % kBlk, c = idx % (kBlk / 4) * 4;
        int I, J;
        off_diag_block(job, I, J);
        *reinterpret_cast<float4*>(&sm.Aqk[J * kBlk + r][I * kBlk + c]) = make_float4(0.f, 0.f, 0.f, 0.f);
      }
    }
    __syncthreads();
    KDA_TC_MARK(6);

    // 4a. T's diagonal blocks by forward substitution (thread = block, column; A_kk's rows carry
    //     beta already). T's blocks above the diagonal are zero and never read (4b and 6b take its
    //     blocks on and below the diagonal), so they are not written. T is only ever a tensor-core
    //     operand, so 4a and 4b store it TF32-rounded once and its readers take the bits as they are.
    if (tid < kC) {
      // Column j of its block's T in registers, fully unrolled: the A loads do not depend on the
      // solve and are broadcasts (the 16 threads of a block read the same entries); entries above
      // j come out 0 (every term multiplies an entry above j) and the diagonal is set to 1.
      const int j = tid, lo = j / kBlk * kBlk;
      float col[kBlk];
#pragma unroll
      for (int r = 0; r < kBlk; ++r) {
        float x = 0.f;
#pragma unroll
        for (int m = 0; m < r; ++m) x -= sm.Akk[lo + r][lo + m] * col[m];
        col[r] = lo + r < j ? 0.f : (lo + r == j ? 1.f : x);
      }
#pragma unroll
      for (int r = 0; r < kBlk; ++r) sm.r1.tu.T[lo + r][j] = tf32_round(col[r]);
    }
#ifdef KDA_SIMT_EMULATOR
    // The emulated kernel fills what is never read with NaN, so a read of it reaches the output.
    else {
      for (int idx = tid - kC; idx < kC * kC; idx += kPrepThr - kC) {
        const int i = idx / kC, j = idx % kC;
        if (j / kBlk > i / kBlk) sm.r1.tu.T[i][j] = sm.Akk[i][j] = std::numeric_limits<float>::quiet_NaN();
      }
    }
#endif
    // 5. The record's A_qk (fp16) and EL, final since 3b: out now, while threads 0..63 solve (the
    // rest start on it at once), so that the stores drain during 4a and 4b instead of queueing at
    // the item's end.
    store_rows_half(rec_half(rec, kRecAqk), &sm.Aqk[0][0], kLdC, kC, nullptr, tid, kPrepThr);
    if (tid < kK) rec[kRecEL + tid] = sm.EL[tid];
    __syncthreads();
    KDA_TC_MARK(7);

    // 4b. T's blocks below the diagonal on tensor cores (mma.sync m16n8k8, TF32): warp J walks
    //     column J's blocks I = J+1 .. 3 in order, X = sum_{J<=M<I} A_IM T_MJ (only this column's
    //     blocks above I) into the warp's own 16 rows of the X area, then T_IJ = -T_II X, which it
    //     also stores into the record as T beta. Meanwhile the other warps store T beta's diagonal
    //     blocks and go on (with kWy to 6a, else to the next item, whose shared-memory writes wait
    //     at the barrier in its phase 1): nothing crosses warps here.
    if (warp >= kNB - 1) store_t_beta_diagonal(sm, rec, tid - (kNB - 1) * 32, kPrepThr - (kNB - 1) * 32);
    if (warp < kNB - 1) {
      const int J = warp;
      float(*Xw)[kLdC] = &sm.r1.tu.X[J * kBlk];
      for (int I = J + 1; I < kNB; ++I) {
        float acc[2][4] = {};
        // A fragments by ldmatrix: rows 16 I + L % 16, words 4 (L / 16) on.
        const int ar = I * kBlk + lane % 16, aw = lane / 16 * 4;
        for (int ks = J * kBlk; ks < I * kBlk; ks += 8) {
          uint32_t a[4];
          ldsm_words_x4(a, smem_addr(&sm.Akk[ar][ks + aw]));
#pragma unroll
          for (int e = 0; e < 4; ++e) a[e] = to_tf32(__uint_as_float(a[e]));
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            const float* br = &sm.r1.tu.T[ks + t4][J * kBlk + 8 * nt + g];
            mma_tf32(acc[nt], a, __float_as_uint(br[0]), __float_as_uint(br[4 * kLdC]));
          }
        }
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          *reinterpret_cast<float2*>(&Xw[g][8 * nt + 2 * t4]) = make_float2(acc[nt][0], acc[nt][1]);
          *reinterpret_cast<float2*>(&Xw[g + 8][8 * nt + 2 * t4]) = make_float2(acc[nt][2], acc[nt][3]);
        }
        __syncwarp();
        float tij[2][4] = {};
#pragma unroll
        for (int ks = 0; ks < kBlk; ks += 8) {
          uint32_t a[4];
          ldsm_words_x4(a, smem_addr(&sm.r1.tu.T[ar][I * kBlk + ks + aw]));
#pragma unroll
          for (int nt = 0; nt < 2; ++nt)
            mma_tf32(tij[nt], a, to_tf32(Xw[ks + t4][8 * nt + g]), to_tf32(Xw[ks + t4 + 4][8 * nt + g]));
        }
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const int r = I * kBlk + g, c = J * kBlk + 8 * nt + 2 * t4;
          const float t[4] = {tf32_round(-tij[nt][0]), tf32_round(-tij[nt][1]), tf32_round(-tij[nt][2]),
                              tf32_round(-tij[nt][3])};
          *reinterpret_cast<float2*>(&sm.r1.tu.T[r][c]) = make_float2(t[0], t[1]);
          *reinterpret_cast<float2*>(&sm.r1.tu.T[r + 8][c]) = make_float2(t[2], t[3]);
          const float2 be = *reinterpret_cast<const float2*>(&sm.beta[c]);
          t_beta_pair(rec, r, c, t[0], t[1], be);
          t_beta_pair(rec, r + 8, c, t[2], t[3], be);
        }
        __syncwarp();  // T_IJ is the next block's operand; X is rewritten
      }
    }

    // 6 (kWy). w = T (beta Ke) into the record (kda_prefill_tc_wy.cuh): 6a writes beta Ke as the
    //    B operand, every thread (warps 0..2 after their 4b); once T is complete (the barrier) 6b
    //    multiplies it by T on tensor cores.
    if constexpr (kWy) {
      wy_stage(sm, tid);
      __syncthreads();
      KDA_TC_MARK(8);
      wy_products(sm, rec, warp, lane);
    }
    KDA_TC_MARK(9);  // (the barrier before the next item's writes sits in its phase 1)
  }
  KDA_TC_PROFILE_END();
}

}  // namespace kda
