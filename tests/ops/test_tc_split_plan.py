"""The tensor-core prefill's split planner and unit table (kda_serving/ops/tc_split.py), on the CPU."""

import random

import pytest

from kda_serving.ops import tc_split as ts


def test_units_cover_every_token_once_and_chain_their_entries():
    rng = random.Random(3)
    for _ in range(200):
        lens = [rng.choice([0, 1, 63, 64, 65, rng.randrange(1, 3000)]) for _ in range(rng.randrange(1, 7))]
        seg = rng.choice([1, 2, 3, 5, 16])
        bounds = [0]
        for n in lens:
            bounds.append(bounds[-1] + n)
        table, ua, ub, uc, entries = ts.build_units(bounds, seg)
        rows = [table[i:i + ts.UNIT_INTS] for i in range(0, len(table), ts.UNIT_INTS)]
        assert len(rows) == ua + ub + uc
        out_chunks = {n: [] for n in range(len(lens))}
        finals = {n: 0 for n in range(len(lens))}
        for i, (n, c0, chunks, flags, e_in, e_out, *_pad) in enumerate(rows[:ua + ub]):
            in_a = i < ua
            if flags & ts.OUT:
                out_chunks[n] += range(c0, c0 + chunks)
            finals[n] += bool(flags & ts.FINAL_POOL)
            if flags & ts.INIT_ENTRY:
                assert not in_a and 0 <= e_in < entries
            if flags & (ts.FINAL_ENTRY | ts.TRANSITION):
                assert in_a and 0 <= e_out < entries
            if flags & ts.INIT_POOL:
                assert in_a and c0 == 0
        for n, length in enumerate(lens):
            chunks = -(-length // 64)
            assert finals[n] == 1
            covered = sorted(c for c in out_chunks[n] if c < chunks)
            assert covered == list(range(chunks)), (lens, seg, n)
        split = [n for n, length in enumerate(lens) if -(-length // 64) > seg]
        assert [r[0] for r in rows[ua + ub:]] == split
        assert sum(r[2] for r in rows[ua + ub:]) == entries  # entries per split sequence: segments - 1
        # pass A: every split sequence's units before the unsplit sequences, these longest first
        a_seqs = [r[0] for r in rows[:ua]]
        unsplit = [n for n in a_seqs if n not in split]
        assert a_seqs[len(a_seqs) - len(unsplit):] == unsplit
        chunks_unsplit = [-(-lens[n] // 64) for n in unsplit]
        assert chunks_unsplit == sorted(chunks_unsplit, reverse=True)


def test_planner_env_overrides(monkeypatch):
    monkeypatch.setenv("KDA_SERVING_PREFILL_SPLIT", "1024")
    assert ts.plan_segment([5000, 10], 8, None) == 16
    assert ts.plan_segment([1024, 10], 8, 132) is None  # nothing longer than a segment
    monkeypatch.setenv("KDA_SERVING_PREFILL_SPLIT", "0")
    assert ts.plan_segment([131072], 8, 132) is None
    monkeypatch.setenv("KDA_SERVING_PREFILL_SPLIT", "100")
    with pytest.raises(ValueError, match="KDA_SERVING_PREFILL_SPLIT"):
        ts.plan_segment([131072], 8, 132)


def test_planner_splits_few_heads_long_prompts_only(monkeypatch):
    monkeypatch.delenv("KDA_SERVING_PREFILL_SPLIT", raising=False)
    assert ts.plan_segment([131072], 8, None) is None  # no GPU: never on its own
    assert ts.plan_segment([131072], 8, 132) is not None
    assert ts.plan_segment([131072], 4, 132) is not None
    assert ts.plan_segment([131072] + [1024] * 63, 8, 132) is not None
    assert ts.plan_segment([8192], 96, 132) is None
    assert ts.plan_segment([1024] * 8, 96, 132) is None
    assert ts.plan_segment([4096] * 8, 32, 132) is None
    assert ts.plan_segment([100], 1, 132) is None


def test_state_rows_mirror_the_launcher():
    # tc_state_rows: 96 sequence-heads on 132 SMs take 128 rows; 32 take 32 rows; 16 take 32.
    assert ts.state_rows(96, 132) == 128
    assert ts.state_rows(32, 132) == 32
    assert ts.state_rows(256, 132) == 128


def test_device_units_are_built_once_per_batch():
    """Every layer of a step prefills the same lengths: the uploaded table is reused, and a table
    for other lengths or another segment is a new one; at most TABLES_KEPT stay."""
    import torch
    ts._TABLES.clear()
    dev = torch.device("cpu")
    a = ts.device_units([0, 500, 520], 2, dev)
    assert ts.device_units([0, 500, 520], 2, dev)[0] is a[0]
    table, *counts = ts.build_units([0, 500, 520], 2)
    assert a[0].tolist() == torch.tensor(table).reshape(-1, ts.UNIT_INTS).tolist() and list(a[1:]) == counts
    assert ts.device_units([0, 500, 521], 2, dev)[0] is not a[0]
    assert ts.device_units([0, 500, 520], 3, dev)[0] is not a[0]
    for n in range(ts.TABLES_KEPT):
        ts.device_units([0, 1000 + n], 2, dev)
    assert len(ts._TABLES) == ts.TABLES_KEPT and ts.device_units([0, 500, 520], 2, dev)[0] is not a[0]
    ts._TABLES.clear()
