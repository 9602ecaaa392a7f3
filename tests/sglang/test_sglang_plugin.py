"""The SGLang plugin: entry point, hook, dispatcher wiring, kernel interface and Triton fallbacks.

Runs against the real ``sglang`` package on CPU; skipped where sglang is not installed.
"""

import importlib.metadata
import inspect

import pytest

pytest.importorskip("sglang")

import torch  # noqa: E402

from kda_serving.integrations import sglang as plugin  # noqa: E402
from kda_serving.integrations.sglang.kernel import KDAServingKernel  # noqa: E402
from tests.sglang.helpers import dispatcher  # noqa: E402

from sglang.srt.layers.attention.linear.kernels.kernel_backend import LinearAttnKernelBase  # noqa: E402
from sglang.srt.plugins.hook_registry import HookRegistry, HookType  # noqa: E402



def _triton():
    """SGLang's original TritonKDAKernel. Not a module global: the REPLACE hook rebinds every module
    attribute that is the original class, this test module's included."""
    return KDAServingKernel.__mro__[1]


def test_kernel_satisfies_sglang_interface():
    TRITON = _triton()
    assert TRITON.__name__ == "TritonKDAKernel"
    assert issubclass(KDAServingKernel, LinearAttnKernelBase) and issubclass(KDAServingKernel, TRITON)
    kern = KDAServingKernel()  # every abstract method implemented
    assert kern.supports_track_state_snapshot and kern.supports_packed_decode
    assert not kern.supports_fused_chain_verify  # SGLang must not bypass our target_verify
    # The exact keyword sets KDAAttnBackend / kda_extend_in_graph / the dispatcher pass.
    t = torch.zeros(1)
    inspect.signature(kern.extend).bind(
        t, t, t, t, t, ssm_states=t, cache_indices=t, query_start_loc=t, A_log=t, dt_bias=t, lower_bound=None,
        beta_is_raw=True, extend_seq_lens_cpu=[1], extend_prefix_lens=t, layer_id=0, is_spec_decode=False,
        return_intermediate_states=True, track_ssm_h_src=t, track_state=t, track_chunk_idx=t,
        state_checkpoint_cu_starts=None, num_state_checkpoints=None, state_checkpoint_every_n_tokens=None,
        state_checkpoint_indices=None, track_ssm_h_batch_src=t, chunk_indices=t, chunk_offsets=t)
    inspect.signature(kern.decode).bind(t, t, t, t, t, A_log=t, dt_bias=t, ssm_states=t, cache_indices=t,
                                        query_start_loc=t, lower_bound=None)
    inspect.signature(kern.packed_decode).bind(
        t, t, t, A_log=t, dt_bias=t, scale=1.0, ssm_states=t, cache_indices=t, num_v_heads=1, head_v_dim=1,
        lower_bound=None, replayssm_d=None, replayssm_k=None, replayssm_g=None, replayssm_write_pos=None,
        replayssm_force_flush=None)
    inspect.signature(kern.target_verify).bind(
        A_log=t, dt_bias=t, q=t, k=t, v=t, a=t, b=t, ssm_states=t, cache_indices=t, query_start_loc=t,
        intermediate_states_buffer=t, intermediate_state_indices=t, cache_steps=4, retrieve_parent_token=None,
        lower_bound=None, cache_ring=False, replayssm_rawv=None, replayssm_rawk=None, replayssm_g=None,
        replayssm_beta=None)


def test_register_is_idempotent_and_installs_into_dispatcher():
    plugin.register()
    plugin.register()
    ours = [h for ht, h, _ in HookRegistry._hooks[plugin.TRITON_KDA_KERNEL] if h is KDAServingKernel]
    assert len(ours) == 1 and all(ht == HookType.REPLACE for ht, _, _ in HookRegistry._hooks[plugin.TRITON_KDA_KERNEL])
    d = dispatcher()  # applies the hooks, builds SGLang's own dispatcher with default flags
    from sglang.srt.layers.attention.linear import kda_backend
    from sglang.srt.layers.attention.linear.kernels import kda_triton
    assert kda_triton.TritonKDAKernel is KDAServingKernel and kda_backend.TritonKDAKernel is KDAServingKernel
    assert d.supports_packed_decode and d.supports_packed_decode_safe_gate
    assert d.effective_extend_kernel(None, 8, 2) is d.extend_kernel


