"""Long sequences split into segments inside the tensor-core prefill (``kda_prefill_tc_split``).

The prepare pass is the unsplit one (it already runs every chunk of every sequence at once); only
the serial state pass is cut. Within a segment the state is affine in the state it starts from,
``S_end = S_start·P + B``, so a sequence of ``S`` segments runs as (csrc/prefill/kda_prefill_tc_units.cuh)

- pass A: segment 0 from the real initial state, with outputs; every middle segment from zero
  (``B_j``) and, in as many CTAs again, from the identity with ``u = 0`` (``P_j``), no outputs;
  sequences that are not split run whole here;
- combine: ``S_start(j+1) = S_start(j)·P_j + B_j`` in fp32;
- pass B: segments 1 .. S-1 from their start states, with outputs; the last writes the pool.

The longest chain falls from the sequence's chunk count to about two segments, for about twice
the state-pass work (three times the rows of a middle segment, two of them without outputs).

Planner (``plan_segment``): estimates both state passes from the chunk-step times of a CTA of
128 / 64 / 32 value rows (``STEP_US``: the profile's per-chunk cycles at 1.98 GHz, H100, fp16
records, 13.7K cycles for 128 rows at H96 1x8192 and 6.6K for 32 rows at H32 1x32768, 64 rows
interpolated, times 1.25), each pass as the larger of its longest chain and its total work spread
over the SMs, a split unit's chain ``UNIT_STEPS`` steps longer than its chunks, and splits when
the estimate is under ``MARGIN`` of the unsplit state pass. The 1.25 and ``UNIT_STEPS`` are fitted
to the H100 run of 54de340 (``benchmarks/results/bench_prefill-long-tc-split-kimi-*-54de340.json``:
H8 1x32768 and 1x131072, unsplit and at segments of 2048 to 8192 tokens, less the prepare pass's
share from the phase profile), which they reproduce within 5%.
``KDA_SERVING_PREFILL_SPLIT`` forces a segment length (a multiple of 64 tokens) or ``0`` (never).
Splitting needs the host's lengths (``cu_seqlens_cpu`` or a CPU ``cu_seqlens``) and no
checkpoints (``intermediate_states``)."""

from __future__ import annotations

from collections import OrderedDict

import torch

from .scratch import DeviceScratch
from .split_plan import env_segment

CHUNK = 64
UNIT_INTS = 8                                # kda_prefill.h kTcUnitInts
INIT_POOL, INIT_ENTRY, OUT, FINAL_POOL, FINAL_ENTRY, TRANSITION = 1, 2, 4, 8, 16, 32  # TcUnitFlags
STEP_US = {128: 8.6, 64: 6.0, 32: 4.1}       # one chunk step of a state CTA of that many rows
UNIT_STEPS = 20                              # a split unit's start and tail, in chunk steps (fitted)
ROW_COST = {128: 16, 64: 10, 32: 7}          # the launcher's weights (tc_state_rows)
NO_OUTPUT = 0.65                             # a step without outputs (no Qe, A_qk products): estimate
COMBINE_STEP_US = 2.0                        # one S·P + B step of the combine kernel: estimate
OVERHEAD_US = 30.0                           # table upload, two more launches: estimate
MARGIN = 0.8
SEGMENTS = (16, 32, 64, 128, 256, 512, 1024)  # candidate segment lengths, in chunks
SPLIT_STATE = DeviceScratch(torch.float32)    # the split-state entries, per device and stream


