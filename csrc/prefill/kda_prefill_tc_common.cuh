// Shared by the two passes of the tensor-core chunked prefill (kda_prefill_tc_prepare.cuh and
// kda_prefill_tc_state.cuh): chunk geometry, the workspace record a chunk's operands travel in,
// the chunk -> sequence map, the TF32 tensor-core helpers and the phase-cycle profile marks.
#pragma once

#include <cuda_fp16.h>

#ifdef KDA_SIMT_EMULATOR
#include <cstdlib>
#endif

#include "../common/build_options.h"
#include "prefill_sequence.cuh"

namespace kda {
namespace tc {

constexpr int kC = 64;           // tokens per chunk (= the checkpoint interval)
constexpr int kBlk = 16;         // tokens per block
constexpr int kNB = kC / kBlk;   // blocks per chunk
constexpr int kK = kHeadDim;     // 128 channels
constexpr int kThr = 256;        // threads of a state-pass CTA
constexpr int kWarp = kThr / 32;
// Warps of a prepare-pass CTA (one per SM): 16, four per scheduler, so that the latency of its
// CUDA-core phases (shared-memory round trips, MUFU and shuffle chains) hides behind other warps.
// KDA_TC_PREP_WARPS=8 builds the earlier 8-warp CTA (scripts/profile_tc_phases.cu compares both).
#ifndef KDA_TC_PREP_WARPS
#define KDA_TC_PREP_WARPS 16
#endif
constexpr int kPrepWarp = KDA_TC_PREP_WARPS;
constexpr int kPrepThr = kPrepWarp * 32;
static_assert(kPrepWarp == 8 || kPrepWarp == 16, "the prepare pass's warp mappings take 8 or 16 warps");
static_assert(kC == kCheckpointEvery, "a chunk ends on every checkpoint");
// Row pitches of the prepare pass's operand arrays in shared memory, padded by 4 floats so that
// an A-fragment load (8 rows x 4 columns) hits 32 banks; rows stay 16-byte aligned.
constexpr int kLdK = kK + 4;    // [64 x 128] arrays: Qr/Qe, Kq/Ke, Kb/Kd, beta v
constexpr int kLdC = kC + 4;    // [64 x 64] arrays: A_qk, A_kk, T

// KDA_TC_STATE_WGMMA=1 (opt-in, measured slower; common/build_options.h): the state pass's
// 128-row CTAs run their products on wgmma (kda_prefill_tc_state.cuh), which takes Kd as a
// K-major B operand only channel-major, so the record then holds Kd^T [128 channels x 64 tokens]
// (kKdChannelMajor) for every state CTA.
constexpr bool kKdChannelMajor = KDA_TC_STATE_WGMMA;

// One workspace record per (chunk, head), unpadded rows (kda_prefill.h kTcRecordFloats; offsets in
// 4-byte units): what the state pass needs of a chunk, computed by the prepare pass. Qe, Kd, Ke / w
// and A_qk, which the state pass only multiplies on tensor cores, are stored as fp16: its 10-bit
// mantissa is TF32's, so they enter the TF32 products exactly as TF32-rounded fp32 would, at half
// the bytes (the torch mirror measured the same error against fp64 with fp16 fields as with TF32
// ones; they are bounded, Qe, A_qk by the attention scale and Kd, Ke, w by about 1). T beta =
// T diag(beta) (fp32, TF32-rounded; only its blocks on and below the diagonal are written and read)
// takes the place of u = T beta v, which the state pass forms from v itself, so the prepare pass
// never reads v. State CTAs of 128 value rows take Ke (k decayed to the chunk start) and compute
// U = T beta (v - Ke S^T), so that the prepare pass does no product with T at all; those of 64 or
// 32 rows, whose token-major units would need a barrier more per chunk for that, take the WY factor
// w = T beta Ke in the same field and compute U = u - w S^T (docs/kernels.md,
// "U = T beta (v - Ke S^T)"). The launcher tells the prepare pass which (tc_record_w).
constexpr int kRecQe = 0;                      // fp16 [64 x 128] q decayed to the chunk start
constexpr int kRecKd = kRecQe + kC * kK / 2;   // fp16 [64 x 128] k decayed to the chunk end (or its transpose)
constexpr int kRecKw = kRecKd + kC * kK / 2;   // fp16 [64 x 128] Ke (128-row state CTAs) or w = T beta Ke
constexpr int kRecTb = kRecKw + kC * kK / 2;   // fp32 [64 x 64] T diag(beta), TF32-rounded, lower blocks
constexpr int kRecAqk = kRecTb + kC * kC;      // fp16 [64 x 64] A_qk
constexpr int kRecEL = kRecAqk + kC * kC / 2;  // fp32 [128] the chunk's total decay per channel

// Whether state CTAs of bv value rows take w (true) or Ke in the record's kRecKw field.
__host__ __device__ constexpr bool tc_record_w(int bv) { return bv < 128; }
#define KDA_TC_RECORD_KW 1  // tc_record_w exists (scripts/profile_tc_phases.cu builds older trees too)
static_assert(kRecEL + kK == kTcRecordFloats, "kda_prefill.h's record size");

__device__ __forceinline__ __half* rec_half(float* rec, int field) { return reinterpret_cast<__half*>(rec + field); }
__device__ __forceinline__ const __half* rec_half(const float* rec, int field) {
  return reinterpret_cast<const __half*>(rec + field);
}

// Work item -> (chunk slot, head) = (item / H, item % H) without a 64-bit division (tens of
// instructions even where the compiler's check of the high words lets it divide in 32 bits, once
// per item in every thread, by next_prep_item): below 2^31 a multiply by a precomputed reciprocal,
// m = ceil(2^(31 + l) / H) with l = ceil(log2 H), exact for every dividend below 2^31; larger
// items (never in practice) divide.
struct ItemDiv {
  uint32_t m = 0;
  int s = 0, H = 1;
  __host__ __device__ explicit ItemDiv(int heads) : H(heads) {
    int l = 0;
    while ((1ll << l) < heads) ++l;
    s = l - 1;  // q = umulhi(x, m) >> (31 + l - 32)
    m = heads == 1 ? 0u : (uint32_t)(((1ull << (31 + l)) + heads - 1) / heads);
  }
  __host__ __device__ void split(int64_t item, int64_t& cslot, int& h) const {
    if (item <= 0x7fffffff) {
      const uint32_t x = (uint32_t)item;
      const uint32_t q = H == 1 ? x : (uint32_t)(((uint64_t)x * m) >> 32) >> s;
      cslot = q;
      h = (int)(x - q * (uint32_t)H);
    } else {
      cslot = item / H;
      h = (int)(item % H);
    }
  }
};

// Chunk slots: sequence n's chunks occupy slots chunk_base(n) + j, j < ceil(len_n / 64), with
// chunk_base(n) = floor(bos_n / 64) + n; slots never overlap and number at most
// floor(Ttot / 64) + N (kda_prefill.h tc_chunk_slots), known without reading cu_seqlens.
__device__ __forceinline__ int64_t chunk_base(const KdaPrefillParams& p, int n, int64_t base_tok) {
  return (load_index(p.cu_seqlens, p.cu_seqlens_64, n) - base_tok) / kC + n;
}

// The sequence owning chunk slot c (the last n with chunk_base(n) <= c; bases strictly increase).
__device__ __forceinline__ int chunk_sequence(const KdaPrefillParams& p, int64_t c, int64_t base_tok) {
  int lo = 0, hi = p.N - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (chunk_base(p, mid, base_tok) <= c) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// gridDim.x (the emulator keeps it as emu::g_grid: a gridDim macro would clash with cuda_runtime.h).
__device__ __forceinline__ int64_t grid_ctas() {
#ifdef KDA_SIMT_EMULATOR
  return emu::g_grid.x;
#else
  return gridDim.x;
#endif
}

__device__ __forceinline__ float* chunk_record(const KdaPrefillParams& p, int64_t slot, int h) {
  return p.tc_workspace + (slot * p.H + h) * (int64_t)kTcRecordFloats;
}

// Phase timing for scripts/profile_tc_phases.cu (compiled with -DKDA_TC_PHASE_CYCLES; absent from
// the extension): thread 0 reads clock64() after each block-wide barrier, i.e. when the phase
// before it is done CTA-wide, and adds the cycles per phase to kda_tc_phase_cycles at exit.
// Phases 0..kPrepPhases-1 belong to the prepare pass, the rest to the state pass.
constexpr int kPrepPhases = 10;
constexpr int kPhases = kPrepPhases + 3;
#ifdef KDA_TC_PHASE_CYCLES
__device__ unsigned long long kda_tc_phase_cycles[kPhases];
#define KDA_TC_PROFILE_BEGIN() \
  long long tc_last_ = clock64(), tc_acc_[::kda::tc::kPhases] = {}
#define KDA_TC_MARK(i)                        \
  do {                                        \
    if (threadIdx.x == 0) {                   \
      const long long tc_now_ = clock64();    \
      tc_acc_[i] += tc_now_ - tc_last_;       \
      tc_last_ = tc_now_;                     \
    }                                         \
  } while (0)
#define KDA_TC_PROFILE_END()                                                                     \
  do {                                                                                           \
    if (threadIdx.x == 0)                                                                        \
      for (int i_ = 0; i_ < ::kda::tc::kPhases; ++i_)                                            \
        atomicAdd(&::kda::tc::kda_tc_phase_cycles[i_], (unsigned long long)tc_acc_[i_]);          \
  } while (0)
#else
#define KDA_TC_PROFILE_BEGIN() \
  do {                         \
  } while (0)
#define KDA_TC_MARK(i) \
  do {                 \
  } while (0)
#define KDA_TC_PROFILE_END() \
  do {                       \
  } while (0)
#endif

// 4 / 8 consecutive bf16 values as loaded (bf16 pairs in 32-bit words, first in the low half):
// one 8- / 16-byte load when vec (the caller checked the alignment), else 2-byte loads packed,
// which wait for their data here.
__device__ __forceinline__ uint2 ld_raw4(const __nv_bfloat16* src, bool vec) {
  if (vec) {
#ifdef KDA_SIMT_EMULATOR
    if (reinterpret_cast<uintptr_t>(src) % 8 != 0) std::abort();  // the CPU would not notice
#endif
    return *reinterpret_cast<const uint2*>(src);
  }
  const unsigned short* h = reinterpret_cast<const unsigned short*>(src);
  return make_uint2(h[0] | (unsigned)h[1] << 16, h[2] | (unsigned)h[3] << 16);
}
__device__ __forceinline__ uint4 ld_raw8(const __nv_bfloat16* src, bool vec) {
  if (vec) {
#ifdef KDA_SIMT_EMULATOR
    if (reinterpret_cast<uintptr_t>(src) % 16 != 0) std::abort();
#endif
    return *reinterpret_cast<const uint4*>(src);
  }
  const uint2 lo = ld_raw4(src, false), hi = ld_raw4(src + 4, false);
  return make_uint4(lo.x, lo.y, hi.x, hi.y);
}

// Round to TF32 as the tensor cores' operands (cvt.rna: nearest, ties away from zero), as float.
// For a finite x (every operand here) adding half a TF32 unit to the bit pattern and dropping the
// low 13 bits is exactly that rounding (the magnitude rounds to nearest, ties away; a carry moves
// into the exponent, and inf stays inf): one add and one mask where cvt.rna costs three
// instructions (a NaN with its top mantissa bits set would wrap, which no operand here can be).
__device__ __forceinline__ float tf32_round(float x) {
  return __uint_as_float((__float_as_uint(x) + 0x1000u) & ~0x1FFFu);
}

// One m16n8k8 TF32 tensor-core product d += a b on raw mma.sync fragments (PTX ISA layouts, with
// g = lane / 4, t = lane % 4): a = A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4] of the 16 x 8 A;
// b = B[t][g], B[t+4][g] of the 8 x 8 B; d = D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1].
// Operands are TF32 bit patterns (to_tf32); the emulator gathers the warp's fragments.
// The tensor cores ignore an operand's low 13 bits, so to_tf32 leaves out tf32_round's mask.
__device__ __forceinline__ uint32_t to_tf32(float x) { return __float_as_uint(x) + 0x1000u; }
// An A operand read by many mma.sync (3b's Qr, Kq) is stored with to_tf32's bump already added, so
// each ldmatrix word is an operand as it is; tf32_unbump gives back the exact fp32 value to the
// other readers (integer add and subtract: the same bits either way).
__device__ __forceinline__ float tf32_bump(float x) { return __uint_as_float(to_tf32(x)); }
__device__ __forceinline__ float tf32_unbump(float x) { return __uint_as_float(__float_as_uint(x) - 0x1000u); }

__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef KDA_SIMT_EMULATOR
  emu::mma_m16n8k8_tf32(d, a, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// One m16n8k16 fp16 tensor-core product d += a b with fp32 accumulation (PTX ISA layouts): a holds
// fp16 pairs A[g][2t..2t+1], A[g+8][2t..2t+1], A[g][2t+8..2t+9], A[g+8][2t+8..2t+9] (the lower
// column in the low half); b = B[2t..2t+1][g], B[2t+8..2t+9][g]; d as mma_tf32's. fp16 carries
// TF32's 10-bit mantissa, so a product of fp16 operands is as exact as one of TF32 operands, at
// twice the depth per instruction and half the operand bytes; its range is what needs care
// (RowScale below).
__device__ __forceinline__ void mma_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef KDA_SIMT_EMULATOR
  emu::mma_m16n8k16_f16(d, a, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Four 8 x 8 fp16 matrices from shared memory in one instruction (ldmatrix .x4): lane L gives the
// address of row L % 8 of matrix L / 8 (rows 16-byte aligned); r[i] of lane (g, t) is matrix i's
// [g][2t..2t+1], or with kTrans [2t..2t+1][g], i.e. m16n8k16 fragments straight from row-major
// tiles. One 128-byte shared-memory wavefront per matrix, where 2-byte loads of a transposed
// operand took four half-used ones per fragment.
template <bool kTrans>
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const __half* row) {
#ifdef KDA_SIMT_EMULATOR
  emu::ldmatrix_x4(r, row, kTrans);
#else
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#endif
}

// ldmatrix on fp32 data: an 8 x 8 matrix of 16-bit values is an 8 x 4 one of 32-bit words, so
// lane (g, t) receives word t of row g, which is where the m16n8k8 TF32 fragments want them: x4 a
// [16 x 8] A fragment (matrices: rows 0-7 / 8-15 x words 0-3, then words 4-7), x2 an [8 x 8] B
// fragment stored n-major (words 0-3, 4-7). One instruction instead of four / two 4-byte loads.
// Rows are given as shared-memory window addresses in bytes (smem_addr), one register where a
// generic pointer takes two; the emulator keeps the pointer.
#ifdef KDA_SIMT_EMULATOR
using SmemAddr = uintptr_t;
__device__ __forceinline__ SmemAddr smem_addr(const void* p) { return reinterpret_cast<uintptr_t>(p); }
#else
using SmemAddr = unsigned;
__device__ __forceinline__ SmemAddr smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
#endif
__device__ __forceinline__ void ldsm_words_x4(uint32_t (&r)[4], SmemAddr row) {
#ifdef KDA_SIMT_EMULATOR
  emu::ldmatrix_x4(r, reinterpret_cast<const void*>(row), false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(row));
#endif
}
template <int kN>
__device__ __forceinline__ void ldsm_words_x2(uint32_t (&r)[kN], SmemAddr row) {  // r[0], r[1]
  static_assert(kN >= 2);
#ifdef KDA_SIMT_EMULATOR
  emu::ldmatrix_x2(r, reinterpret_cast<const void*>(row));
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(row));
#endif
}

// Two floats as one fp16 pair (round to nearest even), as a 32-bit word (a in the low half).
__device__ __forceinline__ unsigned half2_bits(float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<const unsigned*>(&h);
}

// A power of two 2^e that brings the largest magnitude m of a row of fp32 values into
// [2^14, 2^15), so that the row, times it, is an fp16 operand: no value overflows (fp16 ends
// below 2^16) and every value above m 2^-28 stays a normal fp16 number, as precise as TF32.
// e = 14 - floor(log2 m), clamped to 126 (m zero or below 2^-112: the row is at most 2^14 times
// it, still finite); the scale and its inverse are exact, so unscaling a product loses nothing.
struct RowScale {
  float scale = 1.f, inv = 1.f;
  RowScale() = default;
  __device__ __forceinline__ explicit RowScale(float m) {
    const int E = (int)((__float_as_uint(m) >> 23) & 0xffu) - 127;  // floor(log2 m) for a normal m
    const int e = min(14 - E, 126);                                  // >= -113: m below 2^128
    scale = __uint_as_float((uint32_t)(127 + e) << 23);
    inv = __uint_as_float((uint32_t)(127 - e) << 23);
  }
};

// The largest of m over the eight lanes of a t4 (g = 0..7): a column of an accumulator tile.
__device__ __forceinline__ float column_max(float m) {
  m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 4));
  m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 8));
  return fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 16));
}

