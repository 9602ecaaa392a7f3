// Phases 6a and 6b of the prepare pass (kda_prefill_tc_prepare.cuh): the WY factor w = T (beta Ke)
// of a chunk, T = (I + beta A_kk)^-1 block lower triangular [64 x 64] in sm.r1.tu.T (TF32-rounded),
// stored into the chunk's record (fp16), and T beta = T diag(beta), from which the state pass forms
// u = T beta v (fp32, TF32-rounded).
//
// 6a (wy_stage, every thread; warps 0..2 after their 4b) writes the B operand beta Ke = beta Kq pre
// into the Kb area (Kd is out), TF32-rounded; then a barrier; then 6b stores T beta
// (store_t_beta) and multiplies (wy_products). Two builds of the product:
//  - default: 6b on mma.sync m16n8k8 per warp (wy_stage_mma / wy_products_mma);
//  - KDA_TC_WY_WGMMA=1 (common/build_options.h): 6b on wgmma m64n64k8 per warpgroup
//    (kda_prefill_tc_wgmma.cuh), its B operand in K-major core matrices. Same bits in the
//    emulator; timed side by side with the mma.sync build when 6b also formed u (6bbb7c8) it was
//    no faster, so it stays opt-in (docs/kernels.md).
#pragma once

#include "kda_prefill_tc_common.cuh"
#include "kda_prefill_tc_prepare_io.cuh"
#include "kda_prefill_tc_wgmma.cuh"

