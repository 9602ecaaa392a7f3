"""The KDA mixer forward: conv1d → KDA (decode part, prefill part) → gated RMSNorm.

Input projections and o_proj stay with the engine; this covers what sits between them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..ops.dispatch import decode_fused_selected
from ..ops.validation import check_slot_values
from .batch import KDABatch


@dataclass
class KDALayerParams:
    num_heads: int                 # heads on this rank
    head_dim: int
    conv_weight: torch.Tensor      # [3·H·D, W]
    conv_bias: torch.Tensor | None
    A_log: torch.Tensor            # [H] fp32
    dt_bias: torch.Tensor          # [H·D] fp32
    norm_weight: torch.Tensor | None = None  # [D]
    norm_eps: float = 1e-6
    lower_bound: float | None = None
    scale: float | None = None


def _split_qkv(x, H, D):
    """Column views of the conv output [..., 3·H·D] as q, k, v [..., H, D] (no copies)."""
    P = H * D
    return tuple(x[..., i * P:(i + 1) * P].unflatten(-1, (H, D)) for i in range(3))


def _check_batch_slots(batch: KDABatch, num_slots: int) -> None:
    """Decode and prefill parts run as separate ops: check their slots together up front, so a bad
    prefill slot cannot raise after the decode part already wrote state."""
    slots = torch.cat([batch.decode_slots.reshape(-1), batch.prefill_slots.reshape(-1)])
    check_slot_values("batch slots", slots, num_slots)


def kda_mixer_forward(mixed_qkv, g_raw, beta_raw, out_gate, params: KDALayerParams, batch: KDABatch,
                      conv_pool, state_pool, out=None):
    """One KDA layer step on packed tokens.

    mixed_qkv: [T, 3·H·D] (projection output, before the conv); g_raw: [T, H, D] or [T, H·D];
    beta_raw: [T, H]; out_gate: [T, H, D] / [T, H·D] or None (no norm);
    conv_pool: [S, R, 3·H·D]; state_pool: [S, H, D, D]. Returns out [T, H, D]; rows after
    ``batch.num_tokens`` (padding) are zero.
    """
    H, D = params.num_heads, params.head_dim
    T = mixed_qkv.shape[0]
    if mixed_qkv.dim() != 2 or mixed_qkv.shape[1] != 3 * H * D:
        raise ValueError(f"mixed_qkv: expected shape [T, {3 * H * D}], got {list(mixed_qkv.shape)}")
    if batch.num_tokens > T:
        raise ValueError(f"batch: {batch.num_tokens} tokens of work but mixed_qkv has {T} rows")
    _check_batch_slots(batch, state_pool.shape[0])
    g = g_raw.reshape(T, H, D)
    beta = beta_raw.reshape(T, H)
    if out is None:
        out = torch.empty(T, H, D, dtype=mixed_qkv.dtype, device=mixed_qkv.device)
    common = dict(lower_bound=params.lower_bound, scale=params.scale)
    nd, nt = batch.num_decode_tokens, batch.num_tokens
    norm = out_gate is not None and params.norm_weight is not None
    normed = 0  # leading rows already normalised (by the fused decode)
    if batch.num_decodes:
        B, L = batch.num_decodes, batch.decode_len
        xd, gd, bd = mixed_qkv[:nd].view(B, L, -1), g[:nd].view(B, L, H, D), beta[:nd].view(B, L, H)
        od = out[:nd].view(B, L, H, D)
        gate_d = out_gate.reshape(T, H, D)[:nd].view(B, L, H, D) if norm else None
        nw = params.norm_weight if norm else None
        if decode_fused_selected() and ops.fused_decode_ready(
                xd, gd, bd, state_pool, params.conv_weight, params.conv_bias, conv_pool, gate_d, nw, od):
            ops.kda_decode_fused(xd, gd, bd, params.A_log, params.dt_bias, conv_weight=params.conv_weight,
                                 conv_bias=params.conv_bias, conv_pool=conv_pool, state_pool=state_pool,
                                 slots=batch.decode_slots, num_accepted_tokens=batch.num_accepted_tokens,
                                 out_gate=gate_d, norm_weight=nw, norm_eps=params.norm_eps, out=od,
                                 **common)
            normed = nd if norm else 0
        else:
            x = ops.causal_conv1d_update(xd, params.conv_weight, params.conv_bias, conv_pool=conv_pool,
                                         slots=batch.decode_conv_slots,
                                         num_accepted_tokens=batch.num_accepted_tokens)
            q, k, v = _split_qkv(x, H, D)
            ops.kda_decode(q, k, v, gd, bd, params.A_log, params.dt_bias, state_pool=state_pool,
                           slots=batch.decode_slots, num_accepted_tokens=batch.num_accepted_tokens,
                           out=od, **common)
    if batch.num_prefills:
        x = ops.causal_conv1d_prefill(mixed_qkv[nd:nt], params.conv_weight, params.conv_bias,
                                      cu_seqlens=batch.prefill_cu_seqlens, conv_pool=conv_pool,
                                      slots=batch.prefill_slots,
                                      has_initial_state=batch.prefill_has_initial_state)
        q, k, v = _split_qkv(x, H, D)
        ops.kda_prefill(q, k, v, g[nd:nt], beta[nd:nt], params.A_log, params.dt_bias,
                        cu_seqlens=batch.prefill_cu_seqlens, cu_seqlens_cpu=batch.prefill_cu_seqlens_cpu,
                        state_pool=state_pool,
                        slots=batch.prefill_slots, has_initial_state=batch.prefill_has_initial_state,
                        out=out[nd:nt], **common)
    if nt < T:
        out[nt:] = 0
    if norm and nt > normed:
        ops.gated_rms_norm(out[normed:nt], out_gate.reshape(T, H, D)[normed:nt], params.norm_weight,
                           params.norm_eps, out=out[normed:nt])
    return out
