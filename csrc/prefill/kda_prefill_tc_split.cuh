// The combine step of a split tensor-core prefill (kda_prefill_tc_units.cuh): per split sequence
// and head, S_start(j+1) = S_start(j) P_j + B_j over its middle segments, in fp32 on CUDA cores
// (at most a few dozen [128 x 128] products per sequence, next to thousands of chunk steps).
// Entry e0 holds S_start(1) (segment 0's end state); entry e0 + j (j >= 1) holds B_j in rows
// 0..127 and P_j in rows 128..255, and leaves with S_start(j+1) in rows 0..127, which the second
// state pass's segment j + 1 starts from.
#pragma once

#include "kda_prefill_tc_units.cuh"

namespace kda {
namespace tc {

constexpr int kCombineRows = 32;  // state rows per CTA

}  // namespace tc

// grid = (128 / kCombineRows, H, tc_units_c), tc::kThr threads.
__global__ void __launch_bounds__(tc::kThr) kda_prefill_tc_combine_kernel(const KdaPrefillParams p) {
  using namespace tc;
  constexpr int kGroups = kThr / kK, kPer = kCombineRows / kGroups;  // row groups, rows per thread
  __shared__ float S[kCombineRows][kK];
  const int32_t* row = p.tc_units + (int64_t)(p.tc_units_a + p.tc_units_b + blockIdx.z) * kTcUnitInts;
  const int n = row[0], e0 = row[1], entries = row[2];
  if (p.slots[n] <= 0) return;  // nothing was run for a null slot
  const int h = blockIdx.y, r0 = blockIdx.x * kCombineRows;
  const int c = threadIdx.x % kK, rg = threadIdx.x / kK;  // column; rows rg + kGroups i
  const float* first = entry_rows(p, e0, h, r0);
#pragma unroll
  for (int i = 0; i < kPer; ++i) S[rg + kGroups * i][c] = first[(rg + kGroups * i) * kK + c];
  __syncthreads();
  for (int e = e0 + 1; e < e0 + entries; ++e) {
    const float* P = entry_rows(p, e, h, kK);
    float* B = entry_rows(p, e, h, r0);
    float acc[kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i) acc[i] = B[(rg + kGroups * i) * kK + c];
    for (int m = 0; m < kK; ++m) {
      const float pm = P[m * kK + c];
#pragma unroll
      for (int i = 0; i < kPer; ++i) acc[i] = fmaf(S[rg + kGroups * i][m], pm, acc[i]);
    }
    __syncthreads();  // every read of S done
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      S[rg + kGroups * i][c] = acc[i];
      B[(rg + kGroups * i) * kK + c] = acc[i];
    }
    __syncthreads();
  }
}

}  // namespace kda
