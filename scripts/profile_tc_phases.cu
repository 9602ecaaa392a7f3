// Where the tensor-core prefill spends its time, per pass and phase, without a profiler: builds
// both passes with clock64() marks after each block-wide barrier (KDA_TC_PHASE_CYCLES), runs one
// prefill on random inputs and prints each pass's wall time and the cycles per 64-token chunk of
// each phase, as seen by thread 0 of every CTA (the prepare pass runs one chunk per CTA, the
// state pass all chunks of a sequence per CTA).
//
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -Icsrc scripts/profile_tc_phases.cu -o /tmp/profile_tc
//   /tmp/profile_tc [N sequences] [tokens each] [heads] [state rows 128|64|32]   # default 1 8192 96,
//   rows as the launcher picks; KDA_SERVING_TC_DIAG=exact as for the extension. The Kimi gate on
//   logits uniform in [-3, 1] keeps every diagonal block on the tensor-core path;
//   KDA_SERVING_PROFILE_GATE=bounded runs the bounded gate (lower bound -5) instead;
//   KDA_SERVING_PROFILE_REPS=R times R runs (after one warm-up) and prints the medians.
// The marks cost registers: the phase build of the prepare kernel spills where the extension's
// does not (112 bytes at cf6dba3, 32 at 64fc08a), so its wall times are not the extension's and
// an A/B of two trees can differ from one of the extensions. -DKDA_TC_TIMING_ONLY builds the
// kernels as the extension does (no marks) and prints only the wall times: time A/Bs with it.
#ifndef KDA_TC_TIMING_ONLY
#define KDA_TC_PHASE_CYCLES
#endif
#include "../csrc/prefill/kda_prefill_tc_launch.cu"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "profile_common.h"

namespace {

const char* kPhaseNames[] = {
    "prepare 1a. item barrier, lookups, unpack, norms",
    "prepare 1b. next item's loads issued",
    "prepare 1c. decays, beta; barrier",
    "prepare 2a. block totals",
    "prepare 3a. steep diagonal blocks (CUDA cores)",
    "prepare 2b+2c. decay products, block-local ops",
    "prepare 3b. A_qk, A_kk blocks (tensor cores)",
    "prepare 4a+5. T diagonal blocks, record out (Qe, Kd, A_qk)",
    "prepare 4b+6a. T off-diagonal blocks, beta v, beta Ke",
    "prepare 6b. u and w out",
    "state 1. w S^T, Qe S^T, U = u - w S^T",
    "state 2. S update (128 rows: and A_qk U)",
    "state 3. (A_qk U,) output, next record in",
};
static_assert(sizeof(kPhaseNames) / sizeof(kPhaseNames[0]) == kda::tc::kPhases, "a name per phase");

uint32_t g_rng = 12345u;
float uniform() {  // in [-1, 1)
  g_rng = g_rng * 1664525u + 1013904223u;
  return (g_rng >> 8) * (2.f / 16777216.f) - 1.f;
}

template <typename T>
T* upload(const std::vector<T>& h) {
  T* d = nullptr;
  CHECK(cudaMalloc(&d, h.size() * sizeof(T)));
  CHECK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

std::vector<__nv_bfloat16> random_bf16(size_t n, float scale, float shift = 0.f) {
  std::vector<__nv_bfloat16> v(n);
  for (auto& x : v) x = __float2bfloat16(shift + scale * uniform());
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  const int N = argc > 1 ? std::atoi(argv[1]) : 1;
  const int L = argc > 2 ? std::atoi(argv[2]) : 8192;
  const int H = argc > 3 ? std::atoi(argv[3]) : 96;
  const int K = kda::kHeadDim;
  const size_t T = (size_t)N * L;

  kda::KdaPrefillParams p{};
  p.q = upload(random_bf16(T * H * K, 1.f));
  p.k = upload(random_bf16(T * H * K, 1.f));
  p.v = upload(random_bf16(T * H * K, 1.f));
  p.g = upload(random_bf16(T * H * K, 2.f, -1.f));  // raw gate logits
  p.beta = upload(random_bf16(T * H, 2.f));
  p.q_st = p.k_st = p.v_st = p.g_st = (int64_t)H * K;
  p.q_sh = p.k_sh = p.v_sh = p.g_sh = K;
  p.beta_st = H;
  p.beta_sh = 1;
  std::vector<float> a_log(H), dt_bias((size_t)H * K);
  for (auto& x : a_log) x = 0.5f * uniform();
  for (auto& x : dt_bias) x = uniform();
  p.A_log = upload(a_log);
  p.dt_bias = upload(dt_bias);
  std::vector<int32_t> cu(N + 1), slots(N);
  std::vector<uint8_t> has(N, 0);
  for (int n = 0; n <= N; ++n) cu[n] = n * L;
  for (int n = 0; n < N; ++n) slots[n] = n + 1;
  p.cu_seqlens = upload(cu);
  p.cu_seqlens_64 = false;
  float* state = nullptr;
  const int64_t slot_elems = (int64_t)H * K * K;
  CHECK(cudaMalloc(&state, (size_t)(N + 1) * slot_elems * sizeof(float)));
  p.state = state;
  p.state_ss = slot_elems;
  p.state_bf16 = false;
  p.slots = upload(slots);
  p.has_initial_state = reinterpret_cast<const bool*>(upload(has));
  __nv_bfloat16* o = nullptr;
  CHECK(cudaMalloc(&o, T * H * K * sizeof(__nv_bfloat16)));
  p.o = o;
  p.o_st = (int64_t)H * K;
  p.o_sh = K;
  p.N = N;
  p.H = H;
  p.scale = 1.f / std::sqrt((float)K);
  const char* gate = std::getenv("KDA_SERVING_PROFILE_GATE");
  p.has_lower_bound = gate != nullptr && std::string(gate) == "bounded";
  p.lower_bound = -5.f;
  // As the binding reads it: KDA_SERVING_TC_DIAG=exact puts every diagonal block on its exact path.
  const char* diag = std::getenv("KDA_SERVING_TC_DIAG");
  p.tc_diag_exact = diag != nullptr && std::string(diag) == "exact";
  int dev = 0, sms = 0, clock_khz = 0;
  CHECK(cudaGetDevice(&dev));
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, dev));
  p.num_sms = sms;
  const int rows = argc > 4 ? std::atoi(argv[4]) : kda::tc_state_rows(p);
  if (rows != 128 && rows != 64 && rows != 32) {
    std::fprintf(stderr, "state rows: 128, 64 or 32\n");
    return 2;
  }
  auto launch_state = [&]() {
    const int V = kda::kHeadDim;
    return rows == 128  ? kda::launch_state<128, float>(p, V, p.N, 0)
           : rows == 64 ? kda::launch_state<64, float>(p, V, p.N, 0)
                        : kda::launch_state<32, float>(p, V, p.N, 0);
  };

