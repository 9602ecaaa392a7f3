// Tensor-core chunked prefill, pass 2 of 2: the serial part. One CTA per (sequence, head, block
// of BV = 128, 64 or 32 value rows), 8 warps; the launcher picks BV. Per 64-token chunk it reads
// the record the prepare pass wrote (kda_prefill_tc_prepare.cuh; Qe, Kd, A_qk and Ke or w in fp16,
// T beta in fp32) and the chunk's v, and computes, with fp32 accumulation,
//   U = T beta (v - Ke S^T)  (128 rows)  or  U = T beta v - w S^T  (64, 32 rows);
//   O = Qe S^T + A_qk U;  S <- S diag(EL) + U^T Kd
// the products with T beta on TF32 tensor cores (m16n8k8; v's bf16 values are exact TF32 operands,
// v - Ke S^T is rounded to TF32), the rest on fp16 tensor cores (mma.sync m16n8k16; fp16 has
// TF32's mantissa, so only the range needs care): the state times a power of two per value row
// (RowScale), and U per value row too, with 128 rows under one scale that also fits the sums it
// joins, with fewer rows per (16-token tile, value row), each tile's partial product scaled back on
// its own. Operands come from
// ldmatrix.
// The fp32 state stays in registers, as the accumulator fragments of the update: warp (vt, q)
// holds value rows vt*16 .. vt*16+15 and channels q*kCW .. q*kCW+kCW-1, where the kNCW warps of a
// value tile split the channels. With 128 rows (kNCW = 1) a warp's tiles are the A fragments of
// Ke S^T and Qe S^T for its rows over all channels, and U's A fragments stay in the registers that
// computed it: one barrier per chunk. With fewer rows the state also goes to shared memory as
// fp16 (scaled per row and warp slice) after each update, and the products with it are computed
// token-major, per unit of 16 tokens x 16 value rows over all 128 channels, so no partial sums
// cross warps: two barriers per chunk (U complete; S and the next record in). The record is
// double-buffered: the next chunk's is copied in (cp.async) from the start of this one, so its
// loads have a whole chunk step to arrive.
#pragma once

#include <type_traits>

#include "kda_prefill_tc_common.cuh"
#include "kda_prefill_tc_units.cuh"
#include "kda_prefill_tc_wgmma.cuh"

// KDA_TC_STATE_WGMMA=1 (kda_prefill_tc_common.cuh): CTAs of 128 value rows run S Ke^T, S Qe^T,
// U^T A_qk^T and U^T Kd as wgmma m64n64k16 (fp16) per warpgroup, Ke, Qe, A_qk and Kd^T copied into
// wgmma's core-matrix layout (f16_core_index); every state CTA then reads Kd^T.

