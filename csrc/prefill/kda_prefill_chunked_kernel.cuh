// Chunked varlen KDA prefill: the same contract as kda_prefill_kernel.cuh (KdaPrefillParams),
// computed a chunk of kCC tokens at a time instead of token by token.
//
// One CTA per (sequence, head, block of BV value rows); 4 warps; each warp keeps BV/4 rows of the
// fp32 state in registers (lane l owns channels 4l..4l+3), as the token-serial kernel does.
// Per chunk, with a_t = exp(g_t) <= 1 the per-token, per-channel decay, E_ij = prod_{j<t<=i} a_t
// (running products, E_jj = 1), P_i = prod_{t<=i} a_t, n the number of valid tokens and L = n-1:
//   A_kk[i][j] = beta_i * sum_c k_i k_j E_ij      j < i
//   A_qk[i][j] =          sum_c q_i k_j E_ij      j <= i
//   rhs_i      = beta_i * (v_i - S0 (k_i * P_i))
//   U          = (I + A_kk)^-1 rhs   by forward substitution in fp32
//   o_i        = S0 (q_i * P_i) + sum_{j<=i} A_qk[i][j] u_j
//   S1         = S0 diag(P_L) + sum_j u_j (k_j * E_Lj)^T
// Every decay factor is a product of values <= 1 (the exp(G_i - G_j), i >= j, of the chunk math
// evaluated without subtracting cumulative sums), so nothing overflows for either gate and
// underflow to 0 is the right answer. All products run on CUDA cores in fp32.
#pragma once

#include "prefill_sequence.cuh"

