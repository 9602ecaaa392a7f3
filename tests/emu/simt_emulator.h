// A small SIMT emulator that runs the CUDA kernels of csrc/ on the CPU, for tests on machines
// without a GPU. Every CUDA thread of a block is a fiber (ucontext) on one OS thread: a fiber
// runs until it reaches a barrier (__syncthreads, __syncwarp, a warp shuffle, an mma.sync or wgmma
// product), then the next runnable fiber runs. Blocks run one after another. The order in
// which runnable fibers are resumed is forward, reverse or pseudo-random (set_order), so a
// missing barrier shows up as results that differ between orders. An mma.sync product gathers
// the warp's fragments by their PTX layouts (mma_m16n8k8_tf32, mma_m16n8k16_f16), a wgmma product
// the warpgroup's (wgmma_m64n64k16_f16).
//
// What it checks: indexing, the algorithm, barrier placement (by comparing schedules),
// rounding (tf32 conversions are applied where the code asks). What it cannot: timing,
// memory-model subtleties, performance.
//
// Kernel sources are compiled after a textual pass: `extern __shared__` -> `extern` (the dynamic
// buffer is kda::smem_raw), `__shared__` -> `static` (one instance shared by the block's fibers;
// blocks run sequentially).
#pragma once

#include <setjmp.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#define KDA_SIMT_EMULATOR 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n)

namespace emu {

struct Idx {
  unsigned x = 0, y = 0, z = 0;
};

// Which runnable fiber runs next. The pass orders resume every runnable fiber once per pass, so
// warps advance at about the same rate; the greedy orders always resume the first runnable fiber
// (lowest or highest index), so one warp runs ahead until a block barrier stops it. Races between
// warps show up under the greedy orders, races inside a warp under the pass orders.
enum Order { kForward = 0, kReverse = 1, kShuffled = 2, kGreedy = 3, kGreedyReverse = 4 };

// A fiber starts through ucontext (once) and then switches with _setjmp/_longjmp, which, unlike
// swapcontext, make no system call.
struct Fiber {
  ucontext_t start;
  jmp_buf env;
  bool started = false;
  int waiting = -1;  // barrier id it waits on, -1 when runnable
  bool done = false;
};

constexpr int kFragValues = 16;  // a, b, c of the largest product (m16n8k16: 8 + 4 + 4)

struct Block {
  int threads = 0;
  std::vector<Fiber> fibers;
  std::vector<int> arrived;      // per barrier: 0 = the block, 1 + w = warp w, then warpgroups
  std::vector<uint32_t> shfl;    // one 32-bit slot per thread
  std::vector<float> frag;       // one mma.sync fragment set (a, b, c: up to 16 values) per thread
  std::vector<const void*> rows;  // one ldmatrix row address per thread
  ucontext_t sched_ctx;
  jmp_buf sched;
  int current = 0;
};

inline Idx g_thread, g_block, g_grid;
inline Block* g_blk = nullptr;
inline Order g_order = kForward;
inline uint64_t g_seed = 1;
inline std::function<void()>* g_body = nullptr;
inline constexpr size_t kStack = 128 * 1024;
// Called before each block runs (emu_api.cpp poisons the dynamic shared memory with it).
inline void (*g_on_block_start)() = nullptr;

inline void set_order(int order, uint64_t seed) {
  g_order = static_cast<Order>(order);
  g_seed = seed | 1;
}

inline void fail(const char* what) {
  std::fprintf(stderr, "simt emulator: %s\n", what);
  std::abort();
}

// Arrive at barrier `id` with `n` participants; the last arrival releases the others and goes on.
inline void barrier(int id, int n) {
  Block& b = *g_blk;
  if (++b.arrived[id] == n) {
    b.arrived[id] = 0;
    for (auto& f : b.fibers)
      if (f.waiting == id) f.waiting = -1;
    return;
  }
  Fiber& f = b.fibers[b.current];
  f.waiting = id;
  if (!_setjmp(f.env)) _longjmp(b.sched, 1);
}

inline void warp_barrier() { barrier(1 + (int)(g_thread.x / 32), 32); }

inline void fiber_entry() {
  (*g_body)();
  g_blk->fibers[g_blk->current].done = true;
  _longjmp(g_blk->sched, 1);
}

// Runs body() once per thread of every block of the grid.
template <class F>
void launch(Idx grid, int threads, F&& fn) {
  std::function<void()> body = fn;
  g_body = &body;
  g_grid = grid;
  std::vector<char> stacks((size_t)threads * kStack);
  uint64_t rng = g_seed;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Block blk;
        blk.threads = threads;
        blk.fibers.resize(threads);
        blk.arrived.assign(1 + threads / 32 + (threads + 127) / 128, 0);
        blk.shfl.assign(threads, 0);
        blk.rows.assign(threads, nullptr);
        blk.frag.assign((size_t)threads * kFragValues, 0.f);
        g_blk = &blk;
        g_block = Idx{x, y, z};
        if (g_on_block_start) g_on_block_start();
        for (int t = 0; t < threads; ++t) {
          Fiber& f = blk.fibers[t];
          getcontext(&f.start);
          f.start.uc_stack.ss_sp = stacks.data() + (size_t)t * kStack;
          f.start.uc_stack.ss_size = kStack;
          f.start.uc_link = nullptr;
          makecontext(&f.start, fiber_entry, 0);
        }
        std::vector<int> order(threads);
        const bool greedy = g_order == kGreedy || g_order == kGreedyReverse;
        for (;;) {
          const bool reverse = g_order == kReverse || g_order == kGreedyReverse;
          for (int i = 0; i < threads; ++i) order[i] = reverse ? threads - 1 - i : i;
          if (g_order == kShuffled)
            for (int i = threads - 1; i > 0; --i) {
              rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
              std::swap(order[i], order[rng % (i + 1)]);
            }
          bool ran = false, all_done = true;
          for (int t : order) {
            Fiber& f = blk.fibers[t];
            if (f.done) continue;
            all_done = false;
            if (f.waiting >= 0) continue;
            blk.current = t;
            g_thread = Idx{(unsigned)t, 0, 0};
            if (!_setjmp(blk.sched)) {
              if (f.started) _longjmp(f.env, 1);
              f.started = true;
              swapcontext(&blk.sched_ctx, &f.start);  // never returns here: the fiber jumps back
            }
            ran = true;
            if (greedy) break;  // rescan from the first fiber
          }
          if (all_done) break;
          if (!ran) fail("deadlock: every live thread waits at a barrier (a barrier not reached by all threads)");
        }
      }
  g_blk = nullptr;
}

