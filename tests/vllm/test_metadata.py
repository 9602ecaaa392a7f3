"""GDNAttentionMetadata → KDABatch translation, checked against running the ops per request."""

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
from vllm.v1.attention.backends.gdn_attn import GDNAttentionMetadata  # noqa: E402

from kda_serving import ops  # noqa: E402
from kda_serving.backend import KDALayerParams  # noqa: E402
from kda_serving.integrations.vllm.metadata import PlanCache, plan_from_gdn_metadata  # noqa: E402
from kda_serving.integrations.vllm.step import run_step  # noqa: E402

H, D, W = 2, 16, 4
P = H * D
SLOTS = 12


def make_params():
    return KDALayerParams(num_heads=H, head_dim=D, conv_weight=torch.randn(3 * P, W) * 0.3, conv_bias=None,
                          A_log=torch.rand(H) * 2, dt_bias=torch.randn(P) * 0.5,
                          norm_weight=torch.rand(D) + 0.5, norm_eps=1e-5)


def make_pools(num_spec=0):
    conv = torch.randn(SLOTS, W - 1 + num_spec, 3 * P)
    state = torch.randn(SLOTS, H, D, D) * 0.1
    return conv, state


def make_inputs(n):
    return (torch.randn(n, 3 * P), torch.randn(n, H, D), torch.randn(n, H), torch.randn(n, H, D))


def qkv(x):
    return tuple(x[..., i * P:(i + 1) * P].unflatten(-1, (H, D)) for i in range(3))


def conv_by_hand(params, hist, x):
    """SiLU(depthwise causal conv) of x [T, C] after history rows hist [W-1, C], in fp32."""
    full = torch.cat([hist, x]).float()
    w = params.conv_weight.float()
    y = sum(full[j:j + x.shape[0]] * w[:, j] for j in range(W))
    return torch.nn.functional.silu(y)


def oracle_request(params, x, g, b, gate, conv, state, *, kind, slot, has_init=True, slots_row=None,
                   accepted=None):
    """One request alone with vLLM's semantics. kind: 'prefill', 'decode' or 'verify'.

    Plain decode and prefill keep conv history in rows [0, W-1); a verify row reads its window
    at row accepted-1, leaves window[1:] ++ x at rows [0, W-2+T) and writes the state after
    token t to slots_row[t], starting from slots_row[accepted-1].
    """
    common = dict(lower_bound=None, scale=None)
    if slot <= 0:
        return torch.zeros_like(gate)
    T = x.shape[0]
    if kind == "verify":
        c0 = int(slots_row[0])
        window = conv[c0, accepted - 1:accepted - 1 + W - 1].clone()
        y = conv_by_hand(params, window, x)
        conv[c0, :W - 2 + T] = torch.cat([window[1:], x])
        tmp = torch.zeros(2, H, D, D)
        tmp[1] = state[int(slots_row[accepted - 1])]
        q, k, v = qkv(y)
        outs = []
        for t in range(T):
            outs.append(ops.kda_decode(q[t][None, None], k[t][None, None], v[t][None, None], g[t][None, None],
                                       b[t][None, None], params.A_log, params.dt_bias, state_pool=tmp,
                                       slots=torch.tensor([1], dtype=torch.int32), **common)[0, 0])
            state[int(slots_row[t])] = tmp[1]
        o = torch.stack(outs)
    else:
        hist = conv[slot, :W - 1].clone() if (kind == "decode" or has_init) else torch.zeros(W - 1, 3 * P)
        y = conv_by_hand(params, hist, x)
        conv[slot, :W - 1] = torch.cat([hist, x])[-(W - 1):]
        tmp = torch.zeros(2, H, D, D)
        if kind == "decode" or has_init:
            tmp[1] = state[slot]
        q, k, v = qkv(y)
        cu = torch.tensor([0, T], dtype=torch.int32)
        o = ops.kda_prefill(q, k, v, g, b, params.A_log, params.dt_bias, cu_seqlens=cu, state_pool=tmp,
                            slots=torch.tensor([1], dtype=torch.int32), has_initial_state=torch.tensor([True]),
                            **common)
        state[slot] = tmp[1]
    return ops.gated_rms_norm(o, gate, params.norm_weight, params.norm_eps)


def metadata(**kw):
    base = dict(num_prefills=0, num_prefill_tokens=0, num_decodes=0, num_decode_tokens=0, num_spec_decodes=0,
                num_spec_decode_tokens=0)
    base.update(kw)
    return GDNAttentionMetadata(**base)


def i32(v):
    return torch.tensor(v, dtype=torch.int32)


