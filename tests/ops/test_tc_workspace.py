"""The tensor-core prefill's cached workspace (kda_serving.ops._ext): sized by the record count of
csrc/prefill/kda_prefill.h, reused while large enough, replaced when outgrown without freeing the
old one (a CUDA graph captured with it keeps a valid pointer)."""

import torch

from kda_serving.ops import _ext


def test_size_formula():
    assert _ext.TC_RECORD_FLOATS == 4 * 64 * 128 + 64 * 64 + 128
    # chunk slots: floor(T / 64) + N, whatever the split of T into N sequences
    assert _ext.tc_workspace_floats(8192, 1, 96) == (128 + 1) * 96 * _ext.TC_RECORD_FLOATS
    assert _ext.tc_workspace_floats(0, 3, 2) == 3 * 2 * _ext.TC_RECORD_FLOATS


def test_cached_grown_and_outgrown_kept():
    dev = torch.device("cpu")
    _ext._tc_workspaces.pop(dev, None)
    a = _ext.tc_workspace(dev, 1000)
    assert a.dtype == torch.float32 and a.numel() >= 1000
    assert _ext.tc_workspace(dev, 500).data_ptr() == a.data_ptr()      # reused
    b = _ext.tc_workspace(dev, 5000)
    assert b.numel() >= 5000 and b.data_ptr() != a.data_ptr()
    assert any(t is a for t in _ext._tc_outgrown)                       # the old one stays alive
    assert _ext.tc_workspace(dev, 1000).data_ptr() == b.data_ptr()
    _ext._tc_workspaces.pop(dev, None)
    _ext._tc_outgrown.clear()
