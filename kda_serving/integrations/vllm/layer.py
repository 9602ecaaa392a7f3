"""The KDA layer vLLM builds for every Kimi-Linear KDA layer once the plugin is registered.

It subclasses vLLM's ``KimiGatedDeltaNetAttention``, so projections, tensor-parallel
sharding, weight loaders, state shapes and the metadata builder stay vLLM's; only the core
(conv1d → KDA → gated RMSNorm, between the projections and o_proj) runs kda_serving's backend.
Under tensor parallelism each rank holds H/tp heads and runs them alone: KDA heads are
independent, and o_proj's all-reduce combines the ranks.
"""

from __future__ import annotations

import logging

import torch

from vllm.compilation.breakable_cudagraph import eager_break_during_capture
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.gdn.kimi_gdn_linear_attn import KimiGatedDeltaNetAttention
from vllm.model_executor.layers.mamba.mamba_utils import is_conv_state_dim_first

from kda_serving import ops
from kda_serving.backend import KDALayerParams

from .checkpoint_check import check_kda_layer_tensors
from .metadata import PlanCache
from .step import run_step

logger = logging.getLogger("kda_serving")

# shared by all layers of the process: one translation per metadata object (per step)
_PLANS = PlanCache()


class KDAServingKimiDeltaAttention(KimiGatedDeltaNetAttention):
    """KimiGatedDeltaNetAttention whose core runs ``kda_serving.backend.kda_mixer_forward``."""

    def __init__(self, config, vllm_config, prefix: str = "") -> None:
        check_kda_layer_tensors(vllm_config, config, prefix)
        super().__init__(config, vllm_config, prefix)
        self._params: KDALayerParams | None = None

    # the KDA state pools are bound here at startup, after weights are loaded: log the path
    def bind_kv_cache(self, kv_cache: torch.Tensor) -> None:
        super().bind_kv_cache(kv_cache)
        logger.info("kda_serving: %s runs %s (%d heads on this rank, %s KDA path)", self.prefix,
                    type(self).__name__, self.local_num_heads, ops.op_path(self.kv_cache[1]))

    def layer_params(self) -> KDALayerParams:
        """Views of this layer's weights in the backend's layout (built once, no copies)."""
        if self._params is None:
            w = self.conv1d.weight  # [3P/tp, 1, W] fp32
            self._params = KDALayerParams(
                num_heads=self.local_num_heads, head_dim=self.head_dim,
                conv_weight=w.view(w.shape[0], w.shape[-1]), conv_bias=self.conv1d.bias,
                A_log=self.A_log, dt_bias=self.dt_bias, norm_weight=self.o_norm.weight,
                norm_eps=self.o_norm.eps, lower_bound=self.gate_lower_bound, scale=None)
        return self._params

    def state_pools(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv pool [slots, R, 3P/tp], recurrent pool [slots, H/tp, V, K]) as the ops expect."""
        conv_state, recurrent_state = self.kv_cache
        if is_conv_state_dim_first():  # DS layout stores [slots, dim, R]
            conv_state = conv_state.transpose(-1, -2)
        return conv_state, recurrent_state

    @eager_break_during_capture
    def _forward(self, mixed_qkv: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor,
                 beta: torch.Tensor, core_attn_out: torch.Tensor) -> None:
        metadata = get_forward_context().attn_metadata
        if metadata is None:  # profile run
            return
        m = metadata.get(self.prefix)
        if m is None:  # warmup runs skip mamba metadata
            return
        plan = _PLANS.get(m, self.num_spec)
        conv_pool, state_pool = self.state_pools()
        run_step(plan, self.layer_params(), mixed_qkv, g1[0], beta[0], g2, conv_pool, state_pool,
                 out=core_attn_out[0])
