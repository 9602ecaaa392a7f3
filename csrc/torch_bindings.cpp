// Torch op registration for kda_serving._C.
//
// Every op writes into caller-provided tensors, runs on the current CUDA stream, never
// synchronises and never allocates. Shapes: Ttot packed tokens, N sequences, B batch rows,
// T tokens per row, H heads, K = V = 128, S pool slots, D conv channels, W conv width <= 4,
// R conv-state rows (>= W-1). A slot <= 0 means null: zero output, no state access.
//
// kda_prefill(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor A_log,
//             Tensor dt_bias, Tensor cu_seqlens, Tensor(a!) state_pool, Tensor slots,
//             Tensor has_initial_state, float? lower_bound, float scale,
//             Tensor(b!)? inter, Tensor? inter_offsets, Tensor(c!) out) -> ()
//   q, k, g [Ttot, H, K] bf16; v [Ttot, H, V] bf16; beta [Ttot, H] bf16 (row strides free,
//   last dim contiguous); A_log [H] fp32; dt_bias [H*K] or [H, K] fp32; cu_seqlens [N+1]
//   int32/int64; state_pool [S, H, V, K] fp32/bf16; slots [N] int32; has_initial_state [N]
//   bool; inter [M, H, V, K] pool dtype, inter_offsets [N] int32/int64 (state after token
//   64(i+1)-1 of sequence n goes to inter[inter_offsets[n] + i]); out [Ttot, H, V] bf16.
//
// kda_prefill_chunked(<same arguments as kda_prefill>) -> ()
//   Same contract, computed by the chunked kernel (csrc/prefill/kda_prefill_chunked_*). Opt-in
//   (slower than the default): kda_serving.ops.kda_prefill calls it only when
//   KDA_SERVING_PREFILL_KERNEL=chunked (docs/kernels.md); the default is the token-serial kernel.
//
// kda_prefill_tc(<same arguments as kda_prefill>, Tensor(d!) workspace) -> ()
//   Same contract, computed by the tensor-core chunked kernel (csrc/prefill/kda_prefill_tc_*,
//   64-token chunks, TF32 mma.sync) in two passes through `workspace`: contiguous fp32, 16-byte
//   aligned, with at least (Ttot / 64 + N) * H * kTcRecordFloats elements (kda_prefill.h
//   tc_workspace_floats), reused across calls on one stream. The default
//   (KDA_SERVING_PREFILL_KERNEL=tc).
//
// kda_prefill_tc_split(<kda_prefill's arguments without inter, inter_offsets>, Tensor(d!) workspace,
//                      Tensor units, int units_a, int units_b, int units_c,
//                      Tensor(e!) split_state) -> ()
//   The tensor-core kernel with long sequences split into segments that run in parallel
//   (csrc/prefill/kda_prefill_tc_units.cuh): units [units_a + units_b + units_c, 8] int32, the
//   table kda_serving/ops/tc_split.py builds (its entry indices must be below split_state's
//   entries; the kernels do not check them); split_state contiguous fp32, a multiple of
//   H * 2 * 128 * 128 elements, 16-byte aligned. No checkpoints.
//
// kda_decode(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor A_log,
//            Tensor dt_bias, Tensor(a!) state_pool, Tensor slots, Tensor? num_accepted,
//            float? lower_bound, float scale, Tensor(b!) out) -> ()
//   q, k, g [B, T, H, K]; v [B, T, H, V]; beta [B, T, H]; out [B, T, H, V]. slots [B]: start
//   from and write the final state to slots[n]. slots [B, C >= T] (verify): start from
//   slots[n, num_accepted[n]-1] (column 0 without num_accepted), state after token t goes
//   to slots[n, t] when > 0.
//
// causal_conv1d_prefill(Tensor x, Tensor weight, Tensor? bias, Tensor cu_seqlens,
//                       Tensor(a!) conv_pool, Tensor slots, Tensor has_initial_state,
//                       bool silu, Tensor(b!) out) -> ()
//   x, out [Ttot, D] bf16; weight [D, W] fp32/bf16, bias [D] same dtype; conv_pool [S, R, D]
//   fp32/bf16 (any strides). History = pool rows [0, W-1) (zeros without initial state);
//   afterwards those rows hold the last W-1 inputs.
//
// causal_conv1d_update(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) conv_pool,
//                      Tensor slots, Tensor? num_accepted, bool silu, Tensor(b!) out) -> ()
//   x, out [B, T, D] bf16; slots [B] int32. off = num_accepted[b]-1 (0 without): window
//   history = pool rows [off, off+W-1); new rows = (pool[off:] ++ zeros(off) ++ x)[T:T+R].
//
// kda_decode_fused(Tensor mixed_qkv, Tensor g, Tensor beta, Tensor A_log, Tensor dt_bias,
//                  Tensor conv_weight, Tensor? conv_bias, Tensor(a!) conv_pool,
//                  Tensor(b!) state_pool, Tensor slots, Tensor? num_accepted,
//                  float? lower_bound, float scale, Tensor? out_gate, Tensor? norm_weight,
//                  float norm_eps, Tensor(c!) out, Tensor(d!)? conv_out) -> ()
//   causal_conv1d_update (SiLU) of mixed_qkv [B, T, 3*H*128] bf16 (row strides free) with
//   conv_weight [3*H*128, W], conv_pool [S, R, 3*H*128] and the conv slot slots[n, 0], then
//   kda_decode of the q | k | v column blocks with g [B, T, H, 128], beta [B, T, H] on
//   state_pool, then, with out_gate [B, T, H, 128] bf16 and norm_weight [128] fp32/bf16,
//   out = RMSNorm(out)·norm_weight·sigmoid(out_gate) per head. slots / num_accepted as for
//   kda_decode; a row whose start slot or conv slot is <= 0 (or whose conv window leaves the
//   pool) gets zero output and touches neither pool. The conv outputs of the conv + decode pair
//   (csrc/decode/kda_decode_fused_kernel.cuh) go to conv_out, contiguous bf16 with at least
//   B*T*3*H*128 elements (ops._ext keeps one per device), or without it to a buffer from torch's
//   caching allocator.
//
// gated_rms_norm(Tensor x, Tensor gate, Tensor weight, float eps, Tensor(a!) out) -> ()
//   x, gate, out [M, H, 128] bf16 (last dim contiguous, other strides free; out may be x);
//   weight [128] fp32/bf16: out = RMSNorm(x)·weight·sigmoid(gate) per 128-wide row, in fp32.

