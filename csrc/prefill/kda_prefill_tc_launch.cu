// Launch code for the tensor-core chunked KDA prefill: the prepare pass over all chunks
// (kda_prefill_tc_prepare.cuh), then the serial state pass (kda_prefill_tc_state.cuh), on one
// stream, through the caller's workspace; a split call runs the state pass twice around the
// combine (kda_prefill_tc_units.cuh, kda_prefill_tc_split.cuh).
#include "kda_prefill_tc_prepare.cuh"
#include "kda_prefill_tc_split.cuh"
#include "kda_prefill_tc_state.cuh"

namespace kda {

// Over 48 KiB of shared memory: opt in (cheap; set on every launch so any device gets it).
template <typename Kernel>
static cudaError_t allow_smem(Kernel kernel, int bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

// Value rows per state-pass CTA: fewer rows mean more CTAs (more SMs busy), each reading the
// whole record per chunk and doing the products with Ke or w, Qe over fewer rows. Picks the fewest
// waves, each weighted by the relative time of one CTA of that many rows (kRowCost).
// A split call weighs its second pass's units (every unit there runs a whole segment).
int tc_state_rows(const KdaPrefillParams& p) {
  constexpr int kRows[3] = {128, 64, 32};
  constexpr int kRowCost[3] = {16, 10, 7};  // tenths of a 64-row CTA's time per chunk
  const int64_t seq_heads = (int64_t)p.H * (p.tc_units ? p.tc_units_b : p.N), sms = p.num_sms > 0 ? p.num_sms : 1;
  int best = 0;
  int64_t best_cost = -1;
  for (int i = 0; i < 3; ++i) {
    const int64_t ctas = seq_heads * (kHeadDim / kRows[i]);
    const int64_t cost = (ctas + sms - 1) / sms * kRowCost[i];
    if (best_cost < 0 || cost < best_cost) { best = i; best_cost = cost; }
  }
  return kRows[best];
}

// state_rows: the value rows per state-pass CTA that will read the records (tc_state_rows), which
// decides whether they hold Ke or w (tc::tc_record_w).
cudaError_t launch_kda_prefill_tc_prepare_for(const KdaPrefillParams& p, int state_rows, cudaStream_t stream) {
  constexpr int smem = (int)sizeof(tc::PrepSmem);
  static_assert(smem <= 227 * 1024, "shared memory of one CTA exceeds what Hopper grants");
  if (p.N == 0 || p.H == 0 || p.tc_chunk_slots == 0) return cudaSuccess;
  const bool aligned = tc::qkg_rows_aligned(p), wy = tc::tc_record_w(state_rows);
  const auto kernel = aligned ? (wy ? kda_prefill_tc_prepare_kernel<true, true>
                                    : kda_prefill_tc_prepare_kernel<true, false>)
                              : (wy ? kda_prefill_tc_prepare_kernel<false, true>
                                    : kda_prefill_tc_prepare_kernel<false, false>);
  const cudaError_t attr = allow_smem(kernel, smem);
  if (attr != cudaSuccess) return attr;
  const int64_t items = p.tc_chunk_slots * p.H;  // persistent: at most one CTA per SM
  const int64_t grid = p.num_sms > 0 && p.num_sms < items ? p.num_sms : items;
  kernel<<<(unsigned)grid, tc::kPrepThr, smem, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_kda_prefill_tc_prepare(const KdaPrefillParams& p, cudaStream_t stream) {
  return launch_kda_prefill_tc_prepare_for(p, tc_state_rows(p), stream);
}

// rows: value rows per (unit, head), V or (a split call's first pass) 2 V; z: sequences or units.
template <int BV, typename StateT, bool kSplit = false>
static cudaError_t launch_state(const KdaPrefillParams& p, int rows, int z, cudaStream_t stream) {
  constexpr int smem = (int)sizeof(tc::StateSmem<BV>);
  static_assert(smem <= 227 * 1024, "shared memory of one CTA exceeds what Hopper grants");
  if (z == 0) return cudaSuccess;
  const cudaError_t attr = allow_smem(kda_prefill_tc_state_kernel<BV, StateT, kSplit>, smem);
  if (attr != cudaSuccess) return attr;
  const dim3 grid(rows / BV, p.H, z);
  kda_prefill_tc_state_kernel<BV, StateT, kSplit><<<grid, tc::kThr, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename StateT, bool kSplit>
static cudaError_t launch_state_rows(const KdaPrefillParams& p, int rows, int z, cudaStream_t stream) {
  switch (tc_state_rows(p)) {
    case 128: return launch_state<128, StateT, kSplit>(p, rows, z, stream);
    case 64: return launch_state<64, StateT, kSplit>(p, rows, z, stream);
    default: return launch_state<32, StateT, kSplit>(p, rows, z, stream);
  }
}

template <bool kSplit>
static cudaError_t launch_state_pass(const KdaPrefillParams& p, int rows, int z, cudaStream_t stream) {
  return p.state_bf16 ? launch_state_rows<__nv_bfloat16, kSplit>(p, rows, z, stream)
                      : launch_state_rows<float, kSplit>(p, rows, z, stream);
}

// Split call: pass A over units [0, a) with the transition rows, the combine, pass B over units
// [a, a + b).
static cudaError_t launch_split_state(const KdaPrefillParams& p, cudaStream_t stream) {
  KdaPrefillParams pa = p;
  pa.tc_unit_first = 0;
  cudaError_t err = launch_state_pass<true>(pa, 2 * kHeadDim, p.tc_units_a, stream);
  if (err != cudaSuccess) return err;
  if (p.tc_units_c > 0) {
    const dim3 grid(kHeadDim / tc::kCombineRows, p.H, p.tc_units_c);
    kda_prefill_tc_combine_kernel<<<grid, tc::kThr, 0, stream>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  KdaPrefillParams pb = p;
  pb.tc_unit_first = p.tc_units_a;
  return launch_state_pass<true>(pb, kHeadDim, p.tc_units_b, stream);
}

cudaError_t launch_kda_prefill_tc_state(const KdaPrefillParams& p, cudaStream_t stream) {
  if (p.N == 0 || p.H == 0) return cudaSuccess;
  if (p.tc_units) return launch_split_state(p, stream);
  return launch_state_pass<false>(p, kHeadDim, p.N, stream);
}

cudaError_t launch_kda_prefill_tc(const KdaPrefillParams& p, cudaStream_t stream) {
  const cudaError_t err = launch_kda_prefill_tc_prepare(p, stream);
  return err != cudaSuccess ? err : launch_kda_prefill_tc_state(p, stream);
}

}  // namespace kda
