"""The KDA layer vLLM builds for every Kimi-Linear KDA layer once the plugin is registered.

It subclasses vLLM's ``KimiGatedDeltaNetAttention``, so projections, tensor-parallel
sharding, weight loaders, state shapes and the metadata builder stay vLLM's; only the core
(conv1d → KDA [→ gated RMSNorm], between the projections and o_proj) runs kda_serving's backend.
Under tensor parallelism each rank holds H/tp heads and runs them alone: KDA heads are
independent, and o_proj's all-reduce combines the ranks.

vLLM's ``_forward`` has two APIs (``version_adapter.py``): the fused-qkv one of vLLM 0.32/0.33
and the split-qkv one of vLLM 0.26. The class below takes the ``_forward`` matching the
installed vLLM.
"""

from __future__ import annotations

import logging

import torch

from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.gdn.kimi_gdn_linear_attn import KimiGatedDeltaNetAttention
from vllm.model_executor.layers.mamba.mamba_utils import is_conv_state_dim_first

from kda_serving import ops
from kda_serving.backend import KDALayerParams

from . import version_adapter as va
from .checkpoint_check import check_kda_layer_tensors
from .metadata import PlanCache
from .step import run_step

try:  # vLLM >= 0.26 (0.32 decorates its _forward with it)
    from vllm.compilation.breakable_cudagraph import eager_break_during_capture
except ImportError:  # pragma: no cover - older vLLM: no breakable CUDA graphs
    def eager_break_during_capture(fn):
        return fn

logger = logging.getLogger("kda_serving")

FORWARD_API = va.detect_forward_api(KimiGatedDeltaNetAttention)

# shared by all layers of the process: one translation per metadata object (per step)
_PLANS = PlanCache()


def _step_metadata(prefix: str):
    metadata = get_forward_context().attn_metadata
    if metadata is None:  # profile run
        return None
    return metadata.get(prefix)  # None: warmup runs skip mamba metadata


class _KDAServingBase(KimiGatedDeltaNetAttention):
    """What both APIs share: checkpoint check, state pools, logging."""

    def __init__(self, config, vllm_config, prefix: str = "") -> None:
        spec = getattr(vllm_config, "speculative_config", None)
        va.check_spec_supported(FORWARD_API, spec.num_speculative_tokens if spec else 0)
        check_kda_layer_tensors(vllm_config, config, prefix)
        super().__init__(config, vllm_config, prefix)
        self._params: KDALayerParams | None = None

    # the KDA state pools are bound here at startup, after weights are loaded: log the path
    def bind_kv_cache(self, kv_cache: torch.Tensor) -> None:
        super().bind_kv_cache(kv_cache)
        logger.info("kda_serving: %s runs %s (%d heads on this rank, %s KDA path, vLLM %s API)",
                    self.prefix, type(self).__name__, self.local_num_heads,
                    ops.op_path(self.kv_cache[1]), FORWARD_API.name)

    def state_pools(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv pool [slots, R, 3P/tp], recurrent pool [slots, H/tp, V, K]) as the ops expect."""
        conv_state, recurrent_state = self.kv_cache
        if is_conv_state_dim_first():  # DS layout stores [slots, dim, R]
            conv_state = conv_state.transpose(-1, -2)
        return conv_state, recurrent_state


class _FusedQKVLayer(_KDAServingBase):
    """vLLM 0.32/0.33: ``_forward(mixed_qkv, g1, g2, beta, core_attn_out)``, norm inside."""

    def layer_params(self) -> KDALayerParams:
        """Views of this layer's weights in the backend's layout (built once, no copies)."""
        if self._params is None:
            w = self.conv1d.weight  # [3P/tp, 1, W] fp32
            self._params = KDALayerParams(
                num_heads=self.local_num_heads, head_dim=self.head_dim,
                conv_weight=w.view(w.shape[0], w.shape[-1]), conv_bias=self.conv1d.bias,
                A_log=va.a_log_heads(self.A_log), dt_bias=self.dt_bias, norm_weight=self.o_norm.weight,
                norm_eps=self.o_norm.eps, lower_bound=getattr(self, "gate_lower_bound", None), scale=None)
        return self._params

    @eager_break_during_capture
    def _forward(self, mixed_qkv: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor,
                 beta: torch.Tensor, core_attn_out: torch.Tensor) -> None:
        m = _step_metadata(self.prefix)
        if m is None:  # profile or warmup run: take the prefill workspace now, so vLLM counts it
            ops.reserve_prefill_workspace(mixed_qkv.shape[0], self.local_num_heads, mixed_qkv.device)
            return
        plan = _PLANS.get(m, self.num_spec)
        conv_pool, state_pool = self.state_pools()
        run_step(plan, self.layer_params(), mixed_qkv, g1[0], beta[0], g2, conv_pool, state_pool,
                 out=core_attn_out[0])


class _SplitQKVLayer(_KDAServingBase):
    """vLLM 0.26: ``_forward(q_proj_states, k_proj_states, v_proj_states, g1, beta,
    core_attn_out)``; beta arrives sigmoided and vLLM applies o_norm after ``_forward``."""

    _conv_weight: va.FusedConvWeight | None = None

    def layer_params(self) -> KDALayerParams:
        """The backend's view of this layer: the three conv weights concatenated once (rebuilt
        only if vLLM reloads them), A_log as [H], no norm (vLLM applies it)."""
        if self._conv_weight is None:
            self._conv_weight = va.FusedConvWeight()
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        weight = self._conv_weight.get(*(c.weight for c in convs))
        if self._params is None or self._params.conv_weight is not weight:
            self._params = KDALayerParams(
                num_heads=self.local_num_heads, head_dim=self.head_dim, conv_weight=weight,
                conv_bias=self._conv_weight.concat_bias(*(c.bias for c in convs)),
                A_log=va.a_log_heads(self.A_log), dt_bias=self.dt_bias, norm_weight=None,
                lower_bound=getattr(self, "gate_lower_bound", None), scale=None)
        return self._params

    @eager_break_during_capture
    def _forward(self, q_proj_states: torch.Tensor, k_proj_states: torch.Tensor,
                 v_proj_states: torch.Tensor, g1: torch.Tensor, beta: torch.Tensor,
                 core_attn_out: torch.Tensor) -> None:
        m = _step_metadata(self.prefix)
        if m is None:  # profile or warmup run: take the prefill workspace now, so vLLM counts it
            ops.reserve_prefill_workspace(q_proj_states.shape[0], self.local_num_heads, q_proj_states.device)
            return
        plan = _PLANS.get(m, 0)
        n = min(plan.num_rows, q_proj_states.shape[0])
        mixed_qkv = va.concat_qkv(q_proj_states, k_proj_states, v_proj_states, n)
        beta_logits = va.beta_to_logits(beta[0, :n], g1.dtype)
        conv_pool, state_pool = self.state_pools()
        # rows >= n (padding) are zeroed by run_step; vLLM's o_norm then maps them to zero too
        run_step(plan, self.layer_params(), mixed_qkv, g1[0, :n], beta_logits, None, conv_pool,
                 state_pool, out=core_attn_out[0, :n])
        if n < core_attn_out.shape[1]:
            core_attn_out[0, n:] = 0


_IMPL = {va.FUSED_QKV: _FusedQKVLayer, va.SPLIT_QKV: _SplitQKVLayer}[FORWARD_API.name]


class KDAServingKimiDeltaAttention(_IMPL):
    """KimiGatedDeltaNetAttention whose core runs ``kda_serving.backend.kda_mixer_forward``."""
