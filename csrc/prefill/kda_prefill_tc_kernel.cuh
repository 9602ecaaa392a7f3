// Tensor-core chunked varlen KDA prefill: the contract of kda_prefill_kernel.cuh
// (KdaPrefillParams), 64-token chunks, the matrix products on TF32 tensor cores (WMMA m16n16k8,
// fp32 accumulation). kda_serving/ops/tensorcore_mirror.py is this algorithm in torch, operand
// for operand; docs/kernels.md has the derivation.
//
// One CTA per (sequence, head, half of the value rows); 8 warps; the fp32 state [64 rows x 128]
// lives in shared memory across chunks. Per chunk of C = 64 tokens in 4 blocks of 16, with
// a_t = exp(g_t) <= 1, Ploc/Rloc the forward/backward running products of a_t inside a block,
// Ptot the block totals, pre_I / post_J the products of the totals before I / after J:
//   Qr = q Ploc, Kq = k Ploc, Kb = k Rloc                              (factors <= 1)
//   A_qk, A_kk off-diagonal block (I, J<I) = [Qr_I; Kq_I] . (Kb_J * prod_{J<M<I} Ptot_M)^T
//   A_qk, A_kk diagonal blocks: exact on CUDA cores with running products E_ij = prod a_t
//   T = (I + beta A_kk)^-1 (fp32, blocked forward substitution)
//   Qe = Qr pre, Ke = Kq pre, Kd = Kb post, EL = prod Ptot
//   W = beta (v - Ke S^T);  U = T W;  O = Qe S^T + A_qk U;  S <- S diag(EL) + U^T Kd
// Every decay factor is a product of values <= 1, so no gate, bounded or not, overflows.
#pragma once

#include <mma.h>

#include <type_traits>

#include "prefill_sequence.cuh"

