"""A bounded workspace for the tensor-core prefill (``_ext.prefill_tc``): its workspace grows with
the call (one 72.5-KB record per 64-token chunk slot and head, 1.13 KB per token and head), so a call
that would need more than ``KDA_SERVING_TC_WORKSPACE_MB`` (default 4096) runs as several calls over
consecutive token windows instead. A sequence cut between windows is cut at a multiple of 64 of its
own tokens, so every chunk stays whole; its state travels through its pool slot (the later piece
starts from it, ``has_initial_state`` true) and its checkpoints keep their rows. With an fp32 pool
the windowed call gives the same bits as one call; with a bf16 pool the state is rounded to bf16
where a sequence is cut. Windowing reads cu_seqlens (and the slots, flags and checkpoint offsets)
on the host, so such a call cannot be captured into a CUDA graph."""

from __future__ import annotations

import os

import torch

DEFAULT_LIMIT_MB = 4096


def workspace_limit_bytes() -> int:
    """``KDA_SERVING_TC_WORKSPACE_MB`` in bytes (read on every call)."""
    raw = os.environ.get("KDA_SERVING_TC_WORKSPACE_MB", str(DEFAULT_LIMIT_MB))
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"KDA_SERVING_TC_WORKSPACE_MB must be a number of MiB, got {raw!r}") from None
    if mb <= 0:
        raise ValueError(f"KDA_SERVING_TC_WORKSPACE_MB must be positive, got {raw!r}")
    return int(mb * (1 << 20))


def plan_windows(bounds: list[int], max_slots: int) -> list[list[tuple[int, int, int]]]:
    """Windows of pieces (sequence n, first token s of the piece within it, length) in token order,
    each window one call of at most ``max_slots`` (>= 2) chunk slots. A call of Tw tokens in Nw
    sequences uses floor(Tw / 64) + Nw slots, at most the sum of ceil(length / 64) + 1 over its
    pieces, which is what a window is filled to. Empty sequences are pieces too (their state is
    still written)."""
    if max_slots < 2:
        raise ValueError(f"max_slots must be at least 2, got {max_slots}")
    windows: list[list[tuple[int, int, int]]] = []
    cur: list[tuple[int, int, int]] = []
    used = 0
    for n in range(len(bounds) - 1):
        length, s = bounds[n + 1] - bounds[n], 0
        while True:
            rest = length - s
            cost = -(-rest // 64) + 1
            if used + cost <= max_slots:
                cur.append((n, s, rest))
                used += cost
                break
            fit = max_slots - used - 1  # whole chunks that still fit in this window
            if fit >= 1:
                cur.append((n, s, 64 * fit))
                s += 64 * fit
            windows.append(cur)
            cur, used = [], 0
    if cur:
        windows.append(cur)
    return windows


def run_windows(run_one, windows, bounds, q, k, v, g, beta, slots, has_initial_state, inter_offsets, out):
    """``run_one(q, k, v, g, beta, cu, slots, has_init, inter_offsets, out, bounds=cu_host)`` once per
    window, on row slices of the token tensors and of ``out`` (rows counted from bounds[0]);
    ``cu_host``: the window's cu_seqlens as a list."""
    dev = q.device
    slots_h = slots.tolist()
    has_h = [bool(x) for x in has_initial_state.tolist()]
    offs_h = inter_offsets.tolist() if inter_offsets is not None else None
    for pieces in windows:
        n0, s0, _ = pieces[0]
        n1, s1, l1 = pieces[-1]
        lo, hi = bounds[n0] - bounds[0] + s0, bounds[n1] - bounds[0] + s1 + l1
        cu = [0]
        for _, _, length in pieces:
            cu.append(cu[-1] + length)
        rows = slice(lo, hi)
        offs = None
        if offs_h is not None:
            offs = torch.tensor([offs_h[n] + s // 64 for n, s, _ in pieces], dtype=inter_offsets.dtype, device=dev)
        run_one(q[rows], k[rows], v[rows], g[rows], beta[rows],
                torch.tensor(cu, dtype=torch.int32, device=dev),
                torch.tensor([slots_h[n] for n, _, _ in pieces], dtype=torch.int32, device=dev),
                torch.tensor([has_h[n] or s > 0 for n, s, _ in pieces], dtype=torch.bool, device=dev),
                offs, out[rows], bounds=cu)
