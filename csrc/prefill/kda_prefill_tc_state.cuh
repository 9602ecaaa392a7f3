// Tensor-core chunked prefill, pass 2 of 2: the serial part. One CTA per (sequence, head, block
// of BV = 64 or 32 value rows), 8 warps; the fp32 state [BV rows x 128] stays in shared memory
// across the sequence's chunks (BV = 32 doubles the CTAs when few sequences x heads would leave
// SMs idle; the launcher picks). Per 64-token chunk it reads the record the prepare pass wrote
// (kda_prefill_tc_prepare.cuh) and computes, on TF32 tensor cores with fp32 accumulation,
//   U = u - w S^T;  O = Qe S^T + A_qk U;  S <- S diag(EL) + U^T Kd
// The next chunk's Qe and w are copied in (cp.async) while this chunk's output and state update
// run.
#pragma once

#include "kda_prefill_tc_common.cuh"

namespace kda {
namespace tc {

template <int BV>
struct alignas(128) StateSmem {
  static constexpr int kLdV = BV + 4;  // [64 tokens x BV rows] arrays
  float S[BV][kLdK];    // state rows v0 .. v0+BV-1
  float Qe[kC][kLdK];
  float Kd[kC][kLdK];
  float W[kC][kLdK];    // w = T beta Ke
  float U[kC][kLdV];    // u (this CTA's value rows), then U = u - w S^T
  float Aqk[kC][kLdC];
  float O[kC][kLdV];    // output tile staging
  float EL[kK];
};

template <int BV, typename StateT>
__device__ __forceinline__ void copy_state_out(const StateSmem<BV>& sm, StateT* dst) {
  for (int idx = threadIdx.x * 4; idx < BV * kK; idx += kThr * 4) {
    const float x[4] = {sm.S[idx / kK][idx % kK], sm.S[idx / kK][idx % kK + 1], sm.S[idx / kK][idx % kK + 2],
                        sm.S[idx / kK][idx % kK + 3]};
    StateIO<StateT>::store(dst + idx, x);
  }
}

// Qe and w of a chunk (the operands of the products with the undecayed state).
template <int BV>
__device__ __forceinline__ void load_qe_w(StateSmem<BV>& sm, const float* rec) {
  copy_rows_async(&sm.Qe[0][0], kLdK, rec + kRecQe, kK, kC, kK);
  copy_rows_async(&sm.W[0][0], kLdK, rec + kRecW, kK, kC, kK);
}

// The rest: Kd, this CTA's columns of u, A_qk, EL.
template <int BV>
__device__ __forceinline__ void load_rest(StateSmem<BV>& sm, const float* rec, int v0) {
  copy_rows_async(&sm.Kd[0][0], kLdK, rec + kRecKd, kK, kC, kK);
  copy_rows_async(&sm.U[0][0], StateSmem<BV>::kLdV, rec + kRecU + v0, kK, kC, BV);
  copy_rows_async(&sm.Aqk[0][0], kLdC, rec + kRecAqk, kC, kC, kC);
  copy_rows_async(&sm.EL[0], kK, rec + kRecEL, kK, 1, kK);
}

}  // namespace tc

// grid = (V / BV, H, N), tc::kThr threads, dynamic smem sizeof(tc::StateSmem<BV>); runs after
// kda_prefill_tc_prepare_kernel on the same stream.
template <int BV, typename StateT>
__global__ void __launch_bounds__(tc::kThr, 1) kda_prefill_tc_state_kernel(const KdaPrefillParams p) {
  using namespace tc;
  constexpr int kLdV = StateSmem<BV>::kLdV;
  constexpr int kNT = BV / 32;  // output tiles per warp: 4 x BV/16 tiles over 8 warps
  extern __shared__ __align__(128) unsigned char smem_raw[];
  StateSmem<BV>& sm = *reinterpret_cast<StateSmem<BV>*>(smem_raw);
  const int v0 = blockIdx.x * BV, h = blockIdx.y, n = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32;
  const TokenView tv = prefill_tokens(p, n, h, v0);
  const int len = tv.len;
  if (prefill_null_slot<BV, kThr>(p, tv, n)) return;
  const int slot = p.slots[n];
  StateT* dst = prefill_state_rows<StateT>(p, slot, h, v0);
  StateT* ckpt = prefill_checkpoint_rows<StateT>(p, n, h, v0);
  const int64_t cbase = chunk_base(p, n, load_index(p.cu_seqlens, p.cu_seqlens_64, 0));

  // Initial state rows into shared memory (zeros without an initial state).
  for (int idx = tid * 4; idx < BV * kK; idx += kThr * 4) {
    float x[4] = {0.f, 0.f, 0.f, 0.f};
    if (p.has_initial_state[n]) StateIO<StateT>::load(dst + idx, x);
    float* s = &sm.S[idx / kK][idx % kK];
    s[0] = x[0]; s[1] = x[1]; s[2] = x[2]; s[3] = x[3];
  }
  if (len > 0) load_qe_w(sm, chunk_record(p, cbase, h));

  // Warp w owns output tiles (tm, tn0 .. tn0 + kNT - 1) of the [64 tokens x BV rows] U / O.
  const int tm = warp / 2, tn0 = (warp % 2) * kNT;
  KDA_TC_PROFILE_BEGIN();
  for (int t0 = 0, j = 0; t0 < len; t0 += kC, ++j) {
    const int nt = min(kC, len - t0);
    load_rest(sm, chunk_record(p, cbase + j, h), v0);
    cp_async_wait_all();
    __syncthreads();  // the chunk's record is in; the previous chunk's update is complete
    KDA_TC_MARK(kPrepPhases);

    // 1. w S^T and Qe S^T (B = S^T: state rows as columns, col-major with ld kLdK);
    //    U = u - w S^T in place of u, tile by tile by the owning warp.
    FragC accw[kNT], acco[kNT];
#pragma unroll
    for (int s = 0; s < kNT; ++s) {
      wmma::fill_fragment(accw[s], 0.f);
      wmma::fill_fragment(acco[s], 0.f);
    }
    mma_acc<FragBc>(accw, &sm.W[tm * 16][0], kLdK, &sm.S[tn0 * 16][0], kLdK, 16 * kLdK, kK);
    mma_acc<FragBc>(acco, &sm.Qe[tm * 16][0], kLdK, &sm.S[tn0 * 16][0], kLdK, 16 * kLdK, kK);
#pragma unroll
    for (int s = 0; s < kNT; ++s) {
      float* u = &sm.U[tm * 16][(tn0 + s) * 16];
      FragC uf;
      wmma::load_matrix_sync(uf, u, kLdV, wmma::mem_row_major);
#pragma unroll
      for (int i = 0; i < uf.num_elements; ++i) uf.x[i] -= accw[s].x[i];
      wmma::store_matrix_sync(u, uf, kLdV, wmma::mem_row_major);
    }
    __syncthreads();  // U complete; every read of Qe, w and the undecayed S is done
    KDA_TC_MARK(kPrepPhases + 1);

    // 2. The next chunk's Qe, w on their way; O = Qe S^T + A_qk U, staged per tile and written
    //    out by the owning warp.
    if (t0 + kC < len) load_qe_w(sm, chunk_record(p, cbase + j + 1, h));
    mma_acc<FragBr>(acco, &sm.Aqk[tm * 16][0], kLdC, &sm.U[0][tn0 * 16], kLdV, 16, kC);
#pragma unroll
    for (int s = 0; s < kNT; ++s) {
      const int tn = tn0 + s;
      wmma::store_matrix_sync(&sm.O[tm * 16][tn * 16], acco[s], kLdV, wmma::mem_row_major);
      __syncwarp();
      for (int e = threadIdx.x % 32; e < 256; e += 32) {
        const int i = tm * 16 + e / 16, r = tn * 16 + e % 16;
        if (i < nt) tv.o[(int64_t)(t0 + i) * p.o_st + r] = __float2bfloat16(sm.O[i][r]);
      }
    }
    // 3. S <- S diag(EL) + U^T Kd by tiles [16 value rows x 16 channels]: the owning warp decays
    //    its tile, then A = U^T (U col-major), B = Kd. Only this warp touches the tile between
    //    the barriers, so no block-wide barrier separates decay and update.
#pragma unroll 1
    for (int tile = warp; tile < (BV / 16) * (kK / 16); tile += kWarp) {
      const int tr = tile / (kK / 16), tcn = tile % (kK / 16);
      for (int e = threadIdx.x % 32; e < 256; e += 32)
        sm.S[tr * 16 + e / 16][tcn * 16 + e % 16] *= sm.EL[tcn * 16 + e % 16];
      __syncwarp();
      FragC accs;
      wmma::load_matrix_sync(accs, &sm.S[tr * 16][tcn * 16], kLdK, wmma::mem_row_major);
      FragAc a;
      FragBr b;
#pragma unroll 2
      for (int kk = 0; kk < kC; kk += 8) {
        load_tf32(a, &sm.U[kk][tr * 16], kLdV);  // (row v, col t) at U[t][v]
        load_tf32(b, &sm.Kd[kk][tcn * 16], kLdK);
        wmma::mma_sync(accs, a, b, accs);
      }
      wmma::store_matrix_sync(&sm.S[tr * 16][tcn * 16], accs, kLdK, wmma::mem_row_major);
    }
    const int tend = t0 + nt;
    __syncthreads();  // the update is complete: U, Kd, A_qk, EL may be overwritten
    if (ckpt && tend % kCheckpointEvery == 0)
      copy_state_out(sm, ckpt + (int64_t)(tend / kCheckpointEvery - 1) * p.inter_ss);
    KDA_TC_MARK(kPrepPhases + 2);
  }
  __syncthreads();
  copy_state_out(sm, dst);  // final state (the initial one, or zeros, for an empty sequence)
  KDA_TC_PROFILE_END();
}

}  // namespace kda
