"""The tensor-core prefill's cached workspace (kda_serving.ops._ext): sized by the record count of
csrc/prefill/kda_prefill.h, reused while large enough, replaced by one at least a quarter larger
when outgrown, the old one freed unless a CUDA graph captured it; the token windows a call over the
workspace limit runs in (kda_serving.ops.tc_windows)."""

import pytest
import torch

from kda_serving.ops import _ext


def test_size_formula():
    # fp16 Qe, Kd, Ke / w, A_qk; fp32 T beta [64 x 64] and EL [128]
    assert _ext.TC_RECORD_FLOATS == 3 * 64 * 128 // 2 + 64 * 64 + 64 * 64 // 2 + 128
    # chunk slots: floor(T / 64) + N, whatever the split of T into N sequences
    assert _ext.tc_workspace_floats(8192, 1, 96) == (128 + 1) * 96 * _ext.TC_RECORD_FLOATS
    assert _ext.tc_workspace_floats(0, 3, 2) == 3 * 2 * _ext.TC_RECORD_FLOATS


def test_cached_grown_and_outgrown_freed_unless_captured(monkeypatch):
    dev = torch.device("cpu")
    _ext.TC_SCRATCH.clear(dev)
    _ext.TC_SCRATCH.outgrown.clear()
    a = _ext.tc_workspace(dev, 1000)
    assert a.dtype == torch.float32 and a.numel() >= 1000
    assert _ext.tc_workspace(dev, 500).data_ptr() == a.data_ptr()      # reused
    b = _ext.tc_workspace(dev, 1001)
    assert b.numel() >= 1250 and b.data_ptr() != a.data_ptr()          # grown by a quarter at least
    assert not _ext.TC_SCRATCH.outgrown                                        # nothing captured: a is freed
    assert _ext.tc_workspace(dev, 1250).data_ptr() == b.data_ptr()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    _ext.TC_SCRATCH.note_captured(b)                                               # a graph captured a call with b
    c = _ext.tc_workspace(dev, 5000)
    assert c.numel() >= 5000 and any(t is b for t in _ext.TC_SCRATCH.outgrown)  # b stays alive for that graph
    _ext.TC_SCRATCH.clear(dev)
    _ext.TC_SCRATCH.outgrown.clear()
    _ext.TC_SCRATCH.captured.clear()


def test_token_windows_cover_every_token_in_whole_chunks():
    """plan_windows: pieces in token order cover each sequence exactly, cut only at multiples of 64
    of its own tokens; each window's slot bound (sum of ceil(len / 64) + 1) fits, and so does what
    the kernel sizes (floor(Tw / 64) + Nw)."""
    import random

    from kda_serving.ops.tc_windows import plan_windows
    rng = random.Random(3)
    for _ in range(200):
        lens = [rng.choice([0, 1, 63, 64, 65, rng.randrange(0, 700)]) for _ in range(rng.randrange(1, 6))]
        bounds = [0]
        for n in lens:
            bounds.append(bounds[-1] + n)
        cap = rng.randrange(2, 12)
        covered = {n: 0 for n in range(len(lens))}
        pieces = [p for w in plan_windows(bounds, cap) for p in w]
        for w in plan_windows(bounds, cap):
            assert sum(-(-length // 64) + 1 for _, _, length in w) <= cap
            assert sum(length for _, _, length in w) // 64 + len(w) <= cap
        assert [n for n, _, _ in pieces] == sorted(n for n, _, _ in pieces)
        for n, s, length in pieces:
            assert s == covered[n] and s % 64 == 0
            covered[n] += length
        assert [covered[n] for n in range(len(lens))] == lens


def test_workspace_limit_read_from_the_environment(monkeypatch):
    from kda_serving.ops import tc_windows
    monkeypatch.delenv("KDA_SERVING_TC_WORKSPACE_MB", raising=False)
    assert tc_windows.workspace_limit_bytes() == tc_windows.DEFAULT_LIMIT_MB << 20
    monkeypatch.setenv("KDA_SERVING_TC_WORKSPACE_MB", "1.5")
    assert tc_windows.workspace_limit_bytes() == 3 << 19
    for bad in ("0", "-1", "lots"):
        monkeypatch.setenv("KDA_SERVING_TC_WORKSPACE_MB", bad)
        with pytest.raises(ValueError, match="KDA_SERVING_TC_WORKSPACE_MB"):
            tc_windows.workspace_limit_bytes()


def test_reserve_takes_nothing_on_the_reference_path():
    from kda_serving import ops
    assert ops.reserve_prefill_workspace(4096, 4, "cpu") == 0
    assert _ext.TC_SCRATCH.current("cpu") is None
