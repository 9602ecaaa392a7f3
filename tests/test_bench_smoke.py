"""The benchmark scripts' --smoke runs on the CPU, and the fla adapters' pool plumbing."""

import importlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kda_serving.backend import KDALayerParams, build_kda_batch, kda_mixer_forward
from kda_serving.baselines import fla_ops
from kda_serving.ops import reference
from kda_serving.ops.gates import kda_gate

ROOT = Path(__file__).resolve().parents[1]
META_KEYS = {"script", "device", "torch", "commit", "copy_bandwidth_gbps", "mode", "results"}
ROW_KEYS = {"case", "shape", "speedup_vs_fla", "hbm_floor_fraction"}
TIME_KEYS = {"bench_prefill": {"ours_ms", "fla_ms", "floor_ms", "ours_extra_bytes_per_token"},
             "bench_decode": {"ours_us", "ours_fused_us", "fla_us", "ours_kda_us", "floor_us"},
             "bench_layer": {"ours_ms", "fla_ms", "floor_ms", "projections_ms", "covers"},
             "bench_conv": {"ours_ms", "fla_ms", "floor_ms"}}


@pytest.mark.parametrize("script", sorted(TIME_KEYS))
def test_smoke_run_writes_json(script, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    main = importlib.import_module(script).main
    path = main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    files = list(tmp_path.glob(f"{script}-smoke-cpu-*.json"))
    assert files == [path], list(tmp_path.iterdir())
    record = json.loads(files[0].read_text())
    assert META_KEYS <= record.keys() and record["mode"] == "smoke"
    assert record["results"]
    for row in record["results"]:
        assert ROW_KEYS | TIME_KEYS[script] <= row.keys(), sorted(row)
        assert not [k for k in row if k.endswith("_error")], row
        first = "ours_us" if script == "bench_decode" else "ours_ms"
        assert row[first] > 0 and row["hbm_floor_fraction"] > 0


def test_copy_probe_smoke_writes_json(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    main = importlib.import_module("bench_copy").main
    path = main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    record = json.loads(Path(path).read_text())
    assert META_KEYS <= record.keys() and record["mode"] == "smoke"
    assert [r["copy_mib"] for r in record["results"]] == [1]
    assert all(r["us"] > 0 and r["hbm_floor_fraction"] > 0 for r in record["results"])


# Stand-ins with fla's documented semantics (dense [N, D, W] conv caches, V-first states), so the
# adapters' gather / scatter and layout conversions are checked without a GPU.

def _fake_chunk_kda(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                    use_gate_in_kernel, use_beta_sigmoid_in_kernel, safe_gate, lower_bound, state_v_first,
                    cu_seqlens, cu_seqlens_cpu, A_log, dt_bias):
    assert use_qk_l2norm_in_kernel and use_gate_in_kernel and use_beta_sigmoid_in_kernel and state_v_first
    assert output_final_state and cu_seqlens.dtype == torch.int64 and safe_gate == (lower_bound is not None)
    assert initial_state is None or initial_state.dtype == torch.float32
    bounds = cu_seqlens.tolist()
    _, T, H, K = q.shape
    init = initial_state if initial_state is not None else q.new_zeros(len(bounds) - 1, H, v.shape[-1], K,
                                                                      dtype=torch.float32)
    gate = kda_gate(g[0].float(), A_log, dt_bias, lower_bound)
    o, final, _ = reference.chunked_kda(q[0].float(), k[0].float(), v[0].float(), gate,
                                        torch.sigmoid(beta[0].float()), init, bounds, scale=scale)
    return o[None].to(q.dtype), final


def _fake_fused_recurrent(q, k, v, g, beta, A_log, dt_bias, initial_state, scale, inplace_final_state,
                          state_v_first, ssm_state_indices, num_accepted_tokens, use_qk_l2norm_in_kernel,
                          use_gate_in_kernel, use_beta_sigmoid_in_kernel, lower_bound, out):
    assert inplace_final_state and state_v_first and q.is_contiguous() and out.is_contiguous()
    reference.kda_decode(q, k, v, g, beta, A_log, dt_bias, initial_state, ssm_state_indices,
                         num_accepted_tokens, lower_bound, scale, out)
    return out, initial_state


def _conv(window, weight, bias, activation):
    y = (window.float() * weight.float()).sum(-1) + (0 if bias is None else bias.float())
    return F.silu(y) if activation == "silu" else y


def _fake_conv(x, weight, bias, initial_state, output_final_state, activation, cu_seqlens):
    W, b = weight.shape[1], cu_seqlens.tolist()
    y, finals = torch.empty_like(x[0]), []
    for n in range(len(b) - 1):
        hist = initial_state[n, :, 1:].T if initial_state is not None else x.new_zeros(W - 1, x.shape[-1])
        full = torch.cat([hist.to(x.dtype), x[0, b[n]:b[n + 1]]])
        y[b[n]:b[n + 1]] = _conv(full.unfold(0, W, 1), weight, bias, activation).to(x.dtype)
        finals.append(F.pad(full.T, (W, 0))[:, -W:])  # [D, W], newest input last
    return y[None], torch.stack(finals)


def _fake_conv_update(x, cache, weight, bias, activation):
    window = torch.cat([cache[:, :, 1:], x[:, :, None].to(cache.dtype)], 2)
    cache.copy_(window)
    return _conv(window, weight, bias, activation).to(x.dtype), cache


def _fake_norm(x, g, weight, bias, activation, eps):
    assert activation == "sigmoid" and bias is None
    return reference.gated_rms_norm(x, g, weight, eps, torch.empty_like(x))


def test_bench_prefill_times_forced_segments(monkeypatch):
    """--segments: the selected path split at each forced length, timed and cross-checked, and the
    switch restored afterwards."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    monkeypatch.delenv("KDA_SERVING_PREFILL_SPLIT", raising=False)
    bp = importlib.import_module("bench_prefill")
    row = bp.run_case(2, 32, [200, 30], "kimi", torch.device("cpu"), 1e11, "fla not wanted", 2, 1, segments=(64, 256))
    assert row["ours_split64_ms"] > 0 and row["split64_vs_ours_out_rel_rms"] < 5e-3
    assert "ours_split256_ms" not in row  # not shorter than the longest sequence: nothing to split
    assert "KDA_SERVING_PREFILL_SPLIT" not in os.environ


@pytest.mark.parametrize("lower_bound", [None, -5.0])
def test_fla_adapters_match_ours_in_the_mixer(monkeypatch, lower_bound):
    fake = SimpleNamespace(chunk_kda=_fake_chunk_kda, fused_recurrent_kda_fwd=_fake_fused_recurrent,
                           causal_conv1d=_fake_conv, causal_conv1d_update=_fake_conv_update,
                           rms_norm_gated=_fake_norm)
    monkeypatch.setattr(fla_ops, "_fla", lambda: fake)
    H, D, P = 2, 16, 32
    bf = dict(dtype=torch.bfloat16)
    # 3 decodes, then prefills of 20 (fresh), 37 (with context) and 5 tokens (fresh)
    qsl = [0, 1, 2, 3, 23, 60, 65]
    batch = build_kda_batch(qsl, [9, 4, 7, 0, 30, 0], torch.tensor([5, 2, 7, 1, 6, 3], dtype=torch.int32))
    params = KDALayerParams(num_heads=H, head_dim=D, conv_weight=torch.randn(3 * P, 4, **bf),
                            conv_bias=torch.randn(3 * P, **bf), A_log=torch.rand(H), dt_bias=torch.rand(P),
                            norm_weight=torch.rand(D, **bf), lower_bound=lower_bound)
    T = qsl[-1]
    inputs = (torch.randn(T, 3 * P, **bf), torch.randn(T, P, **bf), torch.randn(T, H, **bf),
              torch.randn(T, P, **bf))
    conv0, state0 = torch.randn(8, 3, 3 * P, **bf), 0.1 * torch.randn(8, H, D, D)
    results = []
    for use_fla in (False, True):
        conv, state = conv0.clone(), state0.clone()
        if use_fla:
            with fla_ops.mixer_uses_fla_ops():
                out = kda_mixer_forward(*inputs, params, batch, conv, state)
        else:
            out = kda_mixer_forward(*inputs, params, batch, conv, state)
        results.append((out.float(), conv.float(), state))
    for ours, theirs in zip(*results):
        assert torch.allclose(theirs, ours, rtol=1e-2, atol=1e-2), (theirs - ours).abs().max()
    assert torch.equal(results[1][1][[0, 4]], conv0[[0, 4]].float())  # untouched rows stay
