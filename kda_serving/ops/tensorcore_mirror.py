"""The tensor-core prefill kernel's chunk algebra in torch, with the kernel's TF32 rounding points.

``csrc/prefill/kda_prefill_tc_*.cuh`` feed TF32 operands (fp32 values rounded to a 10-bit
mantissa) to tensor cores and accumulates in fp32. This file is the same computation on the CPU,
operand for operand, so the numerical design (which factors are formed how, what is rounded,
how the unbounded gate stays finite) is checked against the fp64 gold in CI even where no GPU
runs; the kernel itself is checked on Hopper by tests/gpu. See docs/kernels.md.

Per 64-token chunk, in 4 blocks of 16 tokens, with a_t = exp(g_t) <= 1 the per-token decay:

* every decay factor is a running product of the a_t (never an exponential of a difference of
  cumulative sums): Ploc (forward product from the block start), Rloc (backward product to the
  block end), Ptot (block totals);
* off-diagonal blocks (I > J) of A_qk / A_kk factor at the token before block I, so both operand
  factors are products of values <= 1: (q_i Ploc_i) . (k_j Rloc_j prod_{J<M<I} Ptot_M);
* a diagonal 16 x 16 block runs on tensor cores as (q_i Ploc_i s) . (k_j Rloc_j s), s =
  Ptot^-1/2 per channel, where the block's decay Ptot is at least 2^-120 in every channel (both
  factors within 2^+-60, each product keeps its relative precision; such a block's operands
  carry s everywhere, the off-diagonal multipliers 1 / s); a steeper block's is computed exactly
  on CUDA cores with running products E_ij = prod_{j<t<=i} a_t, so no input overflows; A_qk's
  diagonal entries q_i . k_i are fp32 dot products in both cases;
* T = (I + A_kk)^-1 by blocked forward substitution (``_blocked_inverse``; its diagonal blocks
  in fp32, the rest from TF32 products); T beta = T diag(beta) (the kernel's prepare pass, for all
  chunks at once), then U = T beta (v - Ke S^T) on tensor cores, Z = v - Ke S^T rounded to TF32
  (its serial state pass; the WY form u - w S^T, with u = T beta v and w = T beta Ke formed by
  the prepare pass as the kernel did before, is the same product regrouped);
* the state stays fp32; it is a tensor-core operand only in Ke S^T and Qe S^T, as fp16
  (``_fp16_scaled``: each value row times a power of two that fits its largest entry; fp16's
  mantissa is TF32's); U enters A_qk U and U^T Kd as fp16 under a power of two per
  value row that fits U and the sums it joins (S diag(EL), Qe S^T), as the kernel's 128-row CTAs
  do (64- and 32-row CTAs scale U per 16-token tile and value row, and each warp's slice of a
  state row on its own: the same rounding up to where the scales fall);
* the workspace record's Qe, Ke, Kd and A_qk are fp16 (``_fp16``; fp16 values are exact TF32
  operands), T beta fp32 rounded to TF32.

bf16 operands instead of TF32 measured 3.5-4.6e-3 relative RMS against fp64 here (the GPU tests
allow 5e-3); TF32 measured about 6e-4, and fp16 record fields instead of TF32 ones the same
(5.8e-4 at worst over this file's tests' cases and v x 1000; bf16 fields 2.8e-3, a bf16 u
2.0e-3, an fp16 u scaled per 16-token tile and value row 6.2e-4, which the kernel stored from
0745975 to 61086cc; scripts/mirror_record_precision.py; those were measured with the WY form's
record, Qe, Kd, w, A_qk and u).
"""

from __future__ import annotations

import torch

from .gates import kda_gate, l2_normalize

CHUNK = 64
BLOCK = 16
DIAG_TC_MIN = 2.0**-120  # a block's diagonal on tensor cores when its decay is at least this


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 to TF32 (nearest, ties away from zero), as cvt.rna.tf32.f32 does."""
    i = x.float().contiguous().view(torch.int32)
    sign = i & torch.tensor(-0x80000000, dtype=torch.int32)
    mag = (i & 0x7FFFFFFF) + 0x1000
    mag = torch.where((i & 0x7F800000) == 0x7F800000, i & 0x7FFFFFFF, mag) & ~0x1FFF  # inf/nan kept
    return (sign | mag).view(torch.float32)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 to fp16 and back (nearest even), as the prepare pass stores record fields."""
    return x.float().half().float()