def test_register_can_be_disabled(monkeypatch):
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setenv("KDA_SERVING_SGLANG", "0")
    before = len(HookRegistry._hooks.get(plugin.TRITON_KDA_KERNEL, []))
    plugin.register()
    assert len(HookRegistry._hooks.get(plugin.TRITON_KDA_KERNEL, [])) == before


def test_entry_point_declared_when_installed():
    eps = [ep for ep in importlib.metadata.entry_points(group="sglang.srt.plugins") if ep.name == "kda_serving"]
    if not eps:
        pytest.skip("kda-serving is not pip-installed in this environment (entry point comes from setup.py)")
    assert eps[0].value == "kda_serving.integrations.sglang:register"
    assert eps[0].load() is plugin.register


def _sentinel(name):
    def f(self, *args, **kwargs):
        return ("triton", name)
    return f


@pytest.fixture
def triton_sentinels(monkeypatch):
    for name in ("extend", "decode", "target_verify", "packed_decode"):
        monkeypatch.setattr(_triton(), name, _sentinel(name))


def test_uncovered_batches_fall_back_to_sglang_triton(triton_sentinels, monkeypatch):
    kern = KDAServingKernel()
    H, K, T = 2, 16, 4
    q = torch.randn(1, T, H, K)
    pool = torch.zeros(3, H, K, K)
    ci = torch.tensor([1], dtype=torch.int32)
    qsl = torch.tensor([0, T], dtype=torch.int32)
    A, dt = torch.zeros(H), torch.zeros(H * K)
    # already-activated beta / gate
    assert kern.extend(q, q, q, q, q[..., 0], ssm_states=pool, cache_indices=ci, query_start_loc=qsl, A_log=A,
                       dt_bias=dt, beta_is_raw=False) == ("triton", "extend")
    assert kern.extend(q, q, q, q, q[..., 0], ssm_states=pool, cache_indices=ci, query_start_loc=qsl,
                       beta_is_raw=True) == ("triton", "extend")
    # gate bound our ops do not take
    assert kern.decode(q, q, q, q, q[..., 0], A_log=A, dt_bias=dt, ssm_states=pool, cache_indices=ci,
                       query_start_loc=qsl, lower_bound=-7.0) == ("triton", "decode")
    # tree verify and ReplaySSM rings
    buf = torch.zeros(2, T, H, K, K)
    vkw = dict(ssm_states=pool, cache_indices=ci, query_start_loc=qsl, intermediate_states_buffer=buf,
               intermediate_state_indices=torch.zeros(1, dtype=torch.int32), cache_steps=T)
    assert kern.target_verify(A, dt, q, q, q, q, q[..., 0], retrieve_parent_token=torch.zeros(1, T), **vkw) \
        == ("triton", "target_verify")
    assert kern.target_verify(A, dt, q, q, q, q, q[..., 0], retrieve_parent_token=None, cache_ring=True, **vkw) \
        == ("triton", "target_verify")
    assert kern.packed_decode(torch.randn(1, 3 * H * K), q, q, A_log=A, dt_bias=dt, scale=1.0, ssm_states=pool,
                              cache_indices=ci, num_v_heads=H, head_v_dim=K,
                              replayssm_d=torch.zeros(1)) == ("triton", "packed_decode")
    # phases switched off by environment
    monkeypatch.setenv("KDA_SERVING_SGLANG_PHASES", "extend")
    kern = KDAServingKernel()
    assert kern.decode(q, q, q, q, q[..., 0], A_log=A, dt_bias=dt, ssm_states=pool, cache_indices=ci,
                       query_start_loc=qsl) == ("triton", "decode")
    monkeypatch.setenv("KDA_SERVING_SGLANG_PHASES", "decode,bogus")
    with pytest.raises(ValueError, match="KDA_SERVING_SGLANG_PHASES"):
        KDAServingKernel()
