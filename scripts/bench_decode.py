"""Decode: ``ops.causal_conv1d_update`` + ``ops.kda_decode`` against fla, timed under CUDA graph replay.

One decode step of one layer for B sequences, one token each. Timed region, per call:
- "total": the conv on mixed_qkv [B, 3·H·128] (bf16 conv pool [S, 3, 3·H·128], width 4, SiLU),
  then KDA on the column views q, k, v of its output, updating the state pool [S, H, V, K] in
  place at the batch's slots. Ours: ``kda_serving.ops``. fla: ``kda_serving.baselines.fla_ops``,
  i.e. the pool rows gathered into fla's dense conv cache, ``causal_conv1d_update``, scattered
  back, then ``fused_recurrent_kda_fwd`` with ``ssm_state_indices`` in place (q, k, v copied
  contiguous first, as fla's kernel needs).
- "fused" (ours only): ``ops.kda_decode_fused``, the conv update and the KDA step from mixed_qkv
  in one call (what the backend runs for decode), on the same pools and inputs as "total", with
  the extension's choice of kernels; "fused_rows": the same call on its three-kernel path
  (KDA_SERVING_FUSED_DECODE_PATH=rows at capture). "fused_norm": the fused call with the gated
  RMSNorm of the output (out_gate, norm weight), as the backend runs it for Kimi-Linear. The
  "_rowgrid" / "_heads" variants force the row-block / head decode kernel (KDA_SERVING_DECODE_GRID)
  where the plain ones take the launcher's choice; "_single" takes the opt-in single-kernel path
  (KDA_SERVING_FUSED_DECODE_PATH=single).
- "kda": the KDA call alone on contiguous q, k, v, g, beta (same for both).
Each graph replays many calls, cycling over input sets on disjoint slots so the states touched
exceed twice the L2 cache; the number is the median replay time over the calls it holds.

HBM floor: states read and written, conv rows read and written, inputs (mixed_qkv or q, k, v;
g; beta) read once, the bf16 output written once, at the copy bandwidth of the same run.
"""

from __future__ import annotations

import math
import sys

import bench_common as bc
import torch

from kda_serving import ops
from kda_serving.baselines import fla_ops

D, W = 128, 4
GATES = {"kimi": None, "bounded": -5.0}
POOL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def l2_bytes(device) -> int:
    if device.type != "cuda":
        return 0  # no graph, no L2 to defeat: one input set
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)


# Forced variants of the fused call, each timed with and without the norm: the row-block or the
# head decode kernel, the opt-in single-kernel path.
VARIANTS = {"rowgrid": dict(KDA_SERVING_DECODE_GRID="rows"), "heads": dict(KDA_SERVING_DECODE_GRID="heads"),
            "single": dict(KDA_SERVING_FUSED_DECODE_PATH="single")}


class DecodeCase:
    """Pools and ``nsets`` input sets on disjoint slots for one (B, H, pool dtype)."""

    def __init__(self, B, H, d, pool_dtype, nsets, device):
        P = H * d
        bf = dict(dtype=torch.bfloat16, device=device)
        self.B, self.H, self.d = B, H, d
        S = nsets * B + 1  # row 0: the null slot
        self.state_pool = (0.1 * torch.randn(S, H, d, d, device=device)).to(pool_dtype)
        self.conv_pool = torch.randn(S, W - 1, 3 * P, **bf)
        perm = torch.randperm(S - 1) + 1
        self.slots = [perm[i * B:(i + 1) * B].to(device=device, dtype=torch.int32) for i in range(nsets)]
        self.mixed = [torch.randn(B, 3 * P, **bf) for _ in range(nsets)]
        self.qkv = [tuple(m[:, i * P:(i + 1) * P].reshape(B, 1, H, d).contiguous() for i in range(3))
                    for m in self.mixed]
        self.g = [torch.randn(B, 1, H, d, **bf) for _ in range(nsets)]
        self.beta = [torch.randn(B, 1, H, **bf) for _ in range(nsets)]
        self.weight = torch.randn(3 * P, W, **bf) / W
        self.A_log = torch.rand(H, device=device)
        self.dt_bias = torch.rand(H * d, device=device)
        self.out = torch.empty(B, 1, H, d, **bf)
        self.out_gate = torch.randn(B, 1, H, d, **bf)
        self.norm_weight = torch.rand(d, device=device) + 0.5

    def total_fn(self, impl, i, lb):
        """conv update + KDA decode for input set i, with ``impl`` = kda_serving.ops or fla_ops."""
        B, H, d, P = self.B, self.H, self.d, self.H * self.d

        def fn():
            x = impl.causal_conv1d_update(self.mixed[i].view(B, 1, 3 * P), self.weight, None,
                                          conv_pool=self.conv_pool, slots=self.slots[i])
            q, k, v = (x[..., j * P:(j + 1) * P].unflatten(-1, (H, d)) for j in range(3))
            return impl.kda_decode(q, k, v, self.g[i], self.beta[i], self.A_log, self.dt_bias,
                                   state_pool=self.state_pool, slots=self.slots[i], lower_bound=lb,
                                   out=self.out)
        return fn

    def fused_fn(self, i, lb, norm=False):
        B, P = self.B, self.H * self.d
        kw = dict(out_gate=self.out_gate, norm_weight=self.norm_weight) if norm else {}
        return lambda: ops.kda_decode_fused(self.mixed[i].view(B, 1, 3 * P), self.g[i], self.beta[i], self.A_log,
                                            self.dt_bias, conv_weight=self.weight, conv_pool=self.conv_pool,
                                            state_pool=self.state_pool, slots=self.slots[i], lower_bound=lb,
                                            out=self.out, **kw)

    def fused_rows_fn(self, i, lb):
        return bc.with_env(self.fused_fn(i, lb), KDA_SERVING_FUSED_DECODE_PATH="rows")

    def kda_fn(self, impl, i, lb):
        q, k, v = self.qkv[i]
        return lambda: impl.kda_decode(q, k, v, self.g[i], self.beta[i], self.A_log, self.dt_bias,
                                       state_pool=self.state_pool, slots=self.slots[i],
                                       lower_bound=lb, out=self.out)

    def floor_bytes(self):
        """(total, kda-only) essential HBM bytes of one call."""
        B, H, d, P = self.B, self.H, self.d, self.H * self.d
        state = 2 * B * H * d * d * self.state_pool.element_size()
        small = B * P * 2 + B * H * 2 + B * P * 2  # g, beta in; out
        conv = 2 * B * (W - 1) * 3 * P * 2 + B * 3 * P * 2  # rows read + written, mixed_qkv in
        return state + small + conv, state + small + 3 * B * P * 2


