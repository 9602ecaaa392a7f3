"""Prefill: ``kda_serving.ops.kda_prefill`` against fla ``chunk_kda``, on the state pool.

Timed region, per call (CUDA events, median): ours is one ``ops.kda_prefill`` call on bf16
q, k, v, g [T, H, 128], beta [T, H] and an fp32 pool [S, H, V, K] updated in place at ``slots``
(has_initial_state True), with the host cu_seqlens so long sequences may be split into segments
(the tensor-core kernel inside the kernel, ``kda_serving/ops/tc_split.py``; the others
``kda_serving/ops/split_plan.py``; the chosen segment length and the split scratch in bytes per
token are recorded). With --long, ``ours_unsplit`` times the same call with splitting disabled
(KDA_SERVING_PREFILL_SPLIT=0). fla is ``kda_serving.baselines.fla_ops.kda_prefill``: gather the
initial states from the pool, ``chunk_kda`` (V-first fp32 states, gate / L2 norm / beta sigmoid in
the kernel; the bounded gate with safe_gate=True, lower_bound=-5), scatter the final states back.
Both allocate their output inside the timed call. "ours" runs the kernel KDA_SERVING_PREFILL_KERNEL
selects (default: the TF32 tensor-core kernel; each kernel's planner splits, or
KDA_SERVING_PREFILL_SPLIT forces a length). With --kernels (CUDA path only) the
named kernels (``serial``: token-serial, ``chunked``: CUDA cores, ``tc``: tensor cores;
docs/kernels.md) are also timed on the same call, unsplit, as ``ours_<name>``, and cross-checked
against ``ours``. With --segments the selected kernel is also timed split at each forced segment
length S (``ours_split<S>``, KDA_SERVING_PREFILL_SPLIT=S for that call), the data a split planner
for it is fitted to.

HBM floor: q, k, v, g, beta read once, o written once, the states read and written once, at the
copy bandwidth measured in the same run. Extra memory: peak device memory allocated during one
call, output included, per token.
"""

from __future__ import annotations

import sys

import bench_common as bc
import torch

from kda_serving import ops
from kda_serving.baselines import fla_ops
from kda_serving.ops import split_plan
from kda_serving.ops.dispatch import PREFILL_KERNELS, prefill_kernel_name
from kda_serving.ops.split_prefill import describe_split

D = 128
GATES = {"kimi": None, "bounded": -5.0}
K32, K128 = 32 * 1024, 128 * 1024
CASES = [(96, [8192]), (96, [1024] * 8), (32, [32768]), (32, [4096] * 8), (8, [131072])]
LONG_CASES = [(H, [T]) for H in (4, 8, 16, 32) for T in (K32, K128, 512 * 1024, 1024 * 1024)] + \
             [(H, [K128] + [1024] * 63) for H in (4, 8, 16, 32)]
SMOKE_CASES = [(2, [64]), (2, [40, 0, 24])]
KERNELS = ("serial", "chunked", "tc")  # --kernels: timed beside "ours" on the CUDA path
POOL_ORDER = ("cu_seqlens", "state_pool", "slots", "has_initial_state")
SMOKE_D = 32


def describe(seqlens: list[int]) -> str:
    """[8192] -> '1x8192'; [131072] + [1024]*63 -> '1x131072+63x1024'."""
    parts, i = [], 0
    while i < len(seqlens):
        j = i
        while j < len(seqlens) and seqlens[j] == seqlens[i]:
            j += 1
        parts.append(f"{j - i}x{seqlens[i]}")
        i = j
    return "+".join(parts)


def make_inputs(H, d, seqlens, device):
    T, N = sum(seqlens), len(seqlens)
    bf = dict(dtype=torch.bfloat16, device=device)
    x = dict(q=torch.randn(T, H, d, **bf), k=torch.randn(T, H, d, **bf), v=torch.randn(T, H, d, **bf),
             g=torch.randn(T, H, d, **bf), beta=torch.randn(T, H, **bf),
             A_log=torch.rand(H, device=device), dt_bias=torch.rand(H * d, device=device))
    cu_cpu = torch.tensor([0] + seqlens, dtype=torch.int64).cumsum(0)
    pool = 0.1 * torch.randn(N + 1, H, d, d, device=device)  # row 0: the null slot
    return x, dict(cu_seqlens=cu_cpu.to(device), state_pool=pool,
                   slots=torch.arange(1, N + 1, dtype=torch.int32, device=device),
                   has_initial_state=torch.ones(N, dtype=torch.bool, device=device)), cu_cpu


def io_bytes(x: dict, pool: torch.Tensor, N: int) -> int:
    """Essential HBM traffic: inputs once, output (bf16, v's shape) once, N states read + written."""
    inputs = sum(x[n].numel() * x[n].element_size() for n in ("q", "k", "v", "g", "beta"))
    state = pool[0].numel() * pool.element_size()
    return inputs + x["v"].numel() * x["v"].element_size() + 2 * N * state


