"""Prefill with long sequences split into segments that run in parallel, combined exactly.

Per head, with the V-first state S [V, K] and per token
``S ← S·Diag(α_t)·(I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ``, ``o_t = S_t q_t`` (q, k normalised, scale in
q), the state inside a segment is affine in the state S_in it starts from::

    S_t = S_in·P_t + B_t,    P_t = Π_{i≤t} Diag(α_i)(I − β_i k_i k_iᵀ)  [K, K],
                             B_t = the state when the segment starts from zero,
    o_t = o_t(local) + S_in·(P_t q_t).

Execution (every pass is the ordinary prefill, kernel or reference, on re-cut cu_seqlens):

1. local pass, one launch: every segment and every unsplit sequence is its own sequence. The
   first segment of each sequence starts from the sequence's real initial state, the others from
   zero. Outputs go straight into ``out``; final states (B_L, or the exact state after the first
   segment) into an fp32 scratch pool.
2. transition pass, one launch over the tokens of the segments after the first: v = 0 (a
   stride-0 zero tensor), initial state = identity (the [K, K] state uses the [V, K] pool shape,
   so V must equal K). Final states are P_L; outputs are ``P_t q_t``.
3. combine, per split sequence, in fp32: ``S_in(j+1) = S_in(j)·P_L(j) + B_L(j)``; the last one is
   the final state.
4. correction: ``o_t += S_in(j)·(P_t q_t)`` for the tokens of segment j ≥ 1, in fp32, in groups of
   segments whose fp32 temporary stays under ``CORRECTION_BUDGET`` bytes.
5. final states go to ``state_pool[slots]`` in the pool dtype (null slots untouched).

Intermediate 64-token states are not produced here: ``kda_prefill`` does not split when
``intermediate_states`` is requested. No device sync: the layout is built from host lengths and
uploaded with one non-blocking copy.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from . import reference
from .dispatch import log_path_once, prefill_kernel, prefill_kernel_name
from .split_plan import ALIGN, SplitLayout, block_rows, build_layout, plan_split, workspace_bytes

CORRECTION_BUDGET = 256 << 20  # bytes of fp32 temporaries in the output correction


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def host_bounds(cu_seqlens: torch.Tensor, cu_seqlens_cpu: torch.Tensor | None) -> list[int] | None:
    """Host cu_seqlens without a device sync, or None when only a device copy exists."""
    if cu_seqlens.device.type == "cpu":
        return [int(x) for x in cu_seqlens.tolist()]
    if cu_seqlens_cpu is not None:
        return [int(x) for x in cu_seqlens_cpu.tolist()]
    return None


def choose_segment(bounds: list[int] | None, num_heads: int, K: int, V: int, device: torch.device,
                   kernel_path: bool) -> int | None:
    """The segment length ``kda_prefill`` splits with, or None. Splitting needs host lengths and
    V = K (the transition state is [K, K] in the [V, K] pool shape). The cost model is calibrated
    on the token-serial CUDA kernel and runs only when that kernel is selected; with the others
    (the tensor-core default measured faster unsplit than the token-serial kernel split), on the
    CPU and on the reference path only a forced length splits."""
    if bounds is None or V != K or len(bounds) < 2:
        return None
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    planned = kernel_path and device.type == "cuda" and prefill_kernel_name() == "serial"
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) \
        if planned else None
    ctas = V // block_rows(len(lengths) * num_heads, sms) if sms else 1
    return plan_split(lengths, num_heads, sms, ctas_per_seq_head=ctas, head_dim=V)


def describe_split(cu_seqlens_cpu: torch.Tensor, num_heads: int, head_dim: int, device: torch.device,
                   kernel_path: bool = True) -> dict:
    """What ``kda_prefill`` would do for these lengths: segment and scratch bytes (for benchmarks)."""
    bounds = [int(x) for x in cu_seqlens_cpu.tolist()]
    T = bounds[-1] - bounds[0]
    if kernel_path and device.type == "cuda" and prefill_kernel_name() == "tc" and head_dim == 128:
        from .tc_split import build_units, plan_for_bounds, split_state_floats  # split inside the kernel
        seg = plan_for_bounds(bounds, num_heads, device)
        ws = 0 if seg is None else split_state_floats(build_units(bounds, seg)[4], num_heads) * 4
        return dict(segment=None if seg is None else seg * 64, workspace_bytes=ws,
                    workspace_bytes_per_token=ws / max(T, 1), workspace_bytes_per_token_head=ws / max(T, 1) / num_heads)
    seg = choose_segment(bounds, num_heads, head_dim, head_dim, device, kernel_path)
    if seg is None:
        return dict(segment=None, workspace_bytes=0, workspace_bytes_per_token=0.0,
                    workspace_bytes_per_token_head=0.0)
    ws = workspace_bytes(build_layout(bounds, seg), num_heads, head_dim,
                         pq_bytes=2 if kernel_path else 4, correction_budget=CORRECTION_BUDGET)
    return dict(segment=seg, workspace_bytes=ws, workspace_bytes_per_token=ws / max(T, 1),
                workspace_bytes_per_token_head=ws / max(T, 1) / num_heads)


@contextlib.contextmanager
def _full_fp32_matmul():
    """The combine is a chain of matmuls: keep it in true fp32 even when TF32 is enabled."""
    flag = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = flag


def _upload(arrays: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """int64 device tensors for host index lists, in one non-blocking copy."""
    sizes = [len(a) for a in arrays]
    flat = torch.tensor([x for a in arrays for x in a], dtype=torch.int64)
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    return list(torch.split(flat, sizes))


def _prefill_pass(cuda, q, k, v, g, beta, A_log, dt_bias, cu, pool, slots, has_init, lower_bound, scale, out):
    """One ordinary prefill launch (CUDA kernel or torch reference) on validated arguments."""
    if cuda:
        prefill_kernel()(q, k, v, g, beta, A_log, dt_bias, cu, pool, slots.to(torch.int32), has_init,
                         lower_bound=lower_bound, scale=scale, inter=None, inter_offsets=None, out=out)
    else:
        reference.kda_prefill(q, k, v, g, beta, A_log, dt_bias, cu, pool, slots, has_init, lower_bound,
                              scale, None, None, out)


def split_prefill(q, k, v, g, beta, A_log, dt_bias, *, bounds: list[int], segment: int, state_pool,
                  slots, has_initial_state, lower_bound, scale, out, cuda: bool):
    """``kda_prefill`` semantics (validated arguments, no intermediate states) with every sequence
    longer than ``segment`` (a multiple of 64) split. ``bounds``: host cu_seqlens."""
    log_path_once("kda_prefill", "split " + ("cuda" if cuda else "reference"))
    layout = build_layout(bounds, segment)
    dev = q.device
    H, K, V = q.shape[1], q.shape[2], v.shape[2]
    if V != K:
        raise ValueError(f"v: split prefill needs V == K, got V={V}, K={K}")
    N, U = len(bounds) - 1, layout.num_units
    tu = layout.trans_unit
    p_rows = [layout.p_row[u] if u >= 0 else 0 for u in tu]
    p_seq = [layout.unit_seq[u] if u >= 0 else 0 for u in tu]
    cu_local, useq, first, cu_trans, p_rows_t, p_seq_t = _upload(
        [layout.unit_bounds, layout.unit_seq, layout.first_unit, layout.trans_bounds, p_rows, p_seq], dev)
    sl = slots.long()
    valid = sl > 0
    idx = sl.clamp(min=0)

    # 1. local pass: scratch row u + 1 belongs to unit u; row 0 is the null row
    local = torch.zeros(U + 1, H, V, K, dtype=torch.float32, device=dev)
    use_init = (valid & has_initial_state)[:, None, None, None]
    if N:
        local[first + 1] = torch.where(use_init, state_pool[idx].float(), 0.0)
    is_first = torch.zeros(U, dtype=torch.bool, device=dev)
    is_first[first] = True
    local_has = (has_initial_state[useq] & is_first).contiguous()
    rows = torch.arange(1, U + 1, device=dev)
    local_slots = torch.where(valid[useq], rows, 0)
    _prefill_pass(cuda, q, k, v, g, beta, A_log, dt_bias, cu_local, local, local_slots, local_has,
                  lower_bound, scale, out)

    # 2. transition pass over [trans_lo, trans_hi): v = 0, start from the identity
    lo, hi = layout.trans_lo, layout.trans_hi
    P = layout.num_trans_segments
    trans = pq = None
    if P:
        trans = torch.eye(K, dtype=torch.float32, device=dev).expand(P + 1, H, K, K).contiguous()
        t_slots = torch.where((p_rows_t > 0) & valid[p_seq_t], p_rows_t, 0)
        t_has = torch.ones(len(tu), dtype=torch.bool, device=dev)
        vz = torch.zeros(1, 1, K, dtype=v.dtype, device=dev).expand(hi - lo, H, K)
        pq = torch.empty(hi - lo, H, K, dtype=torch.bfloat16 if cuda else torch.float32, device=dev)
        _prefill_pass(cuda, q[lo:hi], k[lo:hi], vz, g[lo:hi], beta[lo:hi], A_log, dt_bias, cu_trans, trans,
                      t_slots, t_has, lower_bound, scale, pq)

    # 3./4. combine the segments of each split sequence and correct their outputs
    finals = local[first + 1] if N else local[:0]
    with _full_fp32_matmul():
        for n, units in layout.chains.items():
            finals[n] = _combine(layout, units, local, trans, pq, out, H, K, V)

    # 5. final states, pool dtype; null slots keep their (gathered) bits
    if N:
        state_pool[idx] = torch.where(valid[:, None, None, None], finals.to(state_pool.dtype), state_pool[idx])
    return out


def _combine(layout: SplitLayout, units: list[int], local, trans, pq, out, H, K, V):
    """S_in recursion over one split sequence, then o += S_in·(P q) per segment; returns the
    final state [H, V, K] fp32."""
    m = len(units)
    chain = torch.empty(m, H, V, K, dtype=torch.float32, device=local.device)
    chain[0] = local[units[0] + 1]          # exact state after the first segment
    for j in range(1, m):                   # chain[j] = chain[j-1]·P_L(j) + B_L(j)
        u = units[j]
        torch.baddbmm(local[u + 1], chain[j - 1], trans[layout.p_row[u]], out=chain[j])
    ub, lo, seg = layout.unit_bounds, layout.trans_lo, layout.segment
    per_seg = seg * H * V * 4 * 2           # the fp32 product and the fp32 sum
    group = max(1, CORRECTION_BUDGET // per_seg)
    j = 1
    while j < m:
        # full segments in groups; the (possibly shorter) last segment alone
        full = ub[units[j] + 1] - ub[units[j]] == seg
        jn = min(m, j + group) if full else j + 1
        while full and ub[units[jn - 1] + 1] - ub[units[jn - 1]] != seg:
            jn -= 1
        a, b = ub[units[j]], ub[units[jn - 1] + 1]
        L = (b - a) // (jn - j)
        pq_g = pq[a - lo:b - lo].view(jn - j, L, H, K).float()
        corr = torch.einsum("slhk,shvk->slhv", pq_g, chain[j - 1:jn - 1]).reshape(b - a, H, V)
        out[a:b] = (out[a:b].float() + corr).to(out.dtype)
        j = jn
    return chain[m - 1]


__all__ = ["ALIGN", "choose_segment", "describe_split", "host_bounds", "split_prefill"]
