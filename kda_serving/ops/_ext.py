"""Thin wrappers over the compiled ``kda_serving._C`` ops (``torch.ops.kda_serving.*``).

Arguments are assumed validated by ``kda_serving.ops``; these only allocate outputs.
"""

from __future__ import annotations

import torch

from . import tc_split, tc_windows
from .scratch import DeviceScratch

_loaded: bool | None = None


def load() -> bool:
    """Import the built extension once; True when its ops are registered."""
    global _loaded
    if _loaded is None:
        try:
            import kda_serving._C  # noqa: F401  (registers torch.ops.kda_serving)
            _loaded = True
        except ImportError:
            _loaded = False
    return _loaded


def build_options() -> dict[str, int] | None:
    """The opt-in build defines the loaded extension was compiled with ({define: 0 or 1}), or None
    without an extension (or one built before it reported them)."""
    if not load() or not hasattr(torch.ops.kda_serving, "build_options"):
        return None
    from ..build_defines import names
    return names(int(torch.ops.kda_serving.build_options()))


def available(device=None) -> bool:
    """Extension built, CUDA present and the device is Hopper (sm_90) or newer."""
    if not load() or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


def _scale(q, scale):
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _i32(t):
    """The kernels index with int32; engines often hand int64 (a no-op when already int32)."""
    return None if t is None else t.to(torch.int32).contiguous()


def _silu(activation) -> bool:
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
    return activation is not None


def _prefill_with(op, q, k, v, g, beta, A_log, dt_bias, cu_seqlens, state_pool, slots,
                  has_initial_state, lower_bound, scale, inter, inter_offsets, out):
    if out is None:
        out = torch.empty(v.shape, dtype=torch.bfloat16, device=v.device)
    op(q, k, v, g, beta, A_log, dt_bias.reshape(-1), cu_seqlens, state_pool, _i32(slots),
       has_initial_state.contiguous(), lower_bound, _scale(q, scale), inter, inter_offsets, out)
    return out


def _prefill_op(name: str, what: str):
    """The Python entry of one prefill op of the extension (all share one signature)."""
    def run(q, k, v, g, beta, A_log, dt_bias, cu_seqlens, state_pool, slots, has_initial_state,
            *, lower_bound=None, scale=None, inter=None, inter_offsets=None, out=None):
        return _prefill_with(getattr(torch.ops.kda_serving, name), q, k, v, g, beta, A_log, dt_bias,
                             cu_seqlens, state_pool, slots, has_initial_state, lower_bound, scale,
                             inter, inter_offsets, out)
    run.__name__ = name.replace("kda_", "")
    run.__doc__ = ("q, k, g [T, H, K]; v [T, H, V]; beta [T, H] -> o [T, H, V] bf16; pool updated in "
                   f"place. {what}")
    return run


prefill = _prefill_op("kda_prefill", "Token-serial kernel (KDA_SERVING_PREFILL_KERNEL=serial).")
prefill_chunked = _prefill_op("kda_prefill_chunked", "Chunked CUDA-core kernel (opt-in, docs/kernels.md).")

# The tensor-core kernel's workspace (csrc/prefill/kda_prefill.h): one record per (64-token chunk
# slot, head) of TC_RECORD_FLOATS 4-byte units (fp16 and fp32 fields); a call of Ttot tokens in N
# sequences uses (Ttot // 64 + N) * H records.
TC_RECORD_FLOATS = 3 * 64 * 128 // 2 + 64 * 64 + 64 * 64 // 2 + 128
TC_SCRATCH = DeviceScratch(torch.float32)  # the tensor-core prefill's workspaces
DECODE_SCRATCH = DeviceScratch(torch.bfloat16)  # the fused decode's conv outputs


def tc_chunk_slots(total_tokens: int, num_seqs: int) -> int:
    """Chunk slots of a call: sequence n's chunks start at slot floor(bos_n / 64) + n."""
    return total_tokens // 64 + num_seqs


def tc_workspace_floats(total_tokens: int, num_seqs: int, num_heads: int) -> int:
    return tc_chunk_slots(total_tokens, num_seqs) * num_heads * TC_RECORD_FLOATS


