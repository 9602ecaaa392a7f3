"""Public functional API of kda-serving.

Every op validates its arguments before writing anything, then runs the CUDA kernels when the
extension is built and the tensors live on an SM90+ GPU, else the exact torch reference.
Shapes use T = packed tokens, N = sequences, B = batch rows, H = heads, K = V = head dim,
S = pool slots, D = channels, W = conv width.
"""

from __future__ import annotations

import torch

from . import reference
from .dispatch import log_path_once, op_path, prefill_kernel, prefill_kernel_name
from .validation import (FLOAT_INPUTS, INDEX_DTYPES, check_cu_seqlens, check_decode_slots,
                         check_gate_params, check_lower_bound, check_scale, check_slot_values,
                         check_state_pool, check_tensor)

__all__ = ["kda_prefill", "kda_decode", "causal_conv1d_prefill", "causal_conv1d_update",
           "gated_rms_norm", "op_path", "reserve_prefill_workspace"]


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _kernel_ready(x, *tensors) -> bool:
    """The CUDA kernels take bf16 activations with head dim 128 and packed state rows."""
    return op_path(x) == "cuda" and all(t is None or t.dtype == torch.bfloat16 for t in tensors)


def _run(op, cuda: bool, args, ext_call):
    """Run the kernel (``ext_call``) when ``cuda`` else the reference ``reference.<op>(*args)``."""
    log_path_once(op, "cuda" if cuda else "reference")
    if cuda:
        return ext_call()
    return getattr(reference, op)(*args)


def _check_qkvgb(q, k, v, g, beta, lead):
    """q, k, g: [*lead, H, K]; v: [*lead, H, V]; beta: [*lead, H]. Returns (H, K, V)."""
    nd = len(lead) + 2
    check_tensor("q", q, dtypes=FLOAT_INPUTS, ndim=nd)
    H, K = q.shape[-2], q.shape[-1]
    if K != 128 and q.device.type == "cuda":
        raise ValueError(f"q: expected head dim 128 on the GPU, got {K}")
    shape = tuple(q.shape[:-2])
    check_tensor("k", k, dtypes=FLOAT_INPUTS, shape=shape + (H, K), device=q.device)
    check_tensor("v", v, dtypes=FLOAT_INPUTS, ndim=nd, device=q.device)
    if tuple(v.shape[:-1]) != shape + (H,):
        raise ValueError(f"v: expected shape {list(shape + (H,))} + [V], got {list(v.shape)}")
    check_tensor("g", g, dtypes=FLOAT_INPUTS, shape=shape + (H, K), device=q.device)
    check_tensor("beta", beta, dtypes=FLOAT_INPUTS, shape=shape + (H,), device=q.device)
    return H, K, v.shape[-1]


