"""Split prefill (segments in parallel, combined exactly) against the unsplit path and the fp64 gold."""

import json
import math
from pathlib import Path

import pytest
import torch

from kda_serving import ops
from kda_serving.ops import split_plan
from kda_serving.ops import split_prefill as sp
from kda_serving.ops.naive import naive_kda
from tests.conftest import rel_rms
from tests.ops.helpers import cu_from_lens, kda_inputs

ENV = split_plan.ENV


@pytest.fixture
def split_calls(monkeypatch):
    """Counts the calls that took the split path."""
    calls = []
    real = sp.split_prefill

    def counting(*a, **kw):
        calls.append(kw["segment"])
        return real(*a, **kw)
    monkeypatch.setattr(sp, "split_prefill", counting)
    return calls


def make_pool(N, H, K, dtype=torch.float32, extra=3):
    """Pool of N + extra slots filled with 1e30 (untouched rows must stay bit-identical); the
    sequences' rows hold random states."""
    pool = torch.full((N + extra, H, K, K), 1e30).to(dtype)
    slots = torch.arange(2, N + 2, dtype=torch.int32)
    pool[slots.long()] = torch.randn(N, H, K, K).to(dtype)
    return pool, slots


def run(inp, lens, pool, slots, has_init, lb=None, **kw):
    q, k, v, g, beta, A_log, dt = inp
    out = torch.full((q.shape[0], q.shape[1], v.shape[2]), float("nan"), dtype=q.dtype)
    ops.kda_prefill(q, k, v, g, beta, A_log, dt, cu_seqlens=cu_from_lens(lens), state_pool=pool,
                    slots=slots, has_initial_state=has_init, lower_bound=lb, out=out, **kw)
    return out


def gold(inp, lens, pool, slots, has_init, lb=None):
    q, k, v, g, beta, A_log, dt = inp
    sl = slots.long()
    init = torch.zeros(len(lens), *pool.shape[1:], dtype=torch.float64)
    use = (sl > 0) & has_init
    init[use] = pool[sl[use]].double()
    o, s = naive_kda(q, k, v, g, beta, A_log, dt, cu_seqlens=cu_from_lens(lens), initial_state=init,
                     lower_bound=lb)
    return o, s


def check_case(monkeypatch, split_calls, inp, lens, slots=None, has_init=None, lb=None, segment=64,
               pool_dtype=torch.float32, tol=1e-5):
    """Split (forced) vs unsplit vs fp64 gold, from the same starting pool."""
    H, K = inp[0].shape[1], inp[0].shape[2]
    N = len(lens)
    pool0, default_slots = make_pool(N, H, K, pool_dtype)
    slots = default_slots if slots is None else slots
    has_init = torch.rand(N) < 0.5 if has_init is None else has_init
    results = {}
    for name, env in (("split", str(segment)), ("serial", "0")):
        monkeypatch.setenv(ENV, env)
        pool = pool0.clone()
        results[name] = (run(inp, lens, pool, slots, has_init, lb), pool)
    assert split_calls == [segment] if max(lens) > segment else split_calls == []
    ref_o, ref_s = gold(inp, lens, pool0, slots, has_init, lb)
    out, pool = results["split"]
    sl = slots.long()
    live = sl > 0
    bounds = cu_from_lens(lens).tolist()
    mask = torch.zeros(out.shape[0], dtype=torch.bool)
    for n in range(N):
        if live[n]:
            mask[bounds[n]:bounds[n + 1]] = True
    assert torch.isfinite(out).all() and torch.isfinite(pool[sl[live]]).all()
    assert rel_rms(out[mask], ref_o[mask]) <= tol
    assert torch.count_nonzero(out[~mask]) == 0                       # null slots: zero output
    assert rel_rms(pool[sl[live]], ref_s[live]) <= tol
    untouched = [s for s in range(pool.shape[0]) if s not in sl[live].tolist()]
    assert torch.equal(pool[untouched], pool0[untouched])             # bit-identical, 1e30 fill
    serial_out, serial_pool = results["serial"]
    assert rel_rms(out, serial_out) <= tol
    assert torch.equal(pool[untouched], serial_pool[untouched])
    return out, pool


@pytest.mark.parametrize("lb", [None, -5.0])
@pytest.mark.parametrize("segment", [64, 128])
def test_single_long_sequence(monkeypatch, split_calls, lb, segment):
    lens = [5 * segment + 37]                     # not a multiple of the segment
    check_case(monkeypatch, split_calls, kda_inputs(sum(lens), 2, 32), lens, lb=lb, segment=segment,
               has_init=torch.tensor([True]))


