"""Run one KDA layer for one engine step from a StepPlan, writing the caller's output in place.

Conv-state layout. vLLM gives each slot R = W-1+num_spec conv rows. Plain decode and prefill use
rows [0, W-1) (history, oldest first); a verify row reads its window at rows [a-1, a+W-2)
(a = tokens accepted last step) and leaves ``window[1:] ++ its new inputs`` at the front — the
layout ``ops.causal_conv1d_update`` keeps when given ``num_accepted_tokens``. The recurrent state
of verify rows follows vLLM too: start from slots[n, a-1], the state after token t goes to
slots[n, t].
"""

from __future__ import annotations

import torch

from kda_serving import ops
from kda_serving.backend import KDALayerParams, kda_mixer_forward

from .metadata import StepPlan, VerifyGroup


def run_step(plan: StepPlan, params: KDALayerParams, mixed_qkv: torch.Tensor, g: torch.Tensor,
             beta: torch.Tensor, out_gate: torch.Tensor | None, conv_pool: torch.Tensor,
             state_pool: torch.Tensor, out: torch.Tensor) -> None:
    """mixed_qkv [n, 3HD]; g [n, H, D]; beta [n, H]; out_gate [n, H, D]; out [n, H, D] (written);
    conv_pool [S, R, 3HD] (R >= W-1); state_pool [S, H, D, D]. Rows no plan part covers are zeroed.
    """
    n_all = out.shape[0]
    if not plan.verify and plan.token_order is None:
        n = min(plan.num_rows, n_all)
        gate = out_gate[:n] if out_gate is not None else None
        kda_mixer_forward(mixed_qkv[:n], g[:n], beta[:n], gate, params, plan.batch,
                          conv_pool, state_pool, out=out[:n])
        if n < n_all:
            out[n:] = 0
        return
    out.zero_()
    for group in plan.verify:
        _run_verify(group, params, mixed_qkv, g, beta, out_gate, conv_pool, state_pool, out)
    if plan.batch is not None and plan.num_rows:
        idx = plan.token_order if plan.token_order is not None else \
            torch.arange(plan.num_rows, device=out.device)
        gate = out_gate.index_select(0, idx) if out_gate is not None else None
        res = kda_mixer_forward(mixed_qkv.index_select(0, idx), g.index_select(0, idx),
                                beta.index_select(0, idx), gate, params, plan.batch,
                                conv_pool, state_pool)
        out.index_copy_(0, idx, res)


def _run_verify(grp: VerifyGroup, params: KDALayerParams, mixed_qkv, g, beta, out_gate,
                conv_pool, state_pool, out) -> None:
    H, D = params.num_heads, params.head_dim
    B, Lg = grp.slots.shape[0], grp.length
    if B == 0:
        return
    tok = grp.token_index
    x = mixed_qkv.index_select(0, tok).view(B, Lg, -1)
    y = ops.causal_conv1d_update(x, params.conv_weight, params.conv_bias, conv_pool=conv_pool,
                                 slots=grp.slots[:, 0], num_accepted_tokens=grp.num_accepted)
    q, k, v = (y[..., i * H * D:(i + 1) * H * D].unflatten(-1, (H, D)) for i in range(3))
    o = ops.kda_decode(q, k, v, g.index_select(0, tok).view(B, Lg, H, D),
                       beta.index_select(0, tok).view(B, Lg, H), params.A_log, params.dt_bias,
                       state_pool=state_pool, slots=grp.slots, num_accepted_tokens=grp.num_accepted,
                       lower_bound=params.lower_bound, scale=params.scale)
    o = o.view(B * Lg, H, D)
    if out_gate is not None and params.norm_weight is not None:
        o = ops.gated_rms_norm(o, out_gate.index_select(0, tok), params.norm_weight, params.norm_eps)
    out.index_copy_(0, tok, o.to(out.dtype))
