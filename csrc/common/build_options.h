// Opt-in build defines of the tensor-core prefill, their defaults, and the mask the extension
// reports (torch.ops.kda_serving.build_options; kda_serving.ops._ext.build_options names the
// bits), so that a benchmark can say which build it timed. setup.py takes them from
// KDA_SERVING_BUILD_DEFINES (kda_serving/build_defines.py).
#pragma once

#ifndef KDA_TC_STATE_WGMMA
#define KDA_TC_STATE_WGMMA 0  // the 128-row state pass's products on wgmma (kda_prefill_tc_state.cuh)
#endif

namespace kda {

// Bit 0: KDA_TC_STATE_WGMMA. (KDA_TC_WY_WGMMA, the prepare pass's WY product on wgmma, left with
// that product.)
constexpr int kBuildOptions = (KDA_TC_STATE_WGMMA ? 1 : 0);

}  // namespace kda
