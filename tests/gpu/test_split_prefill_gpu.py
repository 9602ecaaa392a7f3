"""Split prefill on the CUDA kernels: split vs unsplit kernel path vs an fp64 recurrence (Hopper + _C)."""

import math

import pytest

torch = pytest.importorskip("torch")

from tests.gpu.common import D, DEV, TOL, kernels_available, rel_rms, sync  # noqa: E402

if not kernels_available():
    pytest.skip("CUDA extension or a Hopper GPU is not available", allow_module_level=True)

from kda_serving import ops  # noqa: E402
from kda_serving.ops import split_plan  # noqa: E402
from kda_serving.ops import split_prefill as sp  # noqa: E402
from kda_serving.ops.gates import kda_gate, l2_normalize  # noqa: E402

pytestmark = pytest.mark.gpu


def make_inputs(T, H):
    g = torch.empty(T, H, D).uniform_(-8, 8)
    spikes = torch.rand(T, H, D) < 0.05
    g[spikes] = torch.where(torch.rand(T, H, D) < 0.5, -30.0, 30.0)[spikes]
    x = [torch.randn(T, H, D) for _ in range(3)] + [g, torch.randn(T, H) * 3]
    q, k, v, g, beta = (t.bfloat16().to(DEV) for t in x)
    return q, k, v, g, beta, torch.full((H,), math.log(16.0), device=DEV), (torch.randn(H * D) * 8).to(DEV)


@torch.no_grad()
def gold(q, k, v, g, beta, A_log, dt_bias, bounds, init, lower_bound):
    """fp64 token-serial recurrence on the GPU (a python loop over tokens, vectorised over heads)."""
    dd = torch.float64
    gate = kda_gate(g.to(dd), A_log.to(dd), dt_bias.to(dd), lower_bound).exp()
    qn, kn = l2_normalize(q.to(dd)) * D ** -0.5, l2_normalize(k.to(dd))
    b, vv = torch.sigmoid(beta.to(dd)), v.to(dd)
    o = torch.empty(q.shape, dtype=dd, device=DEV)
    finals = []
    for n in range(len(bounds) - 1):
        S = init[n].to(dd).clone()
        for t in range(bounds[n], bounds[n + 1]):
            S.mul_(gate[t][:, None, :])
            u = b[t][:, None] * (vv[t] - torch.einsum("hvk,hk->hv", S, kn[t]))
            S.add_(u[:, :, None] * kn[t][:, None, :])
            o[t] = torch.einsum("hvk,hk->hv", S, qn[t])
        finals.append(S)
    return o, torch.stack(finals)


def run(inp, lens, pool, has, lb, cu_cpu):
    N = len(lens)
    cu = cu_cpu.to(DEV)
    out = torch.full(inp[2].shape, float("nan"), dtype=torch.bfloat16, device=DEV)
    ops.kda_prefill(*inp, cu_seqlens=cu, state_pool=pool, slots=torch.arange(1, N + 1, dtype=torch.int32, device=DEV),
                    has_initial_state=has, lower_bound=lb, out=out, cu_seqlens_cpu=cu_cpu)
    return out


