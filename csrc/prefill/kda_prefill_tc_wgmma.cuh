// Warpgroup tensor-core products (wgmma, sm_90a), A from registers and B from shared memory: the
// state pass's X^T = S Ke^T, Y^T = S Qe^T, Y^T += U^T A_qk^T and S += U^T Kd (two products of 64
// channels) with 128 value rows (opt-in KDA_TC_STATE_WGMMA): D[64 x 64] += A[64 x 16] B[16 x 64]
// with fp16 operands. (The prepare pass's WY product on TF32 wgmma, opt-in KDA_TC_WY_WGMMA, went
// with that product.)
//
// A: each warp of the warpgroup holds 16 rows (warp w: rows 16 w .. 16 w + 15) in the mma.sync A
// fragment layout (mma_f16's, two values per register), g = lane / 4, t = lane % 4.
// D: per warp its 16 rows, d[4 j .. 4 j + 3] = D[g][8 j + 2t], D[g][8 j + 2t + 1], D[g+8][8 j + 2t],
// D[g+8][8 j + 2t + 1] (mma.sync's accumulator layout, eight 8-column tiles).
// B: K-major core matrices of 8 columns n x 16 bytes of consecutive k, 128 contiguous bytes, no
// swizzle; the core matrices adjacent in k are LBO bytes apart, those adjacent in n SBO bytes
// (f16_core_index below).
#pragma once

#include "kda_prefill_tc_common.cuh"

namespace kda {
namespace tc {

// An fp16 [n rows x kCols k] B operand in K-major core matrices of 8 rows x 8 values: adjacent in
// k 128 bytes apart, in n kCols / 8 x 128 bytes. Element (n, k) at f16_core_index<kCols>(n, k), in
// fp16 elements. The state pass's Ke, Qe (n = token, k = channel, kCols = 128), A_qk (n = token i,
// k = token j, kCols = 64) and Kd^T (n = channel, k = token, kCols = 64).
constexpr int kF16Lbo = 128;
template <int kCols>
constexpr int kF16Sbo = kCols / 8 * kF16Lbo;
template <int kCols>
__host__ __device__ constexpr int f16_core_index(int n, int k) {
  return n / 8 * (kF16Sbo<kCols> / 2) + k / 8 * (kF16Lbo / 2) + n % 8 * 8 + k % 8;
}

// Generic-proxy shared-memory writes (st.shared) made visible to the wgmma reads that follow a
// barrier: every writing thread fences before the barrier.
__device__ __forceinline__ void fence_smem_for_wgmma() {
#ifndef KDA_SIMT_EMULATOR
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Before the first product: orders this thread's writes of the A and D registers before the
// asynchronous products read them.
__device__ __forceinline__ void wgmma_fence() {
#ifndef KDA_SIMT_EMULATOR
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

// Commits the products issued so far and waits for all of them: D is final after it.
__device__ __forceinline__ void wgmma_commit_and_wait() {
#ifndef KDA_SIMT_EMULATOR
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
}

// The shared-memory matrix descriptor of a K-major, unswizzled B at b (16-byte aligned): start
// address, leading (k) and stride (n) byte offsets, each in 16-byte units.
template <int kLbo, int kSbo>
__device__ __forceinline__ uint64_t kmajor_descriptor(SmemAddr b) {
  return (uint64_t)((b & 0x3FFFFu) >> 4) | (uint64_t)(kLbo >> 4) << 16 | (uint64_t)(kSbo >> 4) << 32;
}

// d += A B, one k-step of 16 with fp16 operands (see the top of the file), B in f16_core_index<kCols>
// layout; b = smem_addr of its element (0, k0). As above, issued by the whole warpgroup, final
// after wgmma_commit_and_wait.
template <int kCols>
__device__ __forceinline__ void wgmma_m64n64k16_f16(float (&d)[8][4], const uint32_t (&a)[4], SmemAddr b) {
#ifdef KDA_SIMT_EMULATOR
  emu::wgmma_m64n64k16_f16(reinterpret_cast<float(&)[32]>(d), a, reinterpret_cast<const void*>(b), kF16Lbo,
                           kF16Sbo<kCols>);
#else
  const uint64_t desc = kmajor_descriptor<kF16Lbo, kF16Sbo<kCols>>(b);
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n"
      "}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]),
        "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]),
        "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]),
        "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
        "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
#endif
}

}  // namespace tc
}  // namespace kda