def _fp16_scaled(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x as an fp16 tensor-core operand under the kernel's RowScale: times the power of two that
    brings m (x's rows' largest magnitude, or more; broadcast against x) into [2^14, 2^15), at
    most 2^126, rounded to fp16, and scaled back, which is exact."""
    _, e2 = torch.frexp(m)  # m = f 2^e2 with f in [0.5, 1): floor(log2 m) = e2 - 1
    e = torch.clamp(15 - e2, max=126)
    one = torch.ones_like(m)
    return (x * torch.ldexp(one, e)).half().float() * torch.ldexp(one, -e)


def _chunk(S, q, k, v, g, beta):
    """One chunk for all heads. S [H, V, K] fp32; q (scaled), k normalised [C, H, K]; g the
    activated log-decay [C, H, K]; v [C, H, V]; beta [C, H]. Padded tokens have q = k = v =
    g = beta = 0. Returns (o [C, H, V], S_next)."""
    C, H, K = q.shape
    nb = C // BLOCK
    a = g.exp()
    ab = a.view(nb, BLOCK, H, K)
    Ploc = ab.cumprod(1)                                              # prod_{start <= t <= i}
    Rloc = torch.cat([ab[:, 1:].flip(1).cumprod(1).flip(1), torch.ones_like(ab[:, :1])], 1)
    Ptot = Ploc[:, -1]                                                # [nb, H, K]
    pre = torch.cat([torch.ones_like(Ptot[:1]), Ptot[:-1]]).cumprod(0)           # prod_{M < I}
    post = torch.cat([Ptot[1:].flip(0).cumprod(0).flip(0), torch.ones_like(Ptot[:1])])  # prod_{M > J}
    qb, kb = q.view(nb, BLOCK, H, K), k.view(nb, BLOCK, H, K)

    Qe = _fp16((qb * pre[:, None] * Ploc).view(C, H, K))
    Ke = _fp16((kb * pre[:, None] * Ploc).view(C, H, K))
    Kd = _fp16((kb * Rloc * post[:, None]).view(C, H, K))
    EL = Ptot.prod(0)                                                 # [H, K]
    # a block whose decay is >= DIAG_TC_MIN in every channel (per head) keeps its operands times
    # s = Ptot^-1/2, so that its diagonal block runs on tensor cores (below); isc = 1 / s
    fast = (Ptot >= DIAG_TC_MIN).all(-1, keepdim=True)               # [nb, H, 1]
    sc = torch.where(fast, Ptot.clamp(min=DIAG_TC_MIN).rsqrt(), torch.ones_like(Ptot))
    isc = torch.where(fast, Ptot.clamp(min=DIAG_TC_MIN).sqrt(), torch.ones_like(Ptot))
    Qr, Kq = _tf32(qb * Ploc * sc[:, None]), _tf32(kb * Ploc * sc[:, None])

    Aqk = torch.zeros(H, C, C)
    Akk = torch.zeros(H, C, C)
    for I in range(nb):
        rows = slice(I * BLOCK, (I + 1) * BLOCK)
        for J in range(I):
            mid = Ptot[J + 1:I].prod(0) if I > J + 1 else torch.ones(H, K)
            Kr = _tf32(kb[J] * Rloc[J] * sc[J] * isc[J] * (isc[I] * mid))  # [16, H, K]
            cols = slice(J * BLOCK, (J + 1) * BLOCK)
            Aqk[:, rows, cols] = torch.einsum("ihk,jhk->hij", Qr[I], Kr)
            Akk[:, rows, cols] = torch.einsum("ihk,jhk->hij", Kq[I], Kr)
        # diagonal block: on tensor cores, (q_i Ploc_i s) . (k_j Rloc_j s), for a head whose block
        # decay is >= DIAG_TC_MIN in every channel; else on CUDA cores with E_ij = prod_{j<t<=i}
        # a_t (i >= j), exact in fp32
        Kr = _tf32(kb[I] * Rloc[I] * sc[I])
        la = g.view(nb, BLOCK, H, K)[I].double().cumsum(0)
        E = (la[:, None] - la[None, :]).clamp(max=0.0).exp().float()   # [i, j, H, K]
        Aqk[:, rows, rows] = torch.where(fast[I, :, :, None], torch.einsum("ihk,jhk->hij", Qr[I], Kr),
                                         torch.einsum("ihk,jhk,ijhk->hij", qb[I], kb[I], E))
        Akk[:, rows, rows] = torch.where(fast[I, :, :, None], torch.einsum("ihk,jhk->hij", Kq[I], Kr),
                                         torch.einsum("ihk,jhk,ijhk->hij", kb[I], kb[I], E))
    # A_qk's diagonal entries q_i . k_i in fp32 (not from TF32 operands), as the kernel computes them
    diag = torch.arange(C)
    Aqk[:, diag, diag] = torch.einsum("chk,chk->hc", q, k)
    causal = torch.ones(C, C, dtype=torch.bool).tril()
    Aqk = Aqk.masked_fill(~causal, 0.0)
    Akk = Akk.masked_fill(~causal.tril(-1), 0.0) * beta.t()[:, :, None]

    T = _blocked_inverse(Akk)
    S_op = _fp16_scaled(S, S.abs().amax(dim=-1, keepdim=True))    # [H, V, K], a scale per value row
    Tb = _tf32(_tf32(T) * beta.t()[:, None, :])                       # T diag(beta), [H, C, C]
    Z = v.permute(1, 0, 2) - torch.einsum("chk,hvk->hcv", Ke, S_op)    # [H, C, V]
    U = Tb @ _tf32(Z)
    Y = torch.einsum("chk,hvk->hcv", Qe, S_op)
    S_dec = S * EL[:, None, :]
    # U's scale per value row also fits the sums it is added to (S EL and Y), as 128-row CTAs do.
    m = torch.maximum(torch.maximum(U.abs().amax(dim=1), Y.abs().amax(dim=1)), S_dec.abs().amax(dim=-1))
    U_op = _fp16_scaled(U, m[:, None, :])
    O = Y + _fp16(Aqk) @ U_op
    S_next = S_dec + torch.einsum("hcv,chk->hvk", U_op, Kd)
    return O.permute(1, 0, 2), S_next


def _blocked_inverse(A: torch.Tensor) -> torch.Tensor:
    """(I + A)^-1 for strictly lower-triangular A [H, C, C], as the kernel forms it: 16 x 16
    diagonal blocks by forward substitution in fp32, then the blocks below the diagonal column by
    column on tensor cores (TF32 operands): T_IJ = -T_II (sum_{J<=M<I} A_IM T_MJ)."""
    H, C, _ = A.shape
    nb = C // BLOCK
    T = torch.zeros(H, C, C)
    for b in range(nb):
        o = b * BLOCK
        for i in range(BLOCK):
            T[:, o + i, o + i] = 1.0
            for j in range(i):
                T[:, o + i, o + j] = -(A[:, o + i, o + j:o + i] * T[:, o + j:o + i, o + j]).sum(-1)
    for d in range(1, nb):
        for J in range(nb - d):
            I = J + d
            r, c = slice(I * BLOCK, (I + 1) * BLOCK), slice(J * BLOCK, (J + 1) * BLOCK)
            X = _tf32(A[:, r, J * BLOCK:I * BLOCK]) @ _tf32(T[:, J * BLOCK:I * BLOCK, c])
            T[:, r, c] = -(_tf32(T[:, r, r]) @ _tf32(X))
    return T


def tensorcore_prefill(q, k, v, g, beta, A_log, dt_bias, *, initial_state=None, lower_bound=None,
                       scale=None):
    """One sequence through the mirror. q, k, g [T, H, K] and v [T, H, V] (any float dtype, raw
    gate); beta [T, H] logits; initial_state [H, V, K]. Returns (o [T, H, V], final [H, V, K]) fp32."""
    T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    gate = kda_gate(g.float(), A_log.float(), dt_bias.float(), lower_bound)
    qn, kn = l2_normalize(q.float()) * scale, l2_normalize(k.float())
    b = torch.sigmoid(beta.float())
    S = torch.zeros(H, V, K) if initial_state is None else initial_state.float().clone()
    out = torch.empty(T, H, V)
    for c0 in range(0, T, CHUNK):
        n = min(CHUNK, T - c0)

        def pad(x):
            return torch.cat([x[c0:c0 + n], x.new_zeros((CHUNK - n,) + x.shape[1:])])

        o, S = _chunk(S, pad(qn), pad(kn), pad(v.float()), pad(gate), pad(b))
        out[c0:c0 + n] = o[:n]
    return out, S


__all__ = ["BLOCK", "CHUNK", "tensorcore_prefill"]