namespace kda {

constexpr int kCC = 16;  // tokens per chunk; divides kCheckpointEvery
static_assert(kCheckpointEvery % kCC == 0, "chunk must divide the checkpoint interval");
static_assert(kThreads == kHeadDim, "one thread per channel in the cumulative-gate pass");

template <int BV>
struct ChunkSmem {
  float q[kCC][kHeadDim];   // scale * normalised q
  float k[kCC][kHeadDim];   // normalised k
  float al[kCC][kHeadDim];  // per-token log-decay g, then a = exp(g)
  float qe[kCC][kHeadDim];  // q_i * P_i
  float ke[kCC][kHeadDim];  // k_i * P_i
  float kd[kCC][kHeadDim];  // k_j * E_Lj
  float eL[kHeadDim];       // P_L
  float v[kCC][BV];
  float w[kCC][BV];         // rhs, then U in place
  float op[kCC][BV];        // S0 qe_i
  float akk[kCC][kCC];
  float aqk[kCC][kCC];
  float beta[kCC];
};

// grid = (V / BV, H, N), kThreads threads, dynamic smem sizeof(ChunkSmem<BV>).
template <int BV, typename StateT>
__global__ void __launch_bounds__(kThreads) kda_prefill_chunked_kernel(const KdaPrefillParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  ChunkSmem<BV>& sm = *reinterpret_cast<ChunkSmem<BV>*>(smem_raw);
  const int v0 = blockIdx.x * BV, h = blockIdx.y, n = blockIdx.z;
  const TokenView tv = prefill_tokens(p, n, h, v0);
  const int len = tv.len;
  if (prefill_null_slot<BV>(p, tv, n)) return;
  const int slot = p.slots[n];
  StateT* dst = prefill_state_rows<StateT>(p, slot, h, v0);
  StateT* ckpt = prefill_checkpoint_rows<StateT>(p, n, h, v0);

  const float a = expf(p.A_log[h]);
  const bool bounded = p.has_lower_bound;
  const float lb = p.lower_bound;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, c = lane * 4;
  float dtb[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) dtb[j] = p.dt_bias[h * kHeadDim + c + j];

  RowBlock<BV, StateT> rb;  // state rows in registers; load/store helpers
  constexpr int RPW = RowBlock<BV, StateT>::RPW;
  rb.load(p.has_initial_state[n] ? dst : nullptr);
  const int myrow = row_of_lane<RPW>(lane);
  const bool writer = (lane & (32 / RPW - 1)) == 0;

  for (int t0 = 0; t0 < len; t0 += kCC) {
    const int nt = min(kCC, len - t0);
    __syncthreads();  // previous chunk fully consumed

    // 1. Normalised q, k, per-token log-decay and beta; one warp per token.
    for (int i = warp; i < nt; i += kWarps) {
      const int64_t t = t0 + i;
      float qv[4], kv[4], gv[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        qv[j] = bf2f(tv.q[t * p.q_st + c + j]);
        kv[j] = bf2f(tv.k[t * p.k_st + c + j]);
        gv[j] = bf2f(tv.g[t * p.g_st + c + j]);
      }
      float rq, rk;
      qk_inv_norms(qv, kv, p.scale, rq, rk);
#pragma unroll
      for (int j = 0; j < 4; ++j) gv[j] = kda_gate(gv[j] + dtb[j], a, bounded, lb);
      *reinterpret_cast<float4*>(&sm.q[i][c]) = make_float4(qv[0] * rq, qv[1] * rq, qv[2] * rq, qv[3] * rq);
      *reinterpret_cast<float4*>(&sm.k[i][c]) = make_float4(kv[0] * rk, kv[1] * rk, kv[2] * rk, kv[3] * rk);
      *reinterpret_cast<float4*>(&sm.al[i][c]) = make_float4(gv[0], gv[1], gv[2], gv[3]);
      if (lane == 0) sm.beta[i] = sigmoid_stable(bf2f(tv.beta[t * p.beta_st]));
    }
    for (int idx = threadIdx.x; idx < nt * BV; idx += kThreads)
      sm.v[idx / BV][idx % BV] = bf2f(tv.v[(int64_t)(t0 + idx / BV) * p.v_st + idx % BV]);
    __syncthreads();

    // 2. Per-token decays and the decayed operands (forward and backward running products);
    //    thread = channel.
    {
      const int ch = threadIdx.x;
      float P = 1.f;
      for (int i = 0; i < nt; ++i) {
        const float al = expf(sm.al[i][ch]);  // g <= 0
        sm.al[i][ch] = al;
        P *= al;
        sm.qe[i][ch] = sm.q[i][ch] * P;
        sm.ke[i][ch] = sm.k[i][ch] * P;
      }
      sm.eL[ch] = P;
      float R = 1.f;
      for (int j = nt - 1; j >= 0; --j) {
        sm.kd[j][ch] = sm.k[j][ch] * R;
        R *= sm.al[j][ch];
      }
    }
    __syncthreads();

    // 3a. Intra-chunk products A_kk, A_qk: warp w takes columns j = w (mod 4) and walks i = j..n-1
    //     with the running product E_ij per channel.
    for (int j = warp; j < nt; j += kWarps) {
      const float4 kj = *reinterpret_cast<const float4*>(&sm.k[j][c]);
      float4 E = make_float4(1.f, 1.f, 1.f, 1.f);
      for (int i = j; i < nt; ++i) {
        if (i > j) {
          const float4 a4 = *reinterpret_cast<const float4*>(&sm.al[i][c]);
          E.x *= a4.x; E.y *= a4.y; E.z *= a4.z; E.w *= a4.w;
        }
        const float4 qi = *reinterpret_cast<const float4*>(&sm.q[i][c]);
        const float4 ki = *reinterpret_cast<const float4*>(&sm.k[i][c]);
        const float k0 = kj.x * E.x, k1 = kj.y * E.y, k2 = kj.z * E.z, k3 = kj.w * E.w;
        float skk = ki.x * k0 + ki.y * k1 + ki.z * k2 + ki.w * k3;
        float sqk = qi.x * k0 + qi.y * k1 + qi.z * k2 + qi.w * k3;
        skk = warp_sum(skk);
        sqk = warp_sum(sqk);
        if (lane == 0) {
          sm.akk[i][j] = i > j ? sm.beta[i] * skk : 0.f;
          sm.aqk[i][j] = sqk;
        }
      }
    }

    // 3b. Inter-chunk products with the register state: rhs = beta (v - S0 ke), op = S0 qe.
    for (int i = 0; i < nt; ++i) {
      const float4 k4 = *reinterpret_cast<const float4*>(&sm.ke[i][c]);
      const float4 q4 = *reinterpret_cast<const float4*>(&sm.qe[i][c]);
      float pk[RPW], pq[RPW];
#pragma unroll
      for (int r = 0; r < RPW; ++r) {
        pk[r] = rb.S[r][0] * k4.x + rb.S[r][1] * k4.y + rb.S[r][2] * k4.z + rb.S[r][3] * k4.w;
        pq[r] = rb.S[r][0] * q4.x + rb.S[r][1] * q4.y + rb.S[r][2] * q4.z + rb.S[r][3] * q4.w;
      }
      const float dk = RowReduce<RPW, 16>::run(pk, lane);
      const float dq = RowReduce<RPW, 16>::run(pq, lane);
      if (writer) {
        const int row = warp * RPW + myrow;
        sm.w[i][row] = sm.beta[i] * (sm.v[i][row] - dk);
        sm.op[i][row] = dq;
      }
    }
    __syncthreads();

    // 4. U = (I + A_kk)^-1 rhs, forward substitution per value row, in place.
    for (int r = threadIdx.x; r < BV; r += kThreads) {
      for (int i = 1; i < nt; ++i) {
        float x = sm.w[i][r];
        for (int j = 0; j < i; ++j) x -= sm.akk[i][j] * sm.w[j][r];
        sm.w[i][r] = x;
      }
    }
    __syncthreads();

    // 5. Outputs o_i = op_i + sum_{j<=i} A_qk[i][j] u_j.
    for (int idx = threadIdx.x; idx < nt * BV; idx += kThreads) {
      const int i = idx / BV, r = idx % BV;
      float o = sm.op[i][r];
      for (int j = 0; j <= i; ++j) o += sm.aqk[i][j] * sm.w[j][r];
      tv.o[(int64_t)(t0 + i) * p.o_st + r] = __float2bfloat16(o);
    }

    // 6. State update in registers: S1 = S0 diag(P_L) + sum_j u_j kd_j^T.
    {
      const float4 e4 = *reinterpret_cast<const float4*>(&sm.eL[c]);
#pragma unroll
      for (int r = 0; r < RPW; ++r) {
        rb.S[r][0] *= e4.x; rb.S[r][1] *= e4.y; rb.S[r][2] *= e4.z; rb.S[r][3] *= e4.w;
      }
      for (int j = 0; j < nt; ++j) {
        const float4 d4 = *reinterpret_cast<const float4*>(&sm.kd[j][c]);
#pragma unroll
        for (int r = 0; r < RPW; ++r) {
          const float u = sm.w[j][warp * RPW + r];
          rb.S[r][0] += u * d4.x; rb.S[r][1] += u * d4.y; rb.S[r][2] += u * d4.z; rb.S[r][3] += u * d4.w;
        }
      }
    }

    const int tend = t0 + nt;  // tokens done so far
    if (ckpt && tend % kCheckpointEvery == 0)
      rb.store(ckpt + (int64_t)(tend / kCheckpointEvery - 1) * p.inter_ss);
  }
  rb.store(dst);  // final state (the initial one, or zeros, for an empty sequence)
}

}  // namespace kda
