// Device helpers shared by the KDA decode and prefill kernels. No torch headers here.
#pragma once

#include <cuda_bf16.h>
#include <cstdint>

namespace kda {

constexpr int kHeadDim = 128;   // K = V = 128
constexpr int kThreads = 128;   // 4 warps per CTA
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float bf2f(__nv_bfloat16 x) { return __bfloat162float(x); }

// n words of packed bf16 pairs (as one vector load returns them, lower half first) to 2n floats;
// bf16 -> fp32 is a 16-bit shift, and bit operations keep the words in registers.
template <int n>
__device__ __forceinline__ void unpack_bf16(const unsigned (&w)[n], float (&x)[2 * n]) {
#pragma unroll
  for (int k = 0; k < n; ++k) {
    x[2 * k] = __uint_as_float(w[k] << 16);
    x[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
  }
}

// Programmatic dependent launch (sm_90): a kernel started by launch_overlapping (launch_utils.h)
// may run while the kernel before it in the stream finishes. pdl_wait() returns once that kernel
// has completed and its writes are visible; nothing it writes may be read before. A kernel calls
// pdl_release_dependents() to let the next one start early. Both are no-ops without a dependency
// (and in the CPU emulator, which runs kernels one after another).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_release_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Stable forms: every exp argument is <= 0, so nothing overflows.
__device__ __forceinline__ float sigmoid_stable(float z) {
  if (z >= 0.f) return 1.f / (1.f + expf(-z));
  const float e = expf(z);
  return e / (1.f + e);
}

__device__ __forceinline__ float softplus_stable(float x) {
  return fmaxf(x, 0.f) + log1pf(expf(-fabsf(x)));
}

// Log-decay of one channel (always <= 0). a = exp(A_log[h]).
__device__ __forceinline__ float kda_gate(float x, float a, bool bounded, float lower_bound) {
  return bounded ? lower_bound * sigmoid_stable(a * x) : -a * softplus_stable(x);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Reciprocal L2 norms (eps inside the sqrt) of one token's q and k, each lane holding four
// channels; rq also carries the attention scale.
__device__ __forceinline__ void qk_inv_norms(const float (&qv)[4], const float (&kv)[4], float scale,
                                             float& rq, float& rk) {
  float sq = 0.f, sk = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) { sq += qv[j] * qv[j]; sk += kv[j] * kv[j]; }
  rq = rsqrtf(warp_sum(sq) + 1e-6f) * scale;
  rk = rsqrtf(warp_sum(sk) + 1e-6f);
}

// An element of an int32 or int64 index tensor (cu_seqlens, checkpoint offsets).
__device__ __forceinline__ int64_t load_index(const void* p, bool is64, int i) {
  return is64 ? static_cast<const int64_t*>(p)[i] : (int64_t) static_cast<const int32_t*>(p)[i];
}

// Four consecutive channels of one row of a state (fp32 or bf16), vectorised.
template <typename T> struct StateIO;

template <> struct StateIO<float> {
  static __device__ __forceinline__ void load(const float* p, float (&x)[4]) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    x[0] = v.x; x[1] = v.y; x[2] = v.z; x[3] = v.w;
  }
  static __device__ __forceinline__ void store(float* p, const float (&x)[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
  }
  // Two consecutive channels (the tensor-core state pass's accumulator pairs).
  static __device__ __forceinline__ void load2(const float* p, float& a, float& b) {
    const float2 v = *reinterpret_cast<const float2*>(p);
    a = v.x; b = v.y;
  }
  static __device__ __forceinline__ void store2(float* p, float a, float b) {
    *reinterpret_cast<float2*>(p) = make_float2(a, b);
  }
};

template <> struct StateIO<__nv_bfloat16> {
  static __device__ __forceinline__ void load(const __nv_bfloat16* p, float (&x)[4]) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    const __nv_bfloat162 a = *reinterpret_cast<const __nv_bfloat162*>(&raw.x);
    const __nv_bfloat162 b = *reinterpret_cast<const __nv_bfloat162*>(&raw.y);
    const float2 fa = __bfloat1622float2(a), fb = __bfloat1622float2(b);
    x[0] = fa.x; x[1] = fa.y; x[2] = fb.x; x[3] = fb.y;
  }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, const float (&x)[4]) {
    const __nv_bfloat162 a = __floats2bfloat162_rn(x[0], x[1]);
    const __nv_bfloat162 b = __floats2bfloat162_rn(x[2], x[3]);
    uint2 raw;
    raw.x = *reinterpret_cast<const uint32_t*>(&a);
    raw.y = *reinterpret_cast<const uint32_t*>(&b);
    *reinterpret_cast<uint2*>(p) = raw;
  }
  static __device__ __forceinline__ void load2(const __nv_bfloat16* p, float& a, float& b) {
    const float2 v = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
    a = v.x; b = v.y;
  }
  static __device__ __forceinline__ void store2(__nv_bfloat16* p, float a, float b) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
  }
};

// Asynchronous 16-byte global -> shared copies (cp.async.cg: through L2 only), 16-byte aligned
// both sides; the emulator copies at once. cp_async_wait<N> waits until at most the N newest
// committed groups of this thread are in flight; cp_async_wait_all commits and waits for all.
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
#ifdef KDA_SIMT_EMULATOR
  *static_cast<uint4*>(dst) = *static_cast<const uint4*>(src);
#else
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifndef KDA_SIMT_EMULATOR
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifndef KDA_SIMT_EMULATOR
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
  cp_async_commit();
  cp_async_wait<0>();
}

// 2^x from MUFU.EX2 alone, a result below 2^-126 flushed to 0 (exp2f adds a test and two
// multiplies to return it subnormal): for callers where such a result only meets 1 + it, or is
// rounded into a bf16 output next to values above 2^-126 anyway.
__device__ __forceinline__ float ex2_ftz(float x) {
#ifdef KDA_SIMT_EMULATOR
  return exp2f(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

}  // namespace kda
