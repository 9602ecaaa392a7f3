"""The tensor-core prefill's diagonal-block paths, on the CPU: how often a block qualifies for the
tensor-core path, and what that path does to the error against the fp64 gold.

Runs the torch mirror of the kernel (kda_serving/ops/tensorcore_mirror.py) over the cases of
scripts/mirror_record_precision.py plus a bounded gate pinned at its bound, once with every
diagonal block exact (DIAG_TC_MIN = inf) and once as the kernel chooses; prints the worst relative
RMS error of outputs and final states of each. Then counts the 16-token blocks (per head) whose
decay is at least DIAG_TC_MIN in every channel, on scripts/bench_prefill.py's input distribution
(g ~ N(0, 1), A_log ~ U(0, 1), dt_bias ~ U(0, 1)), both gates. Writes JSON (--out). The numbers
quoted in docs/kernels.md come from this script.

    PYTHONPATH=. python scripts/mirror_diag_paths.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mirror_record_precision as mrp  # noqa: E402

from kda_serving.ops import tensorcore_mirror  # noqa: E402
from kda_serving.ops.gates import kda_gate  # noqa: E402
from tests.ops.helpers import kda_inputs  # noqa: E402


def cases():
    yield from mrp.cases()
    q, k, v, g, beta, A_log, dt = kda_inputs(200, 2, 128)
    yield "bounded gate at its bound", (q, k, v, torch.full_like(g, 30.0), beta, A_log, dt), -5.0, True


def worst_errors(ns) -> dict:
    torch.manual_seed(0)
    worst = max(((*mrp.run(ns, inp, lb, init), name) for name, inp, lb, init in cases()), key=lambda r: max(r[:2]))
    return dict(worst_out_rel_rms=worst[0], worst_state_rel_rms=worst[1], worst_case=worst[2])


def fast_fraction(lower_bound, T=4096, H=32, D=128) -> float:
    torch.manual_seed(0)
    g, A_log, dt = torch.randn(T, H, D), torch.rand(H), torch.rand(H * D)
    log2_block = kda_gate(g, A_log, dt, lower_bound).view(T // 16, 16, H, D).sum(1) / math.log(2)
    return float((log2_block >= math.log2(tensorcore_mirror.DIAG_TC_MIN)).all(-1).float().mean())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    ns = {"tensorcore_prefill": tensorcore_mirror.tensorcore_prefill}
    default = tensorcore_mirror.DIAG_TC_MIN
    rows = []
    for name, threshold in (("every diagonal exact", math.inf), ("as the kernel chooses", default)):
        tensorcore_mirror.DIAG_TC_MIN = threshold
        try:
            rows.append(dict(variant=name, **worst_errors(ns)))
        finally:
            tensorcore_mirror.DIAG_TC_MIN = default
        r = rows[-1]
        print(f"{name:24s} worst out {r['worst_out_rel_rms']:.2e} state {r['worst_state_rel_rms']:.2e} "
              f"({r['worst_case']})", flush=True)
    fractions = {gate: fast_fraction(lb) for gate, lb in (("kimi", None), ("bounded", -5.0))}
    print("blocks on the tensor-core path, bench_prefill's inputs:", fractions)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "mirror_diag_paths-cpu.json"
        path.write_text(json.dumps(dict(script="scripts/mirror_diag_paths.py", device="cpu", diag_tc_min=default,
                                        results=rows, tensor_core_block_fraction=fractions), indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