namespace kda {
namespace tc {

constexpr int kC = 64;           // tokens per chunk (= the checkpoint interval)
constexpr int kBlk = 16;         // tokens per block
constexpr int kNB = kC / kBlk;   // blocks per chunk
constexpr int kBV = 64;          // value rows per CTA
constexpr int kK = kHeadDim;     // 128 channels
constexpr int kThr = 256;
constexpr int kWarp = kThr / 32;
static_assert(kC == kCheckpointEvery, "a chunk ends on every checkpoint");
// Row pitches of the WMMA operand arrays, padded by 4 floats so that the 8 rows a tile load
// touches fall into different shared-memory banks; tile rows stay 32-byte aligned.
constexpr int kLdK = kK + 4;    // [.. x 128] arrays: S, Qr, Kq, Kb
constexpr int kLdC = kC + 4;    // [64 x 64] arrays: A_qk, A_kk, T
constexpr int kLdV = kBV + 4;   // [64 tokens x 64 rows] arrays: W, U

// Phase timing for scripts/profile_tc_phases.cu (compiled with -DKDA_TC_PHASE_CYCLES; absent from
// the extension): thread 0 reads clock64() after each block-wide barrier, i.e. when the phase
// before it is done CTA-wide, and adds the cycles per phase to kda_tc_phase_cycles at exit.
constexpr int kPhases = 12;
#ifdef KDA_TC_PHASE_CYCLES
// Probe: phase 4a runs twice, the second time multiplying by 1 (phase 11). The second pass runs
// the very instructions of the first right after it, so the difference between the two is what
// the first pays for fetching its code (and for anything else a warm re-run does not pay).
constexpr int kProbeReps = 2;
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
constexpr int kProbeReps = 1;
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

struct alignas(128) Smem {
  float S[kBV][kLdK];  // state rows v0 .. v0+63, fp32
  float Qr[kC][kLdK];  // q Ploc, then Qe
  float Kq[kC][kLdK];  // k Ploc, then Ke
  float Kb[kC][kLdK];  // k Rloc, then Kd
  union {
    float al[kC][kK];  // a_t, until the decayed operands are built (2c)
    struct {
      float T[kC][kLdC];  // (I + beta A_kk)^-1
      float U[kC][kLdV];  // first the substitution's 16x16 temporaries, then U = T W
    } tu;
  } r1;
  union {
    float scratch[kWarp][kBlk][8];  // per-warp scaled Kb tile of one k-step
    float W[kC][kLdV];              // beta (v - Ke S^T), then the output tile staging
  } r2;
  float Aqk[kC][kLdC];
  float Akk[kC][kLdC];
  float Ptot[kNB][kK];
  float pre[kNB][kK];
  float post[kNB][kK];
  float EL[kK];
  float beta[kC];
};

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

// acc[s] += A[16 x k] B_s[k x 16] for the two output tiles of a warp, B_1 starting b_next floats
// after B_0 (the next 16 columns); the tiles share A's fragment, loaded once per k-step. A
// row-major (lda); B row-major (FragB = FragBr) or given as B^T row-major, i.e. col-major
// (FragB = FragBc), with leading dimension ldb.
template <typename FragB>
__device__ __forceinline__ void mma_acc2(FragC (&acc)[2], const float* A, unsigned lda, const float* B,
                                         unsigned ldb, unsigned b_next, int k) {
  constexpr bool kRowB = std::is_same<FragB, FragBr>::value;
  FragA a;
  FragB b0, b1;
  for (int kk = 0; kk < k; kk += 8) {
    const float* bk = B + (kRowB ? (size_t)kk * ldb : (size_t)kk);
    load_tf32(a, A + kk, lda);
    load_tf32(b0, bk, ldb);
    load_tf32(b1, bk + b_next, ldb);
    wmma::mma_sync(acc[0], a, b0, acc[0]);
    wmma::mma_sync(acc[1], a, b1, acc[1]);
  }
}

template <typename StateT>
__device__ __forceinline__ void copy_state_out(const Smem& sm, StateT* dst) {
  for (int idx = threadIdx.x * 4; idx < kBV * kK; idx += kThr * 4) {
    const float x[4] = {sm.S[idx / kK][idx % kK], sm.S[idx / kK][idx % kK + 1], sm.S[idx / kK][idx % kK + 2],
                        sm.S[idx / kK][idx % kK + 3]};
    StateIO<StateT>::store(dst + idx, x);
  }
}

}  // namespace tc

// grid = (V / 64, H, N), tc::kThr threads, dynamic smem sizeof(tc::Smem).
template <typename StateT>
__global__ void __launch_bounds__(tc::kThr, 1) kda_prefill_tc_kernel(const KdaPrefillParams p) {
  using namespace tc;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  const int v0 = blockIdx.x * kBV, h = blockIdx.y, n = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const TokenView tv = prefill_tokens(p, n, h, v0);
  const int len = tv.len;
  if (prefill_null_slot<kBV, kThr>(p, tv, n)) return;
  const int slot = p.slots[n];
  StateT* dst = prefill_state_rows<StateT>(p, slot, h, v0);
  StateT* ckpt = prefill_checkpoint_rows<StateT>(p, n, h, v0);

  // Initial state rows into shared memory (zeros without an initial state).
  for (int idx = tid * 4; idx < kBV * kK; idx += kThr * 4) {
    float x[4] = {0.f, 0.f, 0.f, 0.f};
    if (p.has_initial_state[n]) StateIO<StateT>::load(dst + idx, x);
    float* s = &sm.S[idx / kK][idx % kK];
    s[0] = x[0]; s[1] = x[1]; s[2] = x[2]; s[3] = x[3];
  }

  const float a_h = expf(p.A_log[h]);
  const int ch = tid % kK;          // channel of this thread in the per-channel passes
  const int half = tid / kK;        // which two blocks of the chunk it walks
  const int c4 = lane * 4;          // first of the 4 channels of this lane in the per-token passes
  float dtb4[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) dtb4[j] = p.dt_bias[h * kHeadDim + c4 + j];

  KDA_TC_PROFILE_BEGIN();
  for (int t0 = 0; t0 < len; t0 += kC) {
    const int nt = min(kC, len - t0);
    __syncthreads();  // the previous chunk (or the initial load) is complete
    KDA_TC_MARK(0);

    // 1. The chunk's inputs into shared memory, read from global memory once: q, k L2-normalised
    //    and not yet decayed in Qr, Kq; the per-token decays a_t in al (1 past the end); beta.
    //    One warp per token, 4 channels per lane. (a) All loads of a warp's tokens are issued
    //    before the first is used, so their latencies overlap; the raw values go to shared
    //    memory. (b) Norms, gates and beta one token at a time in a loop that is not unrolled:
    //    unrolled over the 8 tokens this pass was half of the kernel's machine code, which is
    //    fetched again for every chunk (the profile's warm re-run of a phase costs a fifth of
    //    its first run). Each lane reads back only what it wrote; same arithmetic either way.
    {
      constexpr int kPer = kC / kWarp;
      float qv[kPer][4], kv[kPer][4], gv[kPer][4], bv[kPer];
#pragma unroll
      for (int m = 0; m < kPer; ++m) {
        const int i = warp + m * kWarp;
        const int64_t t = t0 + i;
        const bool live = i < nt;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          qv[m][j] = live ? bf2f(tv.q[t * p.q_st + c4 + j]) : 0.f;
          kv[m][j] = live ? bf2f(tv.k[t * p.k_st + c4 + j]) : 0.f;
          gv[m][j] = live ? bf2f(tv.g[t * p.g_st + c4 + j]) : 0.f;
        }
        bv[m] = live ? bf2f(tv.beta[t * p.beta_st]) : 0.f;
      }
#pragma unroll
      for (int m = 0; m < kPer; ++m) {
        const int i = warp + m * kWarp;
        *reinterpret_cast<float4*>(&sm.Qr[i][c4]) = make_float4(qv[m][0], qv[m][1], qv[m][2], qv[m][3]);
        *reinterpret_cast<float4*>(&sm.Kq[i][c4]) = make_float4(kv[m][0], kv[m][1], kv[m][2], kv[m][3]);
        *reinterpret_cast<float4*>(&sm.r1.al[i][c4]) = make_float4(gv[m][0], gv[m][1], gv[m][2], gv[m][3]);
        if (lane == 0) sm.beta[i] = bv[m];
      }
#pragma unroll 1
      for (int m = 0; m < kPer; ++m) {
        const int i = warp + m * kWarp;
        const bool live = i < nt;
        const float4 q4 = *reinterpret_cast<const float4*>(&sm.Qr[i][c4]);
        const float4 k4 = *reinterpret_cast<const float4*>(&sm.Kq[i][c4]);
        const float4 g4 = *reinterpret_cast<const float4*>(&sm.r1.al[i][c4]);
        const float q[4] = {q4.x, q4.y, q4.z, q4.w}, k[4] = {k4.x, k4.y, k4.z, k4.w};
        const float g[4] = {g4.x, g4.y, g4.z, g4.w};
        float rq, rk, al[4];
        qk_inv_norms(q, k, p.scale, rq, rk);
#pragma unroll
        for (int j = 0; j < 4; ++j)
          al[j] = live ? expf(kda_gate(g[j] + dtb4[j], a_h, p.has_lower_bound, p.lower_bound)) : 1.f;
        *reinterpret_cast<float4*>(&sm.Qr[i][c4]) = make_float4(q[0] * rq, q[1] * rq, q[2] * rq, q[3] * rq);
        *reinterpret_cast<float4*>(&sm.Kq[i][c4]) = make_float4(k[0] * rk, k[1] * rk, k[2] * rk, k[3] * rk);
        *reinterpret_cast<float4*>(&sm.r1.al[i][c4]) = make_float4(al[0], al[1], al[2], al[3]);
        if (lane == 0) sm.beta[i] = live ? sigmoid_stable(sm.beta[i]) : 0.f;
      }
    }
    __syncthreads();
    KDA_TC_MARK(1);

    // 2a. Block totals of the decays; thread = (channel, two blocks).
    for (int b = 2 * half; b < 2 * half + 2; ++b) {
      float P = 1.f;
      for (int i = b * kBlk; i < (b + 1) * kBlk; ++i) P *= sm.r1.al[i][ch];
      sm.Ptot[b][ch] = P;
    }

    // 3a. Diagonal blocks on CUDA cores, from the undecayed q, k in shared memory. Item = (block,
    //     pair of columns j1 = jj, j2 = 15 - jj of it): their lower triangles hold 17 rows
    //     together, so a pair costs 17 row steps where two separate columns would cost 32. Each
    //     lane holds 4 channels; step 0 / 1 are the diagonal entries (q_j . k_j, E = 1), steps
    //     2..16 walk j1's rows below the diagonal, then j2's, with the running product
    //     E = prod_{j<t<=i} a_t. The 17 + 15 partial dot products (A_qk for every step, A_kk for
    //     steps 2..16) stay in registers; one reduce-scatter over the warp (RowReduce, 31 shuffles)
    //     then leaves lane L with the full sum of value L. Rows past the end are zero in Qr / Kq.
    for (int item = warp; item < kNB * kBlk / 2; item += kWarp) {
      const int i0 = item / (kBlk / 2) * kBlk, jj = item % (kBlk / 2);
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
      else sm.Akk[i][second ? j2 : j1] = sum;
      // The pair's entries above the diagonal (and A_kk's diagonal) are zero: A_qk rows 0..jj-1
      // of j1 and 0..14-jj of j2 (15 lanes); A_kk rows 0..jj of j1 and 0..15-jj of j2 (17 lanes).
      if (lane < kBlk - 1) sm.Aqk[i0 + (lane < jj ? lane : lane - jj)][lane < jj ? j1 : j2] = 0.f;
      if (lane <= kBlk) sm.Akk[i0 + (lane <= jj ? lane : lane - jj - 1)][lane <= jj ? j1 : j2] = 0.f;
    }
    __syncthreads();
    KDA_TC_MARK(2);

    // 2b. Products of block totals before / after each block, and the chunk total.
    if (tid < kK) {
      float x = 1.f;
      for (int b = 0; b < kNB; ++b) { sm.pre[b][ch] = x; x *= sm.Ptot[b][ch]; }
      sm.EL[ch] = x;
      x = 1.f;
      for (int b = kNB - 1; b >= 0; --b) { sm.post[b][ch] = x; x *= sm.Ptot[b][ch]; }
    }
    // 2c. Block-local decayed operands, in place: Kb = k Rloc (backward products, from the
    //     undecayed Kq), then Qr = q Ploc and Kq = k Ploc (forward products).
    for (int b = 2 * half; b < 2 * half + 2; ++b) {
      float R = 1.f;
      for (int j = (b + 1) * kBlk - 1; j >= b * kBlk; --j) {
        sm.Kb[j][ch] = sm.Kq[j][ch] * R;
        R *= sm.r1.al[j][ch];
      }
      float P = 1.f;
      for (int i = b * kBlk; i < (b + 1) * kBlk; ++i) {
        P *= sm.r1.al[i][ch];
        sm.Qr[i][ch] *= P;
        sm.Kq[i][ch] *= P;
      }
    }
    __syncthreads();
    KDA_TC_MARK(3);

    // 3b. Off-diagonal blocks (I > J) on tensor cores: job = (I, J); B tile = Kb_J scaled by
    //     prod_{J<M<I} Ptot_M, written 8 channels at a time to a per-warp scratch. Blocks above
    //     the diagonal are zeroed by the warps without a job.
    {
      constexpr int kJobs = kNB * (kNB - 1) / 2;  // 6
      if (warp < kJobs) {
        int I = 1, J = warp;
        while (J >= I) { J -= I; ++I; }            // warp -> (1,0) (2,0) (2,1) (3,0) (3,1) (3,2)
        FragC accq, acck;
        wmma::fill_fragment(accq, 0.f);
        wmma::fill_fragment(acck, 0.f);
        FragA a;
        FragBc b;
        float* scr = &sm.r2.scratch[warp][0][0];
        for (int kk = 0; kk < kK; kk += 8) {
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int idx = lane + 32 * r, jr = idx / 8, cc = kk + idx % 8;
            float m = 1.f;
            for (int M = J + 1; M < I; ++M) m *= sm.Ptot[M][cc];
            scr[jr * 8 + idx % 8] = sm.Kb[J * kBlk + jr][cc] * m;
          }
          __syncwarp();
          load_tf32(b, scr, 8);
          load_tf32(a, &sm.Qr[I * kBlk][kk], kLdK);
          wmma::mma_sync(accq, a, b, accq);
          load_tf32(a, &sm.Kq[I * kBlk][kk], kLdK);
          wmma::mma_sync(acck, a, b, acck);
          __syncwarp();
        }
        wmma::store_matrix_sync(&sm.Aqk[I * kBlk][J * kBlk], accq, kLdC, wmma::mem_row_major);
        wmma::store_matrix_sync(&sm.Akk[I * kBlk][J * kBlk], acck, kLdC, wmma::mem_row_major);
      } else {
        for (int idx = (warp - kJobs) * 32 + lane; idx < kJobs * kBlk * kBlk; idx += (kWarp - kJobs) * 32) {
          const int job = idx / (kBlk * kBlk), r = (idx / kBlk) % kBlk, c = idx % kBlk;
          int I = 1, J = job;
          while (J >= I) { J -= I; ++I; }
          sm.Aqk[J * kBlk + r][I * kBlk + c] = 0.f;  // the transposed position: above the diagonal
          sm.Akk[J * kBlk + r][I * kBlk + c] = 0.f;
        }
      }
    }
    __syncthreads();
    KDA_TC_MARK(4);