#include <Python.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include "common/build_options.h"
#include "conv/conv1d.h"
#include "decode/kda_decode.h"
#include "decode/kda_decode_fused.h"
#include "norm/gated_rms_norm.h"
#include "prefill/kda_prefill.h"

namespace kda {
// csrc/prefill/kda_prefill_chunked_launch.cu
cudaError_t launch_kda_prefill_chunked(const KdaPrefillParams& p, cudaStream_t stream);
// csrc/prefill/kda_prefill_tc_launch.cu
cudaError_t launch_kda_prefill_tc(const KdaPrefillParams& p, cudaStream_t stream);
}  // namespace kda

namespace {

using at::Tensor;
using Named = std::pair<const Tensor*, const char*>;
constexpr int64_t kDim = 128;  // K = V

// Error messages are built here by string concatenation, numbers through std::to_string, and
// reach TORCH_CHECK as one std::string, so no message goes through an ostream: on the GPU machine
// (torch 2.11.0+cu130) every binding error whose message held a number (a size, a count, a
// tensor's sizes()) crashed the process with SIGSEGV instead of raising, while messages of text
// alone raised (c3ff5f8, one bad call per process); TORCH_CHECK formats several arguments through
// an std::ostringstream in this library. Arguments: text, numbers, or shape() / device_name() /
// dtype_name() strings; anything else does not compile.
inline void msg_append(std::string& s, const char* x) { s += x; }
inline void msg_append(std::string& s, const std::string& x) { s += x; }
template <typename T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
inline void msg_append(std::string& s, T x) { s += std::to_string(x); }
template <typename... Args>
std::string kda_msg(const Args&... args) {
  std::string s = "kda_serving: ";
  (msg_append(s, args), ...);
  return s;
}
#define KDA_CHECK(cond, ...) TORCH_CHECK(cond, kda_msg(__VA_ARGS__))

std::string shape(const Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}
std::string device_name(const Tensor& t) { return t.device().str(); }
const char* dtype_name(at::ScalarType st) { return c10::toString(st); }

void check_cuda(const Tensor& t, const char* name, const Tensor& ref) {
  KDA_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  KDA_CHECK(t.device() == ref.device(), name, " must be on ", device_name(ref), ", got ", device_name(t));
}

void check_dtype(const Tensor& t, const char* name, at::ScalarType want) {
  KDA_CHECK(t.scalar_type() == want, name, " must be ", dtype_name(want), ", got ", dtype_name(t.scalar_type()));
}

void check_last_contig(const Tensor& t, const char* name) {
  KDA_CHECK(t.stride(-1) == 1, name, " must have a contiguous last dim");
}

bool check_index_tensor(const Tensor& t, const char* name) {
  KDA_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, name,
            " must be int32 or int64, got ", dtype_name(t.scalar_type()));
  KDA_CHECK(t.dim() == 1 && t.is_contiguous(), name, " must be a contiguous 1-D tensor");
  return t.scalar_type() == at::kLong;
}

// Pool [S, H, V, K] with H, V, K packed and 16-byte aligned rows for vector access.
void check_state(const Tensor& s, const char* name, int64_t H, const Tensor& ref) {
  check_cuda(s, name, ref);
  KDA_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kBFloat16, name,
            " must be float32 or bfloat16, got ", dtype_name(s.scalar_type()));
  KDA_CHECK(s.dim() == 4 && s.size(1) == H && s.size(2) == kDim && s.size(3) == kDim,
            name, " must be [S, ", H, ", 128, 128], got ", shape(s));
  KDA_CHECK(s.stride(3) == 1 && s.stride(2) == 128 && s.stride(1) == 128 * 128, name,
            " must have packed [H, V, K] per slot");
  KDA_CHECK(s.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(s.data_ptr()) % 16 == 0, name,
            " slot stride must be a multiple of 8 elements and data 16-byte aligned");
}

int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

void check_gate_params(const Tensor& A_log, const Tensor& dt_bias, int64_t H, const Tensor& ref) {
  check_cuda(A_log, "A_log", ref);
  check_cuda(dt_bias, "dt_bias", ref);
  check_dtype(A_log, "A_log", at::kFloat);
  check_dtype(dt_bias, "dt_bias", at::kFloat);
  KDA_CHECK(A_log.numel() == H && A_log.is_contiguous(), "A_log must be contiguous [H]");
  KDA_CHECK(dt_bias.numel() == H * kDim && dt_bias.is_contiguous(),
            "dt_bias must be contiguous [H*K]");
}

using PrefillLaunch = cudaError_t (*)(const kda::KdaPrefillParams&, cudaStream_t);

// kda_prefill_tc_split's extra arguments.
struct TcSplitArgs {
  const Tensor* units;
  int64_t a, b, c;
  const Tensor* state;
};

int tc_diag_choice();  // below, with the other environment switches