def run_and_compare(m, requests, n_tokens, num_spec=0, dim_first=False):
    """requests: list of dicts (token index list + oracle kwargs); compares outputs and pools.

    dim_first: the conv pool is stored [slots, 3P, R] (vLLM's DS layout) and seen through a
    transposed view, as the layer does.
    """
    params = make_params()
    conv, state = make_pools(num_spec)
    if dim_first:
        conv = conv.transpose(1, 2).contiguous().transpose(1, 2)
    conv_ref, state_ref = conv.clone(), state.clone()
    x, g, b, gate = make_inputs(n_tokens)
    out = torch.full((n_tokens, H, D), float("nan"))
    plan = plan_from_gdn_metadata(m, num_spec)
    run_step(plan, params, x, g, b, gate, conv, state, out)
    expect = torch.zeros(n_tokens, H, D)
    covered = {t for r in requests for t in r["tokens"]}
    for r in requests:
        idx = torch.tensor(r.pop("tokens"))
        expect[idx] = oracle_request(params, x[idx], g[idx], b[idx], gate[idx], conv_ref, state_ref, **r)
    torch.testing.assert_close(out, expect, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(state, state_ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(conv, conv_ref, atol=0, rtol=0)
    for i in set(range(n_tokens)) - covered:
        assert bool((out[i] == 0).all()), f"padding row {i} not zeroed"
    return plan


def test_decode_only_with_padding_rows():
    # 3 decode rows (one padded with slot 0, one with PAD -1) and 2 padding tokens at the end
    m = metadata(num_decodes=4, num_decode_tokens=4, num_actual_tokens=6,
                 non_spec_query_start_loc=i32([0, 1, 2, 3, 4]), non_spec_state_indices_tensor=i32([5, 0, 2, -1]))
    plan = run_and_compare(m, [
        dict(tokens=[0], kind="decode", slot=5), dict(tokens=[1], kind="decode", slot=0),
        dict(tokens=[2], kind="decode", slot=2), dict(tokens=[3], kind="decode", slot=-1)], 6)
    assert plan.batch.num_decodes == 4 and plan.batch.num_prefills == 0


def test_prefill_only_with_and_without_initial_state():
    m = metadata(num_prefills=3, num_prefill_tokens=40, num_actual_tokens=42,
                 non_spec_query_start_loc=i32([0, 17, 18, 40, 40]), non_spec_state_indices_tensor=i32([3, 7, 9, 0]),
                 has_initial_state=torch.tensor([False, True, True, False]))
    run_and_compare(m, [
        dict(tokens=list(range(0, 17)), kind="prefill", slot=3, has_init=False),
        dict(tokens=[17], kind="prefill", slot=7, has_init=True),
        dict(tokens=list(range(18, 40)), kind="prefill", slot=9, has_init=True)], 42)


@pytest.mark.parametrize("dim_first", [False, True])
def test_mixed_decode_and_chunked_prefill(dim_first):
    # decodes first (vLLM's reorder), then a first chunk and a continuation chunk
    m = metadata(num_decodes=2, num_decode_tokens=2, num_prefills=2, num_prefill_tokens=30, num_actual_tokens=32,
                 non_spec_query_start_loc=i32([0, 1, 2, 22, 32]), non_spec_state_indices_tensor=i32([4, 1, 6, 8]),
                 has_initial_state=torch.tensor([True, True, False, True]))
    plan = run_and_compare(m, [
        dict(tokens=[0], kind="decode", slot=4), dict(tokens=[1], kind="decode", slot=1),
        dict(tokens=list(range(2, 22)), kind="prefill", slot=6, has_init=False),
        dict(tokens=list(range(22, 32)), kind="prefill", slot=8, has_init=True)], 32, dim_first=dim_first)
    assert plan.batch.num_decodes == 2 and plan.batch.prefill_cu_seqlens.tolist() == [0, 20, 30]


def test_spec_only_verify_rows():
    ns = 2
    spec_slots = i32([[2, 3, 4], [6, 7, 8]])
    m = metadata(num_spec_decodes=2, num_spec_decode_tokens=6, num_actual_tokens=6,
                 spec_query_start_loc=i32([0, 3, 6]), spec_state_indices_tensor=spec_slots,
                 spec_sequence_masks=torch.tensor([True, True]), spec_token_indx=torch.arange(6, dtype=torch.int32),
                 non_spec_token_indx=torch.zeros(0, dtype=torch.int32), num_accepted_tokens=i32([1, 3]))
    run_and_compare(m, [
        dict(tokens=[0, 1, 2], kind="verify", slot=2, slots_row=spec_slots[0], accepted=1),
        dict(tokens=[3, 4, 5], kind="verify", slot=6, slots_row=spec_slots[1], accepted=3)], 6, num_spec=ns)


@pytest.mark.parametrize("dim_first", [False, True])
def test_spec_mixed_with_prefill_and_token_permutation(dim_first):
    # token order: [prefill 0..4 | verify row (5,6,7) | 1-token prefill (8) | verify row (9,10,11)]
    ns = 2
    spec_slots = i32([[2, 3, 4], [9, 10, 11]])
    spec_idx = i32([5, 6, 7, 9, 10, 11])
    non_spec_idx = i32([0, 1, 2, 3, 4, 8])
    m = metadata(num_prefills=2, num_prefill_tokens=6, num_spec_decodes=2, num_spec_decode_tokens=6,
                 num_actual_tokens=13, spec_query_start_loc=i32([0, 3, 6]), spec_state_indices_tensor=spec_slots,
                 spec_sequence_masks=torch.tensor([False, True, False, True]), spec_token_indx=spec_idx,
                 non_spec_token_indx=non_spec_idx, num_accepted_tokens=i32([2, 1]),
                 non_spec_query_start_loc=i32([0, 5, 6]), non_spec_state_indices_tensor=i32([5, 6]),
                 has_initial_state=torch.tensor([False, True]))
    plan = run_and_compare(m, [
        dict(tokens=[0, 1, 2, 3, 4], kind="prefill", slot=5, has_init=False),
        dict(tokens=[5, 6, 7], kind="verify", slot=2, slots_row=spec_slots[0], accepted=2),
        dict(tokens=[8], kind="prefill", slot=6, has_init=True),
        dict(tokens=[9, 10, 11], kind="verify", slot=9, slots_row=spec_slots[1], accepted=1)], 13, num_spec=ns,
        dim_first=dim_first)
    assert plan.token_order.tolist() == [0, 1, 2, 3, 4, 8]
    assert plan.verify[0].token_index.tolist() == [5, 6, 7, 9, 10, 11]


def test_plan_is_cached_per_metadata_object():
    m = metadata(num_decodes=1, num_decode_tokens=1, num_actual_tokens=1,
                 non_spec_query_start_loc=i32([0, 1]), non_spec_state_indices_tensor=i32([3]))
    cache = PlanCache()
    p1 = cache.get(m, 0)
    assert cache.get(m, 0) is p1
    m2 = metadata(num_decodes=1, num_decode_tokens=1, num_actual_tokens=1,
                  non_spec_query_start_loc=i32([0, 1]), non_spec_state_indices_tensor=i32([4]))
    assert cache.get(m2, 0) is not p1


def test_ragged_verify_rows_and_padding_row():
    # rows that drafted fewer tokens (1 and 2 of up to 3), one accepting more than it now sends,
    # and a padding row with null slots
    ns = 2
    spec_slots = i32([[2, 3, 4], [6, 7, 8], [0, 0, 0], [9, 10, 11]])
    m = metadata(num_spec_decodes=4, num_spec_decode_tokens=6, num_actual_tokens=7,
                 spec_query_start_loc=i32([0, 1, 3, 3, 6]), spec_state_indices_tensor=spec_slots,
                 spec_sequence_masks=torch.tensor([True, True, True, True]),
                 spec_token_indx=torch.arange(6, dtype=torch.int32),
                 non_spec_token_indx=torch.zeros(0, dtype=torch.int32), num_accepted_tokens=i32([3, 1, 1, 2]))
    plan = run_and_compare(m, [
        dict(tokens=[0], kind="verify", slot=2, slots_row=spec_slots[0], accepted=3),
        dict(tokens=[1, 2], kind="verify", slot=6, slots_row=spec_slots[1], accepted=1),
        dict(tokens=[3, 4, 5], kind="verify", slot=9, slots_row=spec_slots[3], accepted=2)], 7, num_spec=ns)
    assert sorted(g.length for g in plan.verify) == [1, 2, 3]


def test_plain_rows_use_only_the_history_rows_when_spec_is_configured():
    # with speculative decoding configured the conv pool has W-1+num_spec rows; a step without
    # verify rows must only touch rows [0, W-1)
    m = metadata(num_decodes=1, num_decode_tokens=1, num_prefills=1, num_prefill_tokens=9, num_actual_tokens=10,
                 non_spec_query_start_loc=i32([0, 1, 10]), non_spec_state_indices_tensor=i32([4, 7]),
                 has_initial_state=torch.tensor([True, True]))
    run_and_compare(m, [dict(tokens=[0], kind="decode", slot=4),
                        dict(tokens=list(range(1, 10)), kind="prefill", slot=7, has_init=True)], 10, num_spec=3)


def test_host_offsets_of_mixed_and_speculative_steps():
    from types import SimpleNamespace

    from kda_serving.integrations.vllm.host_lengths import non_spec_qsl_cpu
    common = SimpleNamespace(query_start_loc_cpu=i32([0, 3, 4, 10, 13]))
    plain = metadata(num_actual_tokens=13, non_spec_query_start_loc=i32([0, 3, 4, 10, 13]))
    assert non_spec_qsl_cpu(plain, common).tolist() == [0, 3, 4, 10, 13]
    masks = torch.tensor([True, False, False, True])
    spec = metadata(num_actual_tokens=13, spec_sequence_masks=masks, spec_sequence_masks_cpu=masks)
    assert non_spec_qsl_cpu(spec, common).tolist() == [0, 1, 7]
    # masks that do not fit the offsets, or no host offsets at all: nothing is guessed
    bad = metadata(num_actual_tokens=13, spec_sequence_masks=masks, spec_sequence_masks_cpu=masks[:3])
    assert non_spec_qsl_cpu(bad, common) is None
    assert non_spec_qsl_cpu(plain, SimpleNamespace()) is None


def test_install_wraps_the_gdn_builder_once():
    from vllm.v1.attention.backends.gdn_attn import GDNAttentionMetadataBuilder

    from kda_serving.integrations.vllm.host_lengths import install
    assert install()
    wrapped = GDNAttentionMetadataBuilder.build
    assert install() and GDNAttentionMetadataBuilder.build is wrapped


@pytest.mark.parametrize("spec", [False, True])
def test_host_offsets_reach_the_prefill_batch_and_long_prompts_split_exactly(monkeypatch, spec):
    # one decode (or verify row) and two prefills of 150 and 70 tokens; with the host offsets
    # attached, a forced 64-token segment splits both prefills and must not change anything
    from kda_serving.integrations.vllm.host_lengths import ATTR
    from kda_serving.ops import split_prefill as split_mod
    calls = []
    real = split_mod.split_prefill
    monkeypatch.setattr(split_mod, "split_prefill", lambda *a, **k: calls.append(k["bounds"]) or real(*a, **k))
    real_step = run_step

    def split_step(*a, **k):  # the forced segment for the step only; the oracle runs unsplit
        with monkeypatch.context() as mp:
            mp.setenv("KDA_SERVING_PREFILL_SPLIT", "64")
            return real_step(*a, **k)

    monkeypatch.setitem(globals(), "run_step", split_step)
    if not spec:
        m = metadata(num_decodes=1, num_decode_tokens=1, num_prefills=2, num_prefill_tokens=220, num_actual_tokens=221,
                     non_spec_query_start_loc=i32([0, 1, 151, 221]), non_spec_state_indices_tensor=i32([4, 6, 8]),
                     has_initial_state=torch.tensor([True, False, True]))
        setattr(m, ATTR, i32([0, 1, 151, 221]))
        reqs = [dict(tokens=[0], kind="decode", slot=4),
                dict(tokens=list(range(1, 151)), kind="prefill", slot=6, has_init=False),
                dict(tokens=list(range(151, 221)), kind="prefill", slot=8, has_init=True)]
        n, ns = 221, 0
    else:
        spec_slots = i32([[2, 3, 4]])
        m = metadata(num_prefills=2, num_prefill_tokens=220, num_spec_decodes=1, num_spec_decode_tokens=3,
                     num_actual_tokens=223, spec_query_start_loc=i32([0, 3]), spec_state_indices_tensor=spec_slots,
                     spec_sequence_masks=torch.tensor([True, False, False]), spec_token_indx=i32([0, 1, 2]),
                     non_spec_token_indx=torch.arange(3, 223, dtype=torch.int32), num_accepted_tokens=i32([2]),
                     non_spec_query_start_loc=i32([0, 150, 220]), non_spec_state_indices_tensor=i32([6, 8]),
                     has_initial_state=torch.tensor([False, True]))
        setattr(m, ATTR, i32([0, 150, 220]))
        reqs = [dict(tokens=[0, 1, 2], kind="verify", slot=2, slots_row=spec_slots[0], accepted=2),
                dict(tokens=list(range(3, 153)), kind="prefill", slot=6, has_init=False),
                dict(tokens=list(range(153, 223)), kind="prefill", slot=8, has_init=True)]
        n, ns = 223, 2
    plan = run_and_compare(m, reqs, n, num_spec=ns)
    assert plan.batch.prefill_cu_seqlens_cpu.tolist() == plan.batch.prefill_cu_seqlens.tolist() == [0, 150, 220]
    assert calls == [[0, 150, 220]]
