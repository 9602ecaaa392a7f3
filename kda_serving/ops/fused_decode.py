"""Fused decode / speculative verify: conv1d update + SiLU → KDA decode → optional gated RMSNorm.

One op for what engines hand a KDA layer at decode time: the projection output ``mixed_qkv``
(q | k | v column blocks, before the conv), the layer's conv pool and recurrent state pool.
On the kernel path (no host sync, safe to capture in CUDA graphs) it is, for T <= 8, a conv kernel
writing the conv outputs to a per-device buffer reused across calls (``_ext.DECODE_SCRATCH``), then
the decode kernel, which loads its state rows while the conv kernel runs, then the optional norm
kernel; for T > 8 three kernels without the buffer (docs/kernels.md). Otherwise the exact
composition of the reference ops ``causal_conv1d_update`` → ``kda_decode`` → ``gated_rms_norm``.
"""

from __future__ import annotations

import torch

from . import _kernel_ready, _run, reference
from .dispatch import log_path_once
from .validation import (FLOAT_INPUTS, INDEX_DTYPES, check_decode_slots, check_gate_params,
                         check_lower_bound, check_scale, check_slot_values, check_state_pool,
                         check_tensor, debug_checks_enabled)

__all__ = ["kda_decode_fused", "fused_decode_ready"]


def _check_conv_layer(mixed_qkv, conv_weight, conv_bias, conv_pool):
    D = mixed_qkv.shape[-1]
    dev = mixed_qkv.device
    check_tensor("conv_weight", conv_weight, dtypes=FLOAT_INPUTS, ndim=2, device=dev)
    if conv_weight.shape[0] != D or not 2 <= conv_weight.shape[1] <= 4:
        raise ValueError(f"conv_weight: expected shape [{D}, W] with W in 2..4, got {list(conv_weight.shape)}")
    if conv_bias is not None:
        check_tensor("conv_bias", conv_bias, dtypes=(conv_weight.dtype,), shape=(D,), device=dev)
    check_tensor("conv_pool", conv_pool, dtypes=FLOAT_INPUTS, ndim=3, device=dev)
    W = conv_weight.shape[1]
    if conv_pool.shape[2] != D or conv_pool.shape[1] < W - 1:
        raise ValueError(f"conv_pool: expected shape [S, R >= {W - 1}, {D}], got {list(conv_pool.shape)}")


def _check_norm(out_gate, norm_weight, norm_eps, shape, device):
    if (out_gate is None) != (norm_weight is None):
        missing = "norm_weight" if norm_weight is None else "out_gate"
        raise ValueError(f"{missing}: expected a tensor (out_gate and norm_weight come together), got None")
    if out_gate is None:
        return
    check_tensor("out_gate", out_gate, dtypes=FLOAT_INPUTS, shape=shape, device=device)
    check_tensor("norm_weight", norm_weight, dtypes=FLOAT_INPUTS, shape=(shape[-1],), device=device)
    if not isinstance(norm_eps, (int, float)) or not float(norm_eps) > 0.0:
        raise ValueError(f"norm_eps: expected a positive float, got {norm_eps!r}")


def _row_slots(slots):
    """(conv slot, 2-D?) per row: the conv state lives in the row's first slot."""
    return (slots[:, 0], True) if slots.dim() == 2 else (slots, False)


def fused_decode_ready(mixed_qkv, g, beta, state_pool, conv_weight, conv_bias, conv_pool,
                       out_gate=None, norm_weight=None, out=None) -> bool:
    """True when ``kda_decode_fused`` on these tensors runs the CUDA kernels (else the reference):
    bf16 activations on an SM90+ GPU, head dim 128, packed state rows, fp32/bf16 conv weight,
    conv pool and norm weight."""
    if not _kernel_ready(mixed_qkv, mixed_qkv, g, beta, out_gate, out):
        return False
    small = (torch.float32, torch.bfloat16)
    return (g.shape[-1] == 128 and state_pool[0].is_contiguous() and conv_weight.dtype in small
            and conv_pool.dtype in small and (norm_weight is None or norm_weight.dtype in small))