    // 4a. beta into A_kk rows; T's diagonal blocks by forward substitution (thread = block,
    //     column); T's blocks above the diagonal are zero.
#pragma unroll 1
    for (int rep = 0; rep < kProbeReps; ++rep) {
      for (int idx = tid; idx < kC * kC; idx += kThr) sm.Akk[idx / kC][idx % kC] *= rep == 0 ? sm.beta[idx / kC] : 1.f;
      __syncthreads();
      if (rep == 0) KDA_TC_MARK(5);
      else KDA_TC_MARK(11);
    }
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
      for (int r = 0; r < kBlk; ++r) sm.r1.tu.T[lo + r][j] = col[r];
    } else {
      for (int idx = tid - kC; idx < kC * kC; idx += kThr - kC) {
        const int i = idx / kC, j = idx % kC;
        if (j / kBlk > i / kBlk) sm.r1.tu.T[i][j] = 0.f;
      }
    }
    // 5. Chunk-level operands: Qe = Qr pre, Ke = Kq pre, Kd = Kb post (T is not read here).
    for (int idx = tid; idx < kC * kK; idx += kThr) {
      const int i = idx / kK, c = idx % kK, b = i / kBlk;
      sm.Qr[i][c] *= sm.pre[b][c];
      sm.Kq[i][c] *= sm.pre[b][c];
      sm.Kb[i][c] *= sm.post[b][c];
    }
    __syncthreads();
    KDA_TC_MARK(6);

    // 4b. T's blocks below the diagonal, by distance d = I - J:
    //     X = sum_{J<=M<I} A_IM T_MJ;  T_IJ = -T_II X. Temporaries in the U area. A thread computes
    //     4 adjacent columns of one row (one scalar and one float4 load per 4 FMAs), summing in the
    //     same order as a one-entry-per-thread loop would.
    float* X = &sm.r1.tu.U[0][0];
    constexpr int kQuads = kBlk * kBlk / 4;  // 4-column pieces of a 16 x 16 tile
    for (int d = 1; d < kNB; ++d) {
      const int tiles = kNB - d;
      for (int idx = tid; idx < tiles * kQuads; idx += kThr) {
        const int J = idx / kQuads, I = J + d, r = (idx / 4) % kBlk, c = idx % 4 * 4;
        float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int col = J * kBlk; col < I * kBlk; ++col) {
          const float a = sm.Akk[I * kBlk + r][col];
          const float4 t = *reinterpret_cast<const float4*>(&sm.r1.tu.T[col][J * kBlk + c]);
          x.x += a * t.x; x.y += a * t.y; x.z += a * t.z; x.w += a * t.w;
        }
        *reinterpret_cast<float4*>(&X[J * kBlk * kBlk + r * kBlk + c]) = x;
      }
      __syncthreads();
      for (int idx = tid; idx < tiles * kQuads; idx += kThr) {
        const int J = idx / kQuads, I = J + d, r = (idx / 4) % kBlk, c = idx % 4 * 4;
        const float* Xt = X + J * kBlk * kBlk;
        float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int m = 0; m < kBlk; ++m) {
          const float a = sm.r1.tu.T[I * kBlk + r][I * kBlk + m];
          const float4 t = *reinterpret_cast<const float4*>(&Xt[m * kBlk + c]);
          x.x += a * t.x; x.y += a * t.y; x.z += a * t.z; x.w += a * t.w;
        }
        *reinterpret_cast<float4*>(&sm.r1.tu.T[I * kBlk + r][J * kBlk + c]) = make_float4(-x.x, -x.y, -x.z, -x.w);
      }
      __syncthreads();
    }

    KDA_TC_MARK(7);

    // 6. Warp w owns output tiles (tm, tn0) and (tm, tn0 + 1) of the [64 tokens x 64 rows] W / O.
    const int tm = warp / 2, tn0 = (warp % 2) * 2;
    float vr[2][8];  // this lane's v values of both tiles, loaded before the products need them