@pytest.mark.parametrize("lb", [None, -5.0])
@pytest.mark.parametrize("H", [4, 8])
@pytest.mark.parametrize("lens", [[131072], [16384, 700, 0, 9000]], ids=["1x128K", "varlen"])
def test_split_matches_unsplit_and_fp64(monkeypatch, lens, H, lb):
    monkeypatch.setenv("KDA_SERVING_PREFILL_KERNEL", "serial")  # the kernel the planner is calibrated on
    N = len(lens)
    cu_cpu = torch.tensor([0] + lens).cumsum(0)
    inp = make_inputs(sum(lens), H)
    pool0 = torch.full((N + 2, H, D, D), 1e30, device=DEV)
    pool0[1:N + 1] = 0.1 * torch.randn(N, H, D, D, device=DEV)
    has = torch.tensor([True, False, True, True][:N], device=DEV)
    calls = []
    real = sp.split_prefill
    monkeypatch.setattr(sp, "split_prefill", lambda *a, **kw: calls.append(kw["segment"]) or real(*a, **kw))

    results = {}
    for name, env in (("auto", None), ("forced", "1024"), ("serial", "0")):
        if env is None:
            monkeypatch.delenv(split_plan.ENV, raising=False)
        else:
            monkeypatch.setenv(split_plan.ENV, env)
        pool = pool0.clone()
        results[name] = (run(inp, lens, pool, has, lb, cu_cpu), pool)
    sync()
    assert len(calls) == 2 and calls[1] == 1024, calls  # the planner splits 128K at H <= 8 on an H100

    init = torch.where(has[:, None, None, None], pool0[1:N + 1], 0.0)
    ref_o, ref_s = gold(*inp, cu_cpu.tolist(), init, lb)
    serial_o, serial_pool = results["serial"]
    for name in ("auto", "forced"):
        out, pool = results[name]
        assert rel_rms(out, ref_o) <= TOL, name
        assert rel_rms(pool[1:N + 1], ref_s) <= TOL, name
        assert rel_rms(out, serial_o) <= TOL, name
        assert torch.equal(pool[[0, N + 1]], pool0[[0, N + 1]]), name
    assert rel_rms(serial_o, ref_o) <= TOL


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lb", [None, -5.0])
@pytest.mark.parametrize("H,lens", [(4, [16384, 700, 0, 9000]), (8, [20000, 3, 2560, 64])], ids=["H4", "H8"])
def test_split_on_the_tensor_core_kernel(monkeypatch, H, lens, lb, pool_dtype):
    """The tensor-core kernel (the default) splits inside the kernel (tc_split.py): the planner's
    choice, forced segments of 1024 and 640 tokens and no split all match the fp64 gold, split and
    unsplit agree, a null slot gets zeros and untouched slots keep their bits."""
    from kda_serving.ops import _ext
    N = len(lens)
    cu_cpu = torch.tensor([0] + lens).cumsum(0)
    inp = make_inputs(sum(lens), H)
    pool0 = torch.full((N + 2, H, D, D), 1e30, device=DEV, dtype=pool_dtype)
    pool0[1:N + 1] = 0.1 * torch.randn(N, H, D, D, device=DEV)
    has = torch.tensor([True, False, True, True][:N], device=DEV)
    slots = torch.arange(1, N + 1, dtype=torch.int32, device=DEV)
    slots[1] = 0  # a null slot
    calls, old = [], []
    real, real_op = _ext.prefill_tc_split, sp.split_prefill
    monkeypatch.setattr(_ext, "prefill_tc_split", lambda *a, **kw: calls.append(kw["segment_chunks"]) or real(*a, **kw))
    monkeypatch.setattr(sp, "split_prefill", lambda *a, **kw: old.append(1) or real_op(*a, **kw))
    monkeypatch.delenv("KDA_SERVING_PREFILL_KERNEL", raising=False)
    init = torch.where(has[:, None, None, None], pool0[1:N + 1].float(), 0.0)
    ref_o, ref_s = gold(*inp, cu_cpu.tolist(), init, lb)
    results = {}
    for env in ("0", None, "1024", "640"):
        if env is None:
            monkeypatch.delenv(split_plan.ENV, raising=False)
        else:
            monkeypatch.setenv(split_plan.ENV, env)
        pool = pool0.clone()
        out = torch.full(inp[2].shape, float("nan"), dtype=torch.bfloat16, device=DEV)
        ops.kda_prefill(*inp, cu_seqlens=cu_cpu.to(DEV), state_pool=pool, slots=slots, has_initial_state=has,
                        lower_bound=lb, out=out, cu_seqlens_cpu=cu_cpu)
        sync()
        results[env] = out
        live = [n for n in range(N) if n != 1]
        rows = torch.cat([torch.arange(int(cu_cpu[n]), int(cu_cpu[n + 1])) for n in live]).to(DEV)
        assert rel_rms(out[rows], ref_o[rows]) <= TOL, env
        assert (out[int(cu_cpu[1]):int(cu_cpu[2])] == 0).all(), env
        assert rel_rms(pool[[n + 1 for n in live]], ref_s[live]) <= TOL, env
        assert torch.equal(pool[[0, 2, N + 1]], pool0[[0, 2, N + 1]]), env
        assert rel_rms(out[rows], results["0"][rows]) <= 2e-3, env
    assert len(calls) == 3 and calls[1:] == [16, 10], calls  # the planner splits these on an H100
    assert not old