void prefill_common(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                    const Tensor& beta, const Tensor& A_log, const Tensor& dt_bias,
                    const Tensor& cu_seqlens, Tensor& state_pool, const Tensor& slots,
                    const Tensor& has_initial_state, std::optional<double> lower_bound,
                    double scale, const std::optional<Tensor>& inter,
                    const std::optional<Tensor>& inter_offsets, Tensor& out,
                    PrefillLaunch launch, const char* op, const Tensor* tc_workspace = nullptr,
                    const TcSplitArgs* split = nullptr) {
  KDA_CHECK(q.dim() == 3 && q.size(2) == kDim, "q must be [Ttot, H, 128], got ", shape(q));
  const int64_t Tt = q.size(0), H = q.size(1);
  const Named tensors[] = {{&q, "q"}, {&k, "k"}, {&g, "g"}, {&v, "v"}, {&out, "out"}};
  for (const auto& [t, name] : tensors) {
    KDA_CHECK(t->dim() == 3 && t->size(0) == Tt && t->size(1) == H && t->size(2) == kDim,
              name, " must be [", Tt, ", ", H, ", 128], got ", shape(*t));
    check_cuda(*t, name, q);
    check_dtype(*t, name, at::kBFloat16);
    check_last_contig(*t, name);
  }
  KDA_CHECK(beta.dim() == 2 && beta.size(0) == Tt && beta.size(1) == H, "beta must be [Ttot, H]");
  check_cuda(beta, "beta", q);
  check_dtype(beta, "beta", at::kBFloat16);
  check_gate_params(A_log, dt_bias, H, q);
  check_cuda(cu_seqlens, "cu_seqlens", q);
  const bool cu64 = check_index_tensor(cu_seqlens, "cu_seqlens");
  const int64_t N = cu_seqlens.numel() - 1;
  KDA_CHECK(N >= 0, "cu_seqlens must have at least one element");
  check_state(state_pool, "state_pool", H, q);
  check_cuda(slots, "slots", q);
  check_dtype(slots, "slots", at::kInt);
  KDA_CHECK(slots.dim() == 1 && slots.numel() == N && slots.is_contiguous(), "slots must be contiguous [N]");
  check_cuda(has_initial_state, "has_initial_state", q);
  check_dtype(has_initial_state, "has_initial_state", at::kBool);
  KDA_CHECK(has_initial_state.numel() == N && has_initial_state.is_contiguous(),
            "has_initial_state must be contiguous [N]");

  kda::KdaPrefillParams p{};
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr(); p.g = g.data_ptr(); p.beta = beta.data_ptr();
  p.q_st = q.stride(0); p.q_sh = q.stride(1);
  p.k_st = k.stride(0); p.k_sh = k.stride(1);
  p.v_st = v.stride(0); p.v_sh = v.stride(1);
  p.g_st = g.stride(0); p.g_sh = g.stride(1);
  p.beta_st = beta.stride(0); p.beta_sh = beta.stride(1);
  p.A_log = A_log.data_ptr<float>();
  p.dt_bias = dt_bias.data_ptr<float>();
  p.cu_seqlens = cu_seqlens.data_ptr();
  p.cu_seqlens_64 = cu64;
  p.state = state_pool.data_ptr();
  p.state_ss = state_pool.stride(0);
  p.state_bf16 = state_pool.scalar_type() == at::kBFloat16;
  p.slots = slots.data_ptr<int32_t>();
  p.has_initial_state = has_initial_state.data_ptr<bool>();
  if (inter.has_value()) {
    KDA_CHECK(inter_offsets.has_value(), "inter_offsets is required with inter");
    check_state(*inter, "inter", H, q);
    KDA_CHECK(inter->scalar_type() == state_pool.scalar_type(), "inter must have the pool dtype");
    check_cuda(*inter_offsets, "inter_offsets", q);
    p.inter_offsets_64 = check_index_tensor(*inter_offsets, "inter_offsets");
    KDA_CHECK(inter_offsets->numel() == N, "inter_offsets must be [N]");
    p.inter = inter->data_ptr();
    p.inter_ss = inter->stride(0);
    p.inter_offsets = inter_offsets->data_ptr();
  }
  p.o = out.data_ptr(); p.o_st = out.stride(0); p.o_sh = out.stride(1);
  p.N = (int)N; p.H = (int)H;
  p.scale = (float)scale;
  p.has_lower_bound = lower_bound.has_value();
  p.lower_bound = lower_bound.has_value() ? (float)*lower_bound : 0.f;
  if (tc_workspace) {
    check_cuda(*tc_workspace, "workspace", q);
    check_dtype(*tc_workspace, "workspace", at::kFloat);
    const int64_t need = kda::tc_workspace_floats(Tt, N, H);
    KDA_CHECK(tc_workspace->is_contiguous() && tc_workspace->numel() >= need, "workspace must be contiguous "
              "fp32 with at least (Ttot / 64 + N) * H * ", kda::kTcRecordFloats, " = ", need, " elements, got ",
              tc_workspace->numel());
    // The passes move records with 16-byte accesses.
    KDA_CHECK(reinterpret_cast<uintptr_t>(tc_workspace->data_ptr()) % 16 == 0, "workspace must start 16-byte aligned");
    p.tc_workspace = tc_workspace->data_ptr<float>();
    p.tc_chunk_slots = kda::tc_chunk_slots(Tt, N);
    p.tc_diag_exact = tc_diag_choice() == 1;
  }
  if (split) {
    const Tensor& u = *split->units;
    const Tensor& st = *split->state;
    check_cuda(u, "units", q);
    check_dtype(u, "units", at::kInt);
    KDA_CHECK(split->a >= 0 && split->b >= 0 && split->c >= 0 && split->a + split->b + split->c < (1 << 30),
              "units_a, units_b, units_c must be non-negative, got ", split->a, ", ", split->b, ", ", split->c);
    KDA_CHECK(u.dim() == 2 && u.size(0) == split->a + split->b + split->c && u.size(1) == kda::kTcUnitInts &&
              u.is_contiguous(), "units must be contiguous [units_a + units_b + units_c, ", kda::kTcUnitInts,
              "] = [", split->a + split->b + split->c, ", ", kda::kTcUnitInts, "], got ", shape(u));
    check_cuda(st, "split_state", q);
    check_dtype(st, "split_state", at::kFloat);
    const int64_t entry = kda::tc_split_state_floats(1, H);
    KDA_CHECK(st.is_contiguous() && st.numel() % entry == 0 && reinterpret_cast<uintptr_t>(st.data_ptr()) % 16 == 0,
              "split_state must be contiguous fp32, 16-byte aligned, a multiple of H * 2 * 128 * 128 = ", entry,
              " elements, got ", st.numel());
    KDA_CHECK(!inter.has_value(), "kda_prefill_tc_split writes no checkpoints");
    p.tc_units = u.data_ptr<int32_t>();
    p.tc_units_a = (int)split->a; p.tc_units_b = (int)split->b; p.tc_units_c = (int)split->c;
    p.tc_split_state = st.data_ptr<float>();
  }
  const c10::cuda::CUDAGuard guard(q.device());
  p.num_sms = num_sms();
  const cudaError_t err = launch(p, at::cuda::getCurrentCUDAStream());
  KDA_CHECK(err == cudaSuccess, op, " launch failed: ", cudaGetErrorString(err));
}