// What `kernel<<<grid, block, smem, stream>>>(args)` becomes after the textual pass:
// emu::Config(grid, block, smem, stream).run([&] { kernel(args); }).
struct Config {
  Config(dim3 g, dim3 b, size_t = 0, cudaStream_t = nullptr) : grid(g), block(b) {}
  template <class F>
  void run(F&& body) const {
    if (block.y != 1 || block.z != 1 || block.x % 32 != 0) fail("blocks must be 1-D multiples of 32 threads");
    launch(Idx{grid.x, grid.y, grid.z}, (int)block.x, body);
  }
  dim3 grid, block;
};

template <typename T>
T shfl_from(T v, int src_lane) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  const int warp = g_thread.x / 32, lane = g_thread.x % 32;
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  g_blk->shfl[warp * 32 + lane] = bits;
  warp_barrier();
  bits = g_blk->shfl[warp * 32 + (src_lane & 31)];
  warp_barrier();
  T r;
  std::memcpy(&r, &bits, 4);
  return r;
}

// A lane's four outputs of a gathered m16n8kK product, D = C + A B, in the accumulator layout
// (g = lane / 4, t = lane % 4): D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1].
template <int K>
inline void mma_lane_outputs(const float (&A)[16][K], const float (&B)[K][8], const float (&C)[16][8], int lane,
                             float (&d)[4]) {
  const int g = lane / 4, t = lane % 4;
  const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  for (int i = 0; i < 4; ++i) {
    float acc = C[rows[i]][cols[i]];
    for (int k = 0; k < K; ++k) acc += A[rows[i]][k] * B[k][cols[i]];
    d[i] = acc;
  }
}

// A TF32 operand's value: the tensor cores ignore the low 13 bits.
inline float tf32(uint32_t bits) {
  bits &= ~0x1FFFu;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// mma.sync.m16n8k8 with TF32 operands and fp32 accumulation, as the tensor cores take their
// fragments (PTX ISA layouts; g = lane / 4, t = lane % 4): every lane posts its a, b and c, then
// computes its own four outputs from the warp's. The low 13 bits of a TF32 operand are ignored.
inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const int warp = g_thread.x / 32, lane = g_thread.x % 32;
  float* mine = &g_blk->frag[(size_t)(warp * 32 + lane) * kFragValues];
  for (int i = 0; i < 4; ++i) mine[i] = tf32(a[i]);
  mine[4] = tf32(b0);
  mine[5] = tf32(b1);
  for (int i = 0; i < 4; ++i) mine[6 + i] = d[i];
  warp_barrier();
  float A[16][8], B[8][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const float* f = &g_blk->frag[(size_t)(warp * 32 + l) * kFragValues];
    const int g = l / 4, t = l % 4;
    A[g][t] = f[0]; A[g + 8][t] = f[1]; A[g][t + 4] = f[2]; A[g + 8][t + 4] = f[3];
    B[t][g] = f[4]; B[t + 4][g] = f[5];
    C[g][2 * t] = f[6]; C[g][2 * t + 1] = f[7]; C[g + 8][2 * t] = f[8]; C[g + 8][2 * t + 1] = f[9];
  }
  warp_barrier();
  mma_lane_outputs(A, B, C, lane, d);
}

