"""``kda_serving.ops`` and the backend on their CUDA-kernel path, with the kernels emulated on the CPU
(tests/emu/emulated_extension.py): the Python glue the GPU runs (the ``_ext`` wrappers, kernel
selection, split prefill with bf16 transition outputs and a stride-0 v, the fused decode dispatch)
checked against the fp64 gold and the torch reference."""

import math

import pytest
import torch

from kda_serving import ops
from kda_serving.ops import dispatch
from kda_serving.ops.naive import naive_kda
from tests.conftest import rel_rms

D = 128
TOL = 5e-3


def inputs(T, H):
    q, k, v = (torch.randn(T, H, D).bfloat16() for _ in range(3))
    g = (torch.rand(T, H, D) * 16 - 8).bfloat16()
    beta = (torch.randn(T, H) * 3).bfloat16()
    return q, k, v, g, beta, torch.full((H,), math.log(4.0)), torch.randn(H * D) * 0.5


def check_per_sequence(out, pool, slots, cu, ro, rs, unsplit=None):
    """No NaN; a null slot's tokens zero; each live sequence's outputs and final state within TOL
    of the gold (and within 2e-3 of ``unsplit``'s outputs)."""
    assert not out.isnan().any()
    for n, s in enumerate(slots.tolist()):
        a, b = int(cu[n]), int(cu[n + 1])
        if s <= 0:
            assert (out[a:b] == 0).all()
            continue
        if b > a:
            assert rel_rms(out[a:b], ro[a:b]) <= TOL, n
            if unsplit is not None:
                assert rel_rms(out[a:b], unsplit[a:b]) <= 2e-3, n
        assert rel_rms(pool[s], rs[n]) <= TOL, n