def run_case(H, d, seqlens, gate, device, bandwidth, fla_reason, iters, warmup, unsplit=False, kernels=(),
             segments=()):
    T, N = sum(seqlens), len(seqlens)
    lb = GATES[gate]
    row = dict(case=f"H{H} {describe(seqlens)} {gate}", gate=gate, lower_bound=lb, prefill_kernel=prefill_kernel_name(),
               shape=dict(H=H, K=d, V=d, tokens=T, num_seqs=N, seqlens=describe(seqlens),
                          dtype="bfloat16", pool_dtype="float32"),
               ours_ms=None, fla_ms=None, ours_extra_bytes_per_token=None, fla_extra_bytes_per_token=None)
    if unsplit:
        row.update(ours_unsplit_ms=None, ours_unsplit_extra_bytes_per_token=None)
    cu_cpu = torch.tensor([0] + seqlens, dtype=torch.int64).cumsum(0)
    kernel_path = ops.op_path(torch.empty(0, device=device)) == "cuda"
    split = describe_split(cu_cpu, H, d, device, kernel_path)
    row.update(split_segment=split["segment"], split_workspace_bytes_per_token=split["workspace_bytes_per_token"],
               split_workspace_bytes_per_token_head=split["workspace_bytes_per_token_head"])
    # q, k, v, g in, the outputs alive during the cross-check, slack; the split scratch
    need = (7 + unsplit) * T * H * d * 2 + split["workspace_bytes"]
    if need > bc.free_bytes(device):
        row["skipped"] = f"needs about {need / 2**30:.1f} GiB, {bc.free_bytes(device) / 2**30:.1f} GiB free"
        return row
    x, pool_args, cu_cpu = make_inputs(H, d, seqlens, device)
    args = [x[n] for n in ("q", "k", "v", "g", "beta", "A_log", "dt_bias")]
    pool, slots = pool_args["state_pool"], pool_args["slots"].long()
    impls = {"ours": lambda: ops.kda_prefill(*args, **pool_args, lower_bound=lb, cu_seqlens_cpu=cu_cpu)}
    if unsplit:  # split forbidden: a call over the workspace limit reads its lengths to window them
        impls["ours_unsplit"] = bc.with_env(impls["ours"], **{split_plan.ENV: "0"})
    for seg in segments:
        if seg < max(seqlens, default=0):
            impls[f"ours_split{seg}"] = bc.with_env(impls["ours"], **{split_plan.ENV: str(seg)})
    if fla_reason is None:
        impls["fla"] = lambda: fla_ops.kda_prefill(*args, **pool_args, lower_bound=lb, cu_seqlens_cpu=cu_cpu)
        row["fla_backend"] = fla_ops.chunk_backend(lb)
    if kernels and kernel_path and d == D:  # last: a fault there leaves the other numbers taken
        from kda_serving.ops import _ext
        for name in kernels:
            impls[f"ours_{name}"] = (lambda fn: lambda: fn(*args, *(pool_args[k] for k in POOL_ORDER),
                                                           lower_bound=lb))(getattr(_ext, PREFILL_KERNELS[name]))
    if kernel_path and d == D:
        from kda_serving.ops import _ext
        # the tensor-core kernel's workspace is cached across calls, so its peak misses it
        row["tc_workspace_bytes_per_token"] = _ext.tc_workspace_floats(T, N, H) * 4 / T
    row["floor_ms"] = bc.floor_ms(io_bytes(x, pool, N), bandwidth)

    # cross-check from the same starting pool, then time (timing keeps updating the pool)
    pool0, results = pool.clone(), {}
    for name, fn in impls.items():
        pool.copy_(pool0)
        try:
            results[name] = (fn(), pool[slots].clone())
        except (torch.cuda.OutOfMemoryError, RuntimeError, ValueError) as e:
            row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    if "ours" in results and "fla" in results:
        row["fla_vs_ours_out_rel_rms"] = bc.rel_rms(results["fla"][0], results["ours"][0])
        row["fla_vs_ours_state_rel_rms"] = bc.rel_rms(results["fla"][1], results["ours"][1])
    for name in KERNELS:
        if "ours" in results and f"ours_{name}" in results:
            row[f"{name}_vs_ours_out_rel_rms"] = bc.rel_rms(results[f"ours_{name}"][0], results["ours"][0])
            row[f"{name}_vs_ours_state_rel_rms"] = bc.rel_rms(results[f"ours_{name}"][1], results["ours"][1])
    for seg in segments:
        if "ours" in results and f"ours_split{seg}" in results:
            row[f"split{seg}_vs_ours_out_rel_rms"] = bc.rel_rms(results[f"ours_split{seg}"][0], results["ours"][0])
    if "ours" in results and "ours_unsplit" in results:
        row["unsplit_vs_ours_out_rel_rms"] = bc.rel_rms(results["ours_unsplit"][0], results["ours"][0])
        row["unsplit_vs_ours_state_rel_rms"] = bc.rel_rms(results["ours_unsplit"][1], results["ours"][1])
    del results, pool0
    for name, fn in impls.items():
        if f"{name}_error" in row:
            continue
        try:
            row[f"{name}_ms"] = bc.time_ms(fn, device, iters=iters, warmup=warmup)
            extra = bc.peak_extra_bytes(fn, device)
            row[f"{name}_extra_bytes_per_token"] = extra / T if extra is not None else None
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    row["speedup_vs_fla"] = bc.ratio(row.get("fla_ms"), row.get("ours_ms"))
    for name in kernels:
        row[f"{name}_speedup_vs_fla"] = bc.ratio(row.get("fla_ms"), row.get(f"ours_{name}_ms"))
    if unsplit:
        row["split_speedup"] = bc.ratio(row.get("ours_unsplit_ms"), row.get("ours_ms"))
    row["hbm_floor_fraction"] = bc.ratio(row["floor_ms"], row.get("ours_ms"))
    row["fla_hbm_floor_fraction"] = bc.ratio(row["floor_ms"], row.get("fla_ms"))
    return row