@pytest.mark.parametrize("segment", [64, 128])
def test_varlen_long_short_empty_and_null_slots(monkeypatch, split_calls, segment):
    # two long sequences (one with a null slot), short ones, zero-length ones (one null)
    lens = [70, 300, 0, 5, 2 * segment + 1, 64, 0, 129, 3 * segment]
    slots = torch.tensor([2, 3, 0, 4, -1, 6, 7, 0, 9], dtype=torch.int32)
    has = torch.tensor([True, True, False, True, True, False, True, True, False])
    check_case(monkeypatch, split_calls, kda_inputs(sum(lens), 2, 32), lens, slots=slots, has_init=has,
               segment=segment)


def test_exact_multiple_and_has_initial_state_false(monkeypatch, split_calls):
    lens = [256, 192]
    check_case(monkeypatch, split_calls, kda_inputs(sum(lens), 1, 32), lens,
               has_init=torch.tensor([False, False]), segment=64)


def test_bf16_pool_and_inputs(monkeypatch, split_calls):
    lens = [333, 17]
    check_case(monkeypatch, split_calls, kda_inputs(sum(lens), 2, 32, dtype=torch.bfloat16), lens,
               pool_dtype=torch.bfloat16, segment=64, tol=5e-3, has_init=torch.tensor([True, True]))


@pytest.mark.parametrize("lb", [None, -5.0])
def test_adversarial_gates_and_keys(monkeypatch, split_calls, lb):
    T, H, K = 320, 2, 32
    q, k, v, g, beta, A_log, dt = kda_inputs(T, H, K)
    k[10:90] = k[10]                                    # identical keys across a segment boundary
    base = torch.randn(H, K)
    k[150:] = base + 0.07 * torch.randn(T - 150, H, K)  # near-collinear keys
    g[::5] = 30.0
    g[2::7] = -30.0                                     # gate spikes both ways
    beta[::3] = 30.0
    A_log = torch.full((H,), math.log(16.0))
    check_case(monkeypatch, split_calls, (q, k, v, g, beta, A_log, dt), [T], lb=lb, segment=64,
               has_init=torch.tensor([True]))


def test_direct_call_with_a_segment_length():
    lens = [200, 3, 130]
    H, K = 2, 16
    q, k, v, g, beta, A_log, dt = inp = kda_inputs(sum(lens), H, K)
    pool, slots = make_pool(len(lens), H, K)
    has = torch.tensor([True, False, True])
    ref_o, ref_s = gold(inp, lens, pool, slots, has)
    out = torch.empty(sum(lens), H, K)
    sp.split_prefill(q, k, v, g, beta, A_log, dt, bounds=cu_from_lens(lens).tolist(), segment=64,
                     state_pool=pool, slots=slots, has_initial_state=has, lower_bound=None,
                     scale=K ** -0.5, out=out, cuda=False)
    assert rel_rms(out, ref_o) <= 1e-5
    assert rel_rms(pool[slots.long()], ref_s) <= 1e-5


def test_no_split_with_intermediate_states(monkeypatch, split_calls):
    monkeypatch.setenv(ENV, "64")
    lens = [200]
    H, K = 1, 16
    inp = kda_inputs(200, H, K)
    pool, slots = make_pool(1, H, K)
    inter = torch.zeros(3, H, K, K)
    run(inp, lens, pool, slots, torch.tensor([False]), intermediate_states=inter,
        intermediate_offsets=torch.zeros(1, dtype=torch.int32))
    assert split_calls == []


def test_cpu_never_splits_unless_forced(monkeypatch, split_calls):
    monkeypatch.delenv(ENV, raising=False)
    lens = [300]
    inp = kda_inputs(300, 1, 16)
    pool, slots = make_pool(1, 1, 16)
    run(inp, lens, pool, slots, torch.tensor([False]), cu_seqlens_cpu=cu_from_lens(lens))
    assert split_calls == []


def test_cu_seqlens_cpu_is_checked():
    inp = kda_inputs(10, 1, 16)
    pool, slots = make_pool(1, 1, 16)
    with pytest.raises(ValueError, match="cu_seqlens_cpu"):
        run(inp, [10], pool, slots, torch.tensor([False]), cu_seqlens_cpu=torch.tensor([0, 5, 10]))


# ---- planner ------------------------------------------------------------------------------

def unsplit_ctas(H, n, sms=132, D=128):
    return D // split_plan.block_rows(n * H, sms)