namespace kda {
namespace tc {

template <int BV>
constexpr bool kStateWgmma = KDA_TC_STATE_WGMMA && BV == 128;

// Row pitches (in fp16 elements) of the fp16 record arrays in shared memory: rows 4 banks apart,
// so that the 4-byte loads of S Ke^T's B fragments (8 rows x 4 words per warp), the 2-byte loads of
// Kd's (4 rows x 8 elements) and of A_qk's (8 rows x 4 elements) hit distinct banks (or share a
// word).
constexpr int kLdR = kK + 8;
constexpr int kLdA = kC + 8;
// T beta's rows (floats) 8 banks apart: the 8-byte loads of its fragments (8 rows x 4 column
// pairs per half-warp) hit 32 distinct banks.
constexpr int kLdTb = kC + 8;

template <int BV>
struct StateTiling {
  static constexpr int kVT = BV / 16;           // 16-row value tiles
  static constexpr int kNCW = kWarp / kVT;      // warps per value tile
  static constexpr int kCW = kK / kNCW;         // channels of the state a warp holds
  static constexpr int kSN = kCW / 8;           // its 8-channel state tiles
  static constexpr int kUnits = BV / 32;        // steps 1 and 3: (16 tokens x 16 rows) units per warp
  static constexpr int kLdV = BV + 8;           // bf16 v rows: 16-byte aligned, ldmatrix rows on distinct banks
  static constexpr int kLdUh = BV + 8;          // fp16 U rows: 16-byte aligned, ldmatrix rows on distinct banks
  static_assert(kVT * kNCW == kWarp && kUnits * kWarp * 256 == kC * BV, "BV = 128, 64 or 32");
};

template <int BV>
struct alignas(128) StateSmem {
  using G = StateTiling<BV>;
  struct Record {  // chunk j's in rec[j % 2]
    __half Qe[kC][kLdR];
    __half Kw[kC][kLdR];  // Ke, k decayed to the chunk start (128 rows), or w = T beta Ke (tc_record_w)
    // Kd [tokens][channels] in rows of pitch kLdR, or (kKdChannelMajor) Kd^T [channels][tokens]
    // in rows of pitch kLdA (ldmatrix rows on distinct banks, as A_qk's).
    __half Kd[kKdChannelMajor ? kK : kC][kKdChannelMajor ? kLdA : kLdR];
    float Tb[kC][kLdTb];   // T beta, blocks on and below the diagonal
    __nv_bfloat16 V[kC][G::kLdV];  // the chunk's v (this CTA's value rows), zero past the end
    __half Aqk[kC][kLdA];
    float EL[kK];
  } rec[2];
  // kNCW > 1: the state as step 1's fp16 B operand (rows of pitch kLdR, like Ke's: a B fragment's
  // 8 rows x 4 channel pairs hit distinct banks); row r's channels of warp slice q are times
  // 1 / Sinv[q][r] (row_scales).
  __half S[G::kNCW > 1 ? BV : 1][kLdR];
  float Sinv[G::kNCW][G::kNCW > 1 ? BV : 1];
  // kNCW > 1: U = u - w S^T as fp16 [tokens][value rows], each (16-token tile, row) times
  // 1 / Uinv[tile][row]: the A operand of U^T Kd and the B operand of A_qk U.
  __half Uh[G::kNCW > 1 ? kC : 1][G::kLdUh];
  float Uinv[kNB][G::kNCW > 1 ? BV : 1];
};

// An fp16 [64 x kCols] record field (unpadded) into shared rows of pitch kLd, as 4-byte pairs.
template <int kCols, int kLd>
__device__ __forceinline__ void copy_half_rows_async(__half* dst, const float* src) {
  copy_tile_async<kC, kCols / 2, kLd / 2, kCols / 2>(reinterpret_cast<float*>(dst), src);
}

// An fp16 [kRows x kCols] record field into wgmma's core matrices (f16_core_index), one 16-byte
// piece (8 values of a row) per copy.
template <int kRows, int kCols>
__device__ __forceinline__ void copy_half_cores_async(__half* dst, const float* src) {
  constexpr int kPerRow = kCols / 8, kPieces = kRows * kPerRow;
  static_assert(kPieces % kThr == 0, "whole rounds of copies");
#pragma unroll
  for (int i = 0; i < kPieces / kThr; ++i) {
    const int piece = threadIdx.x + i * kThr, t = piece / kPerRow, j = piece % kPerRow;
    cp_async16(dst + f16_core_index<kCols>(t, 8 * j), src + t * (kCols / 2) + 4 * j);
  }
}

// T beta's blocks on and below the diagonal (those above are never written or read) into shared
// rows of pitch kLdTb: round r copies block row r, 16 rows x 16 (r + 1) floats.
__device__ __forceinline__ void copy_t_beta_async(float (*dst)[kLdTb], const float* src) {
  const int i = threadIdx.x / 16, c = threadIdx.x % 16 * 4;
  static_assert(kThr == 16 * kBlk, "a round is one block row");
#pragma unroll
  for (int r = 0; r < kNB; ++r)
    if (c / kBlk <= r) cp_async16(&dst[kBlk * r + i][c], src + (kBlk * r + i) * kC + c);
}

// The chunk's v rows t0 .. t0 + nt - 1 (BV values from the TokenView's column) into shared rows,
// 16 bytes a piece: asynchronous copies where v's rows are 16-byte aligned (vec), else 2-byte
// loads that wait here; rows past the end zero, so that T beta's zero columns there meet zeros.
template <int BV>
__device__ __forceinline__ void copy_v_rows(__nv_bfloat16 (*dst)[StateTiling<BV>::kLdV], const TokenView& tv, int t0,
                                            int nt, bool vec) {
  constexpr int kPerRow = BV / 8, kPieces = kC * kPerRow;
  static_assert(kPieces % kThr == 0, "whole rounds of copies");
#pragma unroll
  for (int m = 0; m < kPieces / kThr; ++m) {
    const int piece = threadIdx.x + m * kThr, i = piece / kPerRow, c = piece % kPerRow * 8;
    uint4* d = reinterpret_cast<uint4*>(&dst[i][c]);
    const __nv_bfloat16* src = tv.v + (int64_t)(t0 + i) * tv.sv + c;
    if (i >= nt) *d = make_uint4(0u, 0u, 0u, 0u);
    else if (vec) cp_async16(d, src);
    else *d = ld_raw8(src, false);
  }
}

// A chunk's record into one buffer: Ke or w, Kd, EL, for all but transition rows (whose v is
// taken as 0) the chunk's v (tokens t0 .. t0 + nt - 1 of tv), T beta unless the CTA reads w and
// has no v (u = 0: nothing multiplies T beta), and, for a CTA that writes outputs, Qe and A_qk. Ke / w, Qe, Kd and A_qk in padded rows, or in wgmma's layout (kStateWgmma;
// the arrays are large enough for either).
template <int BV>
__device__ __forceinline__ void load_record(typename StateSmem<BV>::Record& r, const float* rec, const TokenView& tv,
                                            int t0, int nt, bool vec_v, bool outp, bool with_v) {
  if constexpr (kStateWgmma<BV>) {
    static_assert(sizeof(r.Kw) >= kC * kK * sizeof(__half) && sizeof(r.Aqk) >= kC * kC * sizeof(__half) &&
                      sizeof(r.Kd) >= kK * kC * sizeof(__half),
                  "room for the core-matrix layout");
    if (outp) copy_half_cores_async<kC, kK>(&r.Qe[0][0], rec + kRecQe);
    copy_half_cores_async<kC, kK>(&r.Kw[0][0], rec + kRecKw);
  } else {
    if (outp) copy_half_rows_async<kK, kLdR>(&r.Qe[0][0], rec + kRecQe);
    copy_half_rows_async<kK, kLdR>(&r.Kw[0][0], rec + kRecKw);
  }
  if constexpr (kStateWgmma<BV>)
    copy_half_cores_async<kK, kC>(&r.Kd[0][0], rec + kRecKd);
  else if constexpr (kKdChannelMajor)
    copy_tile_async<kK, kC / 2, kLdA / 2, kC / 2>(reinterpret_cast<float*>(&r.Kd[0][0]), rec + kRecKd);
  else
    copy_half_rows_async<kK, kLdR>(&r.Kd[0][0], rec + kRecKd);
  if (with_v || !tc_record_w(BV)) copy_t_beta_async(r.Tb, rec + kRecTb);
  if (with_v) copy_v_rows<BV>(r.V, tv, t0, nt, vec_v);
  if (outp) {
    if constexpr (kStateWgmma<BV>) copy_half_cores_async<kC, kC>(&r.Aqk[0][0], rec + kRecAqk);
    else copy_half_rows_async<kC, kLdA>(&r.Aqk[0][0], rec + kRecAqk);
  }
  copy_tile_async<1, kK, kK, kK>(&r.EL[0], rec + kRecEL);
}

// Lane L's row for ldsm_x4 of the m16n8k16 B fragments of two 8-wide n tiles n0, n0 + 8 over
// k0 .. k0 + 15, from a row-major fp16 array of pitch kLd: by rows n (B^T stored, as Ke, Qe and
// A_qk are: r = b0, b1 of tile n0, then of tile n0 + 8), or by rows k with kTrans (as Kd is).
template <int kLd, bool kTrans>
__device__ __forceinline__ const __half* b_rows(const __half* a, int n0, int k0, int lane) {
  const int m = lane / 8, r = lane % 8;
  return kTrans ? a + (k0 + 8 * (m % 2) + r) * kLd + n0 + 8 * (m / 2)
                : a + (n0 + 8 * (m / 2) + r) * kLd + k0 + 8 * (m % 2);
}

// The m16n8k16 A fragment of rows m0 .. m0 + 15 over k0 .. k0 + 15 from a fp16 array of pitch
// kLd stored by rows m (or, kTrans, by rows k): b_rows' two n tiles are the A fragment's rows
// m0 and m0 + 8, so its registers come out as a0, a2, a1, a3.
template <int kLd, bool kTrans>
__device__ __forceinline__ void ldsm_a(uint32_t (&a)[4], const __half* base, int m0, int k0, int lane) {
  uint32_t b[4];
  ldsm_x4<kTrans>(b, b_rows<kLd, kTrans>(base, m0, k0, lane));
  a[0] = b[0]; a[1] = b[2]; a[2] = b[1]; a[3] = b[3];
}

// A warp's state tiles from / to state rows (row pitch 128): s[j] = S[vr][c], S[vr][c+1],
// S[vr+8][c], S[vr+8][c+1] with c = c0 + 8j (the accumulator layout of mma_f16).
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

// The decay S <- S diag(EL) of a warp's state tiles (s[j]'s channels cs + 8j and + 1).
template <int SN>
__device__ __forceinline__ void decay_state(float (&s)[SN][4], const float* EL, int cs) {
#pragma unroll
  for (int j = 0; j < SN; ++j) {
    const float2 el = *reinterpret_cast<const float2*>(&EL[cs + 8 * j]);
    s[j][0] *= el.x; s[j][1] *= el.y; s[j][2] *= el.x; s[j][3] *= el.y;
  }
}

// The token tile (of 16) of unit ui of a warp in the state pass's token-major steps: warp w takes
// tiles w % 4 and 3 - w % 4 of value-row tiles w / 4 + 2 ui, so that with two units each warp's
// output product (A_qk U, longer for later tiles) costs the same.
__device__ __forceinline__ int unit_tokens_tile(int ui, int warp) { return ui % 2 ? 3 - warp % 4 : warp % 4; }

// The largest of m over the four lanes of a row (t4 = 0..3).
__device__ __forceinline__ float quad_max(float m) {
  m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
  return fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
}

// The lane's largest magnitudes of accumulator tiles t[j] (rows g and g + 8: entries 0, 1 and
// 2, 3) folded into m0, m1.
template <int N>
__device__ __forceinline__ void tile_row_max(const float (&t)[N][4], float& m0, float& m1) {
#pragma unroll
  for (int j = 0; j < N; ++j) {
    m0 = fmaxf(m0, fmaxf(fabsf(t[j][0]), fabsf(t[j][1])));
    m1 = fmaxf(m1, fmaxf(fabsf(t[j][2]), fabsf(t[j][3])));
  }
}

// Accumulator tiles t[j] times f0 (row g) and f1 (row g + 8).
template <int N>
__device__ __forceinline__ void scale_tiles(float (&t)[N][4], float f0, float f1) {
#pragma unroll
  for (int j = 0; j < N; ++j) {
    t[j][0] *= f0; t[j][1] *= f0; t[j][2] *= f1; t[j][3] *= f1;
  }
}

// The powers of two (RowScale) for a warp's two state rows vr, vr + 8 over the channels its
// tiles hold: the four lanes of a row (t4 = 0..3) hold them all.
template <int SN>
__device__ __forceinline__ void row_scales(const float (&s)[SN][4], RowScale& r0, RowScale& r1) {
  float m0 = 0.f, m1 = 0.f;
  tile_row_max(s, m0, m1);
  r0 = RowScale(quad_max(m0));
  r1 = RowScale(quad_max(m1));
}

// Two accumulator tiles t0, t1 (rows g, g + 8; columns 2t4, 2t4 + 1 of 8-column tiles k and
// k + 1) as the m16n8k16 fp16 A fragment over those 16 columns, row g times c0.scale and row
// g + 8 times c1.scale.
__device__ __forceinline__ void a_of_tiles(const float (&t0)[4], const float (&t1)[4], const RowScale& c0,
                                           const RowScale& c1, uint32_t (&a)[4]) {
  a[0] = half2_bits(t0[0] * c0.scale, t0[1] * c0.scale);
  a[1] = half2_bits(t0[2] * c1.scale, t0[3] * c1.scale);
  a[2] = half2_bits(t1[0] * c0.scale, t1[1] * c0.scale);
  a[3] = half2_bits(t1[2] * c1.scale, t1[3] * c1.scale);
}

// A warp's state tiles (channels c0 + 8j, + 1) into the shared fp16 state, each row times its
// own power of two over the warp's channels, whose inverse goes to sinv[row] (this warp's slice).
template <int SN>
__device__ __forceinline__ void store_state_half(__half (*S)[kLdR], float* sinv, int vr, int c0, int t4,
                                                 const float (&s)[SN][4]) {
  RowScale r0, r1;
  row_scales(s, r0, r1);
#pragma unroll
  for (int j = 0; j < SN; ++j) {
    *reinterpret_cast<uint32_t*>(&S[vr][c0 + 8 * j]) = half2_bits(s[j][0] * r0.scale, s[j][1] * r0.scale);
    *reinterpret_cast<uint32_t*>(&S[vr + 8][c0 + 8 * j]) = half2_bits(s[j][2] * r1.scale, s[j][3] * r1.scale);
  }
  if (t4 == 0) {
    sinv[vr] = r0.inv;
    sinv[vr + 8] = r1.inv;
  }
}

// bf16 pairs (lower token in the low half) as two TF32 operands: a bf16 value's bits are the top
// half of its fp32 bits, exact in TF32.
__device__ __forceinline__ uint32_t bf16_lo_tf32(uint32_t pair) { return pair << 16; }
__device__ __forceinline__ uint32_t bf16_hi_tf32(uint32_t pair) { return pair & 0xffff0000u; }

// The products with T beta on TF32 tensor cores (m16n8k8), with the contraction over tokens in the
// order ldmatrix .trans hands v out: k-slots t4 and t4 + 4 are tokens 8 ks + 2 t4 and
// 8 ks + 2 t4 + 1 (one 8-byte load of T beta's row). T beta is 0 above its diagonal, so token
// tile i sums over k-steps ks <= i only.
//
// 128-row CTAs: d[jt] (the accumulator layout of X^T: value rows vr0 + g (+ 8) x tokens
// 8 jt + 2 t4 (+ 1)) += v^T, from v's 8 x 8 tiles transposed as they load.
template <int kLdV>
__device__ __forceinline__ void add_v_rows(float (&d)[8][4], const __nv_bfloat16 (*V)[kLdV], int vr0, int lane) {
  const int m = lane / 8;
#pragma unroll
  for (int kp = 0; kp < kC / 16; ++kp) {  // token tiles 2 kp, 2 kp + 1; matrices (tile, rows lo / hi)
    uint32_t r[4];
    ldsm_x4<true>(r, reinterpret_cast<const __half*>(&V[16 * kp + 8 * (m / 2) + lane % 8][vr0 + 8 * (m % 2)]));
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float(&t)[4] = d[2 * kp + h];
      t[0] += __uint_as_float(bf16_lo_tf32(r[2 * h]));
      t[1] += __uint_as_float(bf16_hi_tf32(r[2 * h]));
      t[2] += __uint_as_float(bf16_lo_tf32(r[2 * h + 1]));
      t[3] += __uint_as_float(bf16_hi_tf32(r[2 * h + 1]));
    }
  }
}

// 128-row CTAs: Z^T (d, as add_v_rows leaves it) -> U^T = Z^T (T beta)^T in place: A = Z^T from
// the registers (an accumulator tile's entries 0..3 are the A fragment's k-slots t4, t4 + 4 of
// rows g, g + 8 in the token order above), B = T beta^T. Token tile jt needs tiles ks <= jt, so
// the tiles are overwritten from the last one down.
__device__ __forceinline__ void t_beta_rows(float (&d)[8][4], const float (*Tb)[kLdTb], int lane) {
  const int g = lane / 4, t4 = lane % 4;
#pragma unroll
  for (int ks = 0; ks < 8; ++ks)
#pragma unroll
    for (int e = 0; e < 4; ++e) d[ks][e] = tf32_bump(d[ks][e]);
#pragma unroll
  for (int jt = 7; jt >= 0; --jt) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int ks = 0; ks <= jt; ++ks) {
      const uint32_t a[4] = {__float_as_uint(d[ks][0]), __float_as_uint(d[ks][2]), __float_as_uint(d[ks][1]),
                             __float_as_uint(d[ks][3])};
      const float2 b = *reinterpret_cast<const float2*>(&Tb[8 * jt + g][8 * ks + 2 * t4]);
      mma_tf32(acc, a, __float_as_uint(b.x), __float_as_uint(b.y));
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) d[jt][e] = acc[e];
  }
}

