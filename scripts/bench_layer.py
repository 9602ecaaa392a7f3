"""One Kimi-Linear KDA layer on a mixed step: ``kda_mixer_forward`` on our ops vs on fla's.

Shapes: hidden 2304, 32 heads x 128, conv width 4, Kimi-Linear's unbounded gate (``--gate``),
fp32 state pool, bf16 activations. The step (decode-first, as ``KDABatch`` orders it) holds
``--decodes`` one-token decodes with state, then ``--prefills`` prompts of ``--prefill-len``
tokens (fresh unless ``--prefill-context`` > 0).

Timed region (CUDA events, median): ``kda_mixer_forward`` alone: conv1d, KDA decode and
prefill on the pools in place, gated RMSNorm. The step metadata (``build_kda_batch``) is built
once outside it; its cu_seqlens are made int64 once, so fla's per-tensor caches of chunk
indices hit as they do across a model's layers. "fla" is the same backend code with the ops
swapped for ``kda_serving.baselines.fla_ops`` (``mixer_uses_fla_ops``). The input projections
(qkv, low-rank f and g, beta) and o_proj are plain matmuls shared by both: timed apart and
reported as ``projections_ms``, not included in the mixer numbers.

HBM floor of the mixer: mixed_qkv, g, beta, the norm gate read once, the output written once,
decode states read and written, prefill states written (and read with context), conv rows.
"""

from __future__ import annotations

import sys
import time

import bench_common as bc
import torch
import torch.nn.functional as F

from kda_serving.backend import KDALayerParams, build_kda_batch, kda_mixer_forward
from kda_serving.baselines import fla_ops

GATES = {"kimi": None, "bounded": -5.0}
W = 4


class Layer:
    """Weights of one layer, its pools and one step's inputs."""

    def __init__(self, hidden, H, D, prefills, prefill_len, decodes, context, lb, device):
        bf = dict(dtype=torch.bfloat16, device=device)
        P = H * D
        self.H, self.D = H, D
        R = decodes + prefills
        qsl = [0]
        for n in [1] * decodes + [prefill_len] * prefills:
            qsl.append(qsl[-1] + n)
        ncomp = [1000] * decodes + [context] * prefills
        slots = (torch.randperm(R) + 1).to(torch.int32)  # row 0 of the pools: the null slot
        self.batch = build_kda_batch(qsl, ncomp, slots, device=device)
        self.batch.prefill_cu_seqlens = self.batch.prefill_cu_seqlens.long()
        self.T = qsl[-1]
        self.params = KDALayerParams(num_heads=H, head_dim=D, conv_weight=torch.randn(3 * P, W, **bf) / W,
                                     conv_bias=None, A_log=torch.rand(H, device=device),
                                     dt_bias=torch.rand(P, device=device),
                                     norm_weight=torch.ones(D, **bf), lower_bound=lb)
        self.conv_pool = torch.randn(R + 1, W - 1, 3 * P, **bf)
        self.state_pool = 0.1 * torch.randn(R + 1, H, D, D, device=device)
        s = hidden ** -0.5
        self.w = dict(qkv=torch.randn(3 * P, hidden, **bf) * s, f_a=torch.randn(D, hidden, **bf) * s,
                      f_b=torch.randn(P, D, **bf) * D ** -0.5, b=torch.randn(H, hidden, **bf) * s,
                      g_a=torch.randn(D, hidden, **bf) * s, g_b=torch.randn(P, D, **bf) * D ** -0.5,
                      o=torch.randn(hidden, P, **bf) * P ** -0.5)
        self.hidden = torch.randn(self.T, hidden, **bf)
        self.inputs = self.project()

    def project(self):
        """Input projections: mixed_qkv [T, 3P], g_raw [T, P], beta logits [T, H], norm gate [T, P]."""
        x, w = self.hidden, self.w
        return (F.linear(x, w["qkv"]), F.linear(F.linear(x, w["f_a"]), w["f_b"]), F.linear(x, w["b"]),
                F.linear(F.linear(x, w["g_a"]), w["g_b"]))

    def o_proj(self, o):
        return F.linear(o.view(self.T, -1), self.w["o"])

    def mixer(self):
        return kda_mixer_forward(*self.inputs, self.params, self.batch, self.conv_pool, self.state_pool)

    def mixer_fla(self):
        with fla_ops.mixer_uses_fla_ops():
            return self.mixer()

    def floor_bytes(self) -> int:
        b, T, P, H, D = self.batch, self.T, self.H * self.D, self.H, self.D
        acts = T * 3 * P * 2 + 2 * T * P * 2 + T * H * 2 + T * P * 2
        state = H * D * D * self.state_pool.element_size()
        ctx_reads = int(b.prefill_has_initial_state.sum()) if b.num_prefills else 0
        states = (2 * b.num_decodes + b.num_prefills + ctx_reads) * state
        conv = 2 * (b.num_decodes + b.num_prefills) * (W - 1) * 3 * P * 2
        return acts + states + conv


