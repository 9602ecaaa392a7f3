"""Bad arguments to the CUDA ops raise a RuntimeError naming the argument, and nothing else
happens: each call runs in a process of its own, so that a crash in the binding (messages with a
number in them, formatted through an ostream, once killed the process with SIGSEGV instead of
raising) fails its case instead of taking the test run down."""

import subprocess
import sys
import textwrap

import pytest

from tests.gpu.common import EMULATE, kernels_available

pytestmark = pytest.mark.gpu

SETUP = textwrap.dedent("""
    import torch
    from kda_serving.ops import _ext
    assert _ext.load()
    B, H, D, dev = 2, 2, 128, "cuda"
    q, k, v, g = (torch.randn(B, 1, H, D, device=dev).bfloat16() for _ in range(4))
    beta = torch.randn(B, 1, H, device=dev).bfloat16()
    A_log, dt = torch.zeros(H, device=dev), torch.zeros(H * D, device=dev)
    pool = torch.zeros(4, H, D, D, device=dev)
    slots = torch.tensor([1, 2], dtype=torch.int32, device=dev)
    out = torch.empty(B, 1, H, D, device=dev).bfloat16()
    mixed = torch.randn(B, 1, 3 * H * D, device=dev).bfloat16()
    cw, cpool = torch.randn(3 * H * D, 4, device=dev), torch.zeros(4, 3, 3 * H * D, device=dev)
    pq, pk, pv, pg = (torch.randn(70, H, D, device=dev).bfloat16() for _ in range(4))
    pbeta, cu = torch.randn(70, H, device=dev).bfloat16(), torch.tensor([0, 70], dtype=torch.int32, device=dev)
    has = torch.ones(1, dtype=torch.bool, device=dev)
    pout = torch.empty(70, H, D, device=dev).bfloat16()
    pool0, cpool0 = pool.clone(), cpool.clone()
    ops = torch.ops.kda_serving
    try:
        {call}
    except RuntimeError as e:
        torch.cuda.synchronize()
        assert torch.equal(pool, pool0) and torch.equal(cpool, cpool0), "a pool changed"
        print("RAISED:", str(e).splitlines()[0])
    else:
        print("NO ERROR")
""")

DECODE = "ops.kda_decode({q}, k, v, g, beta, A_log, dt, pool, slots, None, None, 0.088, out)"
FUSED = "ops.kda_decode_fused(mixed, g, beta, A_log, dt, cw, None, cpool, pool, slots, None, None, 0.088, {rest})"
PREFILL = ("ops.kda_prefill_tc(pq, pk, pv, pg, pbeta, A_log, dt, cu, pool, slots[:1], has, None, 0.088, None, None, "
           "pout, {ws})")
CASES = {
    "workspace size": (PREFILL.format(ws="torch.empty(5, device=dev)"), "workspace must be contiguous"),
    "workspace alignment": (PREFILL.format(ws="torch.empty(1 << 20, device=dev)[1:]"), "workspace must start 16-byte"),
    "q shape": (DECODE.format(q="q[:, :, :1]"), "q must be"),
    "q dtype": (DECODE.format(q="q.float()"), "q must be BFloat16"),
    "q device": (DECODE.format(q="q.cpu()"), "q must be a CUDA tensor"),
    "conv_out size": (FUSED.format(rest="None, None, 1e-6, out, torch.empty(5, dtype=torch.bfloat16, device=dev)"),
                      "conv_out must be contiguous"),
    "conv_out dtype": (FUSED.format(rest="None, None, 1e-6, out, torch.empty(4096, device=dev)"), "conv_out must be"),
    "out_gate alone": (FUSED.format(rest="g, None, 1e-6, out, None"), "out_gate and norm_weight"),
    "mixed_qkv shape": (FUSED.format(rest="None, None, 1e-6, out, None").replace("mixed,", "mixed[:, :, :5],", 1),
                        "mixed_qkv must be"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_argument_raises_naming_it(case):
    if EMULATE:
        pytest.skip("the binding's checks run on the GPU build only")
    if not kernels_available():
        pytest.skip("needs the CUDA extension on a Hopper GPU")
    call, message = CASES[case]
    r = subprocess.run([sys.executable, "-c", SETUP.format(call=call)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"the process died (rc {r.returncode}): {r.stderr[-2000:]}"
    assert f"RAISED: kda_serving: {message}" in r.stdout, r.stdout + r.stderr[-2000:]