// One TORCH_LIBRARY entry per prefill kernel; all share the kda_prefill signature and checks.
template <cudaError_t (*Launch)(const kda::KdaPrefillParams&, cudaStream_t), const char* Name>
void prefill_op(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g, const Tensor& beta,
                const Tensor& A_log, const Tensor& dt_bias, const Tensor& cu_seqlens, Tensor& state_pool,
                const Tensor& slots, const Tensor& has_initial_state, std::optional<double> lower_bound,
                double scale, const std::optional<Tensor>& inter, const std::optional<Tensor>& inter_offsets,
                Tensor& out) {
  prefill_common(q, k, v, g, beta, A_log, dt_bias, cu_seqlens, state_pool, slots, has_initial_state,
                 lower_bound, scale, inter, inter_offsets, out, Launch, Name);
}

constexpr char kPrefillName[] = "kda_prefill";

void prefill_tc_op(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g, const Tensor& beta,
                   const Tensor& A_log, const Tensor& dt_bias, const Tensor& cu_seqlens, Tensor& state_pool,
                   const Tensor& slots, const Tensor& has_initial_state, std::optional<double> lower_bound,
                   double scale, const std::optional<Tensor>& inter, const std::optional<Tensor>& inter_offsets,
                   Tensor& out, Tensor& workspace) {
  prefill_common(q, k, v, g, beta, A_log, dt_bias, cu_seqlens, state_pool, slots, has_initial_state,
                 lower_bound, scale, inter, inter_offsets, out, &kda::launch_kda_prefill_tc, "kda_prefill_tc",
                 &workspace);
}
void prefill_tc_split_op(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g, const Tensor& beta,
                         const Tensor& A_log, const Tensor& dt_bias, const Tensor& cu_seqlens, Tensor& state_pool,
                         const Tensor& slots, const Tensor& has_initial_state, std::optional<double> lower_bound,
                         double scale, Tensor& out, Tensor& workspace, const Tensor& units, int64_t units_a,
                         int64_t units_b, int64_t units_c, Tensor& split_state) {
  const TcSplitArgs split{&units, units_a, units_b, units_c, &split_state};
  prefill_common(q, k, v, g, beta, A_log, dt_bias, cu_seqlens, state_pool, slots, has_initial_state,
                 lower_bound, scale, std::nullopt, std::nullopt, out, &kda::launch_kda_prefill_tc,
                 "kda_prefill_tc_split", &workspace, &split);
}
constexpr char kPrefillChunkedName[] = "kda_prefill_chunked";

// The index of environment variable var's value in names (read on every call, like the prefill
// selection); unset or empty is names[0] ("auto"), anything else not in names is refused.
template <size_t N>
int env_choice(const char* var, const char* const (&names)[N]) {
  const char* sel = std::getenv(var);
  if (sel == nullptr || *sel == 0) return 0;
  std::string allowed;
  for (size_t i = 0; i < N; ++i) {
    if (std::string(sel) == names[i]) return (int)i;
    allowed += std::string(i == 0 ? "" : i + 1 == N ? " or " : ", ") + names[i];
  }
  KDA_CHECK(false, var, " must be ", allowed, ", got '", sel, "'");
  return 0;
}

// KDA_SERVING_TC_DIAG=exact puts every diagonal block of the tensor-core prefill on its exact
// CUDA-core path (for comparisons); unset or auto, a block's decay decides.
int tc_diag_choice() {
  constexpr const char* kNames[] = {"auto", "exact"};
  return env_choice("KDA_SERVING_TC_DIAG", kNames);
}

// KDA_SERVING_DECODE_GRID=rows / heads forces the decode's row-block / head kernel (for
// comparisons and tests); unset or auto, the launcher decides. Names in kDecodeKernel* order.
int decode_kernel_choice() {
  static_assert(kda::kDecodeKernelAuto == 0 && kda::kDecodeKernelRows == 1 && kda::kDecodeKernelHeads == 2);
  constexpr const char* kNames[] = {"auto", "rows", "heads"};
  return env_choice("KDA_SERVING_DECODE_GRID", kNames);
}