def num_sms(device: torch.device) -> int | None:
    """The GPU's SM count (None off a GPU, where the planner splits only when forced)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    from .split_prefill import _num_sms
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def state_rows(seq_heads: int, num_sms: int) -> int:
    """Value rows per state-pass CTA, as the launcher picks them (tc_state_rows)."""
    best, best_cost = 128, None
    for rows in (128, 64, 32):
        ctas = seq_heads * (128 // rows)
        cost = -(-ctas // num_sms) * ROW_COST[rows]
        if best_cost is None or cost < best_cost:
            best, best_cost = rows, cost
    return best


def _pass_us(chains: list[tuple[int, float]], rows: int, num_heads: int, num_sms: int) -> float:
    """One state pass; chains: (chunk steps of a unit, its CTAs per head and row block, weighted by
    their step cost relative to one with outputs)."""
    if not chains:
        return 0.0
    longest = max(c for c, _ in chains)
    work = sum(c * w for c, w in chains) * num_heads * (128 // rows) / num_sms
    return STEP_US[rows] * max(longest, work)


def _segments(chunks: int, seg: int) -> int:
    return -(-chunks // seg)


def estimate_us(lengths: list[int], num_heads: int, num_sms: int, seg: int | None) -> float:
    """Estimated state-pass time of a call, unsplit (``seg=None``) or split into ``seg``-chunk segments."""
    chunks = [-(-n // CHUNK) for n in lengths]
    if seg is None:
        rows = state_rows(len(chunks) * num_heads, num_sms)
        return _pass_us([(c, 1.0) for c in chunks], rows, num_heads, num_sms)
    pass_a, pass_b, steps = [], [], 0
    for c in chunks:
        s = _segments(c, seg)
        if s < 2:
            pass_a.append((c, 1.0))
            continue
        chain = seg + UNIT_STEPS
        pass_a.append((chain, 1.0))
        pass_a += [(chain, 2 * NO_OUTPUT)] * (s - 2)
        pass_b += [(chain, 1.0)] * (s - 1)
        steps = max(steps, s - 2)
    rows = state_rows(len(pass_b) * num_heads, num_sms)
    return (_pass_us(pass_a, rows, num_heads, num_sms) + _pass_us(pass_b, rows, num_heads, num_sms)
            + COMBINE_STEP_US * steps + OVERHEAD_US)


def plan_segment(lengths: list[int], num_heads: int, num_sms: int | None) -> int | None:
    """Segment length in chunks, or None to run unsplit. ``KDA_SERVING_PREFILL_SPLIT`` forces one
    (tokens, a multiple of 64) or forbids splitting (0); else the estimate decides (never on the
    CPU, ``num_sms=None``)."""
    env = env_segment()
    if env != "auto":
        return env // CHUNK if env and any(n > env for n in lengths) else None
    if not num_sms or not lengths:
        return None
    longest = max(-(-n // CHUNK) for n in lengths)
    base = estimate_us(lengths, num_heads, num_sms, None)
    best, best_cost = None, MARGIN * base
    for seg in SEGMENTS:
        if seg * 2 > longest:
            break
        cost = estimate_us(lengths, num_heads, num_sms, seg)
        if cost < best_cost:
            best, best_cost = seg, cost
    return best


def plan_for_bounds(bounds: list[int], num_heads: int, device: torch.device) -> int | None:
    """``plan_segment`` for a call with host cu_seqlens ``bounds`` on ``device``."""
    return plan_segment([b - a for a, b in zip(bounds[:-1], bounds[1:])], num_heads, num_sms(device))


def build_units(bounds: list[int], seg: int) -> tuple[list[int], int, int, int, int]:
    """The unit table (flat, ``UNIT_INTS`` per row) for host ``cu_seqlens`` bounds and segments of
    ``seg`` chunks: pass A rows, pass B rows, combine rows; returns (table, units_a, units_b,
    units_c, entries). Pass A lists the split sequences' units first and the rest longest first,
    so no long chain starts late in the grid."""
    a_split, a_rest, b_rows, c_rows = [], [], [], []
    entries = 0
    for n in range(len(bounds) - 1):
        chunks = -(-(bounds[n + 1] - bounds[n]) // CHUNK)
        s = _segments(chunks, seg)
        if s < 2:
            a_rest.append((chunks, [n, 0, max(chunks, 1), INIT_POOL | OUT | FINAL_POOL, -1, -1, 0, 0]))
            continue
        e0 = entries
        entries += s - 1
        a_split.append([n, 0, seg, INIT_POOL | OUT | FINAL_ENTRY, -1, e0, 0, 0])
        for j in range(1, s - 1):
            a_split.append([n, j * seg, seg, FINAL_ENTRY | TRANSITION, -1, e0 + j, 0, 0])
        for j in range(1, s):
            last = j == s - 1
            b_rows.append([n, j * seg, seg, INIT_ENTRY | OUT | (FINAL_POOL if last else 0), e0 + j - 1, -1, 0, 0])
        c_rows.append([n, e0, s - 1, 0, 0, 0, 0, 0])
    a_rest.sort(key=lambda r: -r[0])
    rows_a = a_split + [r for _, r in a_rest]
    table = [x for row in rows_a + b_rows + c_rows for x in row]
    return table, len(rows_a), len(b_rows), len(c_rows), entries


def split_state_floats(entries: int, num_heads: int) -> int:
    return entries * num_heads * 2 * 128 * 128


def upload(table: list[int], device: torch.device) -> torch.Tensor:
    """The table as a [U, UNIT_INTS] int32 tensor on ``device`` (one non-blocking copy)."""
    t = torch.tensor(table, dtype=torch.int32).reshape(-1, UNIT_INTS)
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return t


_TABLES: OrderedDict = OrderedDict()  # (bounds, seg, device, stream) -> (units on device, counts)
TABLES_KEPT = 16


def device_units(bounds: list[int], seg: int, device: torch.device) -> tuple[torch.Tensor, int, int, int, int]:
    """``build_units`` uploaded, kept for the next calls with the same lengths on the same stream:
    every KDA layer of an engine step prefills the same batch, so the table is built and copied
    once per step, not once per layer. Returns (units, units_a, units_b, units_c, entries)."""
    device = torch.device(device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (tuple(bounds), seg, device, stream)
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    table, ua, ub, uc, entries = build_units(bounds, seg)
    hit = (upload(table, device), ua, ub, uc, entries)
    _TABLES[key] = hit
    while len(_TABLES) > TABLES_KEPT:
        _TABLES.popitem(last=False)
    return hit