  float* ws = nullptr;
  p.tc_chunk_slots = kda::tc_chunk_slots((int64_t)T, N);
  CHECK(cudaMalloc(&ws, (size_t)kda::tc_workspace_floats((int64_t)T, N, H) * sizeof(float)));
  p.tc_workspace = ws;

  // The records the state CTAs of `rows` rows read (Ke or w: tc_record_w); trees from before
  // that choice have only launch_kda_prefill_tc_prepare.
  auto launch_prepare = [&]() {
#ifdef KDA_TC_RECORD_KW
    return kda::launch_kda_prefill_tc_prepare_for(p, rows, 0);
#else
    return kda::launch_kda_prefill_tc_prepare(p, 0);
#endif
  };
  CHECK(launch_prepare());  // warm-up
  CHECK(launch_state());
  CHECK(cudaDeviceSynchronize());
#ifdef KDA_TC_PHASE_CYCLES
  const unsigned long long zeros[kda::tc::kPhases] = {};
  CHECK(cudaMemcpyToSymbol(kda::tc::kda_tc_phase_cycles, zeros, sizeof(zeros)));
#endif
  const int reps = profile_reps(1);
  cudaEvent_t ev[3];
  for (auto& e : ev) CHECK(cudaEventCreate(&e));
  std::vector<float> t_prep, t_state;
  for (int r = 0; r < reps; ++r) {
    CHECK(cudaEventRecord(ev[0]));
    CHECK(launch_prepare());
    CHECK(cudaEventRecord(ev[1]));
    CHECK(launch_state());
    CHECK(cudaEventRecord(ev[2]));
    CHECK(cudaEventSynchronize(ev[2]));
    float a = 0.f, b = 0.f;
    CHECK(cudaEventElapsedTime(&a, ev[0], ev[1]));
    CHECK(cudaEventElapsedTime(&b, ev[1], ev[2]));
    t_prep.push_back(a);
    t_state.push_back(b);
  }
  const float ms_prep = median_of(t_prep), ms_state = median_of(t_state);
#ifdef KDA_TC_PHASE_CYCLES
  unsigned long long cyc[kda::tc::kPhases];
  CHECK(cudaMemcpyFromSymbol(cyc, kda::tc::kda_tc_phase_cycles, sizeof(cyc)));
  for (auto& c : cyc) c /= reps;
#endif

  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, dev));
  const long long chunks_per_seq = (L + kda::tc::kC - 1) / kda::tc::kC;
  const long long prep_ctas = chunks_per_seq * N * H;  // CTAs with a chunk to prepare
  const long long state_ctas = (long long)(K / rows) * H * N;
  std::printf("%s, %d SMs, clock %.2f GHz; N=%d L=%d H=%d %s gate: prepare %lld CTAs %.3f ms, state %lld CTAs "
              "(%d rows) %.3f ms, total %.3f ms\n", prop.name, sms, clock_khz * 1e-6, N, L, H,
              p.has_lower_bound ? "bounded" : "kimi", prep_ctas, ms_prep, state_ctas, rows, ms_state, ms_prep + ms_state);
#ifdef KDA_TC_PHASE_CYCLES
  std::printf("cycles per chunk per CTA (thread 0 of each CTA, between block-wide barriers):\n");
  for (int pass = 0; pass < 2; ++pass) {
    const int lo = pass ? kda::tc::kPrepPhases : 0, hi = pass ? kda::tc::kPhases : kda::tc::kPrepPhases;
    const long long chunks = pass ? state_ctas * chunks_per_seq : prep_ctas;
    unsigned long long total = 0;
    for (int i = lo; i < hi; ++i) total += cyc[i];
    for (int i = lo; i < hi; ++i)
      std::printf("  %-48s %10.0f  %5.1f%%\n", kPhaseNames[i], (double)cyc[i] / chunks, 100.0 * cyc[i] / total);
    std::printf("  %-48s %10.0f\n", pass ? "state total" : "prepare total", (double)total / chunks);
  }
#endif
  return 0;
}
