"""Run one KDA layer for one engine step from a StepPlan, writing the caller's output in place.

Conv-state layout. vLLM gives each slot R = W-1+num_spec conv rows:
  * plain decode and prefill use rows [0, W-1) only (history, oldest first), so the backend
    gets a view narrowed to those rows;
  * a verify row reads its window at rows [a-1, a+W-2) (a = tokens accepted last step) and
    leaves ``window[1:] ++ its l new inputs`` at rows [0, W-2+l), the other rows untouched,
    so that next step's window at row a'-1 ends at its last accepted input. The backend's
    spec update keeps another layout, so verify rows run the ops here on a copy of each
    row's window and write the new rows back in vLLM's layout.
The recurrent state of verify rows follows vLLM too: start from slots[n, a-1], the state after
token t goes to slots[n, t].
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
    history = conv_pool[:, :params.conv_weight.shape[1] - 1]
    if not plan.verify and plan.token_order is None:
        n = min(plan.num_rows, n_all)
        gate = out_gate[:n] if out_gate is not None else None
        kda_mixer_forward(mixed_qkv[:n], g[:n], beta[:n], gate, params, plan.batch,
                          history, state_pool, out=out[:n])
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
                                history, state_pool)
        out.index_copy_(0, idx, res)


def _run_verify(grp: VerifyGroup, params: KDALayerParams, mixed_qkv, g, beta, out_gate,
                conv_pool, state_pool, out) -> None:
    H, D = params.num_heads, params.head_dim
    W = params.conv_weight.shape[1]
    B, Lg = grp.slots.shape[0], grp.length
    if B == 0:
        return
    dev = mixed_qkv.device
    tok = grp.token_index
    x = mixed_qkv.index_select(0, tok).view(B, Lg, -1)
    conv_slot = grp.slots[:, 0].long()
    live = conv_slot > 0
    off = (grp.num_accepted.long() - 1).clamp(min=0)
    # each row's conv window, copied into a small pool whose slot n+1 belongs to row n
    rows = off[:, None] + torch.arange(W - 1, device=dev)
    window = conv_pool[conv_slot.clamp(min=0)[:, None], rows]                # [B, W-1, 3P]
    scratch = torch.cat([window.new_zeros(1, W - 1, window.shape[-1]), window])
    scratch_slots = torch.where(live, torch.arange(1, B + 1, device=dev), 0).to(torch.int32)
    y = ops.causal_conv1d_update(x, params.conv_weight, params.conv_bias, conv_pool=scratch,
                                 slots=scratch_slots)
    # rows of padding entries (slot <= 0) rewrite the null block with its own contents, so
    # nothing here needs the host to know which rows are live
    n_new = W - 2 + Lg
    dst = conv_slot.clamp(min=0)
    new_rows = torch.cat([window[:, 1:], x.to(conv_pool.dtype)], dim=1)     # [B, W-2+Lg, 3P]
    new_rows = torch.where(live[:, None, None], new_rows, conv_pool[0, :n_new].expand_as(new_rows))
    conv_pool[dst[:, None], torch.arange(n_new, device=dev)] = new_rows
    # start state: copy slots[n, a-1] into slots[n, 0], which token 0's state overwrites anyway
    start = grp.slots.long().gather(1, off[:, None]).squeeze(1)
    src = torch.where(live & (start > 0), start, dst)
    state_pool.index_copy_(0, dst, state_pool.index_select(0, src))
    q, k, v = (y[..., i * H * D:(i + 1) * H * D].unflatten(-1, (H, D)) for i in range(3))
    o = ops.kda_decode(q, k, v, g.index_select(0, tok).view(B, Lg, H, D),
                       beta.index_select(0, tok).view(B, Lg, H), params.A_log, params.dt_bias,
                       state_pool=state_pool, slots=grp.slots[:, :Lg].contiguous(),
                       lower_bound=params.lower_bound, scale=params.scale)
    o = o.view(B * Lg, H, D)
    if out_gate is not None and params.norm_weight is not None:
        o = ops.gated_rms_norm(o, out_gate.index_select(0, tok), params.norm_weight, params.norm_eps)
    out.index_copy_(0, tok, o.to(out.dtype))