def kda_prefill(q, k, v, g, beta, A_log, dt_bias, *, cu_seqlens, state_pool, slots,
                has_initial_state=None, lower_bound=None, scale=None,
                intermediate_states=None, intermediate_offsets=None, out=None, cu_seqlens_cpu=None):
    """KDA forward over packed varlen sequences, on the state pool in place.

    Args:
        q, k: [T, H, K] raw (L2-normalised inside); v: [T, H, V]; g: [T, H, K] raw gate;
            beta: [T, H] logits (sigmoid inside). bf16/fp16/fp32; may be strided column slices.
        A_log: [H] fp32; dt_bias: [H*K] or [H, K] fp32.
        cu_seqlens: [N+1] int32/int64, zero-length sequences allowed.
        state_pool: [S, H, V, K] fp32 or bf16 (V-first); slots: [N] int32/int64, <= 0 is null
            (zero output, no state access); has_initial_state: [N] bool (None: all False).
        lower_bound: None (Kimi-Linear gate) or a float in [-5, 0) (bounded gate).
        scale: default K**-0.5.
        intermediate_states: optional [M, H, V, K] pool-dtype buffer; the state after the
            (64·(i+1))-th token of sequence n goes to row intermediate_offsets[n] + i.
        out: optional [T, H, V] output (default: new tensor of q's dtype).
        cu_seqlens_cpu: optional host copy of cu_seqlens. With it (or a CPU cu_seqlens) long
            sequences may be split into segments run in parallel and combined exactly
            (``split_plan.py``; ``KDA_SERVING_PREFILL_SPLIT``); never with intermediate_states.
    Returns: out [T, H, V]. Final states are written to state_pool[slots].
    """
    H, K, V = _check_qkvgb(q, k, v, g, beta, ("T",))
    dev = q.device
    T = q.shape[0]
    check_gate_params(A_log, dt_bias, H, K, dev)
    check_cu_seqlens(cu_seqlens, T, dev)
    N = cu_seqlens.numel() - 1
    check_state_pool(state_pool, H, V, K, dev)
    check_tensor("slots", slots, dtypes=INDEX_DTYPES, shape=(N,), device=dev)
    check_slot_values("slots", slots, state_pool.shape[0])
    if has_initial_state is None:
        has_initial_state = torch.zeros(N, dtype=torch.bool, device=dev)
    check_tensor("has_initial_state", has_initial_state, dtypes=(torch.bool,), shape=(N,), device=dev)
    lower_bound = check_lower_bound(lower_bound)
    scale = check_scale(scale, K)
    if intermediate_states is not None:
        check_tensor("intermediate_states", intermediate_states, dtypes=(state_pool.dtype,), ndim=4,
                     shape=(None, H, V, K), device=dev)
        if intermediate_offsets is None:
            raise ValueError("intermediate_offsets: expected [N] int32/int64 with intermediate_states, got None")
        check_tensor("intermediate_offsets", intermediate_offsets, dtypes=INDEX_DTYPES, shape=(N,), device=dev)
    if out is None:
        out = torch.empty(T, H, V, dtype=q.dtype, device=dev)
    else:
        check_tensor("out", out, dtypes=FLOAT_INPUTS, shape=(T, H, V), device=dev)
    args = (q, k, v, g, beta, A_log, dt_bias, cu_seqlens, state_pool, slots, has_initial_state,
            lower_bound, scale, intermediate_states, intermediate_offsets, out)
    if cu_seqlens_cpu is not None:
        check_tensor("cu_seqlens_cpu", cu_seqlens_cpu, dtypes=INDEX_DTYPES, shape=(N + 1,),
                     device=torch.device("cpu"))
    cuda = _kernel_ready(q, q, k, v, g, beta, out) and V == 128 and state_pool[0].is_contiguous()
    if intermediate_states is None:
        from .split_prefill import choose_segment, host_bounds, split_prefill
        bounds = host_bounds(cu_seqlens, cu_seqlens_cpu)
        tc = cuda and prefill_kernel_name() == "tc"
        # The tc kernel splits inside the kernel (tc_split.py; over the workspace limit, per token
        # window, _ext.prefill_tc). It uploads a host-built table: never inside a CUDA graph capture.
        if tc and bounds is not None and not _capturing(dev):
            from . import _ext, tc_windows
            from .tc_split import plan_for_bounds
            seg = plan_for_bounds(bounds, H, dev)
            if seg is not None and _ext.tc_workspace_floats(T, N, H) * 4 <= tc_windows.workspace_limit_bytes():
                log_path_once("kda_prefill", "cuda tc split")
                return _ext.prefill_tc_split(q, k, v, g, beta, A_log, dt_bias, cu_seqlens, state_pool, slots,
                                             has_initial_state, bounds=bounds, segment_chunks=seg,
                                             lower_bound=lower_bound, scale=scale, out=out)
        segment = None if tc else choose_segment(bounds, H, K, V, dev, cuda)
        if segment is not None:
            return split_prefill(q, k, v, g, beta, A_log, dt_bias, bounds=bounds, segment=segment,
                                 state_pool=state_pool, slots=slots, has_initial_state=has_initial_state,
                                 lower_bound=lower_bound, scale=scale, out=out, cuda=cuda)

    def kernel():
        return prefill_kernel()(q, k, v, g, beta, A_log, dt_bias, cu_seqlens, state_pool, slots,
                  has_initial_state, lower_bound=lower_bound, scale=scale,
                  inter=intermediate_states, inter_offsets=intermediate_offsets, out=out)
    return _run("kda_prefill", cuda, args, kernel)


