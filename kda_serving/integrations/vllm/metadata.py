"""vLLM's GDNAttentionMetadata → one KDABatch per engine step.

vLLM builds one ``GDNAttentionMetadata`` per KV-cache group and step, and every KDA layer of
the group receives the same object; the translation is cached on that object so the layers
share it. Only tensors vLLM already holds on the device are sliced, and only host integers
are read, so no device sync happens (except for ragged speculative rows, see below).

Token order: with speculative decoding the step's tokens may interleave verify rows and
other rows. The mixer wants verify rows first, so the plan carries the permutation
``cat(spec_token_indx, non_spec_token_indx)``; outputs are scattered back with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kda_serving.backend import KDABatch


@dataclass
class StepPlan:
    batch: KDABatch
    # rows of the step's tensors fed to the mixer, in mixer order; None: rows [0, num_rows)
    token_order: torch.Tensor | None
    num_rows: int


_EMPTY = {}


def _empty_i32(device):
    key = ("i32", device)
    if key not in _EMPTY:
        _EMPTY[key] = torch.zeros(0, dtype=torch.int32, device=device)
    return _EMPTY[key]


def _empty_bool(device):
    key = ("bool", device)
    if key not in _EMPTY:
        _EMPTY[key] = torch.zeros(0, dtype=torch.bool, device=device)
    return _EMPTY[key]


def _prefill_part(m, first_row: int, num_rows: int, token_base: int, device):
    """cu_seqlens (rebased to 0), slots and has_initial_state of non-spec rows [first, first+n)."""
    if num_rows == 0:
        return torch.zeros(1, dtype=torch.int32, device=device), _empty_i32(device), _empty_bool(device)
    qsl = m.non_spec_query_start_loc[first_row:first_row + num_rows + 1]
    cu = (qsl - token_base).to(torch.int32)
    slots = m.non_spec_state_indices_tensor[first_row:first_row + num_rows].to(torch.int32)
    has_init = m.has_initial_state
    if has_init is None:
        has_init = torch.zeros(num_rows, dtype=torch.bool, device=device)
    else:
        has_init = has_init[first_row:first_row + num_rows]
    return cu, slots, has_init


def plan_from_gdn_metadata(m, num_spec: int = 0) -> StepPlan:
    """Translate one GDNAttentionMetadata into a StepPlan.

    Args:
        m: vLLM's ``GDNAttentionMetadata`` (or any object with its fields).
        num_spec: draft tokens per verify row (``speculative_config.num_speculative_tokens``).
    Rows whose slot is <= 0 (vLLM's null block 0 or PAD -1) pass through: the ops give them zero
    output and leave the pools alone. Tokens after the plan's work (padding) get zero output.
    """
    device = (m.non_spec_query_start_loc if m.non_spec_query_start_loc is not None
              else m.spec_query_start_loc).device
    if m.spec_sequence_masks is None:
        nd, np_ = m.num_decodes, m.num_prefills
        decode_slots = (m.non_spec_state_indices_tensor[:nd].to(torch.int32) if nd
                        else _empty_i32(device))
        cu, pslots, has_init = _prefill_part(m, nd, np_, m.num_decode_tokens, device)
        batch = KDABatch(num_decodes=nd, decode_len=1, decode_slots=decode_slots,
                         num_accepted_tokens=None, num_prefills=np_,
                         num_prefill_tokens=m.num_prefill_tokens, prefill_cu_seqlens=cu,
                         prefill_slots=pslots, prefill_has_initial_state=has_init)
        return StepPlan(batch=batch, token_order=None, num_rows=m.num_actual_tokens)

    # speculative decoding: verify rows run as decode rows of 1 + num_spec tokens each
    n_spec = m.num_spec_decodes
    L = 1 + num_spec
    if m.num_spec_decode_tokens != n_spec * L:
        raise NotImplementedError(
            f"kda_serving: verify rows of different lengths ({m.num_spec_decode_tokens} tokens "
            f"for {n_spec} rows of up to {L}) are not supported yet")
    spec_slots = m.spec_state_indices_tensor[:n_spec, :L].to(torch.int32)
    accepted = m.num_accepted_tokens[:n_spec].to(torch.int32)
    # vLLM reclassifies plain decodes as prefills when verify rows exist, so the non-spec
    # rows here are all prefill rows (1-token ones included, with their initial state)
    np_ = m.num_prefills + m.num_decodes
    n_ns_tokens = m.num_prefill_tokens + m.num_decode_tokens
    cu, pslots, has_init = _prefill_part(m, 0, np_, 0, device)
    batch = KDABatch(num_decodes=n_spec, decode_len=L, decode_slots=spec_slots,
                     num_accepted_tokens=accepted, num_prefills=np_, num_prefill_tokens=n_ns_tokens,
                     prefill_cu_seqlens=cu, prefill_slots=pslots, prefill_has_initial_state=has_init)
    if np_ == 0:
        return StepPlan(batch=batch, token_order=None, num_rows=m.num_actual_tokens)
    order = torch.cat([m.spec_token_indx[:n_spec * L], m.non_spec_token_indx[:n_ns_tokens]]).long()
    return StepPlan(batch=batch, token_order=order, num_rows=n_spec * L + n_ns_tokens)


class PlanCache:
    """Remembers the plan of the last metadata object seen, so all layers of a step share it.

    vLLM keeps one metadata object per KV-cache group alive for the whole step, so identity is
    a safe key; a few entries cover models whose KDA layers span several groups.
    """

    def __init__(self, size: int = 8):
        self._size = size
        self._entries: list[tuple[object, StepPlan]] = []

    def get(self, m, num_spec: int) -> StepPlan:
        for obj, plan in self._entries:
            if obj is m:
                return plan
        plan = plan_from_gdn_metadata(m, num_spec)
        self._entries.append((m, plan))
        if len(self._entries) > self._size:
            self._entries.pop(0)
        return plan
