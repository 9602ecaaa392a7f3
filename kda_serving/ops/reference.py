"""Exact torch semantics of every op: chunked and vectorised, fast enough to serve a tiny model on CPU.

This is the CPU path and, with ``naive.py``, the test oracle. Every op follows the state-pool
contract of DESIGN.md: a slot <= 0 is null (zero output, no state read or written).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .gates import kda_gate, l2_normalize
from .naive import naive_kda  # noqa: F401  (re-exported: the fp64 gold lives beside this file)

CHUNK = 16  # divides 64, so 64-token checkpoints fall on chunk ends


def _pad_index(bounds: list[int], chunk: int) -> torch.Tensor:
    """[N, Lp] map from padded (sequence, position) to packed token index; T marks padding."""
    lens = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    lp = max([0] + [(n + chunk - 1) // chunk * chunk for n in lens])
    T = bounds[-1] - bounds[0]
    idx = torch.full((len(lens), lp), T, dtype=torch.long)
    for n, (a, L) in enumerate(zip(bounds[:-1], lens)):
        idx[n, :L] = torch.arange(a - bounds[0], a - bounds[0] + L)
    return idx


def chunked_kda(q, k, v, gate, beta, initial_state, bounds, *, scale, checkpoint_every=None):
    """Chunked KDA in fp32 on activated inputs.

    q, k, gate: [T, H, K] (gate already activated, <= 0); v: [T, H, V]; beta: [T, H] (sigmoided);
    initial_state: [N, H, V, K] fp32; bounds: python list of N+1 offsets.
    Every exponent is of a difference G_i - G_j with i >= j, hence <= 0: no overflow for any gate.
    Returns (o [T, H, V], final [N, H, V, K], checkpoints list of [n_i, H, V, K]).
    """
    T, H, K = q.shape
    V = v.shape[-1]
    N = len(bounds) - 1
    C = CHUNK
    idx = _pad_index(bounds, C)
    Lp = idx.shape[1]

    def pad(x):
        ext = torch.cat([x, x.new_zeros((1,) + x.shape[1:])])
        return ext[idx]  # [N, Lp, ...]; padding rows are zero: g = 0, k = 0 leave the state alone

    qp, kp, vp, gp, bp = (pad(t) for t in (l2_normalize(q) * scale, l2_normalize(k), v, gate, beta))
    S = initial_state.clone()
    out = q.new_zeros(N, Lp, H, V)
    lens = torch.tensor([b - a for a, b in zip(bounds[:-1], bounds[1:])])
    ckpts = [[] for _ in range(N)]
    causal = torch.ones(C, C, dtype=torch.bool).tril()
    strict = causal.tril(-1)
    eye = torch.eye(C, dtype=q.dtype)
    for c0 in range(0, Lp, C):
        qc, kc, vc, bc = qp[:, c0:c0 + C], kp[:, c0:c0 + C], vp[:, c0:c0 + C], bp[:, c0:c0 + C]
        # cumulative gates reach thousands with spiking gates: differences of fp32 sums would
        # lose the digits that matter, so the decay factors are formed in fp64
        G = gp[:, c0:c0 + C].double().cumsum(1)              # [N, C, H, K]
        diff = G[:, :, None] - G[:, None, :]                 # [N, Ci, Cj, H, K]
        D = diff.masked_fill(~causal[None, :, :, None, None], float("-inf")).exp().to(q.dtype)
        Aqk = torch.einsum("nihk,njhk,nijhk->nhij", qc, kc, D)
        Akk = torch.einsum("nihk,njhk,nijhk->nhij", kc, kc, D) * bc.permute(0, 2, 1)[..., None]
        Akk = Akk.masked_fill(~strict, 0.0)
        eG = G.exp().to(q.dtype)
        rhs = bc.permute(0, 2, 1)[..., None] * (
            vc.permute(0, 2, 1, 3) - torch.einsum("nchk,nhvk->nhcv", kc * eG, S))
        # near-collinear keys make I + Akk ill-conditioned: solve in fp64 (tiny C x C systems)
        U = torch.linalg.solve_triangular((eye + Akk).double(), rhs.double(), upper=False,
                                          unitriangular=True).to(q.dtype)
        o = torch.einsum("nchk,nhvk->nhcv", qc * eG, S) + Aqk @ U
        out[:, c0:c0 + C] = o.permute(0, 2, 1, 3)
        Gl = G[:, -1:]
        S = S * Gl[:, 0, :, None, :].exp().to(q.dtype) + torch.einsum(
            "nhcv,nchk->nhvk", U, kc * (Gl - G).exp().to(q.dtype))
        end = c0 + C
        if checkpoint_every and end % checkpoint_every == 0:
            for n in torch.nonzero(lens >= end).flatten().tolist():
                ckpts[n].append(S[n].clone())
    o = out.reshape(N * Lp, H, V)[(idx < T).reshape(-1)] if N else q.new_zeros(0, H, V)
    ckpts = [torch.stack(c) if c else S.new_zeros(0, H, V, K) for c in ckpts]
    return o, S, ckpts


def kda_prefill(q, k, v, g, beta, A_log, dt_bias, cu_seqlens, state_pool, slots,
                has_initial_state, lower_bound, scale, intermediate_states, intermediate_offsets, out):
    """Pool-contract prefill; arguments already validated by ``kda_serving.ops``."""
    bounds = [int(x) for x in cu_seqlens.tolist()]
    N = len(bounds) - 1
    H, K, V = q.shape[1], q.shape[2], v.shape[2]
    slots_l = slots.long()
    valid = slots_l > 0
    init = torch.zeros(N, H, V, K, dtype=torch.float32, device=q.device)
    use = valid & has_initial_state.bool()
    if use.any():
        init[use] = state_pool[slots_l[use]].float()
    gate = kda_gate(g.float(), A_log.float(), dt_bias.float(), lower_bound)
    o, final, ckpts = chunked_kda(q.float(), k.float(), v.float(), gate, torch.sigmoid(beta.float()),
                                  init, [b - bounds[0] for b in bounds], scale=scale,
                                  checkpoint_every=64 if intermediate_states is not None else None)
    for n in range(N):
        if not valid[n]:
            o[bounds[n] - bounds[0]:bounds[n + 1] - bounds[0]] = 0
    if valid.any():
        state_pool[slots_l[valid]] = final[valid].to(state_pool.dtype)
    if intermediate_states is not None:
        for n in torch.nonzero(valid).flatten().tolist():
            if len(ckpts[n]):
                r0 = int(intermediate_offsets[n])
                intermediate_states[r0:r0 + len(ckpts[n])] = ckpts[n].to(intermediate_states.dtype)
    out.copy_(o)
    return out


def kda_decode(q, k, v, g, beta, A_log, dt_bias, state_pool, slots, num_accepted_tokens,
               lower_bound, scale, out):
    """Pool-contract decode / verify on [B, T, ...] inputs; arguments already validated."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    verify = slots.dim() == 2
    sl = slots.long()
    if verify:
        first = (num_accepted_tokens.long() - 1) if num_accepted_tokens is not None else torch.zeros_like(sl[:, 0])
        start = sl.gather(1, first[:, None]).squeeze(1)
    else:
        start = sl
    valid = start > 0
    S = torch.zeros(B, H, V, K, dtype=torch.float32, device=q.device)
    if valid.any():
        S[valid] = state_pool[start[valid]].float()
    gate = kda_gate(g.float(), A_log.float(), dt_bias.float(), lower_bound).exp()
    qn, kn, b = l2_normalize(q.float()) * scale, l2_normalize(k.float()), torch.sigmoid(beta.float())
    o = torch.empty(B, T, H, V, dtype=torch.float32, device=q.device)
    for t in range(T):
        S = S * gate[:, t, :, None, :]
        u = b[:, t, :, None] * (v[:, t].float() - torch.einsum("bhvk,bhk->bhv", S, kn[:, t]))
        S = S + u[..., None] * kn[:, t, :, None, :]
        o[:, t] = torch.einsum("bhvk,bhk->bhv", S, qn[:, t])
        if verify:
            w = valid & (sl[:, t] > 0)
            if w.any():
                state_pool[sl[w, t]] = S[w].to(state_pool.dtype)
    if not verify and valid.any():
        state_pool[start[valid]] = S[valid].to(state_pool.dtype)
    o[~valid] = 0
    out.copy_(o)
    return out


