"""fla (flash-linear-attention) kernels under the op contract of ``kda_serving.ops``.

Each function takes the arguments of the same-named op and does around fla's kernel what an
engine using fla does: gather the slots' states from the pool, run fla, scatter the final states
back (prefill); or hand fla the pool and the slots to update in place (decode). The benchmarks
time them as the fla baseline, and ``mixer_uses_fla_ops`` runs ``kda_mixer_forward`` on them.

Kernels used (fla 0.6):
- prefill: ``fla.ops.kda.chunk_kda`` with V-first fp32 states, gate / L2 norm / beta sigmoid
  in the kernel; the bounded gate passes ``safe_gate=True`` (fla's dispatch may then route the
  call to FlashKDA when that package is installed: see ``chunk_backend``).
- decode: ``fla.ops.kda.fused_recurrent.fused_recurrent_kda_fwd`` with ``ssm_state_indices``
  and ``inplace_final_state=True`` (vLLM's way of calling it); q, k, v, g, beta made contiguous
  first, since the kernel assumes packed rows.
- conv: ``fla.modules.causal_conv1d`` (prefill) and ``causal_conv1d_update`` (one token), whose
  caches are dense ``[N, D, W]``: the pool rows are gathered into that layout and scattered back.
- norm: ``fla.modules.norm.fused_norm_gate.rms_norm_gated`` with the sigmoid gate.

Limits (benchmark adapters, not serving code): slots must be > 0 (fla has no null-slot guard; a
slot 0 reads and writes pool row 0 and its output is not zeroed), no intermediate states, conv
updates take one token per sequence.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from contextlib import contextmanager
from types import SimpleNamespace

import torch
import torch.nn.functional as F


@functools.cache
def _fla() -> SimpleNamespace:
    from fla.modules.causal_conv1d import causal_conv1d, causal_conv1d_update
    from fla.modules.norm.fused_norm_gate import rms_norm_gated
    from fla.ops.kda import chunk_kda
    from fla.ops.kda.fused_recurrent import fused_recurrent_kda_fwd
    return SimpleNamespace(chunk_kda=chunk_kda, fused_recurrent_kda_fwd=fused_recurrent_kda_fwd,
                           causal_conv1d=causal_conv1d, causal_conv1d_update=causal_conv1d_update,
                           rms_norm_gated=rms_norm_gated)


def unavailable_reason(device) -> str | None:
    """None when the adapters can run on ``device``, else why not."""
    if torch.device(device).type != "cuda":
        return "fla runs Triton kernels: needs a CUDA device"
    try:
        _fla()
    except Exception as e:  # ImportError, or triton failing to initialise
        return f"fla not importable: {type(e).__name__}: {e}"
    return None


def chunk_backend(lower_bound) -> str:
    """Which implementation fla's dispatch picks for our ``chunk_kda`` call (made without grad)."""
    if os.environ.get("FLA_DISABLE_BACKEND_DISPATCH") == "1" or lower_bound is None:
        return "triton"
    if importlib.util.find_spec("flash_kda") is None or os.environ.get("FLA_FLASH_KDA", "1") == "0":
        return "triton"
    return "flash_kda"