#pragma unroll
    for (int s = 0; s < 2; ++s)
#pragma unroll
      for (int m = 0; m < 8; ++m) {
        const int e = lane + 32 * m, i = tm * 16 + e / 16, r = (tn0 + s) * 16 + e % 16;
        vr[s][m] = i < nt ? bf2f(tv.v[(int64_t)(t0 + i) * p.v_st + r]) : 0.f;
      }
    FragC accw[2], acco[2];
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      wmma::fill_fragment(accw[s], 0.f);
      wmma::fill_fragment(acco[s], 0.f);
    }
    // Ke S^T and Qe S^T: B = S^T, i.e. S rows (value rows) as columns, col-major with ld kK
    mma_acc2<FragBc>(accw, &sm.Kq[tm * 16][0], kLdK, &sm.S[tn0 * 16][0], kLdK, 16 * kLdK, kK);
    mma_acc2<FragBc>(acco, &sm.Qr[tm * 16][0], kLdK, &sm.S[tn0 * 16][0], kLdK, 16 * kLdK, kK);
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int tn = tn0 + s;
      wmma::store_matrix_sync(&sm.r2.W[tm * 16][tn * 16], accw[s], kLdV, wmma::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int m = 0; m < 8; ++m) {
        const int e = lane + 32 * m, i = tm * 16 + e / 16, r = tn * 16 + e % 16;
        sm.r2.W[i][r] = sm.beta[i] * (vr[s][m] - sm.r2.W[i][r]);
      }
    }
    __syncthreads();
    KDA_TC_MARK(8);

    // 7. U = T W (tensor cores); meanwhile the state columns decay by the chunk total EL.
    {
      FragC accu[2];
      wmma::fill_fragment(accu[0], 0.f);
      wmma::fill_fragment(accu[1], 0.f);
      mma_acc2<FragBr>(accu, &sm.r1.tu.T[tm * 16][0], kLdC, &sm.r2.W[0][tn0 * 16], kLdV, 16, kC);
#pragma unroll
      for (int s = 0; s < 2; ++s)
        wmma::store_matrix_sync(&sm.r1.tu.U[tm * 16][(tn0 + s) * 16], accu[s], kLdV, wmma::mem_row_major);
    }
    __syncthreads();  // U complete; every read of the undecayed S is done
    KDA_TC_MARK(9);
    for (int idx = tid; idx < kBV * kK; idx += kThr) sm.S[idx / kK][idx % kK] *= sm.EL[idx % kK];

    // 8. O = Qe S^T + A_qk U, staged in the W area (W is dead), written out by the owning warp.
    mma_acc2<FragBr>(acco, &sm.Aqk[tm * 16][0], kLdC, &sm.r1.tu.U[0][tn0 * 16], kLdV, 16, kC);
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int tn = tn0 + s;
      wmma::store_matrix_sync(&sm.r2.W[tm * 16][tn * 16], acco[s], kLdV, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int i = tm * 16 + e / 16, r = tn * 16 + e % 16;
        if (i < nt) tv.o[(int64_t)(t0 + i) * p.o_st + r] = __float2bfloat16(sm.r2.W[i][r]);
      }
    }
    __syncthreads();  // S decayed everywhere before the update reads it
    KDA_TC_MARK(10);

    // 9. S += U^T Kd: tiles [16 value rows x 16 channels]; A = U^T (U col-major), B = Kd.
    for (int tile = warp; tile < (kBV / 16) * (kK / 16); tile += kWarp) {
      const int tr = tile / (kK / 16), tcn = tile % (kK / 16);
      FragC accs;
      wmma::load_matrix_sync(accs, &sm.S[tr * 16][tcn * 16], kLdK, wmma::mem_row_major);
      FragAc a;
      FragBr b;
      for (int kk = 0; kk < kC; kk += 8) {
        load_tf32(a, &sm.r1.tu.U[kk][tr * 16], kLdV);  // (row v, col t) at U[t][v]
        load_tf32(b, &sm.Kb[kk][tcn * 16], kLdK);
        wmma::mma_sync(accs, a, b, accs);
      }
      wmma::store_matrix_sync(&sm.S[tr * 16][tcn * 16], accs, kLdK, wmma::mem_row_major);
    }

    const int tend = t0 + nt;
    if (ckpt && tend % kCheckpointEvery == 0) {
      __syncthreads();
      copy_state_out(sm, ckpt + (int64_t)(tend / kCheckpointEvery - 1) * p.inter_ss);
    }
  }
  __syncthreads();
  copy_state_out(sm, dst);  // final state (the initial one, or zeros, for an empty sequence)
  KDA_TC_PROFILE_END();
}

}  // namespace kda
