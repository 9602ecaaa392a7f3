"""The chunked torch KDA against the fp64 gold, on the state-pool contract."""

import math

import pytest
import torch

from kda_serving import ops
from kda_serving.ops.naive import naive_kda
from tests.conftest import rel_rms
from tests.ops.helpers import cu_from_lens, kda_inputs

G_MODES = [-8, -4, 0, 8, "uniform", "normal"]
DT_MODES = [4, -4, 8, -8, "uniform", "normal"]


def run_prefill(inp, lens, lb=None, pool_dtype=torch.float32, has_init=None, cu_dtype=torch.int32):
    q, k, v, g, beta, A_log, dt = inp
    N, H, K = len(lens), q.shape[1], q.shape[2]
    pool = torch.randn(N + 3, H, K, K).to(pool_dtype)
    slots = torch.arange(2, N + 2, dtype=torch.int32)
    has_init = torch.rand(N) < 0.5 if has_init is None else has_init
    init = pool[slots.long()].double()
    init[~has_init] = 0
    before = pool.clone()
    out = torch.full((q.shape[0], H, K), float("nan"), dtype=q.dtype)
    ops.kda_prefill(q, k, v, g, beta, A_log, dt, cu_seqlens=cu_from_lens(lens, cu_dtype),
                    state_pool=pool, slots=slots, has_initial_state=has_init, lower_bound=lb, out=out)
    ref_o, ref_s = naive_kda(q, k, v, g, beta, A_log, dt, cu_seqlens=cu_from_lens(lens),
                             initial_state=init, lower_bound=lb)
    return out, pool, before, slots, ref_o, ref_s


@pytest.mark.parametrize("lb", [None, -5.0])
@pytest.mark.parametrize("g_mode", G_MODES)
@pytest.mark.parametrize("dt_mode", DT_MODES)
def test_chunked_matches_fp64_over_gate_sweep(lb, g_mode, dt_mode):
    inp = kda_inputs(40, 2, 32, g_mode=g_mode, dt_mode=dt_mode)
    out, pool, before, slots, ref_o, ref_s = run_prefill(inp, [40], lb)
    assert rel_rms(out, ref_o) <= 1e-5
    assert rel_rms(pool[slots.long()], ref_s) <= 1e-5


@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
def test_varlen_with_empty_and_long_sequences(cu_dtype):
    lens = [0, 1, 15, 16, 0, 17, 2100]
    inp = kda_inputs(sum(lens), 1, 32)
    out, pool, before, slots, ref_o, ref_s = run_prefill(inp, lens, cu_dtype=cu_dtype)
    assert rel_rms(out, ref_o) <= 1e-5
    assert rel_rms(pool[slots.long()], ref_s) <= 1e-5
    # slots outside the call are untouched, bit for bit
    others = [s for s in range(pool.shape[0]) if s not in slots.tolist()]
    assert torch.equal(pool[others], before[others])


@pytest.mark.parametrize("lb", [None, -5.0])
def test_adversarial_inputs_stay_finite_and_accurate(lb):
    T, H, K = 96, 2, 32
    q, k, v, g, beta, A_log, dt = kda_inputs(T, H, K)
    k[10:74] = k[10]                                   # 64 identical consecutive keys
    base = torch.randn(H, K)
    k[80:] = base + 0.07 * torch.randn(T - 80, H, K)   # near-collinear keys (cosine ~0.99)
    g[::5] = 30.0
    g[2::7] = -30.0                                    # gate spikes both ways
    beta[::3] = 30.0
    A_log = torch.full((H,), math.log(16.0))
    out, pool, _, slots, ref_o, ref_s = run_prefill((q, k, v, g, beta, A_log, dt), [T], lb)
    assert torch.isfinite(out).all() and torch.isfinite(pool).all()
    assert rel_rms(out, ref_o) <= 1e-5
    assert rel_rms(pool[slots.long()], ref_s) <= 1e-5


def test_bf16_pool_and_inputs():
    lens = [33, 70]
    inp = kda_inputs(sum(lens), 2, 32, dtype=torch.bfloat16)
    out, pool, _, slots, ref_o, ref_s = run_prefill(inp, lens, pool_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert rel_rms(out, ref_o) <= 5e-3
    assert rel_rms(pool[slots.long()], ref_s) <= 5e-3


def test_null_slots_give_zero_output_and_touch_nothing():
    lens = [5, 7, 9]
    q, k, v, g, beta, A_log, dt = kda_inputs(sum(lens), 2, 32)
    pool = torch.full((4, 2, 32, 32), 1e30)
    before = pool.clone()
    slots = torch.tensor([0, 2, -1], dtype=torch.int32)
    out = torch.full((sum(lens), 2, 32), float("nan"))
    ops.kda_prefill(q, k, v, g, beta, A_log, dt, cu_seqlens=cu_from_lens(lens), state_pool=pool,
                    slots=slots, has_initial_state=torch.tensor([True, False, True]), out=out)
    assert torch.equal(out[:5], torch.zeros_like(out[:5]))
    assert torch.equal(out[12:], torch.zeros_like(out[12:]))
    assert torch.isfinite(out[5:12]).all()
    for s in (0, 1, 3):
        assert torch.equal(pool[s], before[s])


def test_intermediate_states_every_64_tokens():
    lens = [150, 40, 128]
    q, k, v, g, beta, A_log, dt = kda_inputs(sum(lens), 1, 32)
    pool = torch.zeros(5, 1, 32, 32)
    slots = torch.tensor([1, 2, 3], dtype=torch.int32)
    inter = torch.full((4, 1, 32, 32), float("nan"))
    offsets = torch.tensor([0, 2, 2])
    ops.kda_prefill(q, k, v, g, beta, A_log, dt, cu_seqlens=cu_from_lens(lens), state_pool=pool,
                    slots=slots, intermediate_states=inter, intermediate_offsets=offsets)
    _, _, ck = naive_kda(q, k, v, g, beta, A_log, dt, cu_seqlens=cu_from_lens(lens), checkpoint_every=64)
    assert rel_rms(inter[0:2], ck[0]) <= 1e-5
    assert rel_rms(inter[2:4], ck[2]) <= 1e-5


def test_prefill_then_decodes_equals_longer_prefill():
    T, kdec, H, K = 50, 4, 2, 32
    q, k, v, g, beta, A_log, dt = kda_inputs(T, H, K)
    pool = torch.zeros(3, H, K, K)
    slot = torch.tensor([1], dtype=torch.int32)
    head = ops.kda_prefill(q[:-kdec], k[:-kdec], v[:-kdec], g[:-kdec], beta[:-kdec], A_log, dt,
                           cu_seqlens=cu_from_lens([T - kdec]), state_pool=pool, slots=slot)
    tail = [ops.kda_decode(q[t][None, None], k[t][None, None], v[t][None, None], g[t][None, None],
                           beta[t][None, None], A_log, dt, state_pool=pool, slots=slot)[0, 0]
            for t in range(T - kdec, T)]
    ref_o, ref_s = naive_kda(q, k, v, g, beta, A_log, dt, cu_seqlens=cu_from_lens([T]))
    assert rel_rms(torch.cat([head, torch.stack(tail)]), ref_o) <= 1e-5
    assert rel_rms(pool[1:2], ref_s) <= 1e-5