namespace kda {
namespace tc {

// The mma.sync build's B operands (beta v, beta Ke: [64 tokens x 128 columns]) in the Qr / Kb areas
// with row pitch kK and the columns' bits 3-4 XORed with the row's bits 0-1: a B-fragment load
// (rows 8 ks + t4, columns n0 + 8 j + g) then hits banks 8 (j ^ t4) + g, all 32 distinct, where
// the operand arrays' pitch kLdK (made for A fragments) would put two lanes on every bank. 4-column
// groups stay contiguous, so 6a still stores float4s.
__device__ __forceinline__ float* wy_at(float* area, int row, int col) {
  return area + row * kK + (col ^ ((row & 3) << 3));
}
__device__ __forceinline__ const float* wy_at(const float* area, int row, int col) {
  return area + row * kK + (col ^ ((row & 3) << 3));
}

// One 8-column accumulator tile of w into the record (fp16), from mma_tf32's accumulator layout:
// t = (row g, columns 2 t4, 2 t4 + 1), (row g + 8, the same); at = the record element of t[0].
// Both builds store their products this way.
__device__ __forceinline__ void store_w_tile(float* rec, int at, const float* t) {
  unsigned* dw = reinterpret_cast<unsigned*>(rec_half(rec, kRecW) + at);
  dw[0] = half2_bits(t[0], t[1]);
  dw[4 * kK] = half2_bits(t[2], t[3]);
}

// T beta into the record: T's blocks on and below the diagonal (those above are zero and never
// read), each column j times beta_j (0 past the end), TF32-rounded as the state pass multiplies
// it; 16-byte pieces, every thread. T is complete after the barrier that ends 6a.
template <class Smem>
__device__ __forceinline__ void store_t_beta(Smem& sm, float* rec, int tid) {
#pragma unroll
  for (int idx = tid; idx < kC * kC / 4; idx += kPrepThr) {
    const int i = idx / (kC / 4), j = idx % (kC / 4) * 4;
    if (j / kBlk > i / kBlk) continue;
    const float4 t = *reinterpret_cast<const float4*>(&sm.r1.tu.T[i][j]);
    const float4 b = *reinterpret_cast<const float4*>(&sm.beta[j]);
    *reinterpret_cast<float4*>(rec + kRecTb + i * kC + j) =
        make_float4(tf32_round(t.x * b.x), tf32_round(t.y * b.y), tf32_round(t.z * b.z), tf32_round(t.w * b.w));
  }
}

// 6a for mma.sync: thread = (tokens i0 + kStride m, channels c4 .. c4+3 and c4+64 .. c4+67): a
// row's lanes take consecutive 16-byte pieces, where 8 consecutive channels per thread put them 32
// bytes apart and doubled these accesses' wavefronts (ncu at 61086cc).
template <class Smem>
__device__ __forceinline__ void wy_stage_mma(Smem& sm, int tid) {
  constexpr int kStride = kPrepThr / 16, kPer = kC / kStride;
  const int i0 = tid / 16, c4 = tid % 16 * 4;
#pragma unroll
  for (int m = 0; m < kPer; ++m) {
    const int i = i0 + kStride * m;
    const float b = sm.beta[i];
#pragma unroll
    for (int c = c4; c < kK; c += kK / 2) {
      const float4 kq = *reinterpret_cast<const float4*>(&sm.Kq[i][c]);  // bumped (2c)
      const float4 pr = *reinterpret_cast<const float4*>(&sm.pre[i / kBlk][c]);
      const float4 k = make_float4(tf32_unbump(kq.x) * pr.x, tf32_unbump(kq.y) * pr.y, tf32_unbump(kq.z) * pr.z,
                                   tf32_unbump(kq.w) * pr.w);
      *reinterpret_cast<float4*>(wy_at(&sm.Kb[0][0], i, c)) =
          make_float4(tf32_round(b * k.x), tf32_round(b * k.y), tf32_round(b * k.z), tf32_round(b * k.w));
    }
  }
}

// 6b on mma.sync m16n8k8: T is block lower triangular, so token block I of w sums over tokens
// 0 .. 16 I + 15 only: 2 (I + 1) k-steps. A warp takes blocks I and kNB - 1 - I (10 k-steps in all,
// the same for every warp) over kCols columns. Stored from the accumulators (store_w_tile).
template <class Smem>
__device__ __forceinline__ void wy_products_mma(Smem& sm, float* rec, int warp, int lane) {
  const int g = lane / 4, t4 = lane % 4;
  constexpr int kColGroups = kPrepWarp / 2, kCols = kK / kColGroups, kNJ = kCols / 8;
  const int pair = warp / kColGroups, n0 = (warp % kColGroups) * kCols;
#pragma unroll 1
  for (int side = 0; side < 2; ++side) {
    const int tm = side == 0 ? pair : kNB - 1 - pair;
    float acc[kNJ][4] = {};
    // T's A fragments by ldmatrix (rows 16 tm + L % 16, words 4 (L / 16) on), TF32 bits as stored.
    const SmemAddr trow = smem_addr(&sm.r1.tu.T[tm * 16 + lane % 16][lane / 16 * 4]);
#pragma unroll 2
    for (int ks = 0; ks < 2 * (tm + 1); ++ks) {
      uint32_t a[4];
      ldsm_words_x4(a, trow + 32 * ks);
#pragma unroll
      for (int j = 0; j < kNJ; ++j) {
        const float* br = wy_at(&sm.Kb[0][0], 8 * ks + t4, n0 + 8 * j + g);  // row + 4: same swizzle
        mma_tf32(acc[j], a, __float_as_uint(br[0]), __float_as_uint(br[4 * kK]));
      }
    }
    const int at = (tm * 16 + g) * kK + n0 + 2 * t4;  // element of acc[0][0]
#pragma unroll
    for (int j = 0; j < kNJ; ++j) store_w_tile(rec, at + 8 * j, acc[j]);
  }
}

// 6a for wgmma: the B operand as [128 columns x 64 tokens] in wgmma's K-major core matrices
// (wy_core_index). Thread = (column c, kWyPer groups of 4 consecutive tokens): one 16-byte store
// per group, a warp's lanes on 32 consecutive columns, i.e. 8 rows of each of 4 core matrices: 4
// wavefronts per store, the fewest for 512 bytes; its reads of Kq are consecutive 4-byte words.
// Every writer fences for the wgmma reads after the barrier.
template <class Smem>
__device__ __forceinline__ void wy_stage_wgmma(Smem& sm, int tid) {
  constexpr int kWyPer = kC / 4 * kK / kPrepThr;
  const int c = tid % kK;
#pragma unroll
  for (int m = 0; m < kWyPer; ++m) {
    const int i0 = 4 * (tid / kK + kPrepThr / kK * m);
    const float4 b4 = *reinterpret_cast<const float4*>(&sm.beta[i0]);
    const float b[4] = {b4.x, b4.y, b4.z, b4.w};
    const float pr = sm.pre[i0 / kBlk][c];
    float bk[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) bk[e] = tf32_round(b[e] * (tf32_unbump(sm.Kq[i0 + e][c]) * pr));  // Kq bumped (2c)
    *reinterpret_cast<float4*>(&sm.Kb[0][0] + wy_core_index(c, i0)) = make_float4(bk[0], bk[1], bk[2], bk[3]);
  }
  fence_smem_for_wgmma();
}

// 6b on wgmma (m64n64k8, TF32; A = T from registers, B = 6a's operand): warpgroup q < 2 takes the
// 64-column block q of w, its warp wr the 16 tokens of block wr. T's A fragments by ldmatrix (rows
// 16 wr + L % 16, words 4 (L / 16) on), TF32 bits as stored; the k-steps past a warp's block are
// zeros (T's blocks above the diagonal are never written), two rounds of four k-steps (a product
// reads its A registers until the wait, and all eight k-steps' fragments at once made the pass
// spill).
template <class Smem>
__device__ __forceinline__ void wy_products_wgmma(Smem& sm, float* rec, int warp, int lane) {
  static_assert(kPrepWarp % 4 == 0 && kPrepWarp >= 8, "whole warpgroups, one per column block");
  const int g = lane / 4, t4 = lane % 4, wr = warp % 4, wgrp = warp / 4;
  if (wgrp >= 2) return;  // w has two 64-column blocks
  const SmemAddr trow = smem_addr(&sm.r1.tu.T[wr * kBlk + lane % 16][lane / 16 * 4]);
  const int n0 = wgrp * 64;
  const SmemAddr B = smem_addr(&sm.Kb[0][0]) + 4 * wy_core_index(n0, 0);
  float acc[32] = {};
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    uint32_t a[4][4];
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int ks = 4 * half + s;
      if (ks < 2 * (wr + 1)) ldsm_words_x4(a[s], trow + 32 * ks);  // warp-uniform
      else a[s][0] = a[s][1] = a[s][2] = a[s][3] = 0u;
    }
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < 4; ++s) wgmma_m64n64k8_tf32(acc, a[s], B + 4 * wy_core_index(0, 8 * (4 * half + s)));
    wgmma_commit_and_wait();
  }
  const int at = (wr * kBlk + g) * kK + n0 + 2 * t4;  // element of acc[0]
#pragma unroll
  for (int j = 0; j < 8; ++j) store_w_tile(rec, at + 8 * j, &acc[4 * j]);
}

template <class Smem>
__device__ __forceinline__ void wy_stage(Smem& sm, int tid) {
  if constexpr (KDA_TC_WY_WGMMA) wy_stage_wgmma(sm, tid);
  else wy_stage_mma(sm, tid);
}

template <class Smem>
__device__ __forceinline__ void wy_products(Smem& sm, float* rec, int warp, int lane) {
  if constexpr (KDA_TC_WY_WGMMA) wy_products_wgmma(sm, rec, warp, lane);
  else wy_products_mma(sm, rec, warp, lane);
}

}  // namespace tc
}  // namespace kda
