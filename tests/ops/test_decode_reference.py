"""Decode and speculative verify on the pool, against sequential decodes and the fp64 gold."""

import pytest
import torch

from kda_serving import ops
from kda_serving.ops.naive import naive_kda
from tests.conftest import rel_rms
from tests.ops.helpers import cu_from_lens, kda_inputs


@pytest.mark.parametrize("lb", [None, -5.0])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_gold(lb, pool_dtype):
    B, H, K = 5, 2, 32
    q, k, v, g, beta, A_log, dt = kda_inputs(1, H, K, lead=(B,))
    pool = torch.randn(B + 2, H, K, K).to(pool_dtype)
    slots = torch.tensor([3, 1, 0, 6, -1], dtype=torch.int32)
    before = pool.clone()
    out = torch.full((B, 1, H, K), float("nan"))
    ops.kda_decode(q, k, v, g, beta, A_log, dt, state_pool=pool, slots=slots, lower_bound=lb, out=out)
    tol = 1e-5 if pool_dtype == torch.float32 else 5e-3
    for b, s in enumerate(slots.tolist()):
        if s <= 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
            continue
        ro, rs = naive_kda(q[b], k[b], v[b], g[b], beta[b], A_log, dt, cu_seqlens=cu_from_lens([1]),
                           initial_state=before[s][None], lower_bound=lb)
        assert rel_rms(out[b], ro) <= tol
        assert rel_rms(pool[s], rs[0]) <= tol
    for s in (2, 4, 5):
        assert torch.equal(pool[s], before[s])


def test_verify_equals_sequential_decodes():
    B, T, H, K = 3, 4, 2, 32
    q, k, v, g, beta, A_log, dt = kda_inputs(T, H, K, lead=(B,))
    pool = torch.full((20, H, K, K), 1e30)
    slots = torch.arange(1, 1 + B * T, dtype=torch.int32).view(B, T)
    accepted = torch.tensor([1, 3, 2], dtype=torch.int32)
    start = slots.gather(1, (accepted.long() - 1)[:, None]).squeeze(1)
    pool[start.long()] = torch.randn(B, H, K, K)
    seq_pool = pool.clone()
    before = pool.clone()
    out = torch.full((B, T, H, K), float("nan"))
    ops.kda_decode(q, k, v, g, beta, A_log, dt, state_pool=pool, slots=slots,
                   num_accepted_tokens=accepted, out=out)
    work = torch.tensor([19, 18, 17], dtype=torch.int32)
    seq_pool[work.long()] = seq_pool[start.long()]
    for t in range(T):
        o = ops.kda_decode(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1], beta[:, t:t + 1],
                           A_log, dt, state_pool=seq_pool, slots=work)
        assert rel_rms(out[:, t:t + 1], o) <= 1e-6
        assert rel_rms(pool[slots[:, t].long()], seq_pool[work.long()]) <= 1e-6
    assert torch.equal(pool[0], before[0]) and torch.equal(pool[13:], before[13:])


def test_verify_null_start_slot_is_skipped():
    q, k, v, g, beta, A_log, dt = kda_inputs(2, 1, 32, lead=(2,))
    pool = torch.full((6, 1, 32, 32), 1e30)
    before = pool.clone()
    slots = torch.tensor([[0, 0], [-1, -1]], dtype=torch.int32)
    out = ops.kda_decode(q, k, v, g, beta, A_log, dt, state_pool=pool, slots=slots,
                         num_accepted_tokens=torch.tensor([1, 2]))
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(pool, before)


def test_verify_row_shorter_than_its_slot_columns():
    """A row drafting fewer tokens (T=2) than last step accepted (3) starts from slots[n, 2]."""
    H, K = 1, 32
    q, k, v, g, beta, A_log, dt = kda_inputs(2, H, K, lead=(1,))
    pool = torch.full((6, H, K, K), 1e30)
    pool[3] = torch.randn(H, K, K)
    before = pool.clone()
    slots = torch.tensor([[1, 2, 3]], dtype=torch.int32)
    out = ops.kda_decode(q, k, v, g, beta, A_log, dt, state_pool=pool, slots=slots,
                         num_accepted_tokens=torch.tensor([3]))
    ref_o, ref_s = naive_kda(q[0], k[0], v[0], g[0], beta[0], A_log, dt, cu_seqlens=cu_from_lens([2]),
                             initial_state=before[3][None])
    assert rel_rms(out[0], ref_o) <= 1e-5
    assert rel_rms(pool[2], ref_s[0]) <= 1e-5          # state after the last token
    assert torch.equal(pool[3], before[3]) and torch.equal(pool[4:], before[4:])
