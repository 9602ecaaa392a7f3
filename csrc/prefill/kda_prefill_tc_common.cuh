// Shared by the two passes of the tensor-core chunked prefill (kda_prefill_tc_prepare.cuh and
// kda_prefill_tc_state.cuh): chunk geometry, the workspace record a chunk's operands travel in,
// the chunk -> sequence map, the TF32 WMMA helpers and the phase-cycle profile marks.
#pragma once

#include <mma.h>

#include <type_traits>

#include "prefill_sequence.cuh"

namespace kda {
namespace tc {

constexpr int kC = 64;           // tokens per chunk (= the checkpoint interval)
constexpr int kBlk = 16;         // tokens per block
constexpr int kNB = kC / kBlk;   // blocks per chunk
constexpr int kK = kHeadDim;     // 128 channels
constexpr int kThr = 256;
constexpr int kWarp = kThr / 32;
static_assert(kC == kCheckpointEvery, "a chunk ends on every checkpoint");
// Row pitches of the WMMA operand arrays in shared memory, padded by 4 floats so that the 8 rows
// a tile load touches fall into different banks; tile rows stay 32-byte aligned.
constexpr int kLdK = kK + 4;    // [.. x 128] arrays: S, Qe, Kd, Ke, w, beta v
constexpr int kLdC = kC + 4;    // [64 x 64] arrays: A_qk, A_kk, T

// One workspace record per (chunk, head), fp32, unpadded rows (kda_prefill.h kTcRecordFloats):
// what the state pass needs of a chunk, computed by the prepare pass.
constexpr int kRecQe = 0;                  // [64 x 128] q decayed to the chunk start
constexpr int kRecKd = kRecQe + kC * kK;   // [64 x 128] k decayed to the chunk end
constexpr int kRecW = kRecKd + kC * kK;    // [64 x 128] w = T beta Ke
constexpr int kRecU = kRecW + kC * kK;     // [64 x 128 value rows] u = T beta v
constexpr int kRecAqk = kRecU + kC * kK;   // [64 x 64] A_qk
constexpr int kRecEL = kRecAqk + kC * kC;  // [128] the chunk's total decay per channel
static_assert(kRecEL + kK == kTcRecordFloats, "kda_prefill.h's record size");

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

__device__ __forceinline__ float* chunk_record(const KdaPrefillParams& p, int64_t slot, int h) {
  return p.tc_workspace + (slot * p.H + h) * (int64_t)kTcRecordFloats;
}

// Phase timing for scripts/profile_tc_phases.cu (compiled with -DKDA_TC_PHASE_CYCLES; absent from
// the extension): thread 0 reads clock64() after each block-wide barrier, i.e. when the phase
// before it is done CTA-wide, and adds the cycles per phase to kda_tc_phase_cycles at exit.
// Phases 0..kPrepPhases-1 belong to the prepare pass, the rest to the state pass.
constexpr int kPrepPhases = 8;
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

using namespace nvcuda;
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using FragAc = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
using FragBr = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using FragBc = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

template <typename Frag>
__device__ __forceinline__ void load_tf32(Frag& f, const float* p, unsigned ld) {
  wmma::load_matrix_sync(f, p, ld);
#pragma unroll
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = wmma::__float_to_tf32(f.x[i]);
}

// acc[s] += A[16 x k] B_s[k x 16] for NT (1 or 2) output tiles of a warp, B_1 starting b_next
// floats after B_0 (the next 16 columns); the tiles share A's fragment, loaded once per k-step.
// A row-major (lda); B row-major (FragB = FragBr) or given as B^T row-major, i.e. col-major
// (FragB = FragBc), with leading dimension ldb.
template <typename FragB, int NT>
__device__ __forceinline__ void mma_acc(FragC (&acc)[NT], const float* A, unsigned lda, const float* B,
                                        unsigned ldb, unsigned b_next, int k) {
  constexpr bool kRowB = std::is_same<FragB, FragBr>::value;
  FragA a;
  FragB b[NT];
  for (int kk = 0; kk < k; kk += 8) {
    const float* bk = B + (kRowB ? (size_t)kk * ldb : (size_t)kk);
    load_tf32(a, A + kk, lda);
#pragma unroll
    for (int s = 0; s < NT; ++s) load_tf32(b[s], bk + s * b_next, ldb);
#pragma unroll
    for (int s = 0; s < NT; ++s) wmma::mma_sync(acc[s], a, b[s], acc[s]);
  }
}

// Asynchronous 16-byte global -> shared copies (cp.async); the emulator copies at once.
__device__ __forceinline__ void cp_async16(float* dst, const float* src) {
#ifdef KDA_SIMT_EMULATOR
  dst[0] = src[0]; dst[1] = src[1]; dst[2] = src[2]; dst[3] = src[3];
#else
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src) : "memory");
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
#ifndef KDA_SIMT_EMULATOR
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
#endif
}

// rows x cols floats, unpadded in global memory (row pitch src_ld), into shared rows of pitch
// dst_ld; cols a multiple of 4. All threads of the CTA take part.
__device__ __forceinline__ void copy_rows_async(float* dst, int dst_ld, const float* src, int src_ld, int rows,
                                                int cols) {
  const int per_row = cols / 4;
#pragma unroll 2
  for (int idx = threadIdx.x; idx < rows * per_row; idx += kThr) {
    const int r = idx / per_row, c = idx % per_row * 4;
    cp_async16(dst + r * dst_ld + c, src + (int64_t)r * src_ld + c);
  }
}

}  // namespace tc
}  // namespace kda