// Checks and fills everything of a decode call but q, k, v: g [B, T, H, 128], beta [B, T, H],
// gate params, state pool, slots, num_accepted, out [B, T, H, 128], scale and gate bound.
void fill_decode_common(kda::KdaDecodeParams& p, const Tensor& g, const Tensor& beta,
                        const Tensor& A_log, const Tensor& dt_bias, Tensor& state_pool,
                        const Tensor& slots, const std::optional<Tensor>& num_accepted,
                        std::optional<double> lower_bound, double scale, Tensor& out) {
  KDA_CHECK(g.dim() == 4 && g.size(3) == kDim, "g must be [B, T, H, 128], got ", shape(g));
  const int64_t B = g.size(0), T = g.size(1), H = g.size(2);
  const Named tensors[] = {{&g, "g"}, {&out, "out"}};
  for (const auto& [t, name] : tensors) {
    KDA_CHECK(t->dim() == 4 && t->size(0) == B && t->size(1) == T && t->size(2) == H &&
              t->size(3) == kDim, name, " must be [", B, ", ", T, ", ", H, ", 128], got ", shape(*t));
    check_cuda(*t, name, g);
    check_dtype(*t, name, at::kBFloat16);
    check_last_contig(*t, name);
  }
  KDA_CHECK(beta.dim() == 3 && beta.size(0) == B && beta.size(1) == T && beta.size(2) == H,
            "beta must be [B, T, H]");
  check_cuda(beta, "beta", g);
  check_dtype(beta, "beta", at::kBFloat16);
  check_gate_params(A_log, dt_bias, H, g);
  check_state(state_pool, "state_pool", H, g);
  check_cuda(slots, "slots", g);
  check_dtype(slots, "slots", at::kInt);
  KDA_CHECK(slots.size(0) == B && slots.stride(-1) == 1 && (slots.dim() == 1 || slots.dim() == 2),
            "slots must be [B] or [B, C] with a contiguous last dim");
  const bool verify = slots.dim() == 2;
  if (verify) KDA_CHECK(slots.size(1) >= T, "slots [B, C] needs C >= T");

  p.g = g.data_ptr(); p.beta = beta.data_ptr();
  p.g_sb = g.stride(0); p.g_st = g.stride(1); p.g_sh = g.stride(2);
  p.beta_sb = beta.stride(0); p.beta_st = beta.stride(1); p.beta_sh = beta.stride(2);
  p.A_log = A_log.data_ptr<float>();
  p.dt_bias = dt_bias.data_ptr<float>();
  p.state = state_pool.data_ptr();
  p.state_ss = state_pool.stride(0);
  p.state_bf16 = state_pool.scalar_type() == at::kBFloat16;
  p.slots = slots.data_ptr<int32_t>();
  p.slots_sb = slots.stride(0);
  p.slot_cols = verify ? (int)slots.size(1) : 1;
  p.verify = verify;
  if (verify && num_accepted.has_value()) {
    check_cuda(*num_accepted, "num_accepted", g);
    check_dtype(*num_accepted, "num_accepted", at::kInt);
    KDA_CHECK(num_accepted->numel() == B && num_accepted->is_contiguous(), "num_accepted must be contiguous [B]");
    p.num_accepted = num_accepted->data_ptr<int32_t>();
  }
  p.o = out.data_ptr(); p.o_sb = out.stride(0); p.o_st = out.stride(1); p.o_sh = out.stride(2);
  p.B = (int)B; p.T = (int)T; p.H = (int)H;
  p.scale = (float)scale;
  p.has_lower_bound = lower_bound.has_value();
  p.lower_bound = lower_bound.has_value() ? (float)*lower_bound : 0.f;
  p.kernel = decode_kernel_choice();
}

void kda_decode(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                const Tensor& beta, const Tensor& A_log, const Tensor& dt_bias, Tensor& state_pool,
                const Tensor& slots, const std::optional<Tensor>& num_accepted,
                std::optional<double> lower_bound, double scale, Tensor& out) {
  kda::KdaDecodeParams p{};
  fill_decode_common(p, g, beta, A_log, dt_bias, state_pool, slots, num_accepted, lower_bound,
                     scale, out);
  const Named tensors[] = {{&q, "q"}, {&k, "k"}, {&v, "v"}};
  for (const auto& [t, name] : tensors) {
    KDA_CHECK(t->sizes() == g.sizes(), name, " must be [", p.B, ", ", p.T, ", ", p.H,
              ", 128], got ", shape(*t));
    check_cuda(*t, name, g);
    check_dtype(*t, name, at::kBFloat16);
    check_last_contig(*t, name);
  }
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr();
  p.q_sb = q.stride(0); p.q_st = q.stride(1); p.q_sh = q.stride(2);
  p.k_sb = k.stride(0); p.k_st = k.stride(1); p.k_sh = k.stride(2);
  p.v_sb = v.stride(0); p.v_st = v.stride(1); p.v_sh = v.stride(2);
  const c10::cuda::CUDAGuard guard(g.device());
  p.num_sms = num_sms();
  const cudaError_t err = kda::kda_decode_launch(p, at::cuda::getCurrentCUDAStream());
  KDA_CHECK(err == cudaSuccess, "kda_decode launch failed: ", cudaGetErrorString(err));
}

// Weight, bias and pool of a conv call on x with D channels.
void fill_conv_layer(kda::Conv1dParams& p, const Tensor& x, const Tensor& weight,
                     const std::optional<Tensor>& bias, Tensor& conv_pool, int64_t D, bool silu) {
  check_cuda(weight, "weight", x);
  KDA_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
            "weight must be float32 or bfloat16");
  KDA_CHECK(weight.dim() == 2 && weight.size(0) == D && weight.size(1) >= 1 && weight.size(1) <= 4 &&
            weight.is_contiguous(), "weight must be contiguous [D, W] with W <= 4, got ", shape(weight));
  if (bias.has_value()) {
    check_cuda(*bias, "bias", x);
    KDA_CHECK(bias->scalar_type() == weight.scalar_type() && bias->numel() == D && bias->is_contiguous(),
              "bias must be contiguous [D] with the weight dtype");
  }
  check_cuda(conv_pool, "conv_pool", x);
  KDA_CHECK(conv_pool.scalar_type() == at::kFloat || conv_pool.scalar_type() == at::kBFloat16,
            "conv_pool must be float32 or bfloat16");
  const int64_t W = weight.size(1);
  KDA_CHECK(conv_pool.dim() == 3 && conv_pool.size(2) == D && conv_pool.size(1) >= W - 1,
            "conv_pool must be [S, R >= W-1, D], got ", shape(conv_pool));
  p.weight = weight.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.weight_bf16 = weight.scalar_type() == at::kBFloat16;
  p.pool = conv_pool.data_ptr();
  p.pool_ss = conv_pool.stride(0); p.pool_sr = conv_pool.stride(1); p.pool_sd = conv_pool.stride(2);
  p.pool_bf16 = conv_pool.scalar_type() == at::kBFloat16;
  p.D = (int)D; p.W = (int)W; p.R = (int)conv_pool.size(1);
  p.silu = silu;
}

void fill_conv_common(kda::Conv1dParams& p, const Tensor& x, const Tensor& weight,
                      const std::optional<Tensor>& bias, Tensor& conv_pool, const Tensor& slots,
                      int64_t D, bool silu) {
  fill_conv_layer(p, x, weight, bias, conv_pool, D, silu);
  check_cuda(slots, "slots", x);
  check_dtype(slots, "slots", at::kInt);
  KDA_CHECK(slots.dim() == 1 && slots.is_contiguous(), "slots must be contiguous 1-D");
  p.slots = slots.data_ptr<int32_t>();
}

