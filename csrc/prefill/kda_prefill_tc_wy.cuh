// Phases 6a and 6b of the prepare pass (kda_prefill_tc_prepare.cuh): the WY factors u = T (beta v)
// and w = T (beta Ke) of a chunk, T = (I + beta A_kk)^-1 block lower triangular [64 x 64] in
// sm.r1.tu.T (TF32-rounded), stored into the chunk's record (u fp32, w fp16).
//
// 6a (wy_stage, every thread; warps 0..2 after their 4b) writes the B operands: beta v into the Qr
// area (Qe is out) and beta Ke = beta Kq pre into the Kb area (Kd is out), TF32-rounded; then a
// barrier; then 6b (wy_products) multiplies. Two builds:
//  - default: 6b on mma.sync m16n8k8 per warp (wy_stage_mma / wy_products_mma);
//  - KDA_TC_WY_WGMMA=1 (common/build_options.h): 6b on wgmma m64n64k8 per warpgroup
//    (kda_prefill_tc_wgmma.cuh), its B operands in K-major core matrices. Same bits in the
//    emulator; passed the tc-selected GPU tests (261) on an H100, and timed side by side with the
//    mma.sync build (6bbb7c8) it was no faster, so it stays opt-in (docs/kernels.md).
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

// One 8-column accumulator tile of u (fp32: it enters fp32 math) or w (fp16) into the record, from
// mma_tf32's accumulator layout: t = (row g, columns 2 t4, 2 t4 + 1), (row g + 8, the same); at =
// the record element of t[0]. Both builds store their products this way.
__device__ __forceinline__ void store_wy_tile(float* rec, bool is_w, int at, const float* t) {
  if (!is_w) {
    float* du = rec + kRecU + at;
    *reinterpret_cast<float2*>(du) = make_float2(t[0], t[1]);
    *reinterpret_cast<float2*>(du + 8 * kK) = make_float2(t[2], t[3]);
  } else {
    unsigned* dw = reinterpret_cast<unsigned*>(rec_half(rec, kRecW) + at);
    dw[0] = half2_bits(t[0], t[1]);
    dw[4 * kK] = half2_bits(t[2], t[3]);
  }
}

// 6a for mma.sync: thread = (tokens vi0 + kVStride m, value rows c4 .. c4+3 and c4+64 .. c4+67): a
// row's lanes take consecutive 16-byte pieces of each array, where 8 consecutive rows per thread
// put them 32 bytes apart and doubled these accesses' wavefronts (ncu at 61086cc). The v copies
// of every thread are in since the barrier after phase 5.
template <class Smem>
__device__ __forceinline__ void wy_stage_mma(Smem& sm, int tid) {
  const int vi0 = tid / 16, c4 = tid % 16 * 4;
#pragma unroll
  for (int m = 0; m < kVPer; ++m) {
    const int i = vi0 + kVStride * m;
    const float b = sm.beta[i];
    const uint2* vrow = reinterpret_cast<const uint2*>(&sm.vq[i][0]);  // 4 bf16 values per uint2
#pragma unroll
    for (int c = c4; c < kK; c += kK / 2) {
      const uint2 vr = vrow[c / 4];
      const unsigned vw[2] = {vr.x, vr.y};
      float vv[4];
      unpack_bf16(vw, vv);
      const float4 kq = *reinterpret_cast<const float4*>(&sm.Kq[i][c]);  // bumped (2c)
      const float4 pr = *reinterpret_cast<const float4*>(&sm.pre[i / kBlk][c]);
      const float4 k = make_float4(tf32_unbump(kq.x) * pr.x, tf32_unbump(kq.y) * pr.y, tf32_unbump(kq.z) * pr.z,
                                   tf32_unbump(kq.w) * pr.w);
      *reinterpret_cast<float4*>(wy_at(&sm.Qr[0][0], i, c)) =
          make_float4(tf32_round(b * vv[0]), tf32_round(b * vv[1]), tf32_round(b * vv[2]), tf32_round(b * vv[3]));
      *reinterpret_cast<float4*>(wy_at(&sm.Kb[0][0], i, c)) =
          make_float4(tf32_round(b * k.x), tf32_round(b * k.y), tf32_round(b * k.z), tf32_round(b * k.w));
    }
  }
}

