"""When and how to split long prefill sequences into segments that run in parallel.

The CUDA prefill is token-serial per (sequence, head, value-row block): one CTA walks the whole
sequence. With few heads per GPU (Kimi-Linear at TP4/TP8 holds 8 or 4 of its 32 KDA heads) a
long prompt gives a handful of CTAs with very long chains while most SMs idle. Splitting a
sequence into segments of ``segment`` tokens shortens every chain to at most ``segment`` tokens at
the price of a second (transition) pass over the split tokens and a short combine; see
``split_prefill.py`` and ``docs/long-context-split.md``.

Cost model (``plan_split``), in microseconds, for one launch of the token-serial kernel over
units of lengths ``L_u``, each using ``c`` CTAs per head (``c = V / BV``, ``BV`` as the launcher
picks it from the number of (unit, head) pairs and the SM count)::

    pass(units) = TOKEN_US · tau(BV) · max(max_u L_u, c·H·Σ_u L_u / (SMs · CHAINS_PER_SM)) + LAUNCH_US

The first term of the max is the longest serial chain; the second is the number of full-speed
waves the GPU needs for all the chains (``CHAINS_PER_SM`` chains run at full speed on one SM,
since they are latency-bound). ``tau(BV) = 1 + BV/32`` makes a token step of a CTA holding more
value rows somewhat slower. Then::

    unsplit = pass(lengths)
    split(S) = pass(local units) + TRANSITION_FACTOR · pass(transition units)
               + COMBINE_STEP_US · Σ_n (segments_n − 1)           # sequential S_in recursion
               + CORRECT_NS_PER_TOKEN_HEAD · split tokens · H / 1000 + SPLIT_OVERHEAD_US

where the local units are all segments plus the sequences left whole, and the transition units
are every segment but the first of each split sequence (the first one starts from the real
initial state, so it needs no transition). ``S`` ranges over multiples of 64 (powers of two
from ``MIN_SEGMENT``); every sequence longer than ``S`` is split, and nothing is split unless
the longest sequence has ``MIN_SPLIT_LEN`` tokens. The planner returns the cheapest ``S`` when it beats the unsplit launch by
``MARGIN``, else None.

Calibration (NVIDIA H200, 132 SMs, token-serial kernel; benchmarks/results/
bench_prefill-chunked-nvidia-h200-92f5f3f7abc0.json): the unsplit H96 1x8192, H96 8x1024 and
H32 8x4096 calls all ran with 32-row blocks and took 0.9 µs per token step of a CTA at about 3.5
chains per SM (7.36, 6.10 and 8.26 ms measured; the last two are throughput-bound and give
3.5 chains/SM each); the split H32 1x32768 (segment 4096) and H8 1x131072 (segment 8192) calls
(19.2 and 20.0 ms) both put the transition pass at 1.45x a plain pass. ``tau`` for 8/16-row blocks,
the combine and overhead constants, and the unsplit long calls are not measured yet; re-check
with ``scripts/bench_prefill.py --long`` (``ours_ms`` vs ``ours_unsplit_ms``).

Scheduling in varlen batches (long first): only sequences longer than the segment are split;
short ones stay whole; segments and short sequences are packed, in token order, into one
``cu_seqlens`` per pass, so each pass is a single launch whose units are all at most ``S`` long
and the block scheduler never finds a long chain late in the grid.

``KDA_SERVING_PREFILL_SPLIT`` overrides the planner: ``0`` never splits, a positive multiple of
64 forces that segment length (also on the CPU), unset / ``auto`` lets the planner decide (on
the CPU, ``num_sms=None``, it never splits).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ENV = "KDA_SERVING_PREFILL_SPLIT"
ALIGN = 64                # segment boundaries are multiples of the checkpoint stride
MIN_SEGMENT = 1024        # smallest segment the planner picks on its own
MIN_SPLIT_LEN = 4096      # the planner leaves a call alone when no sequence is this long

# Cost-model constants (H200 calibration in the module doc; the rest are estimates)
TOKEN_US = 0.45           # one token step of one CTA holding 8 value rows (x tau(32) = 0.9 µs measured)
CHAINS_PER_SM = 3.5       # latency-bound chains an SM runs at full speed (measured)
TRANSITION_FACTOR = 1.45  # a transition pass over a plain pass of the same units (measured)
LAUNCH_US = 5.0           # one kernel launch
COMBINE_STEP_US = 15.0    # one S_in ← S_in·P + B step (a batched [H,V,K]·[H,K,K] matmul)
CORRECT_NS_PER_TOKEN_HEAD = 0.5  # o += S_in·(P q): read P q and o, write o
SPLIT_OVERHEAD_US = 40.0  # host plan, index uploads, scratch set-up
MARGIN = 0.9              # split only when it is estimated at <= 90% of the unsplit time (the
                          # calibrated model is within 8% of every measured call)


def block_rows(seq_heads: int, num_sms: int) -> int:
    """The value-row block the CUDA launcher picks (mirror of ``pick_block_rows``)."""
    if seq_heads * 4 >= num_sms:
        return 32
    if seq_heads * 8 >= num_sms:
        return 16
    return 8


def env_segment() -> int | str:
    """``KDA_SERVING_PREFILL_SPLIT``: 'auto' (unset / 'auto'), 0 (never) or a forced length."""
    raw = os.environ.get(ENV, "").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"{ENV}: expected 'auto', 0 or a positive multiple of {ALIGN}, got {raw!r}") from None
    if n < 0 or n % ALIGN:
        raise ValueError(f"{ENV}: expected 'auto', 0 or a positive multiple of {ALIGN}, got {n}")
    return n


def _pass_us(unit_lens: list[int], num_heads: int, num_sms: int, ctas: int, head_dim: int) -> float:
    if not unit_lens or max(unit_lens) == 0:
        return 0.0
    bv = max(1, head_dim // ctas)
    tau = 1.0 + bv / 32.0
    waves = ctas * num_heads * sum(unit_lens) / (num_sms * CHAINS_PER_SM)
    return TOKEN_US * tau * max(max(unit_lens), waves) + LAUNCH_US


def _segments(n: int, segment: int) -> list[int]:
    return [min(segment, n - a) for a in range(0, n, segment)]


def split_cost_us(lengths: list[int], num_heads: int, num_sms: int, segment: int | None, *,
                  ctas_per_seq_head: int | None = None, head_dim: int = 128) -> float:
    """Estimated time of one prefill call; ``segment=None`` is the unsplit launch."""
    if segment is None:
        ctas = ctas_per_seq_head or head_dim // block_rows(len(lengths) * num_heads, num_sms)
        return _pass_us(lengths, num_heads, num_sms, ctas, head_dim)
    local, trans, steps, split_tokens = [], [], 0, 0
    for n in lengths:
        if n > segment:
            segs = _segments(n, segment)
            local += segs
            trans += segs[1:]
            steps += len(segs) - 1
            split_tokens += n - segs[0]
        else:
            local.append(n)
    if not trans:
        return float("inf")
    c_local = head_dim // block_rows(len(local) * num_heads, num_sms)
    c_trans = head_dim // block_rows(len(trans) * num_heads, num_sms)
    return (_pass_us(local, num_heads, num_sms, c_local, head_dim)
            + TRANSITION_FACTOR * _pass_us(trans, num_heads, num_sms, c_trans, head_dim)
            + COMBINE_STEP_US * steps + CORRECT_NS_PER_TOKEN_HEAD * split_tokens * num_heads / 1000.0
            + SPLIT_OVERHEAD_US)


def plan_split(lengths: list[int], num_heads: int, num_sms: int | None, *, ctas_per_seq_head: int,
               head_dim: int = 128) -> int | None:
    """Segment length (a multiple of 64) to split long sequences into, or None to run unsplit.

    lengths: host sequence lengths of the call; num_heads: heads on this GPU; num_sms: SM count
    (None or 0: no GPU, so never split unless forced); ctas_per_seq_head: CTAs per (sequence,
    head) of the unsplit launch (V / BV). ``KDA_SERVING_PREFILL_SPLIT`` overrides (module doc).
    """
    forced = env_segment()
    longest = max(lengths, default=0)
    if forced != "auto":
        return forced if forced and longest > forced else None
    if not num_sms or longest < max(MIN_SPLIT_LEN, 2 * MIN_SEGMENT):
        return None
    base = split_cost_us(lengths, num_heads, num_sms, None, ctas_per_seq_head=ctas_per_seq_head,
                         head_dim=head_dim)
    best, best_cost = None, float("inf")
    s = MIN_SEGMENT
    while 2 * s <= longest:
        cost = split_cost_us(lengths, num_heads, num_sms, s, head_dim=head_dim)
        if cost < best_cost:
            best, best_cost = s, cost
        s *= 2
    return best if best is not None and best_cost <= MARGIN * base else None


@dataclass(frozen=True)
class SplitLayout:
    """Host description of a split call; token offsets are relative to cu_seqlens[0].

    Local pass: ``unit_bounds`` ([U+1], a refinement of the call's cu_seqlens) with
    ``unit_seq[u]`` the sequence owning unit u and ``first_unit[n]`` the first unit of sequence
    n (scratch row u + 1 holds unit u's state). Transition pass over tokens
    ``[trans_lo, trans_hi)``: ``trans_bounds`` (relative to trans_lo) and ``trans_unit`` (the
    local unit each launch unit mirrors, -1 for a gap of tokens that is not transitioned; its
    transition state lives in row ``p_row[u]`` of the transition scratch). ``chains[n]`` lists
    the units of every split sequence, in order.
    """

    segment: int
    unit_bounds: list[int]
    unit_seq: list[int]
    first_unit: list[int]
    chains: dict[int, list[int]]
    trans_lo: int
    trans_hi: int
    trans_bounds: list[int]
    trans_unit: list[int]
    p_row: dict[int, int]

    @property
    def num_units(self) -> int:
        return len(self.unit_seq)

    @property
    def num_trans_segments(self) -> int:
        return len(self.p_row)

    @property
    def trans_tokens(self) -> int:
        return self.trans_hi - self.trans_lo


def build_layout(bounds: list[int], segment: int) -> SplitLayout:
    """Cut every sequence longer than ``segment`` into segments of ``segment`` tokens (the last one
    shorter); keep the others whole. ``bounds``: host cu_seqlens [N+1]."""
    if segment <= 0 or segment % ALIGN:
        raise ValueError(f"segment: expected a positive multiple of {ALIGN}, got {segment}")
    base = bounds[0]
    rel = [b - base for b in bounds]
    ub, useq, first, chains = [0], [], [], {}
    for n in range(len(rel) - 1):
        a, b = rel[n], rel[n + 1]
        first.append(len(useq))
        if b - a > segment:
            units = []
            for s in range(a, b, segment):
                units.append(len(useq))
                useq.append(n)
                ub.append(min(s + segment, b))
            chains[n] = units
        else:
            useq.append(n)
            ub.append(b)
    trans = [u for units in chains.values() for u in units[1:]]
    p_row = {u: i + 1 for i, u in enumerate(trans)}
    if not trans:
        return SplitLayout(segment, ub, useq, first, chains, 0, 0, [0], [], p_row)
    lo, hi = ub[trans[0]], ub[trans[-1] + 1]
    tb, tu, pos = [0], [], lo
    for u in trans:
        a, b = ub[u], ub[u + 1]
        while pos < a:  # gap: null units of at most `segment` tokens (they only write zeros)
            step = min(segment, a - pos)
            tb.append(pos + step - lo)
            tu.append(-1)
            pos += step
        tb.append(b - lo)
        tu.append(u)
        pos = b
    return SplitLayout(segment, ub, useq, first, chains, lo, hi, tb, tu, p_row)


def workspace_bytes(layout: SplitLayout, num_heads: int, head_dim: int = 128, *, pq_bytes: int = 2,
                    correction_budget: int = 0) -> int:
    """Scratch bytes of a split call: local states (U+1 rows), transition states and combined
    start states (one row per transition segment, plus the null row), all fp32 [H, V, K], and the
    transition output ``P_t q_t`` [trans tokens, H, K] (``pq_bytes`` per element), plus the
    bounded fp32 temporary of the output correction."""
    state = num_heads * head_dim * head_dim * 4
    rows = (layout.num_units + 1) + 2 * (layout.num_trans_segments + 1)
    return rows * state + layout.trans_tokens * num_heads * head_dim * pq_bytes + correction_budget
