"""Our kernel class inside SGLang's dispatcher vs SGLang's own pure-torch KDA reference, on CPU fp32.

Extend (with and without radix-cache state tracking), packed and unpacked decode, and target
verify, over SGLang-layout pools ([layer, slot, H, V, K] fp32, the layer's view passed in) with
-1 padding rows. Outputs and scratch buffers are NaN-poisoned before each run; untouched pool cells
hold 1e30 and must stay bit-identical.
"""

import pytest

pytest.importorskip("sglang")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tests.conftest import rel_rms  # noqa: E402
from tests.sglang.helpers import (BIG, Layer, dispatcher, fill_slots, pick, same_bits,  # noqa: E402
                                  sglang_reference, sglang_verify_reference)

TOL = 1e-5
LAYER = 1  # KDA layer index into the [layer, slot, ...] pools


def _live_seqs(lens, slots):
    starts = [sum(lens[:i]) for i in range(len(lens))]
    live = [i for i, s in enumerate(slots) if s > 0]
    return starts, live


# ---------------------------------------------------------------------------------------- extend

EXTEND_CASES = {
    # lens, cache_indices (-1 = padding sequence), track_chunk_idx (-1 = not tracked)
    "mixed": ([130, 64, 7, 0, 70, 20], [3, 9, -1, 5, 2, 7], [2, 0, -1, -1, 1, -1]),
    "aligned_tail": ([128, 64, 65], [4, 1, 6], [1, -1, 1]),
}