// 6b on mma.sync m16n8k8: T is block lower triangular, so token block I of u and w sums over
// tokens 0 .. 16 I + 15 only: 2 (I + 1) k-steps. A warp takes blocks I and kNB - 1 - I (10 k-steps
// in all, the same for every warp) over kCols columns of both u and w, each T fragment feeding
// both. Stored from the accumulators (store_wy_tile; u: 8 rows x 32 bytes per store).
template <class Smem>
__device__ __forceinline__ void wy_products_mma(Smem& sm, float* rec, int warp, int lane) {
  const int g = lane / 4, t4 = lane % 4;
  constexpr int kColGroups = kPrepWarp / 2, kCols = kK / kColGroups, kNJ = kCols / 8;
  const int pair = warp / kColGroups, n0 = (warp % kColGroups) * kCols;
#pragma unroll 1
  for (int side = 0; side < 2; ++side) {
    const int tm = side == 0 ? pair : kNB - 1 - pair;
    float acc[2][kNJ][4] = {};  // [0]: u, [1]: w
    // T's A fragments by ldmatrix (rows 16 tm + L % 16, words 4 (L / 16) on), TF32 bits as stored.
    const SmemAddr trow = smem_addr(&sm.r1.tu.T[tm * 16 + lane % 16][lane / 16 * 4]);
#pragma unroll 2
    for (int ks = 0; ks < 2 * (tm + 1); ++ks) {
      uint32_t a[4];
      ldsm_words_x4(a, trow + 32 * ks);
#pragma unroll
      for (int out = 0; out < 2; ++out) {
        const float* B = out == 0 ? &sm.Qr[0][0] : &sm.Kb[0][0];
#pragma unroll
        for (int j = 0; j < kNJ; ++j) {
          const float* br = wy_at(B, 8 * ks + t4, n0 + 8 * j + g);  // row + 4: same swizzle
          mma_tf32(acc[out][j], a, __float_as_uint(br[0]), __float_as_uint(br[4 * kK]));
        }
      }
    }
    const int at = (tm * 16 + g) * kK + n0 + 2 * t4;  // element of acc[.][0][0]
#pragma unroll
    for (int j = 0; j < kNJ; ++j) {
      store_wy_tile(rec, false, at + 8 * j, acc[0][j]);
      store_wy_tile(rec, true, at + 8 * j, acc[1][j]);
    }
  }
}

// 6a for wgmma: the B operands as [128 columns x 64 tokens] in wgmma's K-major core matrices
// (wy_core_index). Thread = (column c, kWyPer groups of 4 consecutive tokens): one 16-byte store
// per operand and group, a warp's lanes on 32 consecutive columns, i.e. 8 rows of each of 4 core
// matrices: 4 wavefronts per store, the fewest for 512 bytes; its reads of v and Kq are
// consecutive 2- and 4-byte words. Every writer fences for the wgmma reads after the barrier.
template <class Smem>
__device__ __forceinline__ void wy_stage_wgmma(Smem& sm, int tid) {
  constexpr int kWyPer = kC / 4 * kK / kPrepThr;
  const int c = tid % kK;
  const __nv_bfloat16* vcol = reinterpret_cast<const __nv_bfloat16*>(&sm.vq[0][0]) + c;  // row pitch kK
#pragma unroll
  for (int m = 0; m < kWyPer; ++m) {
    const int i0 = 4 * (tid / kK + kPrepThr / kK * m);
    const float4 b4 = *reinterpret_cast<const float4*>(&sm.beta[i0]);
    const float b[4] = {b4.x, b4.y, b4.z, b4.w};
    const float pr = sm.pre[i0 / kBlk][c];
    float bv[4], bk[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      bv[e] = tf32_round(b[e] * __bfloat162float(vcol[(i0 + e) * kK]));
      bk[e] = tf32_round(b[e] * (tf32_unbump(sm.Kq[i0 + e][c]) * pr));  // Kq bumped (2c)
    }
    *reinterpret_cast<float4*>(&sm.Qr[0][0] + wy_core_index(c, i0)) = make_float4(bv[0], bv[1], bv[2], bv[3]);
    *reinterpret_cast<float4*>(&sm.Kb[0][0] + wy_core_index(c, i0)) = make_float4(bk[0], bk[1], bk[2], bk[3]);
  }
  fence_smem_for_wgmma();
}

// 6b on wgmma (m64n64k8, TF32; A = T from registers, B = 6a's operands): warpgroup q takes the
// 64-column blocks kWyBlocks q .. kWyBlocks (q + 1) - 1 of [u | w], its warp wr the 16 tokens of
// block wr. T's A fragments by ldmatrix (rows 16 wr + L % 16, words 4 (L / 16) on), TF32 bits as
// stored; the k-steps past a warp's block are zeros (T's blocks above the diagonal are never
// written), two rounds of four k-steps (a product reads its A registers until the wait, and all
// eight k-steps' fragments at once made the pass spill).
template <class Smem>
__device__ __forceinline__ void wy_products_wgmma(Smem& sm, float* rec, int warp, int lane) {
  static_assert(kPrepWarp % 4 == 0 && 16 % kPrepWarp == 0, "whole warpgroups, 4 column blocks over them");
  constexpr int kWyBlocks = 16 / kPrepWarp;
  const int g = lane / 4, t4 = lane % 4, wr = warp % 4, wgrp = warp / 4;
  const SmemAddr trow = smem_addr(&sm.r1.tu.T[wr * kBlk + lane % 16][lane / 16 * 4]);
#pragma unroll 1
  for (int blk = wgrp * kWyBlocks; blk < (wgrp + 1) * kWyBlocks; ++blk) {
    const bool is_w = blk >= 2;
    const int n0 = blk % 2 * 64;
    const SmemAddr B = smem_addr(is_w ? &sm.Kb[0][0] : &sm.Qr[0][0]) + 4 * wy_core_index(n0, 0);
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
    for (int j = 0; j < 8; ++j) store_wy_tile(rec, is_w, at + 8 * j, &acc[4 * j]);
  }
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