def cross_check(case, lb, with_fla):
    """Run ours, the fused call and fla (when available) once each from the same pools; rel. RMS
    of each against ours (outputs, states and conv rows of the batch's slots)."""
    slots = case.slots[0].long()
    s0, c0 = case.state_pool.clone(), case.conv_pool.clone()
    runs = {"ours": case.total_fn(ops, 0, lb), "fused": case.fused_fn(0, lb), "fused_rows": case.fused_rows_fn(0, lb),
            "fused_single": bc.with_env(case.fused_fn(0, lb), **VARIANTS["single"])}
    if with_fla:
        runs["fla"] = case.total_fn(fla_ops, 0, lb)
    res = {}
    for name, fn in runs.items():
        case.state_pool.copy_(s0)
        case.conv_pool.copy_(c0)
        out = fn().clone()
        res[name] = (out, case.state_pool[slots].clone(), case.conv_pool[slots].clone())
    case.state_pool.copy_(s0)
    case.conv_pool.copy_(c0)
    o1, s1, c1 = res.pop("ours")
    row = {}
    for name, (o2, s2, c2) in res.items():
        row.update({f"{name}_vs_ours_out_rel_rms": bc.rel_rms(o2, o1), f"{name}_vs_ours_state_rel_rms": bc.rel_rms(s2, s1),
                    f"{name}_vs_ours_conv_rel_rms": bc.rel_rms(c2, c1)})
    return row