// mma.sync.m16n8k16 with fp16 operands and fp32 accumulation: a[i] and b[i] hold two fp16 values
// each, the lower column (a) or row (b) in the low half: a = A[g][2t..2t+1], A[g+8][2t..2t+1],
// A[g][2t+8..2t+9], A[g+8][2t+8..2t+9]; b = B[2t..2t+1][g], B[2t+8..2t+9][g]. Every product of
// two fp16 values is exact in fp32, so the sum in fp32 is the tensor cores' up to the order.
inline void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  auto lo = [](uint32_t bits) { return __half2float(__ushort_as_half((unsigned short)(bits & 0xffffu))); };
  auto hi = [](uint32_t bits) { return __half2float(__ushort_as_half((unsigned short)(bits >> 16))); };
  const int warp = g_thread.x / 32, lane = g_thread.x % 32;
  float* mine = &g_blk->frag[(size_t)(warp * 32 + lane) * kFragValues];
  for (int i = 0; i < 4; ++i) { mine[2 * i] = lo(a[i]); mine[2 * i + 1] = hi(a[i]); }
  mine[8] = lo(b0); mine[9] = hi(b0); mine[10] = lo(b1); mine[11] = hi(b1);
  for (int i = 0; i < 4; ++i) mine[12 + i] = d[i];
  warp_barrier();
  float A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const float* f = &g_blk->frag[(size_t)(warp * 32 + l) * kFragValues];
    const int g = l / 4, t = l % 4;
    for (int e = 0; e < 2; ++e) {
      A[g][2 * t + e] = f[e]; A[g + 8][2 * t + e] = f[2 + e];
      A[g][2 * t + 8 + e] = f[4 + e]; A[g + 8][2 * t + 8 + e] = f[6 + e];
      B[2 * t + e][g] = f[8 + e]; B[2 * t + 8 + e][g] = f[10 + e];
    }
    C[g][2 * t] = f[12]; C[g][2 * t + 1] = f[13]; C[g + 8][2 * t] = f[14]; C[g + 8][2 * t + 1] = f[15];
  }
  warp_barrier();
  mma_lane_outputs(A, B, C, lane, d);
}

// A warpgroup product D[64 x 64] += A[64 x K] B[K x 64], A from registers, B from shared memory
// (b, 16-byte aligned): every thread posts its A fragment's K / 2 values (post), after the
// warpgroup's barrier each gathers A (place: lane l's posted values into rows r, r + 8, columns
// from t = l % 4) and computes its 32 outputs, the products added in k order (as
// mma_lane_outputs). Warp w holds rows 16 w .. 16 w + 15 of A and D (d[4 j + e]: the 8-column
// tile j). B(k, n) reads B at once: the program must leave it unchanged until its wait.
template <int K, class Post, class Place, class BAt>
inline void wgmma_product(float (&d)[32], const void* b, Post post, Place place, BAt B) {
  Block& blk = *g_blk;
  if (blk.threads % 128 != 0) fail("wgmma: the block is not a whole number of warpgroups");
  const int tid = g_thread.x, wg = tid / 128, w = tid % 128 / 32, lane = tid % 32;
  if (reinterpret_cast<uintptr_t>(b) % 16 != 0) fail("wgmma: B is not 16-byte aligned");
  post(&blk.frag[(size_t)tid * kFragValues]);
  const int bar = 1 + blk.threads / 32 + wg;
  barrier(bar, 128);
  float A[64][K];
  for (int l = 0; l < 128; ++l)
    place(&blk.frag[(size_t)(wg * 128 + l) * kFragValues], A, 16 * (l / 32) + l % 32 / 4, l % 4);
  barrier(bar, 128);
  const int g = lane / 4, t = lane % 4;
  for (int j = 0; j < 8; ++j)
    for (int e = 0; e < 4; ++e) {
      const int r = 16 * w + g + (e >= 2 ? 8 : 0), c = 8 * j + 2 * t + (e & 1);
      float acc = d[4 * j + e];
      for (int k = 0; k < K; ++k) acc += A[r][k] * B(k, c);
      d[4 * j + e] = acc;
    }
}

// wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 with A from registers (the
// m16n8k16 layout, two fp16 values per register, the lower column in the low half) and B K-major in
// shared memory without swizzle: element (k, n) at b + (n / 8) sbo + (k / 8) lbo + (n % 8) 16 +
// (k % 8) 2 bytes (core matrices of 8 columns n x 8 fp16 k). A product equals mma_m16n8k16_f16's
// on the same operands.
inline void wgmma_m64n64k16_f16(float (&d)[32], const uint32_t (&a)[4], const void* b, int lbo, int sbo) {
  auto lo = [](uint32_t bits) { return __half2float(__ushort_as_half((unsigned short)(bits & 0xffffu))); };
  auto hi = [](uint32_t bits) { return __half2float(__ushort_as_half((unsigned short)(bits >> 16))); };
  wgmma_product<16>(
      d, b, [&](float* mine) { for (int i = 0; i < 4; ++i) { mine[2 * i] = lo(a[i]); mine[2 * i + 1] = hi(a[i]); } },
      [](const float* f, float (&A)[64][16], int r, int t) {
        for (int e = 0; e < 2; ++e) {
          A[r][2 * t + e] = f[e]; A[r + 8][2 * t + e] = f[2 + e];
          A[r][2 * t + 8 + e] = f[4 + e]; A[r + 8][2 * t + 8 + e] = f[6 + e];
        }
      },
      [&](int k, int n) {
        uint16_t bits;
        std::memcpy(&bits, static_cast<const char*>(b) + (n / 8) * sbo + (k / 8) * lbo + (n % 8) * 16 + (k % 8) * 2, 2);
        return __half2float(__ushort_as_half(bits));
      });
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lane L gives the address of row L % 8 of
// matrix L / 8 (eight 16-bit values, 16-byte aligned); r[i] of lane (g, t) is matrix i's
// [g][2t], [g][2t+1] (low half first), or with trans [2t][g], [2t+1][g].
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  const int warp = g_thread.x / 32, lane = g_thread.x % 32;
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) fail("ldmatrix: a row address is not 16-byte aligned");
  g_blk->rows[warp * 32 + lane] = row;
  warp_barrier();
  const int g = lane / 4, t = lane % 4;
  auto at = [&](int m, int rr, int c) {
    return (uint32_t) static_cast<const uint16_t*>(g_blk->rows[warp * 32 + 8 * m + rr])[c];
  };
  for (int m = 0; m < 4; ++m)
    r[m] = trans ? at(m, 2 * t, g) | at(m, 2 * t + 1, g) << 16 : at(m, g, 2 * t) | at(m, g, 2 * t + 1) << 16;
  warp_barrier();
}

// ldmatrix .x2 (no trans): lanes 0..15 give the rows of matrices 0 and 1 (the other lanes'
// addresses are ignored, as on the GPU); r[i] of lane (g, t) is matrix i's [g][2t], [g][2t+1].
inline void ldmatrix_x2(uint32_t* r, const void* row) {
  const int warp = g_thread.x / 32, lane = g_thread.x % 32;
  if (lane < 16 && reinterpret_cast<uintptr_t>(row) % 16 != 0) fail("ldmatrix: a row address is not 16-byte aligned");
  g_blk->rows[warp * 32 + lane] = row;
  warp_barrier();
  const int g = lane / 4, t = lane % 4;
  for (int m = 0; m < 2; ++m) {
    const uint16_t* rp = static_cast<const uint16_t*>(g_blk->rows[warp * 32 + 8 * m + g]);
    r[m] = (uint32_t)rp[2 * t] | (uint32_t)rp[2 * t + 1] << 16;
  }
  warp_barrier();
}

// The warp's predicates as a bit mask (lane L in bit L), as __ballot_sync with a full mask.
inline uint32_t ballot(bool pred) {
  const int warp = g_thread.x / 32, lane = g_thread.x % 32;
  g_blk->shfl[warp * 32 + lane] = pred ? 1u : 0u;
  warp_barrier();
  uint32_t m = 0;
  for (int l = 0; l < 32; ++l) m |= (g_blk->shfl[warp * 32 + l] ? 1u : 0u) << l;
  warp_barrier();
  return m;
}

}  // namespace emu

#define threadIdx (emu::g_thread)
#define blockIdx (emu::g_block)

inline void __syncthreads() { emu::barrier(0, emu::g_blk->threads); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_barrier(); }
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int mask) { return emu::shfl_from(v, (int)(emu::g_thread.x % 32) ^ mask); }
template <typename T>
inline T __shfl_sync(unsigned, T v, int src) { return emu::shfl_from(v, src); }
inline unsigned __ballot_sync(unsigned, int pred) { return emu::ballot(pred != 0); }
inline int __all_sync(unsigned, int pred) { return emu::ballot(pred != 0) == 0xffffffffu; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float __uint_as_float(unsigned x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
template <class F>
inline cudaError_t cudaFuncSetAttribute(F*, cudaFuncAttribute, int) { return cudaSuccess; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