// Token-major units (64 and 32 rows, record w): d[nn] += u = T beta v [16 tokens 16 tt .. x 8 value
// rows r0 + 8 nn ..] (the accumulator layout of X), A = T beta (rows 16 tt + g, + 8), B = v (its
// 8 x 8 tiles transposed as they load).
template <int kLdV>
__device__ __forceinline__ void add_u_tokens(float (&d)[2][4], const __nv_bfloat16 (*V)[kLdV],
                                             const float (*Tb)[kLdTb], int tt, int r0, int lane) {
  const int g = lane / 4, t4 = lane % 4, m = lane / 8;
#pragma unroll 1
  for (int kp = 0; kp <= tt; ++kp) {  // k-steps 2 kp, 2 kp + 1; matrices (k-step, rows nn)
    uint32_t r[4];
    ldsm_x4<true>(r, reinterpret_cast<const __half*>(&V[16 * kp + 8 * (m / 2) + lane % 8][r0 + 8 * (m % 2)]));
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int k = 16 * kp + 8 * h + 2 * t4;
      const float2 lo = *reinterpret_cast<const float2*>(&Tb[16 * tt + g][k]);
      const float2 hi = *reinterpret_cast<const float2*>(&Tb[16 * tt + g + 8][k]);
      const uint32_t a[4] = {__float_as_uint(lo.x), __float_as_uint(hi.x), __float_as_uint(lo.y),
                             __float_as_uint(hi.y)};
#pragma unroll
      for (int nn = 0; nn < 2; ++nn)
        mma_tf32(d[nn], a, bf16_lo_tf32(r[2 * h + nn]), bf16_hi_tf32(r[2 * h + nn]));
    }
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
  const bool vec_v = rows_aligned(tv.v, tv.sv, 16);  // v's rows take 16-byte copies
  if (len > 0)
    load_record<BV>(sm.rec[0], chunk_record(p, cbase, h), tv, 0, min(kC, len), vec_v, outp, !unit.transition);
  if constexpr (G::kNCW > 1) store_state_half<G::kSN>(sm.S, sm.Sinv[q], vr, cs, t4, s);
  cp_async_wait_all();
  if constexpr (kStateWgmma<BV>) fence_smem_for_wgmma();  // this thread's copies, for the wgmma reads
  __syncthreads();

  KDA_TC_PROFILE_BEGIN();
  for (int t0 = 0, j = 0; t0 < len; t0 += kC, ++j) {
    const int nt = min(kC, len - t0);
    auto& rs = sm.rec[j & 1];
    // The next chunk's record into the other buffer, whose last reads (step 3) were before the
    // previous chunk's final barrier; waited for at this chunk's end.
    if (t0 + kC < len)
      load_record<BV>(sm.rec[(j + 1) & 1], chunk_record(p, cbase + j + 1, h), tv, t0 + kC, min(kC, len - t0 - kC),
                      vec_v, outp, !unit.transition);

    if constexpr (G::kNCW == 1) {
      static_assert(!tc_record_w(BV), "128-row CTAs read Ke");
      // A warp holds all 128 channels of its 16 value rows: X^T = S Ke^T and Y^T = S Qe^T,
      // [16 rows x 64 tokens] as 8 token tiles, are whole, and U's rows it writes are the only
      // ones its update and output read, so the chunk needs no barrier until its end.
      // On fp16 tensor cores (m16n8k16): A = the state tiles 2kk, 2kk + 1 (channels 16kk .. 16kk
      // + 15 in order) times a power of two per value row (RowScale; the four lanes of a row hold
      // its 128 channels), B = Ke / Qe as stored (fp16 pairs of adjacent channels); the products
      // are scaled back exactly. Half the TF32 form's instructions, with no conversion of B.
      RowScale r0, r1;
      row_scales(s, r0, r1);
      float x[8][4], y[8][4];
#pragma unroll
      for (int jt = 0; jt < 8; ++jt)
#pragma unroll
        for (int e = 0; e < 4; ++e) x[jt][e] = y[jt][e] = 0.f;
      if constexpr (kStateWgmma<BV>) {
        // The same products per warpgroup (warps 4 w' .. 4 w' + 3: value rows 64 w' ..), x and y
        // as its accumulators, A from the same registers, in two rounds of four k-steps (a product
        // reads its A registers until the wait).
        const SmemAddr bw = smem_addr(&rs.Kw[0][0]), bq = smem_addr(&rs.Qe[0][0]);
        auto products = [&](auto with_y) {
#pragma unroll
          for (int round = 0; round < 2; ++round) {
            uint32_t a[4][4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a_of_tiles(s[8 * round + 2 * i], s[8 * round + 2 * i + 1], r0, r1, a[i]);
            wgmma_fence();
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int k0 = 16 * (4 * round + i);
              wgmma_m64n64k16_f16<kK>(x, a[i], bw + 2 * f16_core_index<kK>(0, k0));
              if constexpr (decltype(with_y)::value)
                wgmma_m64n64k16_f16<kK>(y, a[i], bq + 2 * f16_core_index<kK>(0, k0));
            }
            wgmma_commit_and_wait();
          }
        };
        if (outp) products(std::true_type{});
        else products(std::false_type{});
      } else {
#pragma unroll
        for (int kk = 0; kk < G::kSN / 2; ++kk) {
          uint32_t a[4];
          a_of_tiles(s[2 * kk], s[2 * kk + 1], r0, r1, a);
#pragma unroll
          for (int jt = 0; jt < 8; jt += 2) {  // B fragments of token tiles jt, jt + 1: one ldmatrix
            uint32_t b[4];
            ldsm_x4<false>(b, b_rows<kLdR, false>(&rs.Kw[0][0], 8 * jt, 16 * kk, lane));
            mma_f16(x[jt], a, b[0], b[1]);
            mma_f16(x[jt + 1], a, b[2], b[3]);
            if (outp) {
              ldsm_x4<false>(b, b_rows<kLdR, false>(&rs.Qe[0][0], 8 * jt, 16 * kk, lane));
              mma_f16(y[jt], a, b[0], b[1]);
              mma_f16(y[jt + 1], a, b[2], b[3]);
            }
          }
        }
      }
      // U^T = Z^T (T beta)^T, Z = v - X, in fp32 in X's registers: -X unscaled, v added (none for
      // transition rows: v = 0), then the product on TF32 tensor cores in place (t_beta_rows).
      // The lane's U^T[vr][t], [vr][t+1], [vr+8][t], [vr+8][t+1], t = 8 jt + 2 t4, which for
      // jt = 2kk, 2kk + 1 are the m16n8k16 A fragment of U^T over tokens 16kk .. 16kk + 15 as they
      // stand, so U never goes to shared memory.
      scale_tiles(x, -r0.inv, -r1.inv);
      if (!unit.transition) add_v_rows<G::kLdV>(x, rs.V, vt * 16, lane);
      t_beta_rows(x, rs.Tb, lane);
      KDA_TC_MARK(kPrepPhases);  // thread 0 only: no barrier here

      // 2. O^T += U^T A_qk^T (A_qk is 0 above the diagonal: token tiles jt >= 2kk only) and
      //    S <- S diag(EL) + U^T Kd on fp16 tensor cores, B = A_qk / Kd as stored. One power of two
      //    per value row scales U (the fp16 operand) and the accumulators it adds to, S and Y
      //    (exact both ways): RowScale of the row's largest |U|, |S EL| or |Y|, so nothing
      //    overflows, and a U entry that it leaves subnormal in fp16 is below 2^-24 of what it is
      //    added to.
      decay_state(s, rs.EL, cs);
      // Y from step 1's scale (r) to this one (q): unscaled here, scaled below, each exact and
      // finite. One multiply by r.inv q.scale could overflow (a large state, then a row of zeros:
      // 2^5 2^126), and 0 x inf is NaN.
      scale_tiles(y, r0.inv, r1.inv);
      float m0 = 0.f, m1 = 0.f;
      tile_row_max(x, m0, m1);
      tile_row_max(y, m0, m1);
      tile_row_max(s, m0, m1);
      const RowScale q0(quad_max(m0)), q1(quad_max(m1));
      scale_tiles(y, q0.scale, q1.scale);
      scale_tiles(s, q0.scale, q1.scale);
      if constexpr (kStateWgmma<BV>) {
        // Y^T += U^T A_qk^T and S += U^T Kd per warpgroup on wgmma (A_qk's zero blocks above the
        // diagonal taken too), A = U^T from the same registers, the state tiles the accumulators.
        uint32_t a[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) a_of_tiles(x[2 * kk], x[2 * kk + 1], q0, q1, a[kk]);
        wgmma_fence();
        if (outp) {
          const SmemAddr ba = smem_addr(&rs.Aqk[0][0]);
#pragma unroll
          for (int kk = 0; kk < 4; ++kk) wgmma_m64n64k16_f16<kC>(y, a[kk], ba + 2 * f16_core_index<kC>(0, 16 * kk));
        }
        // The state's channels 0..63 (tiles 0..7) and 64..127 (tiles 8..15), Kd^T's rows n.
        auto& s_lo = *reinterpret_cast<float(*)[8][4]>(&s[0][0]);
        auto& s_hi = *reinterpret_cast<float(*)[8][4]>(&s[8][0]);
        const SmemAddr bk = smem_addr(&rs.Kd[0][0]);
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          wgmma_m64n64k16_f16<kC>(s_lo, a[kk], bk + 2 * f16_core_index<kC>(0, 16 * kk));
          wgmma_m64n64k16_f16<kC>(s_hi, a[kk], bk + 2 * f16_core_index<kC>(64, 16 * kk));
        }
        wgmma_commit_and_wait();
      } else {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          uint32_t a[4], b[4];
          a_of_tiles(x[2 * kk], x[2 * kk + 1], q0, q1, a);
          if (outp) {
#pragma unroll
            for (int jt = 2 * kk; jt < 8; jt += 2) {
              ldsm_x4<false>(b, b_rows<kLdA, false>(&rs.Aqk[0][0], 8 * jt, 16 * kk, lane));
              mma_f16(y[jt], a, b[0], b[1]);
              mma_f16(y[jt + 1], a, b[2], b[3]);
            }
          }
#pragma unroll
          for (int j = 0; j < G::kSN; j += 2) {  // B = Kd[16kk + k][8j + n], transposed as it loads
            ldsm_x4<true>(b, b_rows<kLdR, true>(&rs.Kd[0][0], 8 * j, 16 * kk, lane));
            mma_f16(s[j], a, b[0], b[1]);
            mma_f16(s[j + 1], a, b[2], b[3]);
          }
        }
      }
      scale_tiles(s, q0.inv, q1.inv);
      scale_tiles(y, q0.inv, q1.inv);
      KDA_TC_MARK(kPrepPhases + 1);
#pragma unroll
      for (int jt = 0; jt < 8; ++jt) {
        if (!outp) continue;
        const int t = 8 * jt + 2 * t4;  // y[jt] = O^T[vr][t], [vr][t+1], [vr+8][t], [vr+8][t+1]
        __nv_bfloat16* o = tv.o + (int64_t)(t0 + t) * p.o_st + vr;
        if (t < nt) { o[0] = __float2bfloat16(y[jt][0]); o[8] = __float2bfloat16(y[jt][2]); }
        if (t + 1 < nt) { o[p.o_st] = __float2bfloat16(y[jt][1]); o[p.o_st + 8] = __float2bfloat16(y[jt][3]); }
      }
    } else {
      // 1. X = w S^T and Y = Qe S^T in token-major form, [64 tokens x BV value rows] as units of
      //    16 tokens (tt) x 16 rows (rt), whole products over the 128 channels, so no partial sums
      //    cross warps, on fp16 tensor cores (m16n8k16): A = w / Qe as stored, B = the shared fp16
      //    state. Each warp slice q of the channels carries its own row scales, so its partial
      //    products are scaled back (Sinv) and summed in fp32. u = T beta v, which does not depend
      //    on the state, comes first (add_u_tokens; none for transition rows, whose u is 0), so
      //    that it is off the chunk's dependent chain. Then U = u - X to shared memory as fp16
      //    (below); Y stays in registers for step 3.
      static_assert(tc_record_w(BV), "token-major CTAs read w");
      float y[G::kUnits][2][4];
#pragma unroll
      for (int ui = 0; ui < G::kUnits; ++ui) {
        const int tt = unit_tokens_tile(ui, warp), rt = warp / 4 + 2 * ui;
        float x[2][4] = {}, u[2][4] = {};
        if (!unit.transition) add_u_tokens<G::kLdV>(u, rs.V, rs.Tb, tt, rt * 16, lane);
#pragma unroll
        for (int nn = 0; nn < 2; ++nn)
#pragma unroll
          for (int e = 0; e < 4; ++e) y[ui][nn][e] = 0.f;
        const int m0 = tt * 16 + g;  // tokens m0, m0 + 8 of this lane's A and accumulator rows
#pragma unroll
        for (int qs = 0; qs < G::kNCW; ++qs) {
          float xs[2][4] = {}, ys[2][4] = {};
#pragma unroll
          for (int k0 = qs * G::kCW; k0 < (qs + 1) * G::kCW; k0 += 16) {
            // A = w / Qe, tokens tt*16 .. tt*16 + 15 over channels k0 .. k0 + 15.
            uint32_t aw[4], aq[4] = {0u, 0u, 0u, 0u}, b[4];
            ldsm_a<kLdR, false>(aw, &rs.Kw[0][0], tt * 16, k0, lane);
            if (outp) ldsm_a<kLdR, false>(aq, &rs.Qe[0][0], tt * 16, k0, lane);
            ldsm_x4<false>(b, b_rows<kLdR, false>(&sm.S[0][0], rt * 16, k0, lane));  // value rows nn = 0, 1
#pragma unroll
            for (int nn = 0; nn < 2; ++nn) {
              mma_f16(xs[nn], aw, b[2 * nn], b[2 * nn + 1]);
              if (outp) mma_f16(ys[nn], aq, b[2 * nn], b[2 * nn + 1]);
            }
          }
#pragma unroll
          for (int nn = 0; nn < 2; ++nn) {  // columns r, r + 1 = value rows, r = rt*16 + nn*8 + 2 t4
            const float2 iv = *reinterpret_cast<const float2*>(&sm.Sinv[qs][rt * 16 + nn * 8 + 2 * t4]);
            add_column_scaled(x[nn], xs[nn], iv);
            add_column_scaled(y[ui][nn], ys[nn], iv);
          }
        }
        // x[nn] = X[m0][r], X[m0][r+1], X[m0+8][r], X[m0+8][r+1] with r = rt*16 + nn*8 + 2 t4.
        // U = u - X to the fp16 copy Uh, each value row's 16 tokens of this unit times their own
        // power of two (RowScale; the 8 lanes of a t4 hold them), whose inverse goes to
        // Uinv[tt][r]: steps 2 and 3 contract over tokens one 16-token tile at a time, so each
        // tile's partial product is scaled back on its own.
#pragma unroll
        for (int nn = 0; nn < 2; ++nn) {
          const int r = rt * 16 + nn * 8 + 2 * t4;
          const float d[4] = {u[nn][0] - x[nn][0], u[nn][1] - x[nn][1], u[nn][2] - x[nn][2], u[nn][3] - x[nn][3]};
          const ColumnHalves uh(d);
          *reinterpret_cast<uint32_t*>(&sm.Uh[m0][r]) = uh.lo;
          *reinterpret_cast<uint32_t*>(&sm.Uh[m0 + 8][r]) = uh.hi;
          if (g == 0) *reinterpret_cast<float2*>(&sm.Uinv[tt][r]) = uh.inv;
        }
      }
      __syncthreads();  // U complete; every read of S done
      KDA_TC_MARK(kPrepPhases);

      // 2. S <- S diag(EL) + U^T Kd on the warp's state tiles on fp16 tensor cores, one 16-token
      //    tile kk at a time: A = U^T (Uh transposed as it loads), B = Kd; each tile's product
      //    times its rows' Uinv into the state. Then S to shared memory for the next chunk's step 1.
      decay_state(s, rs.EL, cs);
#pragma unroll 1
      for (int kk = 0; kk < kNB; ++kk) {
        uint32_t a[4], b[4];
        ldsm_a<G::kLdUh, true>(a, &sm.Uh[0][0], vt * 16, 16 * kk, lane);
        const float i0 = sm.Uinv[kk][vr], i1 = sm.Uinv[kk][vr + 8];
#pragma unroll
        for (int j = 0; j < G::kSN; j += 2) {  // two state tiles at a time: few live partials
          if constexpr (kKdChannelMajor)  // Kd^T: rows n
            ldsm_x4<false>(b, b_rows<kLdA, false>(&rs.Kd[0][0], cw0 + 8 * j, 16 * kk, lane));
          else
            ldsm_x4<true>(b, b_rows<kLdR, true>(&rs.Kd[0][0], cw0 + 8 * j, 16 * kk, lane));
          float t[2][4] = {};
          mma_f16(t[0], a, b[0], b[1]);
          mma_f16(t[1], a, b[2], b[3]);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            s[j + h][0] += t[h][0] * i0; s[j + h][1] += t[h][1] * i0;
            s[j + h][2] += t[h][2] * i1; s[j + h][3] += t[h][3] * i1;
          }
        }
      }
      store_state_half<G::kSN>(sm.S, sm.Sinv[q], vr, cs, t4, s);
      KDA_TC_MARK(kPrepPhases + 1);  // thread 0 only: no barrier here

      // 3. O += A_qk U on the units' tokens on fp16 tensor cores, one 16-token tile kk <= tt at a
      //    time (A_qk is 0 above the diagonal): A = A_qk, B = U (Uh transposed as it loads); each
      //    tile's product times its columns' Uinv into the output. O out as bf16.
      if (outp) {
#pragma unroll
        for (int ui = 0; ui < G::kUnits; ++ui) {
          const int tt = unit_tokens_tile(ui, warp), rt = warp / 4 + 2 * ui;
          const int m0 = tt * 16 + g;
          for (int kk = 0; kk <= tt; ++kk) {
            uint32_t a[4], b[4];
            ldsm_a<kLdA, false>(a, &rs.Aqk[0][0], tt * 16, 16 * kk, lane);
            ldsm_x4<true>(b, b_rows<G::kLdUh, true>(&sm.Uh[0][0], rt * 16, 16 * kk, lane));
#pragma unroll
            for (int nn = 0; nn < 2; ++nn) {
              float t[4] = {};
              mma_f16(t, a, b[2 * nn], b[2 * nn + 1]);
              const float2 iv = *reinterpret_cast<const float2*>(&sm.Uinv[kk][rt * 16 + nn * 8 + 2 * t4]);
              add_column_scaled(y[ui][nn], t, iv);
            }
          }
          // y[ui][nn] = O[m0][r], O[m0][r+1], O[m0+8][r], O[m0+8][r+1] with r = rt*16 + nn*8 + 2 t4
#pragma unroll
          for (int nn = 0; nn < 2; ++nn) {
            const int r = rt * 16 + nn * 8 + 2 * t4;
            __nv_bfloat16* o = tv.o + (int64_t)(t0 + m0) * p.o_st + r;
            if (m0 < nt) { o[0] = __float2bfloat16(y[ui][nn][0]); o[1] = __float2bfloat16(y[ui][nn][1]); }
            if (m0 + 8 < nt) {
              o[8 * p.o_st] = __float2bfloat16(y[ui][nn][2]);
              o[8 * p.o_st + 1] = __float2bfloat16(y[ui][nn][3]);
            }
          }
        }
      }
    }
    const int tend = t0 + nt;
    if (ckpt && tend % kCheckpointEvery == 0)
      store_state_tiles(ckpt + (int64_t)(tend / kCheckpointEvery - 1) * p.inter_ss, vr, cs, s);
    cp_async_wait_all();  // the next chunk's record (this thread's copies)
    if constexpr (kStateWgmma<BV>) fence_smem_for_wgmma();
    __syncthreads();      // this chunk's buffer free for the one after; the next chunk's record visible
    KDA_TC_MARK(kPrepPhases + 2);
  }
  // Final state (the initial one, or zeros, for an empty sequence).
  if (unit.flags & kUnitFinalPool) store_state_tiles(dst, vr, cs, s);
  if (unit.flags & kUnitFinalEntry) store_state_tiles(entry_rows(p, unit.entry_out, h, blockIdx.x * BV), vr, cs, s);
  KDA_TC_PROFILE_END();
}

}  // namespace kda