void causal_conv1d_prefill(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                           const Tensor& cu_seqlens, Tensor& conv_pool, const Tensor& slots,
                           const Tensor& has_initial_state, bool silu, Tensor& out) {
  KDA_CHECK(x.is_cuda() && x.dim() == 2, "x must be a CUDA [Ttot, D] tensor");
  check_dtype(x, "x", at::kBFloat16);
  check_last_contig(x, "x");
  KDA_CHECK(out.sizes() == x.sizes(), "out must match x");
  check_cuda(out, "out", x);
  check_dtype(out, "out", at::kBFloat16);
  check_last_contig(out, "out");
  kda::Conv1dParams p{};
  fill_conv_common(p, x, weight, bias, conv_pool, slots, x.size(1), silu);
  check_cuda(cu_seqlens, "cu_seqlens", x);
  p.cu_seqlens_64 = check_index_tensor(cu_seqlens, "cu_seqlens");
  const int64_t N = cu_seqlens.numel() - 1;
  KDA_CHECK(N >= 0 && slots.numel() == N, "slots must be [N] for cu_seqlens [N+1]");
  check_cuda(has_initial_state, "has_initial_state", x);
  check_dtype(has_initial_state, "has_initial_state", at::kBool);
  KDA_CHECK(has_initial_state.numel() == N && has_initial_state.is_contiguous(),
            "has_initial_state must be contiguous [N]");
  p.x = x.data_ptr(); p.x_st = x.stride(0);
  p.y = out.data_ptr(); p.y_st = out.stride(0);
  p.cu_seqlens = cu_seqlens.data_ptr();
  p.has_initial_state = has_initial_state.data_ptr<bool>();
  p.total_tokens = x.size(0);
  p.N = (int)N;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err = kda::conv1d_prefill_launch(p, at::cuda::getCurrentCUDAStream());
  KDA_CHECK(err == cudaSuccess, "causal_conv1d_prefill launch failed: ", cudaGetErrorString(err));
}

void causal_conv1d_update(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                          Tensor& conv_pool, const Tensor& slots,
                          const std::optional<Tensor>& num_accepted, bool silu, Tensor& out) {
  KDA_CHECK(x.is_cuda() && x.dim() == 3, "x must be a CUDA [B, T, D] tensor");
  check_dtype(x, "x", at::kBFloat16);
  check_last_contig(x, "x");
  KDA_CHECK(out.sizes() == x.sizes(), "out must match x");
  check_cuda(out, "out", x);
  check_dtype(out, "out", at::kBFloat16);
  check_last_contig(out, "out");
  kda::Conv1dParams p{};
  fill_conv_common(p, x, weight, bias, conv_pool, slots, x.size(2), silu);
  KDA_CHECK(slots.numel() == x.size(0), "slots must be [B]");
  if (num_accepted.has_value()) {
    check_cuda(*num_accepted, "num_accepted", x);
    check_dtype(*num_accepted, "num_accepted", at::kInt);
    KDA_CHECK(num_accepted->numel() == x.size(0) && num_accepted->is_contiguous(),
              "num_accepted must be contiguous [B]");
    p.num_accepted = num_accepted->data_ptr<int32_t>();
  }
  p.x = x.data_ptr(); p.x_sb = x.stride(0); p.x_st = x.stride(1);
  p.y = out.data_ptr(); p.y_sb = out.stride(0); p.y_st = out.stride(1);
  p.N = (int)x.size(0); p.T = (int)x.size(1);
  p.vec8_min_elems = kda::kConvVec8MinElems;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err = kda::conv1d_update_launch(p, at::cuda::getCurrentCUDAStream());
  KDA_CHECK(err == cudaSuccess, "causal_conv1d_update launch failed: ", cudaGetErrorString(err));
}

// KDA_SERVING_FUSED_DECODE_PATH=rows keeps the fused decode on its three-kernel path, =single takes
// the opt-in single-kernel path for T <= 8 (for comparisons and tests); unset or auto, the default.
// Names in kFusedPath* order.
int fused_path_choice() {
  static_assert(kda::kFusedPathAuto == 0 && kda::kFusedPathRows == 1 && kda::kFusedPathSingle == 2);
  constexpr const char* kNames[] = {"auto", "rows", "single"};
  return env_choice("KDA_SERVING_FUSED_DECODE_PATH", kNames);
}