def kda_decode_fused(mixed_qkv, g, beta, A_log, dt_bias, *, conv_weight, conv_bias=None, conv_pool,
                     state_pool, slots, num_accepted_tokens=None, lower_bound=None, scale=None,
                     out_gate=None, norm_weight=None, norm_eps=1e-6, out=None):
    """Decode (T = 1) or speculative verify (T <= 8) of a KDA layer from the projection output.

    Args:
        mixed_qkv: [B, T, 3·H·K] bf16/fp16/fp32, the q | k | v column blocks before the conv
            (rows may be strided, channels contiguous).
        g: [B, T, H, K] raw gate; beta: [B, T, H] logits; A_log: [H] fp32; dt_bias: [H·K] fp32.
        conv_weight: [3·H·K, W] (W in 2..4); conv_bias: [3·H·K] (weight dtype) or None.
        conv_pool: [S, R, 3·H·K] with R >= W-1, updated in place as ``causal_conv1d_update``
            does (window rows [off, off+W-1), off = num_accepted-1 or 0; rows [0, n) then hold
            the last n of window ++ x, n = W-1 plain or min(R, W-2+T) with num_accepted) in the
            row's conv slot ``slots[n, 0]`` (``slots[n]``).
        state_pool: [S, H, K, K] fp32/bf16 (V-first), updated in place as ``kda_decode`` does.
        slots: [B] or [B, C >= T] (verify: the state after token t goes to slots[n, t]; the start
            state comes from slots[n, num_accepted_tokens[n] - 1]). A row whose start slot or
            conv slot is <= 0 is null: zero output, neither pool read or written.
        num_accepted_tokens: optional [B] int32/int64, only with 2-D slots.
        lower_bound, scale: as for ``kda_decode``.
        out_gate: [B, T, H, K] and norm_weight: [K], both or neither: the output becomes
            ``RMSNorm(o)·norm_weight·sigmoid(out_gate)`` per head, eps ``norm_eps``.
        out: optional [B, T, H, K] output (default: new tensor of mixed_qkv's dtype).
    Returns: out [B, T, H, K].
    """
    check_tensor("mixed_qkv", mixed_qkv, dtypes=FLOAT_INPUTS, ndim=3)
    dev = mixed_qkv.device
    B, T = mixed_qkv.shape[:2]
    check_tensor("g", g, dtypes=FLOAT_INPUTS, ndim=4, shape=(B, T, None, None), device=dev)
    H, K = g.shape[2], g.shape[3]
    if K != 128 and dev.type == "cuda":
        raise ValueError(f"g: expected head dim 128 on the GPU, got {K}")
    if mixed_qkv.shape[2] != 3 * H * K:
        raise ValueError(f"mixed_qkv: expected shape [{B}, {T}, {3 * H * K}] (3·H·K for g's H={H}, "
                         f"K={K}), got {list(mixed_qkv.shape)}")
    check_tensor("beta", beta, dtypes=FLOAT_INPUTS, shape=(B, T, H), device=dev)
    check_gate_params(A_log, dt_bias, H, K, dev)
    _check_conv_layer(mixed_qkv, conv_weight, conv_bias, conv_pool)
    check_state_pool(state_pool, H, K, K, dev)
    check_decode_slots(slots, B, T, dev)
    check_slot_values("slots", slots, min(state_pool.shape[0], conv_pool.shape[0]))
    W, R = conv_weight.shape[1], conv_pool.shape[1]
    if num_accepted_tokens is not None:
        if slots.dim() != 2:
            raise ValueError("num_accepted_tokens: only valid with 2-D slots [B, T], got 1-D slots")
        check_tensor("num_accepted_tokens", num_accepted_tokens, dtypes=INDEX_DTYPES, shape=(B,), device=dev)
        hi = min(slots.shape[1], R - W + 2)  # the conv window [a-1, a-1+W-1) must lie in the R rows
        if debug_checks_enabled(num_accepted_tokens) and B and (
                int(num_accepted_tokens.min()) < 1 or int(num_accepted_tokens.max()) > hi):
            raise ValueError(f"num_accepted_tokens: expected values in [1, {hi}] (C={slots.shape[1]}, conv_pool "
                             f"R={R}, W={W}), got {num_accepted_tokens.tolist()}")
    lower_bound = check_lower_bound(lower_bound)
    scale = check_scale(scale, K)
    _check_norm(out_gate, norm_weight, norm_eps, (B, T, H, K), dev)
    if out is None:
        out = torch.empty(B, T, H, K, dtype=mixed_qkv.dtype, device=dev)
    else:
        check_tensor("out", out, dtypes=FLOAT_INPUTS, shape=(B, T, H, K), device=dev)
    args = (mixed_qkv, g, beta, A_log, dt_bias, conv_weight, conv_bias, conv_pool, state_pool, slots,
            num_accepted_tokens, lower_bound, scale, out_gate, norm_weight, float(norm_eps), out)
    cuda = fused_decode_ready(mixed_qkv, g, beta, state_pool, conv_weight, conv_bias, conv_pool,
                              out_gate, norm_weight, out)

    def kernel():
        from . import _ext
        return _ext.decode_fused(mixed_qkv, g, beta, A_log, dt_bias, conv_weight, conv_bias, conv_pool,
                                 state_pool, slots, num_accepted_tokens, lower_bound=lower_bound,
                                 scale=scale, out_gate=out_gate, norm_weight=norm_weight,
                                 norm_eps=norm_eps, out=out)

    if cuda:
        return _run("kda_decode_fused", True, args, kernel)
    log_path_once("kda_decode_fused", "reference")
    return _reference_fused(*args)


def _reference_fused(mixed_qkv, g, beta, A_log, dt_bias, conv_weight, conv_bias, conv_pool, state_pool,
                     slots, num_accepted_tokens, lower_bound, scale, out_gate, norm_weight, norm_eps, out):
    """The exact composition of the reference ops; arguments already validated."""
    B, T, H, K = g.shape
    conv_slots, verify = _row_slots(slots)
    if verify:
        first = (num_accepted_tokens.long() - 1) if num_accepted_tokens is not None else \
            torch.zeros_like(conv_slots, dtype=torch.long)
        start = slots.gather(1, first[:, None]).squeeze(1)
        live = (start > 0) & (conv_slots > 0)
        # a row is null when either its start or its conv slot is: mask both ops alike
        slots = torch.where(live[:, None], slots, torch.zeros_like(slots))
        conv_slots = slots[:, 0]
    x = torch.empty(B, T, mixed_qkv.shape[2], dtype=mixed_qkv.dtype, device=mixed_qkv.device)
    reference.causal_conv1d_update(mixed_qkv, conv_weight, conv_bias, conv_pool, conv_slots,
                                   num_accepted_tokens, "silu", x)
    P = H * K
    q, k, v = (x[..., i * P:(i + 1) * P].unflatten(-1, (H, K)) for i in range(3))
    reference.kda_decode(q, k, v, g, beta, A_log, dt_bias, state_pool, slots, num_accepted_tokens,
                         lower_bound, scale, out)
    if out_gate is not None:
        reference.gated_rms_norm(out, out_gate, norm_weight, norm_eps, out)
    return out
