// The conv prefill's kernels alone, for A/Bs of source trees without building the extension:
// builds csrc/conv/conv1d_launch.cu of the tree it is compiled against, runs
// conv1d_prefill_launch on random bf16 inputs (a bf16 pool with initial states, width 4, SiLU)
// and prints the median time and its fraction of the HBM floor (x read and the output written
// once, pool rows read and written), with the copy bandwidth measured in the same process by a
// device-to-device copy of 1 GiB.
//
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -Icsrc scripts/profile_conv.cu -o /tmp/profile_conv
//   /tmp/profile_conv [N sequences] [tokens each] [channels]   # default 4 32768 12288, the layer
//   benchmark's shape (3 x 32 heads x 128); KDA_SERVING_PROFILE_REPS=R timed runs (default 20).
#include "../csrc/conv/conv1d_launch.cu"

#include <cuda_bf16.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "profile_common.h"

namespace {

__global__ void fill_bf16(__nv_bfloat16* p, int64_t n, uint32_t seed, float scale) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    uint32_t h = (uint32_t)i * 2654435761u ^ seed;
    h ^= h >> 15; h *= 2246822519u; h ^= h >> 13;
    p[i] = __float2bfloat16(((h >> 8) * (2.f / 16777216.f) - 1.f) * scale);
  }
}

template <typename F>
std::vector<float> time_runs(F&& f, int reps) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  std::vector<float> ms;
  for (int r = 0; r < reps; ++r) {
    CHECK(cudaEventRecord(a));
    f();
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float t = 0.f;
    CHECK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  return ms;
}

}  // namespace

int main(int argc, char** argv) {
  const int N = argc > 1 ? std::atoi(argv[1]) : 4;
  const int64_t L = argc > 2 ? std::atoll(argv[2]) : 32768;
  const int D = argc > 3 ? std::atoi(argv[3]) : 12288;
  const int W = 4;
  const int reps = profile_reps(20);
  const int64_t T = N * L;

  __nv_bfloat16 *x, *y, *w, *pool;
  int32_t *slots, *cu;
  bool* has;
  CHECK(cudaMalloc(&x, T * D * 2));
  CHECK(cudaMalloc(&y, T * D * 2));
  CHECK(cudaMalloc(&w, (int64_t)D * W * 2));
  CHECK(cudaMalloc(&pool, (int64_t)(N + 1) * (W - 1) * D * 2));
  CHECK(cudaMalloc(&slots, N * 4));
  CHECK(cudaMalloc(&cu, (N + 1) * 4));
  CHECK(cudaMalloc(&has, N));
  fill_bf16<<<1024, 256>>>(x, T * D, 1u, 1.f);
  fill_bf16<<<1024, 256>>>(w, (int64_t)D * W, 2u, 0.25f);
  fill_bf16<<<1024, 256>>>(pool, (int64_t)(N + 1) * (W - 1) * D, 3u, 1.f);
  std::vector<int32_t> hs(N), hc(N + 1);
  std::vector<char> hh(N);
  for (int n = 0; n < N; ++n) {
    hs[n] = n + 1;
    hh[n] = n % 2 == 0;
  }
  for (int n = 0; n <= N; ++n) hc[n] = (int32_t)(n * L);
  CHECK(cudaMemcpy(slots, hs.data(), N * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(cu, hc.data(), (N + 1) * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(has, hh.data(), N, cudaMemcpyHostToDevice));

  kda::Conv1dParams p{};
  p.x = x; p.x_st = D; p.y = y; p.y_st = D;
  p.weight = w; p.bias = nullptr; p.weight_bf16 = true;
  p.pool = pool; p.pool_ss = (int64_t)(W - 1) * D; p.pool_sr = D; p.pool_sd = 1; p.pool_bf16 = true;
  p.slots = slots; p.cu_seqlens = cu; p.cu_seqlens_64 = false; p.has_initial_state = has;
  p.total_tokens = T; p.N = N; p.D = D; p.W = W; p.R = W - 1; p.silu = true;

  // The pool rows are rewritten by each call; the timing does not depend on their values.
  CHECK(kda::conv1d_prefill_launch(p, 0));
  CHECK(cudaDeviceSynchronize());
  const float ms = median_of(time_runs([&] { CHECK(kda::conv1d_prefill_launch(p, 0)); }, reps));

  const int64_t copy_bytes = int64_t(1) << 30;
  void *ca, *cb;
  CHECK(cudaMalloc(&ca, copy_bytes));
  CHECK(cudaMalloc(&cb, copy_bytes));
  CHECK(cudaMemcpy(cb, ca, copy_bytes, cudaMemcpyDeviceToDevice));
  const float copy_ms = median_of(time_runs([&] { CHECK(cudaMemcpyAsync(cb, ca, copy_bytes, cudaMemcpyDeviceToDevice)); }, 10));
  const double bw = 2.0 * copy_bytes / (copy_ms * 1e-3);  // bytes read + written per second
  const double bytes = 2.0 * T * D * 2 + 2.0 * N * (W - 1) * D * 2;
  const double floor_ms = bytes / bw * 1e3;

  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s; N=%d L=%lld D=%d W=%d: conv prefill %.3f ms (median of %d), floor %.3f ms at %.0f GB/s copy "
              "bandwidth, %.3f of the floor\n",
              prop.name, N, (long long)L, D, W, ms, reps, floor_ms, bw * 1e-9, floor_ms / ms);
  return 0;
}