def tc_workspace(device, floats: int) -> torch.Tensor:
    """A workspace of at least ``floats`` fp32 elements on ``device`` (``scratch.DeviceScratch``:
    grown when outgrown, then reused)."""
    return TC_SCRATCH.get(device, floats)


def prefill_tc(q, k, v, g, beta, A_log, dt_bias, cu_seqlens, state_pool, slots, has_initial_state,
               *, lower_bound=None, scale=None, inter=None, inter_offsets=None, out=None, workspace=None):
    """q, k, g [T, H, K]; v [T, H, V]; beta [T, H] -> o [T, H, V] bf16; pool updated in place.
    Chunked TF32 tensor-core kernel in two passes (the default, docs/kernels.md); ``workspace``: fp32,
    16-byte aligned, at least tc_workspace_floats(T, N, H) elements (default: one cached per device and stream, and a call
    that would need more than KDA_SERVING_TC_WORKSPACE_MB runs in token windows, tc_windows.py)."""
    need = tc_workspace_floats(q.shape[0], cu_seqlens.numel() - 1, q.shape[1])
    limit = tc_windows.workspace_limit_bytes() if workspace is None else None
    if limit is not None and need * 4 > limit:
        if out is None:
            out = torch.empty(v.shape, dtype=torch.bfloat16, device=v.device)
        bounds = [int(x) for x in cu_seqlens.tolist()]
        max_slots = max(2, limit // (4 * q.shape[1] * TC_RECORD_FLOATS))

        def window(q_, k_, v_, g_, beta_, cu_, slots_, has_, offs_, out_, bounds):  # within the limit by the plan
            seg = None if inter is not None else tc_split.plan_for_bounds(bounds, q.shape[1], q.device)
            if seg is not None:  # a long sequence's window splits like an unwindowed call
                prefill_tc_split(q_, k_, v_, g_, beta_, A_log, dt_bias, cu_, state_pool, slots_, has_, bounds=bounds,
                                 segment_chunks=seg, lower_bound=lower_bound, scale=scale, out=out_)
                return
            ws = tc_workspace(q.device, tc_workspace_floats(q_.shape[0], cu_.numel() - 1, q.shape[1]))
            prefill_tc(q_, k_, v_, g_, beta_, A_log, dt_bias, cu_, state_pool, slots_, has_, lower_bound=lower_bound,
                       scale=scale, inter=inter, inter_offsets=offs_, out=out_, workspace=ws)
        tc_windows.run_windows(window, tc_windows.plan_windows(bounds, max_slots), bounds, q, k, v, g, beta, slots,
                               has_initial_state, inter_offsets, out)
        return out
    if workspace is None:
        workspace = tc_workspace(q.device, need)
    elif (workspace.dtype != torch.float32 or workspace.device != q.device or not workspace.is_contiguous()
          or workspace.numel() < need or workspace.data_ptr() % 16):
        raise ValueError(f"workspace must be contiguous float32 on {q.device}, 16-byte aligned, with at least {need} "
                         f"elements (tc_workspace_floats), got {workspace.dtype} on {workspace.device} with "
                         f"{workspace.numel()} at address {workspace.data_ptr():#x}")

    TC_SCRATCH.note_captured(workspace)

    def op(*args):
        torch.ops.kda_serving.kda_prefill_tc(*args, workspace)
    return _prefill_with(op, q, k, v, g, beta, A_log, dt_bias, cu_seqlens, state_pool, slots,
                         has_initial_state, lower_bound, scale, inter, inter_offsets, out)


def prefill_tc_split(q, k, v, g, beta, A_log, dt_bias, cu_seqlens, state_pool, slots, has_initial_state,
                     *, bounds, segment_chunks, lower_bound=None, scale=None, out=None):
    """The tensor-core kernel with sequences longer than ``segment_chunks`` 64-token chunks split
    (tc_split.py); ``bounds``: host cu_seqlens. No checkpoints; one workspace (no token windows)."""
    units, ua, ub, uc, entries = tc_split.device_units(bounds, segment_chunks, q.device)
    H = q.shape[1]
    workspace = tc_workspace(q.device, tc_workspace_floats(q.shape[0], cu_seqlens.numel() - 1, H))
    need = tc_split.split_state_floats(max(entries, 1), H)
    split_state = tc_split.SPLIT_STATE.get(q.device, need)[:need]
    TC_SCRATCH.note_captured(workspace)
    tc_split.SPLIT_STATE.note_captured(split_state)
    if out is None:
        out = torch.empty(v.shape, dtype=torch.bfloat16, device=v.device)
    torch.ops.kda_serving.kda_prefill_tc_split(
        q, k, v, g, beta, A_log, dt_bias.reshape(-1), cu_seqlens, state_pool, _i32(slots),
        has_initial_state.contiguous(), lower_bound, _scale(q, scale), out, workspace, units, ua, ub, uc,
        split_state)
    return out


def decode(q, k, v, g, beta, A_log, dt_bias, state_pool, slots, num_accepted=None,
           *, lower_bound=None, scale=None, out=None):
    """q, k, g [B, T, H, K]; v [B, T, H, V]; beta [B, T, H]; slots [B] or [B, T] (verify)."""
    if out is None:
        out = torch.empty(v.shape, dtype=torch.bfloat16, device=v.device)
    torch.ops.kda_serving.kda_decode(
        q, k, v, g, beta, A_log, dt_bias.reshape(-1), state_pool, _i32(slots), _i32(num_accepted),
        lower_bound, _scale(q, scale), out)
    return out


def gated_rms_norm(x, gate, weight, eps, out):
    """x, gate, out [M, H, 128] bf16 (out may be x); weight [128] fp32/bf16."""
    torch.ops.kda_serving.gated_rms_norm(x, gate, weight, float(eps), out)
    return out


def conv_prefill(x, weight, bias, cu_seqlens, conv_pool, slots, has_initial_state,
                 *, activation="silu", out=None):
    """x [T, D] bf16 -> y [T, D] bf16; conv_pool [S, R, D] rows [0, W-1) updated in place."""
    if out is None:
        out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    torch.ops.kda_serving.causal_conv1d_prefill(
        x, weight, bias, cu_seqlens, conv_pool, _i32(slots), has_initial_state.contiguous(),
        _silu(activation), out)
    return out


def conv_update(x, weight, bias, conv_pool, slots, num_accepted=None, *, activation="silu", out=None):
    """x [B, T, D] bf16 -> y [B, T, D] bf16; conv_pool [S, R, D] updated in place."""
    if out is None:
        out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    torch.ops.kda_serving.causal_conv1d_update(
        x, weight, bias, conv_pool, _i32(slots), _i32(num_accepted), _silu(activation), out)
    return out


def decode_fused(mixed_qkv, g, beta, A_log, dt_bias, conv_weight, conv_bias, conv_pool, state_pool,
                 slots, num_accepted=None, *, lower_bound=None, scale=None, out_gate=None,
                 norm_weight=None, norm_eps=1e-6, out=None):
    """Conv update + SiLU of mixed_qkv [B, T, 3·H·K], KDA decode/verify, optional gated RMSNorm.

    g [B, T, H, K]; beta [B, T, H]; conv_pool [S, R, 3·H·K] and state_pool updated in place;
    slots [B] or [B, T] (verify, conv slot = column 0) -> o [B, T, H, K] bf16. The conv
    outputs between the two kernels go to a per-device buffer reused across calls (DECODE_SCRATCH).
    """
    if out is None:
        out = torch.empty(g.shape, dtype=torch.bfloat16, device=g.device)
    conv_out = DECODE_SCRATCH.get(mixed_qkv.device, mixed_qkv.shape[0] * mixed_qkv.shape[1] * mixed_qkv.shape[2])
    DECODE_SCRATCH.note_captured(conv_out)
    torch.ops.kda_serving.kda_decode_fused(
        mixed_qkv, g, beta, A_log, dt_bias.reshape(-1), conv_weight, conv_bias, conv_pool, state_pool,
        _i32(slots), _i32(num_accepted), lower_bound, _scale(g, scale), out_gate, norm_weight,
        float(norm_eps), out, conv_out)
    return out
