"""``KDAServingKernel``: SGLang's KDA kernel interface (``LinearAttnKernelBase``) on kda_serving.ops.

It subclasses SGLang's ``TritonKDAKernel`` so that Triton stays the fallback (``super()``) and the
dispatcher's ``isinstance`` checks keep holding. Every call is translated to ``kda_serving.ops``
(``kda_prefill`` / ``kda_decode``); no KDA maths lives here. Conventions translated:

* Pools: SGLang hands each call the layer's ``[slots, H, V, K]`` view of ``temporal``
  (``[layer, slot, H, V, K]``); it is passed through as ``state_pool`` untouched, so the ops write
  the final states in place. No pool is ever copied.
* Slots: SGLang's ``cache_indices`` use ``-1`` for padding rows (graph replay, prefill-graph
  padding) and slot ``0`` as the reserved dummy row of eager padding. Both are null in our
  contract (``<= 0``): the row's output is zero and no state is read or written. Slot 0 is never
  handed to a request (``MambaSlotAllocator`` starts at 1), so live rows behave exactly as in
  SGLang; the dummy slot simply stays untouched.
* Gate and beta: SGLang passes the raw gate with ``A_log``/``dt_bias`` and raw beta logits
  (``beta_is_raw=True``), which is what our ops take.
* Extend tracking (radix cache, ``extra_buffer``): the ops' ``intermediate_states`` (state after
  each 64 tokens) are laid out so that they form SGLang's per-chunk ``h`` ``[1, NT, H, V, K]``
  (``h[chunk_offsets[n] + j]`` = state after ``64*j`` tokens of sequence n) and fill the fp32
  ``track_state[n] = h_n[track_chunk_idx[n]]`` snapshot.
* Target verify: SGLang reads the start state from ``ssm_states[cache_indices[n]]`` and wants the
  state after draft step t in ``intermediate_states_buffer[intermediate_state_indices[n], t]``
  with the committed pool unchanged. The scratch buffer is viewed as a flat state pool, the start
  states are copied into each row's step-0 cell, and ``kda_decode`` runs with 2-D slots
  (``slots[n, t]`` = that row's step-t cell).

Falls back to SGLang's Triton kernels for: tree verify (``retrieve_parent_token``), ReplaySSM
rings, already-activated gate or beta, GVA (more v heads than q/k heads), a ``lower_bound``
outside [-5, 0), head dim != 128 on the GPU, CUDA tensors when our extension is not built for the
device (our torch reference would sync the host and is not graph-safe), and phases disabled by
``KDA_SERVING_SGLANG_PHASES``.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from kda_serving import ops
from kda_serving.ops.dispatch import use_cuda_kernels

# Import the module, never the class name: SGLang's hook registry rebinds every module attribute
# that *is* the original class to our subclass, which would make an explicit ``TritonKDAKernel``
# reference here point back at ourselves. Fallbacks use ``super()`` only.
from sglang.srt.layers.attention.linear.kernels import kda_triton as _kda_triton

logger = logging.getLogger("kda_serving")

PHASES = ("decode", "extend", "verify")
CHUNK = 64  # SGLang's FLA chunk size; the ops write checkpoints every 64 tokens


def _enabled_phases() -> frozenset:
    raw = os.environ.get("KDA_SERVING_SGLANG_PHASES")
    if raw is None:
        return frozenset(PHASES)
    names = {p.strip().lower() for p in raw.split(",") if p.strip()}
    unknown = names - set(PHASES)
    if unknown:
        raise ValueError(f"KDA_SERVING_SGLANG_PHASES: expected a comma list out of {PHASES}, "
                         f"got {sorted(unknown)}")
    return frozenset(names)


def _flat_f32(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1)
    return t if t.dtype == torch.float32 else t.float()


def _lower_bound_ok(lower_bound) -> bool:
    return lower_bound is None or (isinstance(lower_bound, (int, float)) and -5.0 <= float(lower_bound) < 0.0)


def _host_offsets(kwargs: dict, N: int, T: int) -> Optional[torch.Tensor]:
    """Host cu_seqlens from SGLang's ``extend_seq_lens_cpu`` (lets ``kda_prefill`` split long
    prompts without a device sync), or None when it is absent or does not describe these N
    sequences of at most T tokens."""
    lens = kwargs.get("extend_seq_lens_cpu")
    if lens is None:
        return None
    lens = [int(x) for x in (lens.tolist() if torch.is_tensor(lens) else lens)]
    if len(lens) != N or min(lens, default=0) < 0 or sum(lens) > T:
        return None
    cu = torch.zeros(N + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor(lens, dtype=torch.int64), 0, out=cu[1:])
    return cu


class KDAServingKernel(_kda_triton.TritonKDAKernel):
    """kda-serving KDA kernels behind SGLang's ``KDAKernelDispatcher``.

    Implements ``packed_decode``, ``decode``, ``extend`` (with ``track_state`` snapshots and the
    ``(o, h)`` return when ``return_intermediate_states``) and ``target_verify`` (chain).
    """

    # packed decode takes the post-conv fused qkv directly; our op supports both gates.
    supports_packed_decode: bool = True
    supports_packed_decode_safe_gate: bool = True
    # extend honours track_state / track_chunk_idx (fp32 radix-cache snapshot).
    supports_track_state_snapshot: bool = True
    # Keep SGLang from routing chain verify to its fused Triton conv+verify kernel, which would
    # bypass target_verify below.
    supports_fused_chain_verify: bool = False
    # Whether SGLang's own packed Triton decode exists on this platform (used by the fallback).
    _triton_packed_decode: bool = bool(getattr(_kda_triton.TritonKDAKernel, "supports_packed_decode", False))

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.phases = _enabled_phases()
        self._device_ok: dict = {}
        self._logged: set = set()

    # ------------------------------------------------------------------ routing

    def _ours(self, phase: str, *tensors: torch.Tensor, lower_bound=None) -> bool:
        if phase not in self.phases or not _lower_bound_ok(lower_bound):
            return False
        t = tensors[0]
        if t.device.type == "cpu":
            ok = True
        else:
            ok = self._device_ok.get(t.device)
            if ok is None:
                ok = self._device_ok[t.device] = use_cuda_kernels(t)
            if ok and t.shape[-1] != 128:
                ok = False
        if phase not in self._logged:
            self._logged.add(phase)
            logger.info("kda_serving SGLang %s: %s", phase, "kda_serving.ops" if ok else "SGLang Triton fallback")
        return ok

    # ------------------------------------------------------------------ decode

    def packed_decode(self, mixed_qkv, a, b, *, A_log, dt_bias, scale, ssm_states, cache_indices,
                      num_v_heads, head_v_dim, lower_bound: Optional[float] = None, **kwargs):
        """``mixed_qkv`` [B, 2*H*K + H*V] (post-conv), a [B, H*K] (any shape of that size),
        b [B, H] (or [1, B, H]); returns [1, B, H, V] (a view of a [B, 1, H, V] buffer, like
        SGLang's Triton kernel). ``ssm_states[cache_indices[n]]`` updated in place."""
        B = mixed_qkv.shape[0]
        H, V = num_v_heads, head_v_dim
        K = ssm_states.shape[-1]
        ring = kwargs.get("replayssm_d") is not None
        qk = mixed_qkv.shape[-1] - H * V
        if ring or qk != 2 * H * K or not self._ours("decode", ssm_states, lower_bound=lower_bound):
            return self._fallback_packed_decode(mixed_qkv, a, b, A_log=A_log, dt_bias=dt_bias, scale=scale,
                                                ssm_states=ssm_states, cache_indices=cache_indices,
                                                num_v_heads=num_v_heads, head_v_dim=head_v_dim,
                                                lower_bound=lower_bound, **kwargs)
        q = mixed_qkv[:, :H * K].unflatten(-1, (H, K)).unsqueeze(1)
        k = mixed_qkv[:, H * K:2 * H * K].unflatten(-1, (H, K)).unsqueeze(1)
        v = mixed_qkv[:, 2 * H * K:].unflatten(-1, (H, V)).unsqueeze(1)
        out = mixed_qkv.new_empty(B, 1, H, V)
        ops.kda_decode(q, k, v, a.reshape(B, 1, H, K), b.reshape(B, 1, H), _flat_f32(A_log), _flat_f32(dt_bias),
                       state_pool=ssm_states, slots=cache_indices[:B], lower_bound=lower_bound,
                       scale=float(scale), out=out)
        return out.transpose(0, 1)

    def _fallback_packed_decode(self, mixed_qkv, a, b, **kw):
        if self._triton_packed_decode:
            return super().packed_decode(mixed_qkv, a, b, **kw)
        # No packed Triton kernel on this platform: split and take SGLang's unpacked decode.
        H, V = kw["num_v_heads"], kw["head_v_dim"]
        K = kw["ssm_states"].shape[-1]
        B = mixed_qkv.shape[0]
        Hk = (mixed_qkv.shape[-1] - H * V) // (2 * K)
        q, k, v = mixed_qkv.split([Hk * K, Hk * K, H * V], dim=-1)
        qsl = torch.arange(B + 1, dtype=torch.int32, device=mixed_qkv.device)
        return super().decode(q.unflatten(-1, (Hk, K)).unsqueeze(0), k.unflatten(-1, (Hk, K)).unsqueeze(0),
                              v.unflatten(-1, (H, V)).unsqueeze(0), a.reshape(B, H * K), b.reshape(1, B, H),
                              A_log=kw["A_log"], dt_bias=kw["dt_bias"], ssm_states=kw["ssm_states"],
                              cache_indices=kw["cache_indices"], query_start_loc=qsl,
                              lower_bound=kw.get("lower_bound"))

    def decode(self, q, k, v, a, b, *, A_log, dt_bias, ssm_states, cache_indices, query_start_loc,
               lower_bound: Optional[float] = None, **kwargs):
        """q, k [1, T, H, K], v [1, T, H, V] (column slices of the conv output), a [T, H*K] (any
        shape of that size), b [1, T, H]; ``query_start_loc`` [B+1]. Returns [1, T, H, V]."""
        if q.shape[0] != 1 or v.shape[2] != q.shape[2] or not self._ours("decode", q, lower_bound=lower_bound):
            return super().decode(q, k, v, a, b, A_log=A_log, dt_bias=dt_bias, ssm_states=ssm_states,
                                  cache_indices=cache_indices, query_start_loc=query_start_loc,
                                  lower_bound=lower_bound, **kwargs)
        T, H, K = q.shape[1:]
        V = v.shape[-1]
        B = query_start_loc.numel() - 1
        A, dt = _flat_f32(A_log), _flat_f32(dt_bias)
        if T == B:  # one token per row: the decode kernel
            out = q.new_empty(B, 1, H, V)
            ops.kda_decode(q[0].unsqueeze(1), k[0].unsqueeze(1), v[0].unsqueeze(1), a.reshape(B, 1, H, K),
                           b.reshape(B, 1, H), A, dt, state_pool=ssm_states, slots=cache_indices[:B],
                           lower_bound=lower_bound, out=out)
            return out.view(1, B, H, V)
        # several tokens per row (varlen decode): same recurrence, prefill op
        slots = cache_indices[:B]
        out = ops.kda_prefill(q[0], k[0], v[0], a.reshape(T, H, K), b.reshape(T, H), A, dt,
                              cu_seqlens=query_start_loc, state_pool=ssm_states, slots=slots,
                              has_initial_state=torch.ones(B, dtype=torch.bool, device=q.device),
                              lower_bound=lower_bound)
        return out.unsqueeze(0)

    # ------------------------------------------------------------------ extend

    def extend(self, q, k, v, g, beta, *, ssm_states, cache_indices, query_start_loc,
               A_log: Optional[torch.Tensor] = None, dt_bias: Optional[torch.Tensor] = None,
               lower_bound: Optional[float] = None, beta_is_raw: bool = False,
               return_intermediate_states: bool = False, **kwargs):
        """q, k [1, T, H, K], v [1, T, H, V], g [1, T, H, K] raw gate, beta [1, T, H] raw logits;
        ``query_start_loc`` [N+1]. Reads ``ssm_states[cache_indices[n]]`` as the initial state of
        every live sequence and writes the final state there in place.

        Returns o [1, T, H, V], or (o, h) with h [1, NT, H, V, K] fp32 when
        ``return_intermediate_states`` (``h[chunk_offsets[n] + j]`` = state after 64*j tokens).
        Writes ``track_state[n] = h_n[track_chunk_idx[n]]`` (fp32) when given.
        """
        if (A_log is None or dt_bias is None or not beta_is_raw or q.shape[0] != 1
                or v.shape[2] != q.shape[2] or not self._ours("extend", q, lower_bound=lower_bound)):
            return super().extend(q, k, v, g, beta, ssm_states=ssm_states, cache_indices=cache_indices,
                                  query_start_loc=query_start_loc, A_log=A_log, dt_bias=dt_bias,
                                  lower_bound=lower_bound, beta_is_raw=beta_is_raw,
                                  return_intermediate_states=return_intermediate_states, **kwargs)
        T, H, K = q.shape[1:]
        V = v.shape[-1]
        N = query_start_loc.numel() - 1
        dev = q.device
        slots = cache_indices[:N]
        track_state = kwargs.get("track_state")
        track_chunk_idx = kwargs.get("track_chunk_idx")
        args = (q[0], k[0], v[0], g.reshape(T, H, K), beta.reshape(T, H), _flat_f32(A_log), _flat_f32(dt_bias))
        common = dict(cu_seqlens=query_start_loc, state_pool=ssm_states, slots=slots,
                      has_initial_state=torch.ones(N, dtype=torch.bool, device=dev), lower_bound=lower_bound)
        if not return_intermediate_states and track_state is None:
            return ops.kda_prefill(*args, **common, cu_seqlens_cpu=_host_offsets(kwargs, N, T)).unsqueeze(0)

        # Per-chunk states. Row layout of `hbuf` is SGLang's h: sequence n owns rows
        # boh[n] .. boh[n] + ceil(L_n/64) - 1, row boh[n] + j = state after 64*j tokens. The op's
        # checkpoint i (after 64*(i+1) tokens) goes to row boh[n] + 1 + i; a sequence whose length
        # is a multiple of 64 also checkpoints its final state one row past its block, onto the
        # next sequence's row 0 (or the spare last row), which is rewritten with the initial
        # states afterwards.
        boh, NT = self._chunk_offsets(query_start_loc, N, dev, kwargs)
        lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
        live = slots > 0
        init = torch.where(live[:, None, None, None], ssm_states[slots.long().clamp(min=0)].float(), 0.0)
        hbuf = torch.zeros(NT + 1, H, V, K, dtype=ssm_states.dtype, device=dev)
        out = ops.kda_prefill(*args, **common, intermediate_states=hbuf, intermediate_offsets=boh + 1)
        row0 = torch.where(lens > 0, boh, NT)
        hbuf.index_copy_(0, row0, init.to(hbuf.dtype))
        if track_state is not None:
            j = track_chunk_idx[:N].long()
            ok = (j >= 0) & (j * CHUNK < lens)
            rows = torch.where(ok, boh + j.clamp(min=0), NT)
            dst = track_state[:N]
            dst.copy_(torch.where(ok[:, None, None, None], hbuf[rows].to(dst.dtype), dst))
        out = out.unsqueeze(0)
        if return_intermediate_states:
            return out, hbuf[:NT].unsqueeze(0)
        return out

    @staticmethod
    def _chunk_offsets(query_start_loc, N, dev, kwargs):
        """(boh [N] int64 on the device, NT host int): first h row of each sequence, rows in all."""
        chunk_offsets, chunk_indices = kwargs.get("chunk_offsets"), kwargs.get("chunk_indices")
        if chunk_offsets is not None and chunk_indices is not None:  # prefill CUDA graph: static tables
            return chunk_offsets[:N].long(), int(chunk_indices.shape[0])
        lens = kwargs.get("extend_seq_lens_cpu")
        if lens is None or len(lens) != N:  # eager only: reads the lengths back
            qsl = [int(x) for x in query_start_loc.tolist()]
            lens = [b - a for a, b in zip(qsl[:-1], qsl[1:])]
        counts = [(int(n) + CHUNK - 1) // CHUNK for n in lens]
        starts, acc = [], 0
        for c in counts:
            starts.append(acc)
            acc += c
        return torch.tensor(starts, dtype=torch.int64).to(dev, non_blocking=True), acc

    # ------------------------------------------------------------------ target verify

    def target_verify(self, A_log, dt_bias, q, k, v, a, b, *, ssm_states, cache_indices, query_start_loc,
                      intermediate_states_buffer, intermediate_state_indices, cache_steps,
                      retrieve_parent_token, lower_bound: Optional[float] = None, cache_ring: bool = False,
                      **kwargs):
        """Chain verify. q, k [1, T, H, K], v [1, T, H, V], a [T, H*K], b [1, T, H]; row n's draft
        tokens are ``query_start_loc[n] : query_start_loc[n+1]`` (at most ``cache_steps``). Returns
        [1, T, H, V]; the state after step t goes to
        ``intermediate_states_buffer[intermediate_state_indices[n], t]``; ``ssm_states`` is not
        modified."""
        buf = intermediate_states_buffer
        H, K, V = q.shape[2], q.shape[3], v.shape[3]
        S = int(cache_steps)
        fallback = (retrieve_parent_token is not None or cache_ring or buf is None or q.shape[0] != 1
                    or v.shape[2] != H or S < 2 or "fused_accept_state_indices" in kwargs
                    or not self._ours("verify", q, lower_bound=lower_bound))
        if not fallback:
            HVK = H * V * K
            fallback = (buf.dim() != 5 or tuple(buf.shape[2:]) != (H, V, K) or buf.dtype != ssm_states.dtype
                        or buf.stride()[1:] != (HVK, V * K, K, 1) or buf.stride(0) % HVK != 0
                        or buf.stride(0) // HVK < S or buf.shape[1] < S)
        if fallback:
            return super().target_verify(A_log, dt_bias, q, k, v, a, b, ssm_states=ssm_states,
                                         cache_indices=cache_indices, query_start_loc=query_start_loc,
                                         intermediate_states_buffer=intermediate_states_buffer,
                                         intermediate_state_indices=intermediate_state_indices,
                                         cache_steps=cache_steps, retrieve_parent_token=retrieve_parent_token,
                                         lower_bound=lower_bound, cache_ring=cache_ring, **kwargs)
        dev = q.device
        T = q.shape[1]
        B = query_start_loc.numel() - 1
        R0, pitch = buf.shape[0], buf.stride(0) // (H * V * K)
        # The scratch as a flat pool of state cells: cell r*pitch + t = scratch row r, step t.
        # Only cells inside the view's footprint are addressed.
        cells = (R0 - 1) * pitch + S
        flat = buf.as_strided((cells, H, V, K), (H * V * K, V * K, K, 1), buf.storage_offset())
        # Our pools treat slot 0 as null, but cell 0 (row 0, step 0) is live here: send it to a
        # spare cell of the last scratch row (SGLang's discard row for padded requests) and copy
        # it back afterwards. Null rows copy the dump cell onto itself (a no-op).
        spare, dump = (R0 - 1) * pitch + S - 1, (R0 - 1) * pitch

        qsl = query_start_loc.long()
        lens = qsl[1:] - qsl[:-1]
        steps = torch.arange(S, device=dev)
        tok = qsl[:-1, None] + steps[None, :]                                   # [B, S]
        tok = torch.where(steps[None, :] < lens[:, None], tok, qsl[:-1, None]).clamp(0, max(T - 1, 0))
        gather = tok.reshape(-1)
        qd = q[0].index_select(0, gather).view(B, S, H, K)
        kd = k[0].index_select(0, gather).view(B, S, H, K)
        vd = v[0].index_select(0, gather).view(B, S, H, V)
        ad = a.reshape(T, H, K).index_select(0, gather).view(B, S, H, K)
        bd = b.reshape(T, H).index_select(0, gather).view(B, S, H)

        rows = intermediate_state_indices[:B].long()
        live = cache_indices[:B] > 0
        cell = rows[:, None] * pitch + steps[None, :]
        cell = torch.where(cell == 0, spare, cell)
        slots = torch.where(live[:, None], cell, -1)
        start = ssm_states[cache_indices[:B].long().clamp(min=0)]
        start = torch.where(live[:, None, None, None], start, flat[dump])
        flat.index_copy_(0, torch.where(live, cell[:, 0], dump), start)

        out = q.new_empty(B, S, H, V)
        ops.kda_decode(qd, kd, vd, ad, bd, _flat_f32(A_log), _flat_f32(dt_bias), state_pool=flat,
                       slots=slots, lower_bound=lower_bound, out=out)
        need0 = (live & (rows == 0)).any()
        flat[0].copy_(torch.where(need0, flat[spare], flat[0]))

        # back to the packed token order; tokens no row covers get zeros
        p = torch.arange(T, device=dev)
        n = torch.searchsorted(qsl[1:], p, right=True).clamp(max=max(B - 1, 0))
        t = p - qsl[n]
        covered = (p < qsl[-1]) & (t < S) & (t >= 0)
        src = (n * S + t.clamp(0, S - 1)).clamp(0, max(B * S - 1, 0))
        o = out.view(B * S, H, V).index_select(0, src)
        o = torch.where(covered[:, None, None], o, 0.0)
        return o.unsqueeze(0)


__all__ = ["KDAServingKernel"]