def _activate(y, activation):
    return F.silu(y) if activation == "silu" else y


def causal_conv1d_prefill(x, weight, bias, cu_seqlens, conv_pool, slots, has_initial_state,
                          activation, out):
    """Depthwise causal conv over varlen sequences with a conv-state pool.

    History before a sequence is rows [0, W-1) of ``conv_pool[slot]`` (zeros without initial
    state); afterwards those rows hold the sequence's last W-1 inputs.
    """
    W = weight.shape[1]
    bounds = [int(b) for b in cu_seqlens.tolist()]
    w = weight.float()
    for n in range(len(bounds) - 1):
        a, b = bounds[n] - bounds[0], bounds[n + 1] - bounds[0]
        slot = int(slots[n])
        if slot <= 0:
            out[a:b] = 0
            continue
        hist = conv_pool[slot, :W - 1].float() if bool(has_initial_state[n]) else \
            x.new_zeros(W - 1, x.shape[1], dtype=torch.float32)
        full = torch.cat([hist, x[a:b].float()])
        out[a:b] = _conv_windows(full, w, bias, b - a, activation).to(out.dtype)
        conv_pool[slot, :W - 1] = full[-(W - 1):].to(conv_pool.dtype)
    return out


def _conv_windows(full, w, bias, L, activation):
    """Outputs for the last L rows of ``full`` (which starts with W-1 history rows)."""
    W = w.shape[1]
    y = sum(full[j:j + L] * w[:, j] for j in range(W))
    if bias is not None:
        y = y + bias.float()
    return _activate(y, activation)


def causal_conv1d_update(x, weight, bias, conv_pool, slots, num_accepted_tokens, activation, out):
    """Conv for [B, T, D] new tokens; the history window is rows [off, off+W-1) of the pool row,
    off = num_accepted-1 (speculative decoding) or 0.

    Afterwards rows [0, n) hold the last n rows of ``window ++ x``: n = W-1 for plain updates
    (the same rows prefill uses), n = min(R, W-2+T) with ``num_accepted_tokens`` — vLLM's
    speculative layout ``window[1:] ++ x``, so that accepting a tokens puts the next window at
    row a-1. Later rows are left alone.
    """
    B, T, D = x.shape
    W, R = weight.shape[1], conv_pool.shape[1]
    n_keep = W - 1 if num_accepted_tokens is None else min(R, W - 2 + T)
    w = weight.float()
    for b in range(B):
        slot = int(slots[b])
        if slot <= 0:
            out[b] = 0
            continue
        off = int(num_accepted_tokens[b]) - 1 if num_accepted_tokens is not None else 0
        full = torch.cat([conv_pool[slot, off:off + W - 1].float(), x[b].float()])
        out[b] = _conv_windows(full, w, bias, T, activation).to(out.dtype)
        conv_pool[slot, :n_keep] = full[-n_keep:].to(conv_pool.dtype)
    return out


def gated_rms_norm(x, gate, weight, eps, out):
    """``RMSNorm(x)·weight·sigmoid(gate)`` over the last dim, in fp32."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    out.copy_(y * torch.sigmoid(gate.float()))
    return out