void kda_decode_fused(const Tensor& mixed_qkv, const Tensor& g, const Tensor& beta,
                      const Tensor& A_log, const Tensor& dt_bias, const Tensor& conv_weight,
                      const std::optional<Tensor>& conv_bias, Tensor& conv_pool, Tensor& state_pool,
                      const Tensor& slots, const std::optional<Tensor>& num_accepted,
                      std::optional<double> lower_bound, double scale,
                      const std::optional<Tensor>& out_gate, const std::optional<Tensor>& norm_weight,
                      double norm_eps, Tensor& out, const std::optional<Tensor>& conv_out) {
  kda::KdaDecodeFusedParams p{};
  fill_decode_common(p.dec, g, beta, A_log, dt_bias, state_pool, slots, num_accepted, lower_bound,
                     scale, out);
  const int64_t B = p.dec.B, T = p.dec.T, D = 3 * p.dec.H * kDim;
  KDA_CHECK(mixed_qkv.dim() == 3 && mixed_qkv.size(0) == B && mixed_qkv.size(1) == T &&
            mixed_qkv.size(2) == D, "mixed_qkv must be [", B, ", ", T, ", ", D, "], got ",
            shape(mixed_qkv));
  check_cuda(mixed_qkv, "mixed_qkv", g);
  check_dtype(mixed_qkv, "mixed_qkv", at::kBFloat16);
  check_last_contig(mixed_qkv, "mixed_qkv");
  fill_conv_layer(p.conv, mixed_qkv, conv_weight, conv_bias, conv_pool, D, /*silu=*/true);
  p.conv.x = mixed_qkv.data_ptr(); p.conv.x_sb = mixed_qkv.stride(0); p.conv.x_st = mixed_qkv.stride(1);
  p.conv.num_accepted = p.dec.num_accepted;
  p.conv.N = (int)B; p.conv.T = (int)T;
  p.dec.conv_W = p.conv.W; p.dec.conv_R = p.conv.R;
  p.path = fused_path_choice();
  // The pair path's conv outputs [B, T, D]: the caller's buffer, else one from torch's caching
  // allocator (stream-ordered; inside a CUDA graph capture, from the graph's pool).
  Tensor conv_buf;
  if (conv_out.has_value()) {
    check_cuda(*conv_out, "conv_out", g);
    check_dtype(*conv_out, "conv_out", at::kBFloat16);
    KDA_CHECK(conv_out->is_contiguous() && conv_out->numel() >= B * T * D, "conv_out must be contiguous with at least ",
              B * T * D, " elements, got ", shape(*conv_out));
  }
  if (kda::fused_uses_pair(p.path, (int)T)) {
    conv_buf = conv_out.has_value() ? *conv_out : mixed_qkv.new_empty({B, T, D});
    p.conv.y = conv_buf.data_ptr(); p.conv.y_sb = T * D; p.conv.y_st = D;
  }
  KDA_CHECK(out_gate.has_value() == norm_weight.has_value(),
            "out_gate and norm_weight must be given together");
  if (out_gate.has_value()) {
    KDA_CHECK(out_gate->sizes() == out.sizes(), "out_gate must be [", B, ", ", T, ", ", p.dec.H,
              ", 128], got ", shape(*out_gate));
    check_cuda(*out_gate, "out_gate", g);
    check_dtype(*out_gate, "out_gate", at::kBFloat16);
    check_last_contig(*out_gate, "out_gate");
    check_cuda(*norm_weight, "norm_weight", g);
    KDA_CHECK(norm_weight->scalar_type() == at::kFloat || norm_weight->scalar_type() == at::kBFloat16,
              "norm_weight must be float32 or bfloat16, got ", dtype_name(norm_weight->scalar_type()));
    KDA_CHECK(norm_weight->numel() == kDim && norm_weight->is_contiguous(),
              "norm_weight must be contiguous [128]");
    KDA_CHECK(norm_eps > 0.0, "norm_eps must be positive");
    kda::DecodeNormArgs& nm = p.dec.norm;
    nm.gate = out_gate->data_ptr();
    nm.gate_sb = out_gate->stride(0); nm.gate_st = out_gate->stride(1); nm.gate_sh = out_gate->stride(2);
    nm.weight = norm_weight->data_ptr();
    nm.weight_bf16 = norm_weight->scalar_type() == at::kBFloat16;
    nm.eps = (float)norm_eps;
  }
  const c10::cuda::CUDAGuard guard(g.device());
  p.dec.num_sms = num_sms();
  const cudaError_t err = kda::kda_decode_fused_launch(p, at::cuda::getCurrentCUDAStream());
  KDA_CHECK(err == cudaSuccess, "kda_decode_fused launch failed: ", cudaGetErrorString(err));
}

void gated_rms_norm(const Tensor& x, const Tensor& gate, const Tensor& weight, double eps, Tensor& out) {
  KDA_CHECK(x.is_cuda() && x.dim() == 3 && x.size(2) == kDim, "x must be a CUDA [M, H, 128] tensor, got ",
            shape(x));
  const Named rows[] = {{&x, "x"}, {&gate, "gate"}, {&out, "out"}};
  for (const auto& [t, name] : rows) {
    check_cuda(*t, name, x);
    check_dtype(*t, name, at::kBFloat16);
    check_last_contig(*t, name);
    KDA_CHECK(t->sizes() == x.sizes(), name, " must be ", shape(x), ", got ", shape(*t));
  }
  check_cuda(weight, "weight", x);
  KDA_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
            "weight must be float32 or bfloat16, got ", dtype_name(weight.scalar_type()));
  KDA_CHECK(weight.numel() == kDim && weight.is_contiguous(), "weight must be contiguous [128]");
  KDA_CHECK(eps > 0.0, "eps must be positive");
  kda::GatedRmsNormParams p{};
  p.x = x.data_ptr(); p.gate = gate.data_ptr(); p.out = out.data_ptr();
  p.x_s0 = x.stride(0); p.x_s1 = x.stride(1);
  p.g_s0 = gate.stride(0); p.g_s1 = gate.stride(1);
  p.o_s0 = out.stride(0); p.o_s1 = out.stride(1);
  p.M = x.size(0); p.H = (int)x.size(1);
  p.weight = weight.data_ptr(); p.weight_bf16 = weight.scalar_type() == at::kBFloat16;
  p.eps = (float)eps;
  // four bf16 per lane in one 8-byte access when every row start is 8-byte aligned
  p.vec = true;
  for (const auto& [t, name] : rows)
    p.vec = p.vec && reinterpret_cast<uintptr_t>(t->data_ptr()) % 8 == 0 && t->stride(0) % 4 == 0 &&
            t->stride(1) % 4 == 0;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err = kda::gated_rms_norm_launch(p, at::cuda::getCurrentCUDAStream());
  KDA_CHECK(err == cudaSuccess, "gated_rms_norm launch failed: ", cudaGetErrorString(err));
}

// The opt-in build defines this extension was compiled with (common/build_options.h).
int64_t build_options() { return kda::kBuildOptions; }

// Meta kernels: the ops only mutate their arguments, so tracing needs nothing more.
void kda_prefill_meta(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                      const Tensor&, const Tensor&, const Tensor&, Tensor&, const Tensor&,
                      const Tensor&, std::optional<double>, double, const std::optional<Tensor>&,
                      const std::optional<Tensor>&, Tensor&) {}