@pytest.mark.parametrize("H", [4, 8])
@pytest.mark.parametrize("T", [32768, 131072, 1 << 20])
def test_planner_splits_few_heads_long_sequence(monkeypatch, H, T):
    monkeypatch.delenv(ENV, raising=False)
    seg = split_plan.plan_split([T], H, 132, ctas_per_seq_head=unsplit_ctas(H, 1))
    assert seg is not None and seg % 64 == 0 and seg < T


def test_planner_varlen_long_plus_short(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    lens = [131072] + [1024] * 63
    seg = split_plan.plan_split(lens, 8, 132, ctas_per_seq_head=unsplit_ctas(8, 64))
    assert seg is not None and seg >= 1024          # short ones stay whole
    layout = split_plan.build_layout(cu_from_lens(lens).tolist(), seg)
    assert list(layout.chains) == [0] and layout.num_units == 131072 // seg + 63


H200_RECORD = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / \
    "bench_prefill-chunked-nvidia-h200-92f5f3f7abc0.json"


def test_cost_model_reproduces_the_h200_measurements():
    """The calibrated constants predict every recorded token-serial call (unsplit and split, both
    gates) within 12%."""
    record = json.loads(H200_RECORD.read_text())
    assert record["sm_count"] == 132 and record["results"]
    for row in record["results"]:
        shape = row["shape"]
        lens = [shape["tokens"] // shape["num_seqs"]] * shape["num_seqs"]
        model_ms = split_plan.split_cost_us(lens, shape["H"], record["sm_count"], row["split_segment"]) / 1e3
        assert abs(model_ms / row["ours_ms"] - 1) <= 0.12, (row["case"], model_ms, row["ours_ms"])


@pytest.mark.parametrize("lens,H", [([131072], 96), ([2048], 4), ([1024] * 64, 4), ([], 4)])
def test_planner_leaves_many_heads_or_short_alone(monkeypatch, lens, H):
    monkeypatch.delenv(ENV, raising=False)
    assert split_plan.plan_split(lens, H, 132, ctas_per_seq_head=unsplit_ctas(H, max(len(lens), 1))) is None


def test_planner_env_override(monkeypatch):
    monkeypatch.setenv(ENV, "0")
    assert split_plan.plan_split([1 << 20], 4, 132, ctas_per_seq_head=16) is None
    monkeypatch.setenv(ENV, "128")
    assert split_plan.plan_split([1000], 96, None, ctas_per_seq_head=1) == 128   # forced, even on CPU
    assert split_plan.plan_split([128, 64], 4, 132, ctas_per_seq_head=16) is None  # nothing longer
    monkeypatch.setenv(ENV, "auto")
    assert split_plan.plan_split([1 << 20], 4, None, ctas_per_seq_head=16) is None  # CPU: auto never
    for bad in ("100", "-64", "yes"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ValueError, match=ENV):
            split_plan.plan_split([1 << 20], 4, 132, ctas_per_seq_head=16)


def test_choose_segment_needs_host_lengths_and_square_state(monkeypatch):
    monkeypatch.setenv(ENV, "64")
    cpu = torch.device("cpu")
    assert sp.choose_segment(None, 4, 128, 128, cpu, False) is None     # GPU without cu_seqlens_cpu
    assert sp.choose_segment([0, 300], 4, 64, 128, cpu, False) is None  # V != K
    assert sp.choose_segment([0, 300], 4, 128, 128, cpu, False) == 64


def test_layout_and_workspace():
    bounds = [0, 100, 300, 310, 500]
    lay = split_plan.build_layout(bounds, 64)
    assert lay.unit_bounds == [0, 64, 100, 164, 228, 292, 300, 310, 374, 438, 500]
    assert lay.chains == {0: [0, 1], 1: [2, 3, 4, 5], 3: [7, 8, 9]}
    # transition: segments after the first of each sequence, gaps as null units
    assert (lay.trans_lo, lay.trans_hi) == (64, 500)
    spans = [(lay.trans_bounds[i] + 64, lay.trans_bounds[i + 1] + 64, u) for i, u in enumerate(lay.trans_unit)]
    assert spans == [(64, 100, 1), (100, 164, -1), (164, 228, 3), (228, 292, 4), (292, 300, 5),
                     (300, 364, -1), (364, 374, -1), (374, 438, 8), (438, 500, 9)]
    ws = split_plan.workspace_bytes(lay, 2, 16, pq_bytes=4)
    assert ws == ((10 + 1) + 2 * (6 + 1)) * 2 * 16 * 16 * 4 + 436 * 2 * 16 * 4
    info = sp.describe_split(torch.tensor([0, 1 << 17]), 8, 128, torch.device("cpu"), kernel_path=False)
    assert info["segment"] is None and info["workspace_bytes"] == 0
