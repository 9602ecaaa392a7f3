"""vLLM's GDNAttentionMetadata → a StepPlan (KDABatch + verify groups) per engine step.

vLLM builds one ``GDNAttentionMetadata`` per KV-cache group and step, and every KDA layer of
the group receives the same object; the translation is cached on that object so the layers
share it. Only tensors vLLM already holds on the device are sliced, and only host integers
are read (plus the host offsets ``host_lengths.py`` attaches, which let long prompts be split),
so no device sync happens, except for steps whose verify rows have different
lengths (their lengths are read back once for the step).

Token order: with speculative decoding the step's tokens may interleave verify rows and
other rows; the plan carries ``spec_token_indx`` (per verify group) and
``non_spec_token_indx`` (for the KDABatch part) to gather inputs and scatter outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kda_serving.backend import KDABatch

from kda_serving.ops.dispatch import log_path_once

from .host_lengths import ATTR


@dataclass
class VerifyGroup:
    """Speculative verify rows of one query length (vLLM lets rows draft fewer tokens)."""
    length: int
    token_index: torch.Tensor   # [B*length] step rows of these tokens, row-major
    slots: torch.Tensor         # [B, 1+num_spec] int32: state after token t -> slots[:, t]
    num_accepted: torch.Tensor  # [B] int32: start state in slots[:, n-1], conv window at row n-1


@dataclass
class StepPlan:
    batch: KDABatch | None       # non-speculative rows (decodes first, then prefills)
    # step rows of those tokens in mixer order; None: rows [0, num_rows)
    token_order: torch.Tensor | None
    num_rows: int
    verify: list[VerifyGroup]


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
    """cu_seqlens (rebased to 0) with its host copy when the metadata carries one
    (``host_lengths.py``), slots and has_initial_state of non-spec rows [first, first+n)."""
    if num_rows == 0:
        return (torch.zeros(1, dtype=torch.int32, device=device), None, _empty_i32(device),
                _empty_bool(device))
    qsl = m.non_spec_query_start_loc[first_row:first_row + num_rows + 1]
    cu = (qsl - token_base).to(torch.int32)
    host = getattr(m, ATTR, None)
    cu_cpu = None
    if host is not None and host.numel() >= first_row + num_rows + 1:
        cu_cpu = (host[first_row:first_row + num_rows + 1] - token_base).to(torch.int32)
        log_path_once("prefill_offsets", "host")
    slots = m.non_spec_state_indices_tensor[first_row:first_row + num_rows].to(torch.int32)
    has_init = m.has_initial_state
    if has_init is None:
        has_init = torch.zeros(num_rows, dtype=torch.bool, device=device)
    else:
        has_init = has_init[first_row:first_row + num_rows]
    return cu, cu_cpu, slots, has_init


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
        cu, cu_cpu, pslots, has_init = _prefill_part(m, nd, np_, m.num_decode_tokens, device)
        batch = KDABatch(num_decodes=nd, decode_len=1, decode_slots=decode_slots,
                         num_accepted_tokens=None, num_prefills=np_,
                         num_prefill_tokens=m.num_prefill_tokens, prefill_cu_seqlens=cu,
                         prefill_slots=pslots, prefill_has_initial_state=has_init,
                         prefill_cu_seqlens_cpu=cu_cpu)
        return StepPlan(batch=batch, token_order=None, num_rows=m.num_actual_tokens, verify=[])

    n_spec = m.num_spec_decodes
    # vLLM reclassifies plain decodes as prefills when verify rows exist, so the non-spec
    # rows here are all prefill rows (1-token ones included, with their initial state)
    np_ = m.num_prefills + m.num_decodes
    n_ns_tokens = m.num_prefill_tokens + m.num_decode_tokens
    spec_only = np_ == 0
    spec_tokens = (torch.arange(m.num_spec_decode_tokens, device=device) if spec_only
                   else m.spec_token_indx[:m.num_spec_decode_tokens].long())
    verify = _verify_groups(m, n_spec, num_spec, spec_tokens, device)
    if spec_only:
        return StepPlan(batch=None, token_order=None, num_rows=0, verify=verify)
    cu, cu_cpu, pslots, has_init = _prefill_part(m, 0, np_, 0, device)
    batch = KDABatch(num_decodes=0, decode_len=1, decode_slots=_empty_i32(device), num_accepted_tokens=None,
                     num_prefills=np_, num_prefill_tokens=n_ns_tokens, prefill_cu_seqlens=cu,
                     prefill_slots=pslots, prefill_has_initial_state=has_init, prefill_cu_seqlens_cpu=cu_cpu)
    order = m.non_spec_token_indx[:n_ns_tokens].long()
    return StepPlan(batch=batch, token_order=order, num_rows=n_ns_tokens, verify=verify)


def _verify_groups(m, n_spec, num_spec, spec_tokens, device) -> list[VerifyGroup]:
    L = 1 + num_spec
    slots = m.spec_state_indices_tensor[:n_spec, :L].to(torch.int32)
    # padding rows may carry 0; the ops read slots[n, a-1], so keep a >= 1 (their slots are null)
    accepted = m.num_accepted_tokens[:n_spec].to(torch.int32).clamp(min=1)
    uniform = m.uniform_spec_sequence_length
    if uniform is None and m.num_spec_decode_tokens == n_spec * L:
        uniform = L
    if uniform is not None:
        return [VerifyGroup(uniform, spec_tokens, slots, accepted)]
    # ragged rows: their lengths are needed on the host (a sync on GPUs, only for such steps)
    qsl = m.spec_query_start_loc[:n_spec + 1].cpu()
    lens = (qsl[1:] - qsl[:-1]).tolist()
    groups = []
    for length in sorted(set(lens)):
        if length == 0:
            continue
        rows = [r for r, n in enumerate(lens) if n == length]
        tok = torch.tensor([int(qsl[r]) + j for r in rows for j in range(length)], dtype=torch.long)
        rows_t = torch.tensor(rows, dtype=torch.long, device=device)
        groups.append(VerifyGroup(length, spec_tokens[tok.to(device)], slots[rows_t], accepted[rows_t]))
    return groups


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
