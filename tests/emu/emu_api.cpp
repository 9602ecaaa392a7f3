// C entry points of the emulated kernels for ctypes (tests/emu/emulated.py): each takes a
// pointer to the very params struct the CUDA launchers take and calls the real launcher of
// csrc/ (compiled from the *_launch.cu files after the textual pass, see simt_emulator.h).
#include <cstddef>
#include <cstring>

#include "conv/conv1d.h"
#include "decode/kda_decode.h"
#include "decode/kda_decode_fused.h"
#include "norm/gated_rms_norm.h"
#include "prefill/kda_prefill.h"
#include "prefill/kda_prefill_tc_common.cuh"

namespace kda {
alignas(128) unsigned char smem_raw[240 * 1024];  // the kernels' dynamic shared memory
cudaError_t launch_kda_prefill_chunked(const KdaPrefillParams& p, cudaStream_t stream);
cudaError_t launch_kda_prefill_tc(const KdaPrefillParams& p, cudaStream_t stream);
}  // namespace kda

namespace {
// A GPU block's shared memory starts with whatever an earlier block left; here every block's
// starts as NaN (all bits set), so a read before a write reaches the output as NaN instead of
// passing with values an earlier block or test left behind.
const bool kPoisonSmem = [] {
  emu::g_on_block_start = [] { std::memset(kda::smem_raw, 0xFF, sizeof(kda::smem_raw)); };
  return true;
}();
}  // namespace

extern "C" cudaError_t cudaGetLastError(void) { return cudaSuccess; }

extern "C" void emu_set_order(int order, uint64_t seed) { emu::set_order(order, seed); }

extern "C" int emu_build_options() { return kda::kBuildOptions; }

extern "C" int emu_prefill(int kind, const kda::KdaPrefillParams* p) {
  switch (kind) {
    case 0: return kda::kda_prefill_launch(*p, nullptr);
    case 1: return kda::launch_kda_prefill_chunked(*p, nullptr);
    case 2: return kda::launch_kda_prefill_tc(*p, nullptr);
  }
  return -1;
}

extern "C" int emu_decode(const kda::KdaDecodeParams* p) { return kda::kda_decode_launch(*p, nullptr); }

extern "C" int emu_decode_fused(const kda::KdaDecodeFusedParams* p) {
  return kda::kda_decode_fused_launch(*p, nullptr);
}

extern "C" int emu_gated_rms_norm(const kda::GatedRmsNormParams* p) {
  return kda::gated_rms_norm_launch(*p, nullptr);
}

extern "C" int emu_conv(int update, const kda::Conv1dParams* p) {
  return update ? kda::conv1d_update_launch(*p, nullptr) : kda::conv1d_prefill_launch(*p, nullptr);
}

// The tensor-core prepare pass's work item -> (chunk slot, head) split (ItemDiv), for its test.
extern "C" void emu_item_div(int heads, int64_t item, int64_t* cslot, int* h) { kda::tc::ItemDiv(heads).split(item, *cslot, *h); }

// Layout checks for the ctypes mirrors: sizeof and the offset of the last field of each struct;
// then the tensor-core prefill's workspace record size, the last fused decode path and the last
// decode kernel.
extern "C" int64_t emu_layout(int which) {
  switch (which) {
    case 0: return sizeof(kda::KdaPrefillParams);
    case 1: return offsetof(kda::KdaPrefillParams, tc_diag_exact);
    case 2: return sizeof(kda::KdaDecodeParams);
    case 3: return offsetof(kda::KdaDecodeParams, norm);
    case 4: return sizeof(kda::Conv1dParams);
    case 5: return offsetof(kda::Conv1dParams, vec8_min_elems);
    case 6: return sizeof(kda::KdaDecodeFusedParams);
    case 7: return offsetof(kda::KdaDecodeFusedParams, path);
    case 8: return sizeof(kda::GatedRmsNormParams);
    case 9: return offsetof(kda::GatedRmsNormParams, eps);
    case 10: return kda::kTcRecordFloats;
    case 11: return kda::kFusedPathSingle;
    case 12: return kda::kDecodeKernelHeads;
  }
  return -1;
}