def profile_ms(fn, top: int = 16) -> dict:
    """Device time per op and kernel name over one call of ``fn`` (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [(e.key, getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0))
            for e in prof.key_averages()]
    rows = sorted(((k, t / 1e3) for k, t in rows if t), key=lambda r: -r[1])[:top]
    return dict(rows)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = bc.base_parser(__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2304)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--prefills", type=int, default=4)
    p.add_argument("--prefill-len", type=int, default=32768)
    p.add_argument("--prefill-context", type=int, default=0, help="tokens already in each prefill's state")
    p.add_argument("--decodes", type=int, default=64)
    p.add_argument("--gate", choices=list(GATES), default="kimi")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--profile", action="store_true", help="also record device time per op of one ours call (GPU)")
    args = p.parse_args(argv)
    if args.smoke:
        args.hidden, args.heads, args.head_dim, args.prefills, args.prefill_len, args.decodes, args.iters = \
            64, 2, 16, 2, 40, 3, 2
    warmup = 1 if args.smoke else 3
    device = bc.pick_device(args.device)
    torch.manual_seed(0)
    bandwidth, fla_reason = bc.bandwidth_and_fla(device)
    lb = GATES[args.gate]
    t_start = time.perf_counter()

    def progress(what):  # a run stopped by a time limit still shows how far it got
        print(f"[{time.perf_counter() - t_start:6.1f} s] {what}", flush=True)

    with torch.inference_mode():
        layer = Layer(args.hidden, args.heads, args.head_dim, args.prefills, args.prefill_len,
                      args.decodes, args.prefill_context, lb, device)
        T = layer.T
        progress(f"layer built: {T} tokens")
        row = dict(case=f"{args.decodes} decodes + {args.prefills}x{args.prefill_len} prefill",
                   shape=dict(hidden=args.hidden, H=args.heads, K=args.head_dim, V=args.head_dim,
                              conv_width=W, tokens=T, decodes=args.decodes, prefills=args.prefills,
                              prefill_len=args.prefill_len, prefill_context=args.prefill_context,
                              dtype="bfloat16", pool_dtype="float32"),
                   gate=args.gate, lower_bound=lb,
                   covers="kda_mixer_forward (conv1d, KDA decode + prefill, gated RMSNorm); "
                          "projections and o_proj excluded, timed apart as projections_ms",
                   ours_ms=None, fla_ms=None, ours_extra_bytes_per_token=None, fla_extra_bytes_per_token=None)
        row["floor_ms"] = bc.floor_ms(layer.floor_bytes(), bandwidth)
        impls = {"ours": layer.mixer}
        if fla_reason is None:
            impls["fla"] = layer.mixer_fla
            row["fla_backend"] = fla_ops.chunk_backend(lb)
            pools0 = layer.conv_pool.clone(), layer.state_pool.clone()
            outs = {}
            for name, fn in impls.items():
                layer.conv_pool.copy_(pools0[0])
                layer.state_pool.copy_(pools0[1])
                try:
                    outs[name] = (fn().clone(), layer.state_pool.clone())
                    progress(f"{name}: first call done")
                except (RuntimeError, ValueError, NotImplementedError) as e:
                    row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            if len(outs) == 2:
                row["fla_vs_ours_out_rel_rms"] = bc.rel_rms(outs["fla"][0], outs["ours"][0])
                row["fla_vs_ours_state_rel_rms"] = bc.rel_rms(outs["fla"][1], outs["ours"][1])
            del outs, pools0
        for name, fn in impls.items():
            if f"{name}_error" in row:
                continue
            try:
                row[f"{name}_ms"] = bc.time_ms(fn, device, iters=args.iters, warmup=warmup)
                extra = bc.peak_extra_bytes(fn, device)
                row[f"{name}_extra_bytes_per_token"] = extra / T if extra is not None else None
                progress(f"{name}: timed, {row[f'{name}_ms']:.2f} ms")
            except (torch.cuda.OutOfMemoryError, RuntimeError, ValueError, NotImplementedError) as e:
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        if args.profile and device.type == "cuda" and "ours_error" not in row:
            row["ours_profile_ms"] = profile_ms(layer.mixer)
            for name, ms in row["ours_profile_ms"].items():
                print(f"  {ms:8.3f} ms  {name}")
        row["projections_ms"] = bc.time_ms(layer.project, device, iters=args.iters, warmup=warmup)
        out = layer.mixer()
        row["o_proj_ms"] = bc.time_ms(lambda: layer.o_proj(out), device, iters=args.iters, warmup=warmup)
    row["speedup_vs_fla"] = bc.ratio(row["fla_ms"], row["ours_ms"])
    row["hbm_floor_fraction"] = bc.ratio(row["floor_ms"], row["ours_ms"])
    row["fla_hbm_floor_fraction"] = bc.ratio(row["floor_ms"], row["fla_ms"])
    meta = bc.run_metadata("bench_layer", device, argv, bandwidth)
    print(f"\n{meta['device']}  copy bandwidth {meta['copy_bandwidth_gbps']:.0f} GB/s  commit {meta['commit']}")
    bc.print_table([row], [("case", "case"), ("ours_ms", "mixer ms"), ("fla_ms", "fla mixer ms"),
                           ("speedup_vs_fla", "speedup"), ("floor_ms", "floor ms"),
                           ("hbm_floor_fraction", "floor frac"), ("projections_ms", "proj ms"),
                           ("o_proj_ms", "o_proj ms"), ("ours_extra_bytes_per_token", "extra B/tok"),
                           ("fla_vs_ours_out_rel_rms", "o rel rms")])
    for key in [k for k in row if k.endswith("_error")]:
        print(f"{key}: {row[key]}")
    path = bc.write_json(args.out, meta, [row], mode="smoke" if args.smoke else "default",
                         fla_skipped=fla_reason)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
