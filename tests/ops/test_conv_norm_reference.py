"""Causal conv1d (prefill, update, speculative layout) and the gated RMSNorm."""

import torch
import torch.nn.functional as F

from kda_serving import ops
from tests.ops.helpers import cu_from_lens


def direct_conv(x, w, b, hist):
    """SiLU(depthwise causal conv) of x [L, D] after history rows hist [W-1, D], via F.conv1d."""
    full = torch.cat([hist, x]).t()[None]
    return F.silu(F.conv1d(full, w[:, None, :], b, groups=w.shape[0]))[0].t()


def test_conv_prefill_matches_conv1d_and_stores_history():
    D, W = 12, 4
    lens = [0, 1, 2, 9]
    x = torch.randn(sum(lens), D)
    w, b = torch.randn(D, W), torch.randn(D)
    pool = torch.randn(6, W - 1, D)
    before = pool.clone()
    slots = torch.tensor([1, 2, 3, 5], dtype=torch.int32)
    has_init = torch.tensor([True, False, True, True])
    out = torch.full_like(x, float("nan"))
    ops.causal_conv1d_prefill(x, w, b, cu_seqlens=cu_from_lens(lens), conv_pool=pool, slots=slots,
                              has_initial_state=has_init, out=out)
    a = 0
    for n, L in enumerate(lens):
        s = int(slots[n])
        hist = before[s] if has_init[n] else torch.zeros(W - 1, D)
        if L:
            assert torch.allclose(out[a:a + L], direct_conv(x[a:a + L], w, b, hist), atol=1e-5)
        assert torch.equal(pool[s], torch.cat([hist, x[a:a + L]])[-(W - 1):])
        a += L
    assert torch.equal(pool[[0, 4]], before[[0, 4]])


def test_prefill_then_updates_equal_one_prefill():
    D, W, L, k = 8, 4, 11, 3
    x = torch.randn(L, D)
    w = torch.randn(D, W)
    one = torch.zeros(2, W - 1, D)
    full = ops.causal_conv1d_prefill(x, w, cu_seqlens=cu_from_lens([L]), conv_pool=one,
                                     slots=torch.tensor([1]))
    pool = torch.zeros(2, W - 1, D)
    head = ops.causal_conv1d_prefill(x[:L - k], w, cu_seqlens=cu_from_lens([L - k]), conv_pool=pool,
                                     slots=torch.tensor([1]))
    tail = [ops.causal_conv1d_update(x[t][None, None], w, conv_pool=pool, slots=torch.tensor([1]))[0, 0]
            for t in range(L - k, L)]
    assert torch.allclose(torch.cat([head, torch.stack(tail)]), full, atol=1e-6)
    assert torch.equal(pool[1], one[1])


def test_speculative_conv_layout_follows_accepted_tokens():
    """Verify T tokens, accept a, then the next window starts after the a-th accepted token."""
    D, W, s = 6, 4, 2
    R, T = W - 1 + s, 1 + s
    w = torch.randn(D, W)
    stream = torch.randn(20, D)
    pool = torch.zeros(2, R, D)
    ops.causal_conv1d_prefill(stream[:5], w, cu_seqlens=cu_from_lens([5]), conv_pool=pool,
                              slots=torch.tensor([1]))
    pos, accepted = 5, 1
    for a in (2, 3, 1, 3):
        drafts = torch.cat([stream[pos:pos + a], torch.randn(T - a, D)])   # rejected drafts are junk
        out = ops.causal_conv1d_update(drafts[None], w, conv_pool=pool, slots=torch.tensor([1]),
                                       num_accepted_tokens=torch.tensor([accepted]))[0]
        ref = direct_conv(stream[pos:pos + a], w, None, stream[pos - (W - 1):pos])
        assert torch.allclose(out[:a], ref, atol=1e-5)
        pos, accepted = pos + a, a


def test_gated_rms_norm_formula():
    x, gate, w = torch.randn(5, 3, 16), torch.randn(5, 3, 16), torch.randn(16)
    y = ops.gated_rms_norm(x, gate, w, eps=1e-5)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w * torch.sigmoid(gate)
    assert torch.allclose(y, ref, atol=1e-6)


def test_plain_updates_use_the_history_rows_of_a_wider_pool():
    """With R > W-1 (pools sized for speculative decoding) plain steps keep rows [0, W-1)."""
    D, W, R, L = 6, 4, 6, 9
    x = torch.randn(L + 2, D)
    w = torch.randn(D, W)
    pool = torch.randn(2, R, D)
    tail_before = pool[1, W - 1:].clone()
    ops.causal_conv1d_prefill(x[:L], w, cu_seqlens=cu_from_lens([L]), conv_pool=pool, slots=torch.tensor([1]))
    for t in (L, L + 1):
        y = ops.causal_conv1d_update(x[t][None, None], w, conv_pool=pool, slots=torch.tensor([1]))[0, 0]
        assert torch.allclose(y, direct_conv(x[t:t + 1], w, None, x[t - (W - 1):t])[0], atol=1e-5)
    assert torch.equal(pool[1, :W - 1], x[L + 2 - (W - 1):L + 2])
    assert torch.equal(pool[1, W - 1:], tail_before)


def test_speculative_row_with_fewer_tokens_than_drafts():
    """T < 1+s: rows [0, W-2+T) become window[1:] ++ x, as vLLM lays them out."""
    D, W, s = 4, 4, 3
    R = W - 1 + s
    w = torch.randn(D, W)
    pool = torch.randn(2, R, D)
    old = pool[1].clone()
    x = torch.randn(1, 2, D)
    off = 2
    ops.causal_conv1d_update(x, w, conv_pool=pool, slots=torch.tensor([1]),
                             num_accepted_tokens=torch.tensor([off + 1]))
    window = old[off:off + W - 1]
    assert torch.equal(pool[1, :W], torch.cat([window[1:], x[0]]))
    assert torch.equal(pool[1, W:], old[W:])
