// Shared by the standalone profiling tools (scripts/profile_*.cu): a CUDA error check that exits,
// the median of a set of timings, and the number of timed runs.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(x)                                                                              \
  do {                                                                                        \
    const cudaError_t e_ = (x);                                                               \
    if (e_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

inline float median_of(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Timed runs: KDA_SERVING_PROFILE_REPS (at least 1), else `fallback`.
inline int profile_reps(int fallback) {
  const char* env = std::getenv("KDA_SERVING_PROFILE_REPS");
  return env ? std::max(1, std::atoi(env)) : fallback;
}
