"""KDABatch: what the kernels need for one engine step, built once per step from engine metadata.

Token order is decode-first: ``num_decodes`` rows of ``decode_len`` tokens each (1 for plain
decode, 1 + num_spec for speculative verify), then the prefill sequences packed by
``prefill_cu_seqlens``, then padding up to the step's token count (output zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KDABatch:
    num_decodes: int
    decode_len: int
    decode_slots: torch.Tensor            # [Nd] or [Nd, decode_len] (verify) int32
    num_accepted_tokens: torch.Tensor | None  # [Nd] int32, verify only
    num_prefills: int
    num_prefill_tokens: int
    prefill_cu_seqlens: torch.Tensor      # [Np+1] int32, starting at 0
    prefill_slots: torch.Tensor           # [Np] int32
    prefill_has_initial_state: torch.Tensor  # [Np] bool
    # host copy of prefill_cu_seqlens when the engine has one: lets long prompts be split
    # across SMs without a device sync (ops/split_prefill.py)
    prefill_cu_seqlens_cpu: torch.Tensor | None = None

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes * self.decode_len

    @property
    def num_tokens(self) -> int:
        """Tokens that carry real work; later rows of the step are padding."""
        return self.num_decode_tokens + self.num_prefill_tokens

    @property
    def decode_conv_slots(self) -> torch.Tensor:
        """Conv state lives in the row's first slot, also for verify rows."""
        return self.decode_slots[:, 0] if self.decode_slots.dim() == 2 else self.decode_slots


def _host_list(name, x):
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"{name}: expected a host (CPU) tensor or list, got device {x.device}")
        return [int(v) for v in x.tolist()]
    return [int(v) for v in x]


def build_kda_batch(query_start_loc, num_computed_tokens, state_slots, *, num_spec_tokens=0,
                    num_accepted_tokens=None, num_decodes=None, device=None) -> KDABatch:
    """Split one engine step into its decode and prefill parts.

    Args:
        query_start_loc: host [R+1] offsets of each request's new tokens, decode-first order.
        num_computed_tokens: host [R] tokens already in each request's state (> 0 means the
            request has an initial state).
        state_slots: [R] slots, or [R, 1 + num_spec_tokens] with speculative decoding (slot of
            the state after each draft position); <= 0 marks padding rows. May live on the GPU.
        num_spec_tokens: draft tokens per verify row (0 without speculative decoding).
        num_accepted_tokens: [R] (or at least the leading decode rows) accepted-token counts of
            the previous step, verify only.
        num_decodes: how many leading rows are decode/verify rows, as the engine scheduled them.
            Required with num_spec_tokens > 0 (a prefill chunk may be as long as a verify row);
            without it, decode rows are the leading requests of query length 1 that have state.
    The remaining rows are prefills (any length, zero allowed). Host values are checked here,
    so a bad step raises before any state is touched; no device value is read.
    """
    qsl = _host_list("query_start_loc", query_start_loc)
    ncomp = _host_list("num_computed_tokens", num_computed_tokens)
    R = len(qsl) - 1
    if R < 0 or qsl[0] != 0 or any(b < a for a, b in zip(qsl, qsl[1:])):
        raise ValueError(f"query_start_loc: expected non-decreasing offsets starting at 0, got {qsl[:8]}")
    if len(ncomp) != R:
        raise ValueError(f"num_computed_tokens: expected {R} entries (one per request), got {len(ncomp)}")
    if not isinstance(state_slots, torch.Tensor) or state_slots.dtype not in (torch.int32, torch.int64):
        raise TypeError("state_slots: expected an int32/int64 tensor")
    L = 1 + num_spec_tokens
    want = (R,) if num_spec_tokens == 0 else (R, L)
    if tuple(state_slots.shape) != want:
        raise ValueError(f"state_slots: expected shape {list(want)}, got {list(state_slots.shape)}")
    if state_slots.device.type == "cpu":
        live = state_slots.reshape(-1)[state_slots.reshape(-1) > 0]
        if live.numel() != live.unique().numel():
            raise ValueError("state_slots: a slot is used by more than one request in this step")
    lens = [b - a for a, b in zip(qsl, qsl[1:])]
    if num_decodes is None:
        if num_spec_tokens:
            raise ValueError("num_decodes: required when num_spec_tokens > 0")
        nd = 0
        while nd < R and lens[nd] == 1 and ncomp[nd] > 0:
            nd += 1
    else:
        nd = int(num_decodes)
        bad = [i for i in range(min(nd, R)) if lens[i] != L or ncomp[i] <= 0]
        if nd > R or bad:
            raise ValueError(f"num_decodes: rows {bad or list(range(R, nd))} are not decode rows "
                             f"(query length {L} with state)")
    device = state_slots.device if device is None else device
    slots = state_slots.to(device=device, dtype=torch.int32)
    acc = None
    if num_spec_tokens and nd:
        if num_accepted_tokens is None:
            raise ValueError("num_accepted_tokens: required for verify rows with num_spec_tokens > 0")
        acc = num_accepted_tokens[:nd].to(device=device, dtype=torch.int32)
    pre_slots = slots[nd:, 0] if num_spec_tokens else slots[nd:]
    cu_cpu = torch.tensor([q - qsl[nd] for q in qsl[nd:]], dtype=torch.int32)
    cu = cu_cpu.to(device)
    has_init = torch.tensor([c > 0 for c in ncomp[nd:]], dtype=torch.bool, device=device)
    return KDABatch(num_decodes=nd, decode_len=L, decode_slots=slots[:nd], num_accepted_tokens=acc,
                    num_prefills=R - nd, num_prefill_tokens=qsl[-1] - qsl[nd],
                    prefill_cu_seqlens=cu, prefill_slots=pre_slots.contiguous(),
                    prefill_has_initial_state=has_init, prefill_cu_seqlens_cpu=cu_cpu)