@pytest.mark.parametrize("track", [False, True])
@pytest.mark.parametrize("case", sorted(EXTEND_CASES))
def test_extend_matches_sglang_reference(case, track):
    lens, slots, tchunk = EXTEND_CASES[case]
    L = Layer()
    H, K, V = L.H, L.K, L.V
    T, N = sum(lens), len(lens)
    pools = L.pools()
    fill_slots(pools[LAYER], slots)
    before = pools.clone()
    raw, a_raw, b_raw = L.tokens(T)
    qkv = F.silu(raw)                                  # the (identity) conv output SGLang's reference uses
    q, k, v = L.split(qkv)
    qsl = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(N)], dtype=torch.int32)
    ci = torch.tensor(slots, dtype=torch.int32)
    kw = {}
    track_state = None
    if track:
        track_state = torch.full((N, H, V, K), float("nan"))
        kw = dict(track_state=track_state, track_chunk_idx=torch.tensor(tchunk, dtype=torch.int32),
                  track_ssm_h_src=torch.zeros(1, dtype=torch.int64))
    ret = dispatcher().extend(q=q, k=k, v=v, g=a_raw.view(1, T, H, K), beta=b_raw.view(1, T, H),
                              ssm_states=pools[LAYER], cache_indices=ci, query_start_loc=qsl,
                              A_log=L.A_log, dt_bias=L.dt_bias, lower_bound=None, beta_is_raw=True,
                              extend_seq_lens_cpu=list(lens), extend_prefix_lens=None, layer_id=LAYER,
                              is_spec_decode=False, return_intermediate_states=track, **kw)
    if track:
        assert isinstance(ret, tuple) and len(ret) == 2
        out, h = ret
        NT = sum((n + 63) // 64 for n in lens)
        assert tuple(h.shape) == (1, NT, H, V, K)
    else:
        assert isinstance(ret, torch.Tensor)
        out = ret
    assert tuple(out.shape) == (1, T, H, V)

    starts, live = _live_seqs(lens, slots)
    lv = [lens[i] for i in live]
    st = [starts[i] for i in live]
    ref = sglang_reference(L, pick(raw, st, lv), pick(a_raw, st, lv), pick(b_raw, st, lv), lv,
                           [slots[i] for i in live], before[LAYER])
    assert rel_rms(pick(out[0], st, lv), ref.output[0]) <= TOL
    for i in range(N):  # padding sequences: zero output
        if slots[i] <= 0:
            assert torch.equal(out[0, starts[i]:starts[i] + lens[i]], torch.zeros(lens[i], H, V))
    live_slots = [slots[i] for i in live if lens[i] > 0]
    assert rel_rms(pools[LAYER][live_slots], ref.final_states[live_slots]) <= TOL
    touched = torch.zeros(pools.shape[:2], dtype=torch.bool)
    touched[LAYER, live_slots] = True
    assert same_bits(pools[~touched], before[~touched])     # other slots, slot 0, other layers

    if not track:
        return
    # per-chunk states h and the fp32 snapshot, against the reference run on 64*j-token prefixes
    boh = [sum((n + 63) // 64 for n in lens[:i]) for i in range(N)]
    for j in range(0, max(lens) // 64 + 1):
        idx = [i for i in live if 64 * j < lens[i]]
        if not idx:
            continue
        pl = [64 * j] * len(idx)
        pre = sglang_reference(L, pick(raw, [starts[i] for i in idx], pl), pick(a_raw, [starts[i] for i in idx], pl),
                               pick(b_raw, [starts[i] for i in idx], pl), pl, [slots[i] for i in idx], before[LAYER])
        for i in idx:
            want = pre.final_states[slots[i]]
            assert rel_rms(h[0, boh[i] + j], want) <= TOL
            if tchunk[i] == j:
                assert rel_rms(track_state[i], want) <= TOL
    for i in range(N):
        if not (slots[i] > 0 and 0 <= tchunk[i] and 64 * tchunk[i] < lens[i]):
            if slots[i] > 0:
                assert torch.isnan(track_state[i]).all()  # untracked rows are not written


@pytest.mark.parametrize("case", sorted(EXTEND_CASES))
def test_extend_passes_host_lengths_and_splits_long_sequences_exactly(case, monkeypatch):
    from kda_serving import ops
    from kda_serving.ops import split_prefill as split_mod
    seen, calls = [], []
    real_prefill, real_split = ops.kda_prefill, split_mod.split_prefill
    monkeypatch.setattr(ops, "kda_prefill", lambda *a, **k: seen.append(k.get("cu_seqlens_cpu")) or real_prefill(*a, **k))
    monkeypatch.setattr(split_mod, "split_prefill", lambda *a, **k: calls.append(k["bounds"]) or real_split(*a, **k))
    monkeypatch.setenv("KDA_SERVING_PREFILL_SPLIT", "64")
    test_extend_matches_sglang_reference(case, track=False)
    lens = EXTEND_CASES[case][0]
    bounds = [sum(lens[:i]) for i in range(len(lens) + 1)]
    assert [c.tolist() for c in seen] == [bounds] and calls == [bounds]


def test_host_lengths_only_when_they_describe_the_call():
    from kda_serving.integrations.sglang.kernel import _host_offsets
    assert _host_offsets({"extend_seq_lens_cpu": [3, 0, 5]}, 3, 8).tolist() == [0, 3, 3, 8]
    assert _host_offsets({"extend_seq_lens_cpu": torch.tensor([3, 5])}, 2, 9).tolist() == [0, 3, 8]
    for lens, n, t in (([3, 5], 3, 8), ([3, 6], 2, 8), ([3, -1], 2, 8)):
        assert _host_offsets({"extend_seq_lens_cpu": lens}, n, t) is None
    assert _host_offsets({"extend_seq_lens_cpu": None}, 2, 8) is None and _host_offsets({}, 2, 8) is None


def test_extend_then_decode_equals_longer_extend():
    """Chunked prefill continuation + decode steps on the same slot equal one reference pass."""
    L = Layer()
    H, K, V = L.H, L.K, L.V
    lens0, steps = [70, 33], 3
    slots = [5, 2]
    pools = L.pools()
    fill_slots(pools[LAYER], slots)
    before = pools.clone()
    raws = [L.tokens(n + steps) for n in lens0]
    d = dispatcher()
    # extend: the first lens0 tokens of each request
    raw = torch.cat([r[0][:n] for r, n in zip(raws, lens0)])
    a = torch.cat([r[1][:n] for r, n in zip(raws, lens0)])
    b = torch.cat([r[2][:n] for r, n in zip(raws, lens0)])
    q, k, v = L.split(F.silu(raw))
    T = raw.shape[0]
    ci = torch.tensor(slots, dtype=torch.int32)
    d.extend(q=q, k=k, v=v, g=a.view(1, T, H, K), beta=b.view(1, T, H), ssm_states=pools[LAYER], cache_indices=ci,
             query_start_loc=torch.tensor([0, lens0[0], T], dtype=torch.int32), A_log=L.A_log, dt_bias=L.dt_bias,
             beta_is_raw=True, extend_seq_lens_cpu=lens0, return_intermediate_states=False)
    outs = []
    for s in range(steps):
        raw_s = torch.stack([r[0][n + s] for r, n in zip(raws, lens0)])
        a_s = torch.stack([r[1][n + s] for r, n in zip(raws, lens0)])
        b_s = torch.stack([r[2][n + s] for r, n in zip(raws, lens0)])
        outs.append(d.packed_decode(mixed_qkv=F.silu(raw_s), a=a_s, b=b_s.unsqueeze(0), A_log=L.A_log,
                                    dt_bias=L.dt_bias, scale=K ** -0.5, ssm_states=pools[LAYER], cache_indices=ci,
                                    num_v_heads=H, head_v_dim=V, lower_bound=None)[0])
    full = [n + steps for n in lens0]
    ref = sglang_reference(L, torch.cat([r[0] for r in raws]), torch.cat([r[1] for r in raws]),
                           torch.cat([r[2] for r in raws]), full, slots, before[LAYER])
    ref_tail = torch.stack([ref.output[0, [full[0] - steps + s, full[0] + full[1] - steps + s]] for s in range(steps)])
    assert rel_rms(torch.stack(outs), ref_tail) <= TOL
    assert rel_rms(pools[LAYER][slots], ref.final_states[slots]) <= TOL


# ---------------------------------------------------------------------------------------- decode

@pytest.mark.parametrize("packed", [True, False])
def test_decode_matches_sglang_reference(packed):
    L = Layer()
    H, K, V = L.H, L.K, L.V
    slots = [4, -1, 7, 0, 1, -1]  # -1: CUDA-graph padding rows; 0: SGLang's eager dummy slot
    B = len(slots)
    pools = L.pools()
    fill_slots(pools[LAYER], slots)
    pools[LAYER, 0] = torch.randn(H, V, K)  # dummy slot holds garbage in SGLang
    before = pools.clone()
    raw, a_raw, b_raw = L.tokens(B)
    qkv = F.silu(raw)
    ci = torch.tensor(slots, dtype=torch.int32)
    d = dispatcher()
    if packed:
        out = d.packed_decode(mixed_qkv=qkv, a=a_raw, b=b_raw.unsqueeze(0), A_log=L.A_log, dt_bias=L.dt_bias,
                              scale=K ** -0.5, ssm_states=pools[LAYER], cache_indices=ci, num_v_heads=H,
                              head_v_dim=V, lower_bound=None, replayssm_d=None, replayssm_k=None, replayssm_g=None,
                              replayssm_write_pos=None, replayssm_force_flush=None)
    else:
        q, k, v = L.split(qkv)
        out = d.decode(q=q, k=k, v=v, a=a_raw, b=b_raw.unsqueeze(0), A_log=L.A_log, dt_bias=L.dt_bias,
                       ssm_states=pools[LAYER], cache_indices=ci,
                       query_start_loc=torch.arange(B + 1, dtype=torch.int32), lower_bound=None)
    assert tuple(out.shape) == (1, B, H, V)
    live = [i for i, s in enumerate(slots) if s > 0]
    ones = [1] * len(live)
    ref = sglang_reference(L, pick(raw, live, ones), pick(a_raw, live, ones), pick(b_raw, live, ones), ones,
                           [slots[i] for i in live], before[LAYER])
    assert rel_rms(out[0, live], ref.output[0]) <= TOL
    pad = [i for i, s in enumerate(slots) if s <= 0]
    assert torch.equal(out[0, pad], torch.zeros(len(pad), H, V))
    ls = [slots[i] for i in live]
    assert rel_rms(pools[LAYER][ls], ref.final_states[ls]) <= TOL
    touched = torch.zeros(pools.shape[:2], dtype=torch.bool)
    touched[LAYER, ls] = True
    assert same_bits(pools[~touched], before[~touched])


# ---------------------------------------------------------------------------------------- verify

VERIFY_CASES = {
    # cache_indices, scratch rows (intermediate_state_indices), tokens per row (None = dense)
    "dense_positional": ([4, -1, 2, 7], [0, 1, 2, 3], None),
    "dense_stable_rows": ([4, -1, 2, 7], [3, 5, 0, 1], None),
    "ragged": ([4, 6, 2, -1], [0, 1, 2, 3], [4, 2, 3, 1]),
}


@pytest.mark.parametrize("case", sorted(VERIFY_CASES))
def test_target_verify_matches_sglang_reference(case):
    slots, rows, lens = VERIFY_CASES[case]
    L = Layer()
    H, K, V = L.H, L.K, L.V
    S, B = 4, len(slots)
    R0 = 6  # speculative scratch rows: 5 request rows + SGLang's padding row
    lens = lens or [S] * B
    T = sum(lens)
    pools = L.pools()
    fill_slots(pools[LAYER], slots)
    before = pools.clone()
    scratch = torch.full((3, R0, S, H, V, K), BIG)  # intermediate_ssm [layer, rows, steps, H, V, K]
    scratch_before = scratch.clone()
    raw, a_raw, b_raw = L.tokens(T)
    qkv = F.silu(raw)
    q, k, v = L.split(qkv)
    qsl = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(B)], dtype=torch.int32)
    ci = torch.tensor(slots, dtype=torch.int32)
    out = dispatcher().target_verify(
        A_log=L.A_log, dt_bias=L.dt_bias, q=q, k=k, v=v, a=a_raw, b=b_raw.unsqueeze(0), ssm_states=pools[LAYER],
        cache_indices=ci, query_start_loc=qsl, intermediate_states_buffer=scratch[LAYER],
        intermediate_state_indices=torch.tensor(rows, dtype=torch.int32), cache_steps=S, retrieve_parent_token=None,
        lower_bound=None)
    assert tuple(out.shape) == (1, T, H, V)
    assert same_bits(pools, before)  # the committed pool is never written by verify

    starts, live = _live_seqs(lens, slots)
    lv, st = [lens[i] for i in live], [starts[i] for i in live]
    ls = [slots[i] for i in live]
    ref_out = sglang_verify_reference(L, pick(qkv, st, lv), pick(a_raw, st, lv), pick(b_raw, st, lv), lv, ls,
                                      before[LAYER])
    assert rel_rms(pick(out[0], st, lv), ref_out[0]) <= TOL
    for i in range(B):
        if slots[i] <= 0:
            assert torch.equal(out[0, starts[i]:starts[i] + lens[i]], torch.zeros(lens[i], H, V))
    # state after each draft step, against the reference run on the (t+1)-token prefixes
    touched = torch.zeros(scratch.shape[:3], dtype=torch.bool)
    touched[LAYER, R0 - 1] = True  # SGLang's padding row is free scratch for the adapter
    for t in range(S):
        idx = [i for i in live if t < lens[i]]
        pl = [t + 1] * len(idx)
        pre = sglang_reference(L, pick(raw, [starts[i] for i in idx], pl), pick(a_raw, [starts[i] for i in idx], pl),
                               pick(b_raw, [starts[i] for i in idx], pl), pl, [slots[i] for i in idx], before[LAYER])
        for i in idx:
            assert rel_rms(scratch[LAYER, rows[i], t], pre.final_states[slots[i]]) <= TOL
            touched[LAYER, rows[i], t] = True
    for i in live:  # steps past a ragged row's tokens are never committed: free to hold anything
        touched[LAYER, rows[i]] = True
    assert same_bits(scratch[~touched], scratch_before[~touched])
