// Bulk asynchronous copies global -> shared (cp.async.bulk, sm_90: the copy engine behind TMA,
// which moves the bytes without the issuing threads' load/store pipeline), completed on an mbarrier
// by transaction bytes. A phase of the barrier completes once its arrivals (count at init) are in
// and every byte it was told to expect (arrive_expect_tx) has landed; threads wait for a phase by
// its parity. The CPU emulator (tests/emu/simt_emulator.h) does a copy at the first wait on its
// phase and fails a wait whose arrivals or bytes do not add up.
#pragma once

#include <cstdint>

namespace kda {

struct alignas(8) MBarrier {
  uint64_t word;
};

#ifndef KDA_SIMT_EMULATOR
__device__ __forceinline__ unsigned mbarrier_smem(const MBarrier* m) {
  return static_cast<unsigned>(__cvta_generic_to_shared(m));
}
#endif

// One thread, before any use; the other threads use it after a barrier that follows.
__device__ __forceinline__ void mbarrier_init(MBarrier* m, int count) {
#ifdef KDA_SIMT_EMULATOR
  emu::mbarrier_init(m, count);
#else
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(mbarrier_smem(m)), "r"(count) : "memory");
  // The initialisation visible to the copy engine (the async proxy) too.
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

// One of the phase's arrivals, announcing `bytes` of copies that complete on it.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(MBarrier* m, uint32_t bytes) {
#ifdef KDA_SIMT_EMULATOR
  emu::mbarrier_arrive_expect_tx(m, bytes);
#else
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(mbarrier_smem(m)), "r"(bytes)
               : "memory");
#endif
}

// bytes (a multiple of 16, both addresses 16-byte aligned) from global src to shared dst,
// counted against m's current phase.
__device__ __forceinline__ void bulk_copy_g2s(void* dst, const void* src, uint32_t bytes, MBarrier* m) {
#ifdef KDA_SIMT_EMULATOR
  emu::bulk_copy(dst, src, bytes, m);
#else
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
          static_cast<unsigned>(__cvta_generic_to_shared(dst))),
      "l"(src), "r"(bytes), "r"(mbarrier_smem(m))
      : "memory");
#endif
}

// Returns once the phase of m with this parity has completed (its copies' bytes visible).
__device__ __forceinline__ void mbarrier_wait_parity(MBarrier* m, uint32_t parity) {
#ifdef KDA_SIMT_EMULATOR
  emu::mbarrier_wait_parity(m, parity);
#else
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(mbarrier_smem(m)),
      "r"(parity)
      : "memory");
#endif
}

}  // namespace kda