// An accumulator tile t (rows g, g + 8; columns 2t4, 2t4 + 1) as fp16 pairs, each column times its
// own power of two over the tile's 16 rows (RowScale of column_max; the whole warp takes part):
// lo = row g, hi = row g + 8, inv = the two columns' inverse scales. The state pass's U (Uh) is
// stored this way, per 16-token tile and value row.
struct ColumnHalves {
  unsigned lo, hi;
  float2 inv;
  __device__ __forceinline__ explicit ColumnHalves(const float (&t)[4]) {
    const RowScale c0(column_max(fmaxf(fabsf(t[0]), fabsf(t[2])))), c1(column_max(fmaxf(fabsf(t[1]), fabsf(t[3]))));
    lo = half2_bits(t[0] * c0.scale, t[1] * c1.scale);
    hi = half2_bits(t[2] * c0.scale, t[3] * c1.scale);
    inv = make_float2(c0.inv, c1.inv);
  }
};

// d += t with column 2t4 times iv.x and column 2t4 + 1 times iv.y (accumulator layout): a
// product over fp16 operands scaled per column, scaled back as it is added.
__device__ __forceinline__ void add_column_scaled(float (&d)[4], const float (&t)[4], float2 iv) {
  d[0] += t[0] * iv.x; d[1] += t[1] * iv.y;
  d[2] += t[2] * iv.x; d[3] += t[3] * iv.y;
}

// A [kRows x kCols] float tile (kCols a multiple of 4) from global rows of pitch kSrcLd into shared
// rows of pitch kDstLd, 16 bytes a copy; all threads of the CTA take part. The shape is a template
// argument so that each thread's copies sit at fixed offsets from two base pointers (immediate
// offsets): the loop over runtime sizes this replaced took about 25 instructions a copy.
template <int kRows, int kCols, int kDstLd, int kSrcLd>
__device__ __forceinline__ void copy_tile_async(float* dst, const float* src) {
  constexpr int kPerRow = kCols / 4, kTotal = kRows * kPerRow, kRowStep = kThr / kPerRow;
  static_assert(kCols % 4 == 0 && kThr % kPerRow == 0, "a row's copies divide the CTA");
  const int r = threadIdx.x / kPerRow, c = threadIdx.x % kPerRow * 4;
  dst += r * kDstLd + c;
  src += r * kSrcLd + c;
#pragma unroll
  for (int i = 0; i < (kTotal + kThr - 1) / kThr; ++i)
    if (kTotal % kThr == 0 || r + i * kRowStep < kRows)
      cp_async16(dst + i * kRowStep * kDstLd, src + i * kRowStep * kSrcLd);
}

}  // namespace tc
}  // namespace kda
