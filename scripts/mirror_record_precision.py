"""How the tensor-core prefill's record precision moves its error against the fp64 gold, on the CPU.

Runs the torch mirror of the kernel (kda_serving/ops/tensorcore_mirror.py) with the record fields
Qe, Ke, Kd, A_qk rounded to TF32, fp16 (what the kernel stores) or bf16 (T beta stays fp32 rounded
to TF32, as stored), over the cases of tests/ops/test_tensorcore_mirror.py plus v scaled by 1000;
prints the worst relative RMS error of outputs and final states per variant and the largest
magnitude of each field, and writes them as JSON (--out). The numbers quoted in docs/kernels.md
come from this script (those for an fp32, bf16 or fp16 u are from its earlier form, when the
record held u = T beta v and w = T beta Ke in place of T beta and Ke).

    PYTHONPATH=. python scripts/mirror_record_precision.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kda_serving.ops import tensorcore_mirror  # noqa: E402
from kda_serving.ops.naive import naive_kda  # noqa: E402
from tests.conftest import rel_rms  # noqa: E402
from tests.ops.helpers import kda_inputs  # noqa: E402

FIELDS = ("Qe", "Ke", "Kd", "Aqk")  # the order the mirror rounds them in
ROUND = {"tf32": tensorcore_mirror._tf32, "fp16": lambda x: x.float().half().float(),
         "bf16": lambda x: x.float().bfloat16().float()}
VARIANTS = {"fields tf32": "tf32", "fields fp16": "fp16", "fields bf16": "bf16"}


def patched_mirror():
    """The mirror's source with its record-field rounding (_fp16) routed through hooks."""
    src = Path(tensorcore_mirror.__file__).read_text()
    assert src.count("_fp16(") == 5, "tensorcore_mirror.py changed: update this script"
    src = src.replace("def _fp16(", "def _fp16_unused(")
    for name in FIELDS:  # the call sites, in source order
        src = src.replace("_fp16(", f"_F_{name}(", 1)
    src = src.replace("from .gates import", "from kda_serving.ops.gates import")
    ns = {"__name__": "mirror_record_precision_patched"}
    exec(compile(src, "tensorcore_mirror (patched)", "exec"), ns)
    return ns


def cases():
    for lb in (None, -5.0):
        for gm, dm in [(-8, 4), (0, -8), (8, "normal"), ("uniform", 4), ("normal", "normal")]:
            yield f"gate sweep {gm},{dm} lb={lb}", kda_inputs(150, 2, 128, g_mode=gm, dt_mode=dm), lb, True
        T, H, K = 200, 2, 128
        q, k, v, g, beta, A_log, dt = kda_inputs(T, H, K)
        k[10:74] = k[10]
        k[80:] = torch.randn(H, K) + 0.07 * torch.randn(T - 80, H, K)
        g[::5] = 30.0
        g[2::7] = -30.0
        beta[::3] = 30.0
        yield f"adversarial lb={lb}", (q, k, v, g, beta, torch.full((H,), math.log(16.0)), dt), lb, True
        q, k, v, g, beta, A_log, dt = kda_inputs(200, 2, 128)
        yield f"v x 1000 lb={lb}", (q, k, v * 1000, g, beta, A_log, dt), lb, True
    yield "long slow decay", kda_inputs(1024, 1, 128, g_mode=-4, dt_mode=-4), None, False


def run(ns, inp, lb, init):
    q, k, v, g, beta, A_log, dt = (x.bfloat16().float() if i < 5 else x for i, x in enumerate(inp))
    T, H, K = q.shape
    S0 = torch.randn(H, K, K) * 0.5 if init else None
    o, S = ns["tensorcore_prefill"](q, k, v, g, beta, A_log, dt, initial_state=S0, lower_bound=lb)
    ro, rs = naive_kda(q, k, v, g, beta, A_log, dt, cu_seqlens=torch.tensor([0, T]),
                       initial_state=None if S0 is None else S0[None], lower_bound=lb)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    return rel_rms(o, ro), rel_rms(S, rs[0])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    ns = patched_mirror()
    rows, peaks = [], {}
    for name, field in VARIANTS.items():
        ns.update({f"_F_{f}": ROUND[field] for f in FIELDS})
        torch.manual_seed(0)
        worst = max(((*run(ns, inp, lb, init), cname) for cname, inp, lb, init in cases()), key=lambda r: max(r[:2]))
        rows.append(dict(variant=name, worst_out_rel_rms=worst[0], worst_state_rel_rms=worst[1], worst_case=worst[2]))
        print(f"{name:34s} worst out {worst[0]:.2e} state {worst[1]:.2e} ({worst[2]})", flush=True)

    def peak(kind):
        def hook(x):
            peaks[kind] = max(peaks.get(kind, 0.0), float(x.abs().max()))
            return x
        return hook
    ns.update({f"_F_{f}": peak(f) for f in FIELDS})
    torch.manual_seed(0)
    for _, inp, lb, init in cases():
        run(ns, inp, lb, init)
    print("largest magnitude:", {k: f"{v:.3g}" for k, v in peaks.items()})
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "mirror_record_precision-cpu.json"
        path.write_text(json.dumps(dict(script="scripts/mirror_record_precision.py", device="cpu", results=rows,
                                        largest_magnitude=peaks), indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