@pytest.mark.parametrize("split", [None, "64"])
@pytest.mark.parametrize("kernel", [None, "serial", "chunked", "tc"])
def test_kda_prefill_on_each_kernel_and_split(kernel_path, monkeypatch, kernel, split):
    for name, value in (("KDA_SERVING_PREFILL_KERNEL", kernel), ("KDA_SERVING_PREFILL_SPLIT", split)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert ops.op_path(torch.empty(0)) == "cuda"
    assert dispatch.prefill_kernel().__name__ == {None: "prefill_tc", "serial": "prefill", "chunked": "prefill_chunked",
                                              "tc": "prefill_tc"}[kernel]
    lens, H = [150, 0, 9, 70], 2
    N = len(lens)
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    inp = inputs(sum(lens), H)
    pool = torch.full((N + 2, H, D, D), 1e30)
    pool[1:N + 1] = torch.randn(N, H, D, D) * 0.3
    before = pool.clone()
    slots = torch.tensor([1, 2, 0, 4], dtype=torch.int32)
    has = torch.tensor([True, True, True, False])
    out = torch.full((sum(lens), H, D), float("nan")).bfloat16()
    calls = []
    if split:  # the tensor-core kernel splits inside the kernel (tc_split.py), the others in split_prefill.py
        from kda_serving.ops import _ext
        from kda_serving.ops import split_prefill as sp
        real, real_tc = sp.split_prefill, _ext.prefill_tc_split
        monkeypatch.setattr(sp, "split_prefill", lambda *a, **kw: calls.append(kw["cuda"]) or real(*a, **kw))
        monkeypatch.setattr(_ext, "prefill_tc_split", lambda *a, **kw: calls.append("tc") or real_tc(*a, **kw))
    ops.kda_prefill(*inp, cu_seqlens=cu, state_pool=pool, slots=slots, has_initial_state=has, out=out)
    assert calls == ([] if not split else ["tc"] if kernel in (None, "tc") else [True])
    init = torch.where((has & (slots > 0))[:, None, None, None], before[slots.clamp(min=0).long()], 0.0).double()
    ro, rs = naive_kda(*inp, cu_seqlens=cu, initial_state=init)
    check_per_sequence(out, pool, slots, cu, ro, rs)
    assert torch.equal(pool[[0, 3, 5]], before[[0, 3, 5]])


@pytest.mark.parametrize("decode_kernel,decode_ops", [
    ("ops", {"causal_conv1d_update:cuda", "kda_decode:cuda"}), (None, {"kda_decode_fused:cuda"})])
@pytest.mark.parametrize("spec", [0, 2])
def test_continuous_batching_on_the_kernels(kernel_path, monkeypatch, spec, decode_kernel, decode_ops):
    """The backend simulation (tests/backend) with bf16 activations and head dim 128 on the
    kernel path: decode / verify (the conv update + decode pair, or the fused call), conv and
    prefill kernels under random batching."""
    from tests.backend.test_continuous_batching import test_every_request_matches_running_alone as simulate
    monkeypatch.setattr(dispatch, "_logged", set())
    simulate(("cpu", torch.bfloat16, D, TOL, decode_kernel), spec, None, monkeypatch)
    assert {"kda_prefill:cuda", "causal_conv1d_prefill:cuda"} | decode_ops <= dispatch._logged, dispatch._logged


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
def test_tc_workspace_limit_runs_token_windows(kernel_path, monkeypatch, pool_dtype):
    """The tensor-core kernel over its workspace limit (KDA_SERVING_TC_WORKSPACE_MB) runs in token
    windows that cut sequences at multiples of 64 of their tokens: the same outputs, final states
    and 64-token checkpoints as one call (bit for bit with an fp32 pool; the bf16 pool rounds the
    carried state), null and empty sequences included."""
    from kda_serving.ops import _ext, tc_windows
    monkeypatch.setenv("KDA_SERVING_PREFILL_KERNEL", "tc")
    torch.manual_seed(4)
    lens, H = [200, 0, 9, 130, 64], 2
    N = len(lens)
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    inp = inputs(sum(lens), H)
    pool0 = torch.full((N + 2, H, D, D), 1e30, dtype=pool_dtype)
    pool0[1:N + 1] = (torch.randn(N, H, D, D) * 0.3).to(pool_dtype)
    slots = torch.tensor([1, 2, 0, 4, 5], dtype=torch.int32)
    has = torch.tensor([True, True, True, False, True])
    counts = [n // 64 for n in lens]
    offsets = torch.tensor([0] + counts[:-1]).cumsum(0).to(torch.int64)
    record_mb = 4 * H * _ext.TC_RECORD_FLOATS / (1 << 20)
    results, calls = [], []
    real = _ext.prefill_tc
    for limit_slots in (None, 3):  # one call; windows of at most 3 chunk slots
        if limit_slots is None:
            monkeypatch.delenv("KDA_SERVING_TC_WORKSPACE_MB", raising=False)
        else:
            monkeypatch.setenv("KDA_SERVING_TC_WORKSPACE_MB", str(limit_slots * record_mb))
        calls.clear()
        monkeypatch.setattr(_ext, "prefill_tc", lambda *a, **kw: calls.append(a[7].tolist()) or real(*a, **kw))
        pool = pool0.clone()
        inter = torch.full((sum(counts) + 1, H, D, D), float("nan"), dtype=pool_dtype)
        out = torch.full((sum(lens), H, D), float("nan")).bfloat16()
        ops.kda_prefill(*inp, cu_seqlens=cu, state_pool=pool, slots=slots, has_initial_state=has, out=out,
                        intermediate_states=inter, intermediate_offsets=offsets)
        results.append((out, pool, inter, list(calls)))
    (o1, p1, i1, c1), (o2, p2, i2, c2) = results
    assert len(c1) == 1
    plan = tc_windows.plan_windows(cu.tolist(), 3)
    assert len(plan) > N and len(c2) == 1 + len(plan)  # the outer call, then one per window
    assert not o2.isnan().any() and not i2[:sum(counts)].isnan().any()
    if pool_dtype == torch.float32:
        assert torch.equal(o1, o2) and torch.equal(p1, p2) and torch.equal(i1[:sum(counts)], i2[:sum(counts)])
    else:
        assert rel_rms(o2, o1) <= TOL and rel_rms(p2[1:N + 1], p1[1:N + 1]) <= TOL
    assert torch.equal(p2[[0, 3, 6]], pool0[[0, 3, 6]])


def test_gated_rms_norm_takes_the_kernel_for_bf16_rows_of_128(kernel_path, monkeypatch):
    """ops.gated_rms_norm runs the kernel on bf16 [..., 128] tensors with a [M, H, 128] view (the
    mixer's in-place call on [T, H, 128] included) and the reference otherwise; both agree."""
    monkeypatch.setattr(dispatch, "_logged", set())
    torch.manual_seed(2)
    x = torch.randn(2, 3, 4, D).bfloat16()
    gate = torch.randn(2, 3, 8, D).bfloat16()[:, :, :4]  # strided, as a column slice
    w = torch.rand(D) + 0.5
    ref = ops.reference.gated_rms_norm(x, gate, w, 1e-6, torch.empty_like(x))
    out = ops.gated_rms_norm(x, gate, w, 1e-6)
    assert dispatch._logged == {"gated_rms_norm:cuda"}
    assert rel_rms(out, ref) <= 2e-3
    xi = x.clone()
    ops.gated_rms_norm(xi, gate, w, 1e-6, out=xi)
    assert torch.equal(xi, out)
    monkeypatch.setattr(dispatch, "_logged", set())
    for args in ((x.float(), gate.float()), (x[..., :64], gate[..., :64]), (x.transpose(0, 2), gate.transpose(0, 2))):
        got = ops.gated_rms_norm(*args, w[:args[0].shape[-1]], 1e-6)
        want = ops.reference.gated_rms_norm(*args, w[:args[0].shape[-1]], 1e-6, torch.empty_like(args[0]))
        assert torch.equal(got, want)
    assert dispatch._logged == {"gated_rms_norm:reference"}


def test_reserve_prefill_workspace(kernel_path, monkeypatch):
    """reserve_prefill_workspace takes the tensor-core prefill's workspace for a step of N tokens
    (capped at KDA_SERVING_TC_WORKSPACE_MB) and the split state its planner may use at that size,
    so an engine's memory profile counts them; the next prefill of that size reuses them. Nothing
    is taken for the other kernels, and no split state for a windowed size."""
    from kda_serving.ops import _ext, tc_split
    dev = torch.device("cpu")
    _ext.TC_SCRATCH.clear(dev)
    tc_split.SPLIT_STATE.clear(dev)
    monkeypatch.setenv("KDA_SERVING_PREFILL_KERNEL", "serial")
    assert ops.reserve_prefill_workspace(4096, 4, dev) == 0 and _ext.TC_SCRATCH.current(dev) is None
    monkeypatch.delenv("KDA_SERVING_PREFILL_KERNEL")
    got = ops.reserve_prefill_workspace(4096, 4, dev)
    split = tc_split.split_state_floats(4096 // (tc_split.SEGMENTS[0] * 64), 4) * 4
    assert got == _ext.tc_workspace_floats(4096, 1, 4) * 4 + split
    assert tc_split.SPLIT_STATE.current(dev).numel() * 4 == split
    ws = _ext.TC_SCRATCH.current(dev)
    assert _ext.tc_workspace(dev, _ext.tc_workspace_floats(4000, 3, 4)) is ws  # reused by a smaller call
    monkeypatch.setenv("KDA_SERVING_TC_WORKSPACE_MB", "1")
    _ext.TC_SCRATCH.clear(dev)
    tc_split.SPLIT_STATE.clear(dev)
    assert ops.reserve_prefill_workspace(1 << 20, 4, dev) == 1 << 20  # the cap; windowed: no split state
    assert tc_split.SPLIT_STATE.current(dev) is None
    _ext.TC_SCRATCH.clear(dev)


@pytest.mark.parametrize("segment", ["64", "128", "192"])
@pytest.mark.parametrize("pool_dtype,lb", [(torch.float32, None), (torch.bfloat16, -5.0)])
def test_tc_split_matches_fp64_and_unsplit(kernel_path, monkeypatch, segment, pool_dtype, lb):
    """The tensor-core kernel's in-kernel split (tc_split.py) on segments of 1, 2 and 3 chunks:
    sequences of one to eight segments, a partial last segment, an empty sequence, one shorter
    than a segment, a null slot and one without an initial state; outputs poisoned, untouched
    slots filled with 1e30. Against the fp64 gold and the unsplit call."""
    from kda_serving.ops import _ext
    monkeypatch.setenv("KDA_SERVING_PREFILL_KERNEL", "tc")
    torch.manual_seed(7)
    lens, H = [64 * 7 + 13, 0, 40, 64 * 3, 130, 64], 2
    N = len(lens)
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int64)
    inp = inputs(sum(lens), H)
    pool0 = torch.full((N + 2, H, D, D), 1e30, dtype=pool_dtype)
    pool0[1:N + 1] = torch.randn(N, H, D, D) * 0.3
    slots = torch.tensor([1, 2, 3, 4, 0, 6], dtype=torch.int32)
    has = torch.tensor([True, True, False, True, True, True])
    calls = []
    real = _ext.prefill_tc_split
    monkeypatch.setattr(_ext, "prefill_tc_split", lambda *a, **kw: calls.append(kw["segment_chunks"]) or real(*a, **kw))
    outs, pools = {}, {}
    for split in ("0", segment):
        monkeypatch.setenv("KDA_SERVING_PREFILL_SPLIT", split)
        pool = pool0.clone()
        out = torch.full((sum(lens), H, D), float("nan")).bfloat16()
        ops.kda_prefill(*inp, cu_seqlens=cu, state_pool=pool, slots=slots, has_initial_state=has, lower_bound=lb,
                        out=out)
        outs[split], pools[split] = out, pool
    assert calls == [int(segment) // 64]
    init = torch.where((has & (slots > 0))[:, None, None, None], pool0[slots.clamp(min=0).long()].float(), 0.0)
    ro, rs = naive_kda(*inp, cu_seqlens=cu, initial_state=init.double(), lower_bound=lb)
    out, pool = outs[segment], pools[segment]
    check_per_sequence(out, pool, slots, cu, ro, rs, unsplit=outs["0"])
    assert torch.equal(pool[[0, 5, 7]], pool0[[0, 5, 7]])


def test_tc_windows_split_long_pieces(kernel_path, monkeypatch):
    """Over the workspace limit the tensor-core kernel runs token windows, and a window holding a
    long piece splits it like an unwindowed call (forced here): same results as one unsplit call."""
    from kda_serving.ops import _ext
    monkeypatch.setenv("KDA_SERVING_PREFILL_KERNEL", "tc")
    torch.manual_seed(9)
    lens, H = [64 * 9 + 5, 30, 64 * 4], 2
    N = len(lens)
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    inp = inputs(sum(lens), H)
    pool0 = torch.full((N + 2, H, D, D), 1e30)
    pool0[1:N + 1] = torch.randn(N, H, D, D) * 0.3
    slots = torch.tensor([1, 2, 3], dtype=torch.int32)
    has = torch.tensor([True, False, True])
    record_mb = 4 * H * _ext.TC_RECORD_FLOATS / (1 << 20)
    calls = []
    real = _ext.prefill_tc_split
    monkeypatch.setattr(_ext, "prefill_tc_split", lambda *a, **kw: calls.append(kw["bounds"]) or real(*a, **kw))
    results = []
    for split, limit in (("0", None), ("64", 6 * record_mb)):
        monkeypatch.setenv("KDA_SERVING_PREFILL_SPLIT", split)
        if limit is None:
            monkeypatch.delenv("KDA_SERVING_TC_WORKSPACE_MB", raising=False)
        else:
            monkeypatch.setenv("KDA_SERVING_TC_WORKSPACE_MB", str(limit))
        pool = pool0.clone()
        out = torch.full((sum(lens), H, D), float("nan")).bfloat16()
        ops.kda_prefill(*inp, cu_seqlens=cu, state_pool=pool, slots=slots, has_initial_state=has, out=out)
        results.append((out, pool))
    assert len(calls) >= 2 and all(b[-1] - b[0] <= 6 * 64 for b in calls), calls  # one per window with a split
    (o1, p1), (o2, p2) = results
    init = torch.where(has[:, None, None, None], pool0[1:N + 1], 0.0)
    ro, rs = naive_kda(*inp, cu_seqlens=cu, initial_state=init.double())
    check_per_sequence(o2, p2, slots, cu, ro, rs, unsplit=o1)
    assert rel_rms(p2[1:N + 1], p1[1:N + 1]) <= 2e-3
    assert torch.equal(p2[[0, N + 1]], pool0[[0, N + 1]])
