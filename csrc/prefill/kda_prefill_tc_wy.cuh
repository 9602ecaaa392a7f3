// Phases 6a and 6b of the prepare pass (kda_prefill_tc_prepare.cuh) for state CTAs of 64 or 32
// value rows: the WY factor w = T (beta Ke) of a chunk, T = (I + beta A_kk)^-1 block lower
// triangular [64 x 64] in sm.r1.tu.T (TF32-rounded), stored into the record's Ke / w field (fp16).
// Those CTAs compute U = u - w S^T (u = T beta v off their dependent chain) instead of
// U = T beta (v - Ke S^T), which with their token-major units takes a barrier more per chunk.
//
// 6a (wy_stage, every thread; warps 0..2 after their 4b) writes the B operand beta Ke = beta Kq pre
// into the Kb area (Kd is out), TF32-rounded; then a barrier; then 6b multiplies it by T on
// mma.sync m16n8k8 tensor cores (wy_products).
#pragma once

#include "kda_prefill_tc_common.cuh"
#include "kda_prefill_tc_prepare_io.cuh"

namespace kda {
namespace tc {

// 6a's B operand (beta Ke: [64 tokens x 128 columns]) in the Kb area with row pitch kK and the
// columns' bits 3-4 XORed with the row's bits 0-1: a B-fragment load (rows 8 ks + t4, columns
// n0 + 8 j + g) then hits banks 8 (j ^ t4) + g, all 32 distinct, where the operand arrays' pitch
// kLdK (made for A fragments) would put two lanes on every bank. 4-column groups stay contiguous,
// so 6a still stores float4s.
__device__ __forceinline__ float* wy_at(float* area, int row, int col) {
  return area + row * kK + (col ^ ((row & 3) << 3));
}
__device__ __forceinline__ const float* wy_at(const float* area, int row, int col) {
  return area + row * kK + (col ^ ((row & 3) << 3));
}

// One 8-column accumulator tile of w into the record (fp16), from mma_tf32's accumulator layout:
// t = (row g, columns 2 t4, 2 t4 + 1), (row g + 8, the same); at = the record element of t[0].
__device__ __forceinline__ void store_w_tile(float* rec, int at, const float* t) {
  unsigned* dw = reinterpret_cast<unsigned*>(rec_half(rec, kRecKw) + at);
  dw[0] = half2_bits(t[0], t[1]);
  dw[4 * kK] = half2_bits(t[2], t[3]);
}

// 6a: thread = (tokens i0 + kStride m, channels c4 .. c4+3 and c4+64 .. c4+67): a
// row's lanes take consecutive 16-byte pieces, where 8 consecutive channels per thread put them 32
// bytes apart and doubled these accesses' wavefronts (ncu at 61086cc).
template <class Smem>
__device__ __forceinline__ void wy_stage(Smem& sm, int tid) {
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
__device__ __forceinline__ void wy_products(Smem& sm, float* rec, int warp, int lane) {
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

}  // namespace tc
}  // namespace kda