void kda_prefill_tc_meta(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                         const Tensor&, const Tensor&, const Tensor&, Tensor&, const Tensor&,
                         const Tensor&, std::optional<double>, double, const std::optional<Tensor>&,
                         const std::optional<Tensor>&, Tensor&, Tensor&) {}
void kda_prefill_tc_split_meta(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                               const Tensor&, const Tensor&, const Tensor&, Tensor&, const Tensor&,
                               const Tensor&, std::optional<double>, double, Tensor&, Tensor&, const Tensor&,
                               int64_t, int64_t, int64_t, Tensor&) {}
void kda_decode_meta(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                     const Tensor&, const Tensor&, Tensor&, const Tensor&,
                     const std::optional<Tensor>&, std::optional<double>, double, Tensor&) {}
void kda_decode_fused_meta(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                           const Tensor&, const Tensor&, const std::optional<Tensor>&, Tensor&,
                           Tensor&, const Tensor&, const std::optional<Tensor>&,
                           std::optional<double>, double, const std::optional<Tensor>&,
                           const std::optional<Tensor>&, double, Tensor&, const std::optional<Tensor>&) {}
void conv_prefill_meta(const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
                       Tensor&, const Tensor&, const Tensor&, bool, Tensor&) {}
void gated_rms_norm_meta(const Tensor&, const Tensor&, const Tensor&, double, Tensor&) {}
void conv_update_meta(const Tensor&, const Tensor&, const std::optional<Tensor>&, Tensor&,
                      const Tensor&, const std::optional<Tensor>&, bool, Tensor&) {}

}  // namespace

TORCH_LIBRARY(kda_serving, m) {
  m.def(
      "kda_prefill(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor A_log, "
      "Tensor dt_bias, Tensor cu_seqlens, Tensor(a!) state_pool, Tensor slots, "
      "Tensor has_initial_state, float? lower_bound, float scale, Tensor(b!)? inter, "
      "Tensor? inter_offsets, Tensor(c!) out) -> ()");
  m.def(
      "kda_prefill_chunked(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor A_log, "
      "Tensor dt_bias, Tensor cu_seqlens, Tensor(a!) state_pool, Tensor slots, "
      "Tensor has_initial_state, float? lower_bound, float scale, Tensor(b!)? inter, "
      "Tensor? inter_offsets, Tensor(c!) out) -> ()");
  m.def(
      "kda_prefill_tc(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor A_log, "
      "Tensor dt_bias, Tensor cu_seqlens, Tensor(a!) state_pool, Tensor slots, "
      "Tensor has_initial_state, float? lower_bound, float scale, Tensor(b!)? inter, "
      "Tensor? inter_offsets, Tensor(c!) out, Tensor(d!) workspace) -> ()");
  m.def(
      "kda_prefill_tc_split(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor A_log, "
      "Tensor dt_bias, Tensor cu_seqlens, Tensor(a!) state_pool, Tensor slots, "
      "Tensor has_initial_state, float? lower_bound, float scale, Tensor(b!) out, "
      "Tensor(c!) workspace, Tensor units, int units_a, int units_b, int units_c, "
      "Tensor(d!) split_state) -> ()");
  m.def(
      "kda_decode(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor A_log, "
      "Tensor dt_bias, Tensor(a!) state_pool, Tensor slots, Tensor? num_accepted, "
      "float? lower_bound, float scale, Tensor(b!) out) -> ()");
  m.def(
      "causal_conv1d_prefill(Tensor x, Tensor weight, Tensor? bias, Tensor cu_seqlens, "
      "Tensor(a!) conv_pool, Tensor slots, Tensor has_initial_state, bool silu, "
      "Tensor(b!) out) -> ()");
  m.def(
      "causal_conv1d_update(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) conv_pool, "
      "Tensor slots, Tensor? num_accepted, bool silu, Tensor(b!) out) -> ()");
  m.def(
      "kda_decode_fused(Tensor mixed_qkv, Tensor g, Tensor beta, Tensor A_log, Tensor dt_bias, "
      "Tensor conv_weight, Tensor? conv_bias, Tensor(a!) conv_pool, Tensor(b!) state_pool, "
      "Tensor slots, Tensor? num_accepted, float? lower_bound, float scale, Tensor? out_gate, "
      "Tensor? norm_weight, float norm_eps, Tensor(c!) out, Tensor(d!)? conv_out=None) -> ()");
  m.def("gated_rms_norm(Tensor x, Tensor gate, Tensor weight, float eps, Tensor(a!) out) -> ()");
  m.def("build_options() -> int", &build_options);
}

TORCH_LIBRARY_IMPL(kda_serving, CUDA, m) {
  m.impl("kda_prefill", &prefill_op<&kda::kda_prefill_launch, kPrefillName>);
  m.impl("kda_prefill_chunked", &prefill_op<&kda::launch_kda_prefill_chunked, kPrefillChunkedName>);
  m.impl("kda_prefill_tc", &prefill_tc_op);
  m.impl("kda_prefill_tc_split", &prefill_tc_split_op);
  m.impl("kda_decode", &kda_decode);
  m.impl("causal_conv1d_prefill", &causal_conv1d_prefill);
  m.impl("causal_conv1d_update", &causal_conv1d_update);
  m.impl("kda_decode_fused", &kda_decode_fused);
  m.impl("gated_rms_norm", &gated_rms_norm);
}

TORCH_LIBRARY_IMPL(kda_serving, Meta, m) {
  m.impl("kda_prefill", &kda_prefill_meta);
  m.impl("kda_prefill_chunked", &kda_prefill_meta);
  m.impl("kda_prefill_tc", &kda_prefill_tc_meta);
  m.impl("kda_prefill_tc_split", &kda_prefill_tc_split_meta);
  m.impl("kda_decode", &kda_decode_meta);
  m.impl("causal_conv1d_prefill", &conv_prefill_meta);
  m.impl("causal_conv1d_update", &conv_update_meta);
  m.impl("kda_decode_fused", &kda_decode_fused_meta);
  m.impl("gated_rms_norm", &gated_rms_norm_meta);
}

// Importing kda_serving._C loads this library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, 0, nullptr};
  return PyModule_Create(&def);
}
