"""The gold: a token-by-token fp64 KDA recurrence, written for clarity, not speed.

V-first state S [V, K] per head. Per token: S ← S·Diag(exp(g)); S ← S + β(v − S k)kᵀ; o = S(scale·q).
"""

from __future__ import annotations

import torch

from .gates import kda_gate, l2_normalize


def naive_kda(q, k, v, g, beta, A_log, dt_bias, *, cu_seqlens, initial_state=None,
              lower_bound=None, scale=None, checkpoint_every=None):
    """Reference KDA over packed varlen sequences, in fp64.

    q, k, g: [T, H, K]; v: [T, H, V]; beta: [T, H] (logits); A_log: [H]; dt_bias: [H*K] or [H, K];
    cu_seqlens: [N+1]; initial_state: [N, H, V, K] or None (zeros).
    Returns (o [T, H, V], final_state [N, H, V, K]) in fp64, plus, when ``checkpoint_every`` is
    set, a list with the [n_ckpt, H, V, K] states after every ``checkpoint_every``-th token of
    each sequence.
    """
    dd = torch.float64
    q, k, v, g, beta = (t.to(dd) for t in (q, k, v, g, beta))
    T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    gate = kda_gate(g, A_log.to(dd), dt_bias.to(dd), lower_bound)
    qn, kn, b = l2_normalize(q) * scale, l2_normalize(k), torch.sigmoid(beta)
    bounds = [int(x) for x in cu_seqlens.tolist()]
    N = len(bounds) - 1
    o = torch.zeros(T, H, V, dtype=dd)
    final = torch.zeros(N, H, V, K, dtype=dd)
    ckpts = []
    for n in range(N):
        S = torch.zeros(H, V, K, dtype=dd) if initial_state is None else initial_state[n].to(dd).clone()
        seq_ckpts = []
        for i, t in enumerate(range(bounds[n], bounds[n + 1])):
            S = S * gate[t].exp()[:, None, :]
            u = b[t][:, None] * (v[t] - torch.einsum("hvk,hk->hv", S, kn[t]))
            S = S + u[:, :, None] * kn[t][:, None, :]
            o[t] = torch.einsum("hvk,hk->hv", S, qn[t])
            if checkpoint_every and (i + 1) % checkpoint_every == 0:
                seq_ckpts.append(S.clone())
        final[n] = S
        ckpts.append(torch.stack(seq_ckpts) if seq_ckpts else torch.zeros(0, H, V, K, dtype=dd))
    if checkpoint_every:
        return o, final, ckpts
    return o, final