def reserve_prefill_workspace(num_tokens: int, num_heads: int, device) -> int:
    """Allocates now what the tensor-core prefill's workspace needs for one call of ``num_tokens``
    tokens (capped at ``KDA_SERVING_TC_WORKSPACE_MB``, past which a call runs in token windows),
    so that an engine's memory profile, which runs its largest step before sizing its caches,
    counts it, and the split state its planner may use at that size (``tc_split.py``: one entry
    per segment of at least ``SEGMENTS[0]`` chunks; windowed calls never split). Returns the bytes
    held, or 0 when that kernel does not run here (the reference path, another kernel selected) or
    a CUDA graph is being captured."""
    device = torch.device(device)
    if prefill_kernel_name() != "tc" or op_path(torch.empty(0, device=device)) != "cuda":
        return 0
    if _capturing(device):
        return 0
    from . import _ext, tc_split, tc_windows
    need, limit = _ext.tc_workspace_floats(num_tokens, 1, num_heads), tc_windows.workspace_limit_bytes()
    held = _ext.tc_workspace(device, min(need, limit // 4)).numel() * 4
    entries = num_tokens // (tc_split.SEGMENTS[0] * tc_split.CHUNK)
    if need * 4 <= limit and entries:
        held += tc_split.SPLIT_STATE.get(device, tc_split.split_state_floats(entries, num_heads)).numel() * 4
    return held


def kda_decode(q, k, v, g, beta, A_log, dt_bias, *, state_pool, slots, num_accepted_tokens=None,
               lower_bound=None, scale=None, out=None):
    """KDA decode (T = 1) and speculative verify (T <= 8 tokens per sequence) on the pool in place.

    Args:
        q, k, g: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H]; A_log, dt_bias as for prefill.
        slots: [B] (state read from and final state written to slots[n]) or [B, C] with C >= T
            (verify: the state after token t goes to slots[n, t]; the start state is read from
            slots[n, num_accepted_tokens[n] - 1], or slots[n, 0] without num_accepted_tokens;
            C > T lets a row draft fewer tokens than the previous step accepted).
            A start slot <= 0 is null: zero output, no state access.
        num_accepted_tokens: optional [B] int32/int64, only with 2-D slots.
    Returns: out [B, T, H, V].
    """
    H, K, V = _check_qkvgb(q, k, v, g, beta, ("B", "T"))
    dev = q.device
    B, T = q.shape[:2]
    check_gate_params(A_log, dt_bias, H, K, dev)
    check_state_pool(state_pool, H, V, K, dev)
    check_decode_slots(slots, B, T, dev)
    check_slot_values("slots", slots, state_pool.shape[0])
    if num_accepted_tokens is not None:
        if slots.dim() != 2:
            raise ValueError("num_accepted_tokens: only valid with 2-D slots [B, T], got 1-D slots")
        check_tensor("num_accepted_tokens", num_accepted_tokens, dtypes=INDEX_DTYPES, shape=(B,), device=dev)
        C = slots.shape[1]
        if dev.type == "cpu" and B and (int(num_accepted_tokens.min()) < 1 or int(num_accepted_tokens.max()) > C):
            raise ValueError(f"num_accepted_tokens: expected values in [1, {C}], "
                             f"got {num_accepted_tokens.tolist()}")
    lower_bound = check_lower_bound(lower_bound)
    scale = check_scale(scale, K)
    if out is None:
        out = torch.empty(B, T, H, V, dtype=q.dtype, device=dev)
    else:
        check_tensor("out", out, dtypes=FLOAT_INPUTS, shape=(B, T, H, V), device=dev)
    args = (q, k, v, g, beta, A_log, dt_bias, state_pool, slots, num_accepted_tokens, lower_bound,
            scale, out)
    cuda = _kernel_ready(q, q, k, v, g, beta, out) and V == 128 and state_pool[0].is_contiguous()

    def kernel():
        from . import _ext
        return _ext.decode(q, k, v, g, beta, A_log, dt_bias, state_pool, slots, num_accepted_tokens,
                           lower_bound=lower_bound, scale=scale, out=out)
    return _run("kda_decode", cuda, args, kernel)


def _check_conv(x, weight, bias, conv_pool, D):
    check_tensor("weight", weight, dtypes=FLOAT_INPUTS, ndim=2, device=x.device)
    if weight.shape[0] != D or not 2 <= weight.shape[1] <= 4:
        raise ValueError(f"weight: expected shape [{D}, W] with W in 2..4, got {list(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_INPUTS, shape=(D,), device=x.device)
    check_tensor("conv_pool", conv_pool, dtypes=FLOAT_INPUTS, ndim=3, device=x.device)
    if conv_pool.shape[2] != D or conv_pool.shape[1] < weight.shape[1] - 1:
        raise ValueError(f"conv_pool: expected shape [S, R >= {weight.shape[1] - 1}, {D}], "
                         f"got {list(conv_pool.shape)}")


def _check_activation(activation):
    if activation not in ("silu", None):
        raise ValueError(f"activation: expected 'silu' or None, got {activation!r}")


def causal_conv1d_prefill(x, weight, bias=None, *, cu_seqlens, conv_pool, slots,
                          has_initial_state=None, activation="silu", out=None):
    """Causal depthwise conv1d (+SiLU) over packed varlen sequences with a conv-state pool.

    x: [T, D] (may be a strided view); weight: [D, W]; bias: [D] or None;
    conv_pool: [S, R, D] with R >= W-1 (rows [0, W-1) hold the history, oldest first);
    slots: [N]; has_initial_state: [N] bool. Returns out [T, D].
    """
    check_tensor("x", x, dtypes=FLOAT_INPUTS, ndim=2)
    T, D = x.shape
    _check_conv(x, weight, bias, conv_pool, D)
    _check_activation(activation)
    check_cu_seqlens(cu_seqlens, T, x.device)
    N = cu_seqlens.numel() - 1
    check_tensor("slots", slots, dtypes=INDEX_DTYPES, shape=(N,), device=x.device)
    check_slot_values("slots", slots, conv_pool.shape[0])
    if has_initial_state is None:
        has_initial_state = torch.zeros(N, dtype=torch.bool, device=x.device)
    check_tensor("has_initial_state", has_initial_state, dtypes=(torch.bool,), shape=(N,), device=x.device)
    out = torch.empty(T, D, dtype=x.dtype, device=x.device) if out is None else \
        check_tensor("out", out, dtypes=FLOAT_INPUTS, shape=(T, D), device=x.device)
    args = (x, weight, bias, cu_seqlens, conv_pool, slots, has_initial_state, activation, out)

    def kernel():
        from . import _ext
        return _ext.conv_prefill(x, weight, bias, cu_seqlens, conv_pool, slots, has_initial_state,
                                 activation=activation, out=out)
    return _run("causal_conv1d_prefill", _kernel_ready(x, x, out), args, kernel)


def causal_conv1d_update(x, weight, bias=None, *, conv_pool, slots, num_accepted_tokens=None,
                         activation="silu", out=None):
    """Conv for T new tokens per sequence: x [B, T, D]; slots [B]; returns out [B, T, D].

    The history window is rows [off, off+W-1) of the pool row, off = num_accepted-1 with
    ``num_accepted_tokens`` [B] (speculative decoding, R = W-1+num_spec) else 0. Afterwards rows
    [0, n) hold the last n rows of window ++ x: n = W-1 for plain updates (the rows prefill
    uses), n = min(R, W-2+T) with num_accepted_tokens (vLLM's layout window[1:] ++ x).
    """
    check_tensor("x", x, dtypes=FLOAT_INPUTS, ndim=3)
    B, T, D = x.shape
    _check_conv(x, weight, bias, conv_pool, D)
    _check_activation(activation)
    check_tensor("slots", slots, dtypes=INDEX_DTYPES, shape=(B,), device=x.device)
    check_slot_values("slots", slots, conv_pool.shape[0])
    if num_accepted_tokens is not None:
        check_tensor("num_accepted_tokens", num_accepted_tokens, dtypes=INDEX_DTYPES, shape=(B,), device=x.device)
    out = torch.empty(B, T, D, dtype=x.dtype, device=x.device) if out is None else \
        check_tensor("out", out, dtypes=FLOAT_INPUTS, shape=(B, T, D), device=x.device)
    args = (x, weight, bias, conv_pool, slots, num_accepted_tokens, activation, out)

    def kernel():
        from . import _ext
        return _ext.conv_update(x, weight, bias, conv_pool, slots, num_accepted_tokens,
                                activation=activation, out=out)
    return _run("causal_conv1d_update", _kernel_ready(x, x, out), args, kernel)


def gated_rms_norm(x, gate, weight, eps=1e-6, out=None):
    """``RMSNorm(x)·weight·sigmoid(gate)`` over the last dim N: x, gate [..., N]; weight [N]."""
    check_tensor("x", x, dtypes=FLOAT_INPUTS)
    check_tensor("gate", gate, dtypes=FLOAT_INPUTS, shape=tuple(x.shape), device=x.device)
    check_tensor("weight", weight, dtypes=FLOAT_INPUTS, shape=(x.shape[-1],), device=x.device)
    out = torch.empty_like(x) if out is None else \
        check_tensor("out", out, dtypes=FLOAT_INPUTS, shape=tuple(x.shape), device=x.device)
    rows = _norm_rows(x, gate, out) if _kernel_ready(x, x, gate, out) and x.shape[-1] == 128 and eps > 0 \
        and weight.dtype in (torch.float32, torch.bfloat16) and weight.is_contiguous() else None
    args = (x, gate, weight, eps, out)
    if rows is None:
        return _run("gated_rms_norm", False, args, None)

    def kernel():
        from . import _ext
        _ext.gated_rms_norm(*rows[:2], weight, eps, rows[2])
        return out
    return _run("gated_rms_norm", True, args, kernel)


def _norm_rows(*tensors):
    """[M, H, 128] views of tensors shaped [..., H, 128] (or [M, 128], [128]) with a contiguous last
    dim (the kernel's layout), or None when one has no such view (then the reference runs)."""
    views = []
    for t in tensors:
        if t.stride(-1) != 1 or t.numel() == 0:
            return None
        shape = (1,) * max(0, 3 - t.dim()) + tuple(t.shape)
        try:
            views.append(t.view(-1, shape[-2], shape[-1]))
        except RuntimeError:
            return None
    return views


from .fused_decode import fused_decode_ready, kda_decode_fused  # noqa: E402  (needs _run / _kernel_ready above)

__all__ += ["fused_decode_ready", "kda_decode_fused"]