def _long(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.int64 else x.long()


def _scale(scale, K):
    return K ** -0.5 if scale is None else float(scale)


def _copy_out(y, out):
    if out is None:
        return y
    out.copy_(y.view(out.shape))
    return out


def kda_prefill(q, k, v, g, beta, A_log, dt_bias, *, cu_seqlens, state_pool, slots,
                has_initial_state=None, lower_bound=None, scale=None, intermediate_states=None,
                intermediate_offsets=None, out=None, cu_seqlens_cpu=None):
    """fla ``chunk_kda`` on packed [T, H, *] inputs; the pool [S, H, V, K] is updated at ``slots``.

    ``cu_seqlens_cpu`` (optional, fla only) spares fla a device-to-host copy of cu_seqlens.
    """
    if intermediate_states is not None:
        raise NotImplementedError("fla adapter: intermediate_states are not supported")
    s = _long(slots)
    init = None
    if has_initial_state is not None:
        init = state_pool.index_select(0, s).float()
        init = torch.where(has_initial_state.view(-1, 1, 1, 1), init, 0.0)
    o, final = _fla().chunk_kda(
        q[None], k[None], v[None], g[None], beta[None], scale=_scale(scale, q.shape[-1]),
        initial_state=init, output_final_state=True, use_qk_l2norm_in_kernel=True,
        use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
        safe_gate=lower_bound is not None, lower_bound=lower_bound, state_v_first=True,
        cu_seqlens=_long(cu_seqlens), cu_seqlens_cpu=cu_seqlens_cpu,
        A_log=A_log, dt_bias=dt_bias.reshape(-1))
    state_pool.index_copy_(0, s, final.to(state_pool.dtype))
    return _copy_out(o[0], out)


def kda_decode(q, k, v, g, beta, A_log, dt_bias, *, state_pool, slots, num_accepted_tokens=None,
               lower_bound=None, scale=None, out=None):
    """fla ``fused_recurrent_kda_fwd`` on [B, T, H, *] inputs, updating the pool in place at
    ``slots`` ([B], or [B, T] per-token slots for verify, as in ``kda_serving.ops.kda_decode``)."""
    o = out if out is not None and out.is_contiguous() else torch.empty(v.shape, dtype=q.dtype, device=q.device)
    _fla().fused_recurrent_kda_fwd(
        q=q.contiguous(), k=k.contiguous(), v=v.contiguous(), g=g.contiguous(), beta=beta.contiguous(),
        A_log=A_log, dt_bias=dt_bias.reshape(-1), initial_state=state_pool,
        scale=_scale(scale, q.shape[-1]), inplace_final_state=True, state_v_first=True,
        ssm_state_indices=slots, num_accepted_tokens=num_accepted_tokens,
        use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
        lower_bound=lower_bound, out=o)
    return o if out is None or o is out else _copy_out(o, out)


def _gather_conv(conv_pool, s, W):
    """Pool rows [N, R, D] -> fla's dense cache [N, D, W]; column 0 (oldest) is never read."""
    return F.pad(conv_pool[s, :W - 1].transpose(1, 2), (1, 0)).contiguous()


def _scatter_conv(conv_pool, s, cache, W):
    conv_pool[s, :W - 1] = cache[:, :, 1:].transpose(1, 2).to(conv_pool.dtype)


def causal_conv1d_prefill(x, weight, bias=None, *, cu_seqlens, conv_pool, slots,
                          has_initial_state=None, activation="silu", out=None):
    """fla ``causal_conv1d`` over packed x [T, D]; pool rows [0, W-1) are read and rewritten."""
    W = weight.shape[1]
    s = _long(slots)
    init = None
    if has_initial_state is not None:
        init = _gather_conv(conv_pool, s, W)
        init = torch.where(has_initial_state.view(-1, 1, 1), init, 0)
    y, final = _fla().causal_conv1d(x[None], weight, bias, initial_state=init, output_final_state=True,
                                    activation=activation, cu_seqlens=_long(cu_seqlens))
    _scatter_conv(conv_pool, s, final, W)
    return _copy_out(y[0], out)


def causal_conv1d_update(x, weight, bias=None, *, conv_pool, slots, num_accepted_tokens=None,
                         activation="silu", out=None):
    """fla ``causal_conv1d_update`` for x [B, 1, D] (one token per sequence)."""
    B, T, D = x.shape
    if T != 1 or num_accepted_tokens is not None:
        raise NotImplementedError("fla adapter: the conv update takes one token per sequence")
    W = weight.shape[1]
    s = _long(slots)
    cache = _gather_conv(conv_pool, s, W)
    y, cache = _fla().causal_conv1d_update(x.reshape(B, D), cache, weight=weight, bias=bias,
                                           activation=activation)
    _scatter_conv(conv_pool, s, cache, W)
    return _copy_out(y.view(B, T, D), out)


def fused_decode_ready(*args, **kwargs) -> bool:
    """fla has no fused conv + decode: the mixer takes the conv update + decode pair."""
    return False


def gated_rms_norm(x, gate, weight, eps=1e-6, out=None):
    """fla ``rms_norm_gated``: RMSNorm(x)·weight·sigmoid(gate) over the last dim."""
    y = _fla().rms_norm_gated(x, gate, weight, None, activation="sigmoid", eps=eps)
    return _copy_out(y, out)


@contextmanager
def mixer_uses_fla_ops():
    """Within the block, ``kda_serving.backend.kda_mixer_forward`` calls these adapters instead of
    ``kda_serving.ops`` (same backend code, fla kernels)."""
    from kda_serving.backend import mixer
    saved = mixer.ops
    mixer.ops = sys.modules[__name__]
    try:
        yield
    finally:
        mixer.ops = saved