COLUMNS = [("case", "case"), ("ours_ms", "ours ms"), ("ours_unsplit_ms", "unsplit ms"), ("split_segment", "segment"),
           ("fla_ms", "fla ms"), ("speedup_vs_fla", "speedup"), ("ours_serial_ms", "serial ms"),
           ("serial_speedup_vs_fla", "serial speedup"), ("serial_vs_ours_out_rel_rms", "serial o rel rms"),
           ("ours_chunked_ms", "chunked ms"), ("ours_tc_ms", "tc ms"), ("tc_speedup_vs_fla", "tc speedup"),
           ("tc_workspace_bytes_per_token", "tc ws B/tok"),
           ("floor_ms", "floor ms"), ("hbm_floor_fraction", "floor frac"),
           ("fla_hbm_floor_fraction", "fla floor frac"), ("ours_extra_bytes_per_token", "extra B/tok"),
           ("fla_extra_bytes_per_token", "fla extra B/tok"), ("split_workspace_bytes_per_token", "split B/tok"),
           ("fla_vs_ours_out_rel_rms", "o rel rms")]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = bc.base_parser(__doc__.splitlines()[0])
    p.add_argument("--long", action="store_true",
                   help="long single sequences: H in {4,8,16,32} x {32K,128K,512K,1M}, and 1x128K+63x1K")
    p.add_argument("--gates", nargs="+", choices=list(GATES), default=list(GATES))
    p.add_argument("--kernels", nargs="+", choices=KERNELS, default=[],
                   help="also time these prefill kernels, unsplit (serial: token-serial, chunked: CUDA cores, "
                        "tc: tensor cores)")
    p.add_argument("--segments", type=int, nargs="+", default=[],
                   help="also time the selected kernel split at these forced segment lengths (multiples of 64)")
    p.add_argument("--iters", type=int, default=50, help="timing samples per shape (at most)")
    p.add_argument("--heads", type=int, nargs="+", default=None, help="only the cases with these head counts")
    p.add_argument("--max-tokens", type=int, default=None, help="only the cases of at most this many tokens")
    args = p.parse_args(argv)
    if any(seg <= 0 or seg % split_plan.ALIGN for seg in args.segments):
        p.error(f"--segments: positive multiples of {split_plan.ALIGN}, got {args.segments}")
    device = bc.pick_device(args.device)
    torch.manual_seed(0)
    d, iters, warmup = (SMOKE_D, 2, 1) if args.smoke else (D, args.iters, 3)
    cases = SMOKE_CASES if args.smoke else (LONG_CASES if args.long else CASES)
    cases = [(H, lens) for H, lens in cases if (args.heads is None or H in args.heads)
             and (args.max_tokens is None or sum(lens) <= args.max_tokens)]
    bandwidth, fla_reason = bc.bandwidth_and_fla(device)
    rows = []
    meta = bc.run_metadata("bench_prefill", device, argv, bandwidth)
    mode = "smoke" if args.smoke else ("long" if args.long else "default")
    if args.kernels:
        mode += "-" + "-".join(args.kernels)
    with torch.inference_mode():
        for H, seqlens in cases:
            for gate in args.gates:
                rows.append(bc.run_case_timed(run_case, H, d, seqlens, gate, device, bandwidth, fla_reason,
                                              iters, warmup, unsplit=args.long, kernels=tuple(args.kernels),
                                              segments=tuple(args.segments)))
                # after every case, so a run stopped by a time limit keeps what it measured
                bc.write_json(args.out, meta, rows, mode=mode, fla_skipped=fla_reason, complete=False)
    print(f"\n{meta['device']}  copy bandwidth {meta['copy_bandwidth_gbps']:.0f} GB/s  commit {meta['commit']}  "
          f"prefill kernel {prefill_kernel_name()}")
    bc.print_table(rows, COLUMNS + [(f"ours_split{seg}_ms", f"split{seg} ms") for seg in args.segments])
    for r in rows:
        for key in ("skipped", "ours_error", "ours_unsplit_error", "fla_error") + tuple(f"ours_{k}_error" for k in KERNELS) \
                + tuple(f"ours_split{seg}_error" for seg in args.segments):
            if key in r:
                print(f"{r['case']}: {key}: {r[key]}")
    path = bc.write_json(args.out, meta, rows, mode=mode, fla_skipped=fla_reason, complete=True)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
