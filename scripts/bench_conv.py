"""Conv prefill: ``kda_serving.ops.causal_conv1d_prefill`` against fla's ``causal_conv1d``.

The causal depthwise conv (width 4, SiLU) that a KDA layer runs on its q, k, v projections
before the prefill, over packed varlen sequences with a bf16 conv-state pool whose rows hold each
sequence's history (read where ``has_initial_state``, rewritten with its last W-1 inputs). Shapes:
the layer benchmark's (4 x 32768 tokens at H = 32, D = 3 x 32 x 128 channels) and the prefill
benchmark's (H96 1x8192, H96 8x1024, H32 1x32768, H32 8x4096). Ours: the extension's kernels;
fla: ``kda_serving.baselines.fla_ops`` (pool rows gathered into fla's dense initial state and
scattered back), timed with CUDA events (median).

HBM floor: x read once, the output written once, the pool rows read and written, at the copy
bandwidth measured in the same run.
"""

from __future__ import annotations

import sys

import bench_common as bc
import torch

from kda_serving import ops
from kda_serving.baselines import fla_ops

W, D_HEAD = 4, 128
CASES = [(32, [32768] * 4), (96, [8192]), (96, [1024] * 8), (32, [32768]), (32, [4096] * 8)]


def run_case(H, lens, d, device, bandwidth, fla_reason, iters):
    D = 3 * H * d
    T, N = sum(lens), len(lens)
    bf = dict(dtype=torch.bfloat16, device=device)
    x = torch.randn(T, D, **bf)
    weight = torch.randn(D, W, **bf) / W
    pool0 = torch.randn(N + 1, W - 1, D, **bf)
    slots = torch.arange(1, N + 1, dtype=torch.int32, device=device)
    has = torch.tensor([n % 2 == 0 for n in range(N)], dtype=torch.bool, device=device)
    cu = torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)
    label = f"{N}x{lens[0]}" if len(set(lens)) == 1 else f"varlen {T}"
    row = {"case": f"H{H} {label}", "fla_ms": None, "shape": dict(H=H, lens=lens, D=D, W=W, dtype="bfloat16",
                                                          pool_dtype="bfloat16")}
    pools = {"ours": pool0.clone(), "fla": pool0.clone()}

    def call(impl, name):
        return lambda: impl.causal_conv1d_prefill(x, weight, None, cu_seqlens=cu, conv_pool=pools[name],
                                                  slots=slots, has_initial_state=has)

    y = call(ops, "ours")()
    pool_ours = pools["ours"].clone()
    row["ours_ms"] = bc.time_ms(call(ops, "ours"), device, iters=iters)
    if fla_reason is None:
        pools["fla"].copy_(pool0)
        y_fla = call(fla_ops, "fla")()
        row["fla_vs_ours_out_rel_rms"] = bc.rel_rms(y, y_fla)
        row["fla_vs_ours_pool_rel_rms"] = bc.rel_rms(pool_ours, pools["fla"])
        row["fla_ms"] = bc.time_ms(call(fla_ops, "fla"), device, iters=iters)
    nbytes = 2 * T * D * 2 + 2 * N * (W - 1) * D * 2
    row["floor_ms"] = bc.floor_ms(nbytes, bandwidth)
    row["speedup_vs_fla"] = bc.ratio(row.get("fla_ms"), row["ours_ms"])
    row["hbm_floor_fraction"] = bc.ratio(row["floor_ms"], row["ours_ms"])
    row["fla_hbm_floor_fraction"] = bc.ratio(row["floor_ms"], row.get("fla_ms"))
    return row


COLUMNS = [("case", "case"), ("ours_ms", "ours ms"), ("fla_ms", "fla ms"), ("speedup_vs_fla", "speedup"),
           ("floor_ms", "floor ms"), ("hbm_floor_fraction", "floor frac"),
           ("fla_hbm_floor_fraction", "fla floor frac"), ("fla_vs_ours_out_rel_rms", "out rel rms")]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = bc.base_parser(__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=20, help="timing samples per case (at most)")
    args = p.parse_args(argv)
    device = bc.pick_device(args.device)
    torch.manual_seed(0)
    cases, d, iters = ([(2, [5, 70, 0, 9])], 8, 3) if args.smoke else (CASES, D_HEAD, args.iters)
    bandwidth, fla_reason = bc.bandwidth_and_fla(device)
    rows = []
    with torch.inference_mode():
        for H, lens in cases:
            rows.append(bc.run_case_timed(run_case, H, lens, d, device, bandwidth, fla_reason, iters))
    meta = bc.run_metadata("bench_conv", device, argv, bandwidth)
    print(f"\n{meta['device']}  copy bandwidth {meta['copy_bandwidth_gbps']:.0f} GB/s  commit {meta['commit']}")
    bc.print_table(rows, COLUMNS)
    path = bc.write_json(args.out, meta, rows, mode="smoke" if args.smoke else "default", fla_skipped=fla_reason)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
