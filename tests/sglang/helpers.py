"""Shared set-up for the SGLang plugin tests: SGLang's own pure-torch KDA reference on CPU tensors.

Import only after ``pytest.importorskip("sglang")``.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from sglang.test.kits.attention_unittest.attention_methods import kda_attention as kit

from kda_serving.integrations.sglang import install
from kda_serving.integrations.sglang.kernel import KDAServingKernel

BIG = 1e30  # untouched pool cells hold this and must stay bit-identical


def dispatcher():
    """SGLang's own KDAKernelDispatcher with the default (triton) backends, after our plugin."""
    install()
    from sglang.srt.layers.attention.linear.kda_backend import KDAKernelDispatcher
    from sglang.srt.layers.attention.linear.utils import LinearAttnKernelBackend as KB

    d = KDAKernelDispatcher(KB.TRITON, KB.TRITON, KB.TRITON)
    for kern in (d.decode_kernel, d.extend_kernel, d.verify_kernel):
        assert isinstance(kern, KDAServingKernel)
    return d


class Layer:
    """Random KDA layer parameters, in the shapes SGLang's Kimi-Linear layer hands the backend,
    plus SGLang's ``ReferenceKDAAttention`` holding the same values."""

    def __init__(self, H=2, K=32):
        self.H, self.K, self.V = H, K, K
        self.ref = kit.ReferenceKDAAttention(num_k_heads=H, num_v_heads=H, head_k_dim=K, head_v_dim=K,
                                             dtype=torch.float32, device="cpu")
        with torch.no_grad():
            self.ref.A_log.copy_(torch.rand(H) * 1.5 - 1.0)
            self.ref.dt_bias.copy_(torch.randn(H * K) * 0.5)
        self.A_log = self.ref.A_log.detach().clone().view(1, 1, H, 1)  # RadixLinearAttention layout
        self.dt_bias = self.ref.dt_bias.detach().clone()               # [H*K] fp32

    @property
    def width(self):
        return 3 * self.H * self.K

    def tokens(self, T):
        """(raw mixed_qkv [T, 3HK] before the conv, a_raw [T, H*K], b_raw [T, H])."""
        raw = torch.randn(T, self.width)
        a_raw = torch.randn(T, self.H * self.K) - 1.5
        b_raw = torch.randn(T, self.H) * 2
        return raw, a_raw, b_raw

    def split(self, qkv):
        """q, k, v [1, T, H, D] as strided column views of the conv output, as SGLang splits it."""
        HK = self.H * self.K
        q, k, v = qkv.split([HK, HK, HK], dim=-1)
        return tuple(x.unflatten(-1, (-1, self.K)).unsqueeze(0) for x in (q, k, v))

    def pools(self, layers=3, slots=12):
        """temporal pool [L, slots, H, V, K] fp32, all BIG."""
        return torch.full((layers, slots, self.H, self.V, self.K), BIG)


def fill_slots(pool, slots, scale=0.5):
    for s in slots:
        if s > 0:
            pool[s] = torch.randn(pool.shape[1:]) * scale


def sglang_reference(layer: Layer, raw, a_raw, b_raw, lens, slots, init_pool):
    """SGLang's ``_pure_torch_kda_reference`` (silu as the identity conv, per-token per-head
    recurrence) over packed sequences ``lens`` with state slots ``slots`` (all live)."""
    case = SimpleNamespace(input_lens=tuple(lens), num_input_tokens=int(sum(lens)), num_v_heads=layer.H,
                           num_k_heads=layer.H)
    runner = SimpleNamespace(device=torch.device("cpu"),
                             req_to_token_pool=SimpleNamespace(get_mamba_indices=lambda idx: idx))
    fx = SimpleNamespace(case=case, runner=runner, reference_module=layer.ref, mixed_qkv=raw, a_raw=a_raw,
                         b_raw=b_raw, forward_batch=SimpleNamespace(req_pool_indices=torch.tensor(slots)))
    with torch.no_grad():
        return kit._pure_torch_kda_reference(fx, init_pool)


def sglang_verify_reference(layer: Layer, qkv, a_raw, b_raw, lens, slots, init_pool):
    """SGLang's ``expected_kda_verify_output_from_inputs`` (chain, topk=1) on post-conv qkv."""
    case = SimpleNamespace(input_lens=tuple(lens), num_input_tokens=int(sum(lens)), num_v_heads=layer.H,
                           num_k_heads=layer.H)
    runner = SimpleNamespace(device=torch.device("cpu"),
                             req_to_token_pool=SimpleNamespace(get_mamba_indices=lambda idx: idx))
    fx = SimpleNamespace(case=case, runner=runner, reference_module=layer.ref,
                         forward_batch=SimpleNamespace(req_pool_indices=torch.tensor(slots)))
    inputs = {"mixed_qkv": qkv, "a": a_raw, "b": b_raw, "a_raw": a_raw, "b_raw": b_raw}
    with torch.no_grad():
        return kit.expected_kda_verify_output_from_inputs(fx, case, inputs, (None, init_pool), topk=1)


def pick(x, starts, lens):
    """Concatenate rows [s, s+l) of x for each (s, l)."""
    idx = [i for s, n in zip(starts, lens) for i in range(s, s + n)]
    return x[torch.tensor(idx, dtype=torch.long)] if idx else x[:0]


def same_bits(a, b):
    return torch.equal(a.view(torch.int32), b.view(torch.int32))