def run_case(B, H, d, pool_name, lb, device, bandwidth, fla_reason, samples, min_reps):
    elt = torch.empty(0, dtype=POOL_DTYPES[pool_name]).element_size()
    nsets = max(1, min(512, math.ceil(2 * l2_bytes(device) / (B * H * d * d * elt))))
    reps = max(nsets, min_reps)
    row = dict(case=f"B{B} H{H} {pool_name}", shape=dict(B=B, H=H, K=d, V=d, conv_width=W, dtype="bfloat16",
                                                          pool_dtype=pool_name),
               input_sets=nsets, calls_per_replay=reps,
               ours_us=None, ours_fused_us=None, fla_us=None, ours_kda_us=None, fla_kda_us=None)
    case = DecodeCase(B, H, d, POOL_DTYPES[pool_name], nsets, device)
    total, kda = case.floor_bytes()
    row["floor_us"], row["kda_floor_us"] = bc.floor_ms(total, bandwidth) * 1e3, bc.floor_ms(kda, bandwidth) * 1e3
    impls = [("ours", ops)] + ([("fla", fla_ops)] if fla_reason is None else [])
    try:
        row.update(cross_check(case, lb, with_fla=fla_reason is None))
    except (RuntimeError, ValueError, NotImplementedError) as e:
        row["check_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    timed = {f"{name}{part}": [make(impl, i, lb) for i in range(nsets)]
             for name, impl in impls for part, make in (("", case.total_fn), ("_kda", case.kda_fn))}
    timed["ours_fused"] = [case.fused_fn(i, lb) for i in range(nsets)]
    timed["ours_fused_rows"] = [case.fused_rows_fn(i, lb) for i in range(nsets)]
    timed["ours_fused_norm"] = [case.fused_fn(i, lb, True) for i in range(nsets)]
    for norm in ("", "_norm"):
        for name, env in VARIANTS.items():
            timed[f"ours_fused{norm}_{name}"] = [bc.with_env(case.fused_fn(i, lb, bool(norm)), **env) for i in range(nsets)]
    for key, fns in timed.items():
        try:
            row[f"{key}_us"] = bc.graph_time_ms(fns, device, reps=reps, samples=samples) * 1e3
        except (RuntimeError, ValueError, NotImplementedError) as e:
            row[f"{key}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    row["speedup_vs_fla"] = bc.ratio(row["fla_us"], row["ours_us"])
    row["fused_speedup_vs_fla"] = bc.ratio(row["fla_us"], row["ours_fused_us"])
    row["fused_hbm_floor_fraction"] = bc.ratio(row["floor_us"], row["ours_fused_us"])
    row["fused_rows_hbm_floor_fraction"] = bc.ratio(row["floor_us"], row.get("ours_fused_rows_us"))
    row["norm_floor_us"] = row["floor_us"] + bc.floor_ms(B * H * d * 2, bandwidth) * 1e3  # + out_gate read
    row["fused_norm_hbm_floor_fraction"] = bc.ratio(row["norm_floor_us"], row.get("ours_fused_norm_us"))
    row["kda_speedup_vs_fla"] = bc.ratio(row["fla_kda_us"], row["ours_kda_us"])
    row["hbm_floor_fraction"] = bc.ratio(row["floor_us"], row["ours_us"])
    row["kda_hbm_floor_fraction"] = bc.ratio(row["kda_floor_us"], row["ours_kda_us"])
    row["fla_hbm_floor_fraction"] = bc.ratio(row["floor_us"], row["fla_us"])
    row["fla_kda_hbm_floor_fraction"] = bc.ratio(row["kda_floor_us"], row["fla_kda_us"])
    return row


COLUMNS = [("case", "case"), ("ours_us", "ours us"), ("ours_fused_us", "fused us"), ("fla_us", "fla us"),
           ("speedup_vs_fla", "speedup"), ("fused_speedup_vs_fla", "fused speedup"),
           ("fused_hbm_floor_fraction", "fused floor frac"),
           ("ours_fused_rows_us", "rows us"), ("ours_fused_rowgrid_us", "rowgrid us"),
           ("ours_fused_heads_us", "heads us"), ("ours_fused_norm_us", "norm us"),
           ("ours_fused_norm_rowgrid_us", "norm rowgrid us"), ("ours_fused_norm_heads_us", "norm heads us"),
           ("fused_norm_hbm_floor_fraction", "norm floor frac"), ("ours_fused_single_us", "single us"),
           ("ours_fused_norm_single_us", "norm single us"),
           ("floor_us", "floor us"), ("hbm_floor_fraction", "floor frac"),
           ("fla_hbm_floor_fraction", "fla floor frac"), ("ours_kda_us", "kda us"),
           ("fla_kda_us", "fla kda us"), ("kda_speedup_vs_fla", "kda speedup"),
           ("kda_hbm_floor_fraction", "kda floor frac"), ("fla_vs_ours_out_rel_rms", "o rel rms")]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = bc.base_parser(__doc__.splitlines()[0])
    p.add_argument("--gate", choices=list(GATES), default="kimi")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--heads", type=int, nargs="+", default=[32, 8])
    p.add_argument("--pools", nargs="+", choices=list(POOL_DTYPES), default=list(POOL_DTYPES))
    p.add_argument("--samples", type=int, default=30, help="graph replays timed per case")
    args = p.parse_args(argv)
    device = bc.pick_device(args.device)
    torch.manual_seed(0)
    if args.smoke:
        batches, heads, d, samples, min_reps = [1, 3], [2], 32, 2, 2
    else:
        batches, heads, d, samples, min_reps = args.batches, args.heads, D, args.samples, 8
    bandwidth, fla_reason = bc.bandwidth_and_fla(device)
    rows = []
    with torch.inference_mode():
        for H in heads:
            for pool_name in args.pools:
                for B in batches:
                    rows.append(bc.run_case_timed(run_case, B, H, d, pool_name, GATES[args.gate], device,
                                                  bandwidth, fla_reason, samples, min_reps))
    meta = bc.run_metadata("bench_decode", device, argv, bandwidth)
    print(f"\n{meta['device']}  copy bandwidth {meta['copy_bandwidth_gbps']:.0f} GB/s  commit {meta['commit']}"
          f"  gate {args.gate}")
    bc.print_table(rows, COLUMNS)
    for r in rows:
        for key in [k for k in r if k.endswith("_error")]:
            print(f"{r['case']}: {key}: {r[key]}")
    path = bc.write_json(args.out, meta, rows, mode="smoke" if args.smoke else "default", gate=args.gate,
                         lower_bound=GATES[args.gate], time_unit="us", fla_skipped=fla_reason)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
