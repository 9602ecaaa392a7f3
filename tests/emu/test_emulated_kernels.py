"""The CUDA kernels of csrc/, run on the CPU by the SIMT emulator, against the fp64 gold and the
torch reference: all three prefill kernels (token-serial, chunked, tensor-core) and decode/verify.
Outputs are NaN-poisoned and untouched pool slots hold 1e30 before each run. Every kernel must
also give bit-identical results under five thread schedules (simt_emulator.h: warps in step,
forward / reverse / shuffled, or one warp running ahead, lowest / highest first): a missing
barrier makes them differ."""

import ctypes as C
import math
import os
import random

import pytest
import torch

from kda_serving import ops
from kda_serving.ops import _ext
from kda_serving.ops.naive import naive_kda
from tests.conftest import rel_rms
from tests.gpu.common import check_against

from . import emulated

D = 128
TOL = 5e-3          # bf16 outputs alone give ~2e-3
POISON = 1e30
PREFILL = [("prefill", 8), ("prefill", 16), ("prefill", 32), ("prefill_chunked", 32), ("prefill_chunked", 64),
           ("prefill_tc", 128), ("prefill_tc", 64), ("prefill_tc", 32)]
ONE_EACH = [("prefill", 32), ("prefill_chunked", 64), ("prefill_tc", 64)]


def inputs(T, H, *, gate_center=None, A=4.0):
    q, k, v = (torch.randn(T, H, D).bfloat16() for _ in range(3))
    g = (torch.rand(T, H, D) * 16 - 8) if gate_center is None else gate_center + torch.randn(T, H, D)
    spikes = torch.rand(T, H, D) < 0.05
    g[spikes] = torch.where(torch.rand(T, H, D) < 0.5, -30.0, 30.0)[spikes]
    beta = (torch.randn(T, H) * 3).bfloat16()
    return q, k, v, g.bfloat16(), beta, torch.full((H,), math.log(A)), torch.randn(H * D) * 0.5


def pool_for(lens, H, dtype, null=2):
    """Pool with 1e30 everywhere, random initial states in the live slots; slots 1.., the last
    `null` sequences get slots 0 and -1."""
    N = len(lens)
    pool = torch.full((N + 3, H, D, D), POISON).to(dtype)
    slots = torch.arange(1, N + 1, dtype=torch.int32)
    for i in range(null):
        slots[N - 1 - i] = -i
    has = torch.rand(N) < 0.7
    init = torch.zeros(N, H, D, D, dtype=torch.float64)
    for n in range(N):
        if slots[n] > 0:
            pool[slots[n]] = (torch.randn(H, D, D) * 0.3).to(dtype)
            if has[n]:
                init[n] = pool[slots[n]].double()
    return pool, slots, has, init


def run_prefill(lib, kind, bv, lens, H, pool_dtype, lb, inp=None, **kw):
    cu = torch.tensor([0] + lens).cumsum(0).to(kw.pop("cu_dtype", torch.int32))
    inp = inp or inputs(sum(lens), H)
    pool, slots, has, init = pool_for(lens, H, pool_dtype, kw.pop("null", 2))
    before = pool.clone()
    out = torch.full(inp[2].shape, float("nan")).bfloat16()
    emulated.prefill(lib, kind, bv, *inp, cu, pool, slots, has, lower_bound=lb, out=out, **kw)
    return inp, cu, pool, before, slots, init, out


def check_prefill(inp, cu, pool, before, slots, init, out, lb, tol_state=TOL):
    ro, rs = naive_kda(*inp, cu_seqlens=cu, initial_state=init, lower_bound=lb)
    check_against(out, pool, before, cu, slots, ro, rs, tol_state)


@pytest.mark.parametrize("lb", [None, -5.0])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,bv", PREFILL)
def test_prefill_kernels_vs_fp64(lib, kind, bv, pool_dtype, lb):
    res = run_prefill(lib, kind, bv, [0, 1, 17, 130, 9, 5], 2, pool_dtype, lb)
    check_prefill(*res, lb)


@pytest.mark.parametrize("kind,bv", ONE_EACH + [("prefill_tc", 32)])
def test_prefill_checkpoints_every_64_tokens(lib, kind, bv):
    lens, H = [63, 64, 130], 2
    counts = [n // 64 for n in lens]
    offsets = torch.tensor([0] + counts[:-1]).cumsum(0).to(torch.int64)
    inter = torch.full((sum(counts) + 1, H, D, D), POISON)
    inp, cu, pool, before, slots, init, out = run_prefill(lib, kind, bv, lens, H, torch.float32, None, null=0,
                                                          inter=inter, inter_offsets=offsets)
    check_prefill(inp, cu, pool, before, slots, init, out, None)
    _, _, ckpts = naive_kda(*inp, cu_seqlens=cu, initial_state=init, checkpoint_every=64)
    for n, c in enumerate(counts):
        for i in range(c):
            assert rel_rms(inter[int(offsets[n]) + i], ckpts[n][i]) <= TOL, (n, i)
    assert torch.equal(inter[-1], torch.full((H, D, D), POISON))


@pytest.mark.parametrize("lb", [None, -5.0])
@pytest.mark.parametrize("kind,bv", ONE_EACH)
def test_prefill_adversarial(lib, kind, bv, lb):
    T, H = 150, 1
    q, k, v, g, beta, A_log, dt = inputs(T, H, A=16.0)
    k[10:74] = k[10]                                                   # 64 identical keys
    k[80:] = (torch.randn(H, D) + 0.07 * torch.randn(T - 80, H, D)).bfloat16()  # cosine ~0.99
    g[::5] = 30.0
    g[2::7] = -30.0
    beta[::3] = 30.0
    res = run_prefill(lib, kind, bv, [T], H, torch.float32, lb, inp=(q, k, v, g, beta, A_log, dt), null=0)
    check_prefill(*res, lb)


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("kind,bv", ONE_EACH)
def test_prefill_strided_inputs_and_int64_offsets(lib, kind, bv, shift):
    """Row-strided column slices of one fused projection; shift 1 puts every row of q, k, v one
    element (2 bytes) off alignment (the tensor-core kernel's vector loads must fall back)."""
    lens, H = [17, 0, 70], 2
    T = sum(lens)
    mixed = torch.randn(T, 3 * H * D + 64 + shift).bfloat16()
    q, k, v = (mixed[:, shift + i * H * D:shift + (i + 1) * H * D].view(T, H, D) for i in range(3))
    beta = (torch.randn(T, 2 * H) * 3).bfloat16()[:, :H]
    _, _, _, g, _, A_log, dt = inputs(T, H)
    assert not q.is_contiguous() and not beta.is_contiguous()
    res = run_prefill(lib, kind, bv, lens, H, torch.float32, None, inp=(q, k, v, g, beta, A_log, dt), null=0,
                      cu_dtype=torch.int64)
    check_prefill(*res, None)


@pytest.mark.parametrize("bv", [128, 64, 32])
def test_tensor_core_prefill_many_sequences(lib, bv):
    """Many short sequences: the prepare pass finds each chunk's sequence by a binary search over
    cu_seqlens (and skips the slots between sequences); empty, one-token and 64-multiple lengths,
    null slots, both gates' worth of random decays. With 128 rows the emulated GPU has one SM, so
    one prepare CTA walks every item through its two-entry lookup ring (find_prep_item)."""
    torch.manual_seed(21)
    lens = [int(x) for x in torch.randint(0, 140, (30,))] + [0, 1, 64, 128, 0]
    res = run_prefill(lib, "prefill_tc", bv, lens, 1, torch.float32, None, null=3)
    check_prefill(*res, None)


@pytest.mark.parametrize("kind,bv", ONE_EACH)
def test_prefill_offsets_counted_from_the_first(lib, kind, bv):
    """cu_seqlens may start past 0 (an engine's slice of its offsets): token rows count from
    cu_seqlens[0], so adding any base gives the same results (the tensor-core kernel's chunk slots
    too; 100 is not a multiple of its 64-token chunks). The workspace holds stale records of
    the first run."""
    lens, H = [70, 0, 130, 9], 2
    inp = inputs(sum(lens), H)
    pool0, slots, has, _ = pool_for(lens, H, torch.float32, null=1)
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    ws = None
    if kind == "prefill_tc":
        ws = torch.full((_ext.tc_workspace_floats(sum(lens), len(lens), H),), float("nan"))
    results = []
    for base in (0, 100):
        pool = pool0.clone()
        out = emulated.prefill(lib, kind, bv, *inp, cu + base, pool, slots, has, workspace=ws)
        results.append((out, pool))
    assert torch.equal(results[1][0], results[0][0]) and torch.equal(results[1][1], results[0][1])


def test_prepare_item_split_matches_division(lib):
    """The prepare pass's item -> (chunk slot, head) by reciprocal (ItemDiv) against exact division,
    at the edges of its fast path (items below 2^31) and past it."""
    rng = random.Random(7)
    cslot, h = C.c_int64(), C.c_int()
    for heads in list(range(1, 131)) + [255, 256, 1000, 4097]:
        items = [0, 1, heads - 1, heads, heads + 1, 2**31 - 2, 2**31 - 1, 2**31, 2**40 + 3]
        items += [k * heads + d for k in (7, 12345, (2**31 - 1) // heads) for d in (-1, 0, 1)]
        items += [rng.randrange(2**31) for _ in range(200)]
        for item in items:
            if item < 0:
                continue
            lib.emu_item_div(heads, item, C.byref(cslot), C.byref(h))
            assert (cslot.value, h.value) == divmod(item, heads), (heads, item)


# ("prefill_tc", 128): one CTA, so the persistent prepare pass walks several items (the barriers
# between one item's last reads and the next item's writes); the others run one item per CTA.
@pytest.mark.parametrize("kind,bv", ONE_EACH + [("prefill_tc", 32), ("prefill_tc", 128)])
def test_prefill_is_independent_of_the_thread_schedule(lib, kind, bv):
    lens, H = [70, 0, 9], 1
    inp = inputs(sum(lens), H)
    pool0, slots, has, _ = pool_for(lens, H, torch.float32, null=0)
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    results = []
    for order in (0, 1, 2, 3, 4):
        lib.emu_set_order(order, 12345)
        pool = pool0.clone()
        out = emulated.prefill(lib, kind, bv, *inp, cu, pool, slots, has)
        results.append((out, pool))
    lib.emu_set_order(0, 1)
    for out, pool in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(pool, results[0][1])


# The opt-in wgmma build, the same bits as the default mma.sync build: the 128-row state pass's
# products (kda_prefill_tc_state.cuh, -DKDA_TC_STATE_WGMMA=1, whose record holds Kd^T for every
# state CTA), on mixed lengths and gates, both pools, several items per CTA (bv 128), under a pass
# order and a greedy one (the warpgroup products' barriers).
@pytest.mark.parametrize("define", ["-DKDA_TC_STATE_WGMMA=1"])
@pytest.mark.parametrize("bv,order", [(32, 0), (128, 3)])
def test_tensor_core_prefill_wgmma_build_same_bits(lib, bv, order, define):
    wg = emulated.build((define,))
    for lens, H, lb, pool_dtype, spike in (([0, 1, 17, 130, 9, 64, 200], 3, None, torch.float32, 1.0),
                                           ([5, 129, 64, 3], 2, -5.0, torch.bfloat16, 1.0),
                                           ([150, 70], 2, None, torch.float32, 30.0)):
        inp = list(inputs(sum(lens), H))
        inp[3] = (inp[3].float() * spike).bfloat16()
        cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
        pool0, slots, has, _ = pool_for(lens, H, pool_dtype)
        results = []
        for build in (lib, wg):
            build.emu_set_order(order, 777)
            pool = pool0.clone()
            out = emulated.prefill(build, "prefill_tc", bv, *inp, cu, pool, slots, has, lower_bound=lb)
            build.emu_set_order(0, 1)
            results.append((out.view(torch.int16), pool.view(torch.int32 if pool_dtype == torch.float32 else torch.int16)))
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1]), (lens, H)


def test_build_options_report_the_defines(lib):
    """kBuildOptions (csrc/common/build_options.h), which the extension reports, names each define
    (``lib`` has those of KDA_SERVING_EMU_FLAGS, if any)."""
    from kda_serving.build_defines import OPTIONS, names
    flags = os.environ.get("KDA_SERVING_EMU_FLAGS", "").split()
    assert names(lib.emu_build_options()) == {n: int(f"-D{n}=1" in flags) for n in OPTIONS}
    wg = emulated.build(("-DKDA_TC_STATE_WGMMA=1",))
    assert names(wg.emu_build_options()) == {n: int(n == "KDA_TC_STATE_WGMMA" or f"-D{n}=1" in flags) for n in OPTIONS}


def decode_inputs(B, T, H):
    q, k, v = (torch.randn(B, T, H, D).bfloat16() for _ in range(3))
    g = (torch.rand(B, T, H, D) * 16 - 8).bfloat16()
    beta = (torch.randn(B, T, H) * 3).bfloat16()
    return q, k, v, g, beta, torch.full((H,), math.log(4.0)), torch.randn(H * D) * 0.5


def grid_of(bv):
    """emulated.decode's rows and kernel for a test's ``bv``: 8 / 16 / 32 value rows per CTA of
    the row-block kernel, or "heads" for the head kernel."""
    return (None, "heads") if bv == "heads" else (bv, "rows")


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bv", [8, 16, 32, "heads"])
def test_decode_and_verify_vs_reference(lib, bv, pool_dtype):
    rows, kernel = grid_of(bv)
    H = 2
    pool0 = torch.full((12, H, D, D), POISON).to(pool_dtype)
    for s in range(1, 12):
        pool0[s] = (torch.randn(H, D, D) * 0.3).to(pool_dtype)
    # plain decode: live slots and null slots 0 / -1
    inp = decode_inputs(4, 1, H)
    slots = torch.tensor([3, 0, 7, -1], dtype=torch.int32)
    ours, ref = pool0.clone(), pool0.clone()
    o = emulated.decode(lib, rows, *inp, ours, slots, kernel=kernel)
    o_ref = ops.kda_decode(*inp, state_pool=ref, slots=slots)
    assert not o.isnan().any() and (o[[1, 3]] == 0).all()
    assert rel_rms(o[[0, 2]], o_ref[[0, 2]]) <= TOL
    assert rel_rms(ours[[3, 7]], ref[[3, 7]]) <= TOL
    others = [s for s in range(12) if s not in (3, 7)]
    assert torch.equal(ours[others], pool0[others])
    # verify: 3 tokens per row, start from slots[n, a-1], state after token t to slots[n, t]
    inp = decode_inputs(3, 3, H)
    slots = torch.tensor([[1, 2, 4, 5], [6, 8, 9, 10], [0, 0, 0, 0]], dtype=torch.int32)
    acc = torch.tensor([2, 1, 1], dtype=torch.int32)
    ours, ref = pool0.clone(), pool0.clone()
    o = emulated.decode(lib, rows, *inp, ours, slots, acc, kernel=kernel)
    o_ref = ops.kda_decode(*inp, state_pool=ref, slots=slots, num_accepted_tokens=acc)
    assert not o.isnan().any() and (o[2] == 0).all()
    assert rel_rms(o[:2], o_ref[:2]) <= TOL
    written = [1, 2, 4, 6, 8, 9]  # slots[n, t] for t < 3 of the live rows
    assert rel_rms(ours[written], ref[written]) <= TOL
    others = [s for s in range(12) if s not in written]
    assert torch.equal(ours[others], pool0[others])


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,verify", [(1, False), (3, True), (8, True)])
def test_head_kernel_equals_row_blocks(lib, T, verify, pool_dtype):
    """The head kernel runs the 32-row kernel's arithmetic on each of its four row blocks: same bits."""
    H, B = 3, 4
    pool0 = torch.full((2 + B * T, H, D, D), POISON).to(pool_dtype)
    for s in range(1, pool0.shape[0] - 1):
        pool0[s] = (torch.randn(H, D, D) * 0.3).to(pool_dtype)
    inp = decode_inputs(B, T, H)
    if verify:
        slots = torch.arange(1, 1 + B * T, dtype=torch.int32).reshape(B, T)
        slots[2] = 0  # a null row
        acc = torch.tensor([1, T, 1, 2], dtype=torch.int32)
    else:
        slots, acc = torch.tensor([3, 0, 1, -1], dtype=torch.int32), None
    results = []
    for rows, kernel in ((32, "rows"), (None, "heads")):
        pool = pool0.clone()
        o = emulated.decode(lib, rows, *inp, pool, slots, acc, kernel=kernel,
                            out=torch.full((B, T, H, D), float("nan")).bfloat16())
        results.append((o, pool))
    (o_rows, p_rows), (o_heads, p_heads) = results
    assert not o_heads.isnan().any()
    assert torch.equal(o_heads, o_rows) and torch.equal(p_heads, p_rows)


# ------------------------------------------------------------------------------------ conv

def conv_layer(D, W=4, dtype=torch.float32):
    return (torch.randn(D, W) * 0.4).to(dtype), (torch.randn(D) * 0.1).to(dtype)


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D,x_pad", [(160, 0), (160, 4), (164, 0)])  # 8-channel path; odd row stride; D % 8 != 0
def test_conv_prefill_vs_reference(lib, pool_dtype, D, x_pad):
    lens = [0, 1, 3, 40, 7]
    T, N = sum(lens), len(lens)
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    x = torch.randn(T, D + x_pad).bfloat16()[:, :D]
    w, b = conv_layer(D)
    pool0 = torch.full((N + 3, 3, D), POISON).to(pool_dtype)
    for s in range(1, N + 1):
        pool0[s] = torch.randn(3, D).to(pool_dtype)
    slots = torch.tensor([1, 2, 0, 4, 5], dtype=torch.int32)
    has = torch.tensor([True, False, True, True, False])
    ours, ref = pool0.clone(), pool0.clone()
    y = emulated.conv_prefill(lib, x, w, b, cu, ours, slots, has, out=torch.full_like(x, float("nan")))
    y_ref = ops.causal_conv1d_prefill(x, w, b, cu_seqlens=cu, conv_pool=ref, slots=slots, has_initial_state=has)
    assert not y.isnan().any()
    assert rel_rms(y, y_ref) <= TOL
    assert rel_rms(ours[[1, 2, 4, 5]], ref[[1, 2, 4, 5]]) <= 1e-2
    assert torch.equal(ours[[0, 3, 6, 7]], pool0[[0, 3, 6, 7]])


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec", [False, True])
@pytest.mark.parametrize("D,x_pad", [(160, 0), (160, 4), (164, 0)])  # 8-channel path; odd row stride; D % 8 != 0
def test_conv_update_vs_reference(lib, spec, D, x_pad, pool_dtype):
    B, T = 4, (3 if spec else 1)
    R = 3 + (T - 1)
    x = torch.randn(B, T, D + x_pad).bfloat16()[..., x_pad:]
    w, b = conv_layer(D)
    pool0 = torch.randn(8, R, D).to(pool_dtype)
    slots = torch.tensor([2, 0, 5, 6], dtype=torch.int32)
    acc = torch.tensor([1, 1, 3, 2], dtype=torch.int32) if spec else None
    ours, ref = pool0.clone(), pool0.clone()
    y = emulated.conv_update(lib, x, w, b, ours, slots, acc, out=torch.full((B, T, D), float("nan")).bfloat16())
    y_ref = ops.causal_conv1d_update(x, w, b, conv_pool=ref, slots=slots, num_accepted_tokens=acc)
    assert not y.isnan().any()
    assert rel_rms(y[[0, 2, 3]], y_ref[[0, 2, 3]]) <= TOL
    assert torch.equal(y[1], torch.zeros_like(y[1]))  # null slot: zero output
    assert torch.equal(ours, ref) or rel_rms(ours, ref) <= 1e-6
    untouched = [s for s in range(8) if s not in (2, 5, 6)]
    assert torch.equal(ours[untouched], pool0[untouched])


@pytest.mark.parametrize("W,silu", [(1, True), (2, True), (3, True), (4, True), (3, False), (4, False)])
@pytest.mark.parametrize("lens", [[0, 1, 3, 130, 7, 64, 0, 70], [200], []], ids=["varlen", "one", "none"])
def test_conv_prefill_kernels_agree(lib, W, silu, lens):
    """The eight-channel prefill kernel (aligned rows; built per width and activation) and the
    one-channel kernel (rows with an odd stride) give the same bits: outputs, padding rows after
    the last sequence, null slots, and the pool rows, over sequences that start and end inside
    64-token tiles."""
    D, pad = 160, 5
    T, N = sum(lens), len(lens)
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int64)
    x = torch.randn(T + pad, D).bfloat16()
    w, b = conv_layer(D, W, torch.bfloat16)
    pool0 = torch.randn(N + 2, W - 1, D).bfloat16()
    slots = torch.tensor([(n + 1) if n % 3 != 2 else 0 for n in range(N)], dtype=torch.int32)
    has = torch.tensor([n % 2 == 0 for n in range(N)], dtype=torch.bool)
    outs = []
    for xin in (x, torch.randn(T + pad, D + 4).bfloat16()[:, :D].copy_(x)):  # eight-channel; one-channel
        pool = pool0.clone()
        y = emulated.conv_prefill(lib, xin, w, b, cu, pool, slots, has, out=torch.full_like(x, float("nan")), silu=silu)
        outs.append((y, pool))
    assert not outs[0][0].isnan().any() and (outs[0][0][T:] == 0).all()
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("spec", [False, True])
def test_conv_update_kernels_agree(lib, spec):
    """Aligned rows below / at the size rule's threshold: the one- and eight-channel kernels give
    the same bits (same arithmetic per channel, same order)."""
    B, D, T = 4, 160, (3 if spec else 1)
    x = torch.randn(B, T, D).bfloat16()
    w, b = conv_layer(D)
    pool0 = torch.randn(8, 3 + T - 1, D)
    slots = torch.tensor([2, 0, 5, 6], dtype=torch.int32)
    acc = torch.tensor([1, 1, 3, 2], dtype=torch.int32) if spec else None
    outs = []
    for vec8_min in (0, B * D + 1):  # eight-channel kernel; one-channel kernel
        pool = pool0.clone()
        y = emulated.conv_update(lib, x, w, b, pool, slots, acc, out=torch.full((B, T, D), float("nan")).bfloat16(),
                                 vec8_min_elems=vec8_min)
        outs.append((y, pool))
    assert not outs[0][0].isnan().any()
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# ---------------------------------------------------------------------------- fused decode

@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("spec", [False, True])
@pytest.mark.parametrize("bv", [8, 32, "heads"])
@pytest.mark.parametrize("x_pad", [0, 4])  # 4: rows not 16-byte aligned, one-channel conv write-back
@pytest.mark.parametrize("path", ["auto", "rows", "single"])  # conv + decode pair, three kernels, one kernel
def test_fused_decode_vs_reference(lib, bv, spec, norm, x_pad, path):
    rows, kernel = grid_of(bv)
    H, B, T, W = 2, 3, (3 if spec else 1), 4
    Dm = 3 * H * D
    mixed = torch.randn(B, T, Dm + x_pad).bfloat16()[..., x_pad:]
    g = (torch.rand(B, T, H, D) * 16 - 8).bfloat16()
    beta = (torch.randn(B, T, H) * 3).bfloat16()
    A_log, dt = torch.full((H,), math.log(4.0)), torch.randn(H * D) * 0.5
    cw, cb = conv_layer(Dm, W)
    R = W - 1 + (T - 1)
    conv0 = torch.randn(10, R, Dm)
    state0 = torch.full((10, H, D, D), POISON)
    for s in range(1, 10):
        state0[s] = torch.randn(H, D, D) * 0.3
    if spec:
        slots = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [0, 0, 0, 0]], dtype=torch.int32)
        acc = torch.tensor([2, 1, 1], dtype=torch.int32)
    else:
        slots, acc = torch.tensor([3, 0, 7], dtype=torch.int32), None
    kw = dict(out_gate=torch.randn(B, T, H, D).bfloat16(), norm_weight=torch.rand(D) + 0.5, norm_eps=1e-5) if norm else {}
    c_ours, s_ours, c_ref, s_ref = conv0.clone(), state0.clone(), conv0.clone(), state0.clone()
    o = emulated.decode_fused(lib, rows, mixed, g, beta, A_log, dt, cw, cb, c_ours, s_ours, slots, acc,
                              out=torch.full((B, T, H, D), float("nan")).bfloat16(), path=path, kernel=kernel, **kw)
    o_ref = ops.kda_decode_fused(mixed, g, beta, A_log, dt, conv_weight=cw, conv_bias=cb, conv_pool=c_ref,
                                 state_pool=s_ref, slots=slots, num_accepted_tokens=acc, **kw)
    live = [0, 1] if spec else [0, 2]
    dead = [2] if spec else [1]
    assert not o.isnan().any() and (o[dead] == 0).all()
    assert rel_rms(o[live], o_ref[live]) <= TOL
    assert rel_rms(s_ours, s_ref) <= TOL or torch.equal(s_ours, s_ref)
    assert torch.equal(s_ours[0], state0[0]) and torch.equal(s_ours[9], state0[9])
    assert rel_rms(c_ours, c_ref) <= 1e-6


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,spec", [(1, False), (3, True), (8, True)])
def test_single_kernel_fused_decode_equals_pair(lib, T, spec, pool_dtype):
    """The single-kernel path computes the conv as the pair path's conv kernel does and runs the head
    kernel's arithmetic on it: outputs (normalised), states and conv pools bit-identical."""
    H, B, W = 2, 4, 4
    Dm = 3 * H * D
    mixed = torch.randn(B, T, Dm).bfloat16()
    g = (torch.rand(B, T, H, D) * 16 - 8).bfloat16()
    beta = (torch.randn(B, T, H) * 3).bfloat16()
    A_log, dt = torch.full((H,), math.log(4.0)), torch.randn(H * D) * 0.5
    cw, cb = conv_layer(Dm, W)
    R = W - 1 + (T - 1)
    conv0 = torch.randn(3 + B * T, R, Dm).to(pool_dtype)
    state0 = (torch.randn(3 + B * T, H, D, D) * 0.3).to(pool_dtype)
    if spec:
        slots = torch.arange(1, 1 + B * T, dtype=torch.int32).reshape(B, T)
        slots[1] = 0
        acc = torch.tensor([1, 1, T, 2], dtype=torch.int32)
    else:
        slots, acc = torch.tensor([3, 0, 1, -1], dtype=torch.int32), None
    kw = dict(out_gate=torch.randn(B, T, H, D).bfloat16(), norm_weight=torch.rand(D) + 0.5, norm_eps=1e-5)
    runs = []
    for path, kernel in (("auto", "heads"), ("single", None)):
        c, st = conv0.clone(), state0.clone()
        o = emulated.decode_fused(lib, None, mixed, g, beta, A_log, dt, cw, cb, c, st, slots, acc, path=path,
                                  kernel=kernel, out=torch.full((B, T, H, D), float("nan")).bfloat16(), **kw)
        runs.append((o, c, st))
    assert not runs[1][0].isnan().any()
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))


def test_decode_kernels_are_independent_of_the_thread_schedule(lib):
    H, B, T = 1, 2, 3
    Dm = 3 * H * D
    mixed = torch.randn(B, T, Dm).bfloat16()
    q, k, v, g, beta, A_log, dt = decode_inputs(B, T, H)
    cw, cb = conv_layer(Dm)
    conv0, state0 = torch.randn(6, 5, Dm), torch.randn(6, H, D, D) * 0.3
    slots = torch.tensor([[1, 2, 3], [4, 5, 0]], dtype=torch.int32)
    acc = torch.tensor([2, 1], dtype=torch.int32)
    gate, nw = torch.randn(B, T, H, D).bfloat16(), torch.rand(D) + 0.5
    results = []
    for order in (0, 1, 2, 3, 4):
        lib.emu_set_order(order, 777)
        c, s1, s2 = conv0.clone(), state0.clone(), state0.clone()
        o1 = emulated.decode(lib, 16, q, k, v, g, beta, A_log, dt, s1, slots, acc)
        o2 = emulated.decode_fused(lib, 16, mixed, g, beta, A_log, dt, cw, cb, c, s2, slots, acc, out_gate=gate,
                                   norm_weight=nw, path="rows")
        c3, s3 = conv0.clone(), state0.clone()
        o3 = emulated.decode_fused(lib, 16, mixed, g, beta, A_log, dt, cw, cb, c3, s3, slots, acc, out_gate=gate,
                                   norm_weight=nw, path="auto")
        c5, s6 = conv0.clone(), state0.clone()
        o6 = emulated.decode_fused(lib, None, mixed, g, beta, A_log, dt, cw, cb, c5, s6, slots, acc, out_gate=gate,
                                   norm_weight=nw, path="single")
        c4, s4, s5 = conv0.clone(), state0.clone(), state0.clone()
        o4 = emulated.decode(lib, None, q, k, v, g, beta, A_log, dt, s4, slots, acc, kernel="heads")
        o5 = emulated.decode_fused(lib, None, mixed, g, beta, A_log, dt, cw, cb, c4, s5, slots, acc, out_gate=gate,
                                   norm_weight=nw, path="auto", kernel="heads")
        results.append((o1, o2, c, s1, s2, o3, c3, s3, o4, s4, o5, c4, s5, o6, c5, s6))
    lib.emu_set_order(0, 1)
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r, results[0]))


def test_tensor_core_prefill_long_slow_decay(lib):
    """Ten chunks with a slowly decaying state: the TF32 rounding of every chunk accumulates."""
    T, H = 640, 1
    q, k, v, _, beta, A_log, dt = inputs(T, H)
    g = torch.full((T, H, D), -6.0).bfloat16()
    res = run_prefill(lib, "prefill_tc", 64, [T], H, torch.float32, None, inp=(q, k, v, g, beta, A_log, dt * 0.1),
                      null=0)
    check_prefill(*res, None, tol_state=2e-3)


@pytest.mark.parametrize("bv", [128, 64, 32])
def test_tensor_core_prefill_value_row_magnitudes(lib, bv):
    """Value rows of very different magnitudes: v's column and the initial state's row r scaled
    together by 1e-30 .. 1e30 (row 7 by 0). Each row of the state evolves on its own, so each row's
    output and state, divided by its factor, must match fp64 as an unscaled row does. The
    state's products may take it as fp16 times a power of two per row: one scale for all rows
    would flush the small rows to zero or overflow on the large ones."""
    lens, H = [70, 130], 2
    q, k, v, g, beta, A_log, dt = inputs(sum(lens), H)
    f = torch.tensor([10.0 ** e for e in (-30, -6, 0, 4, 30)], dtype=torch.float64)[torch.arange(D) % 5]
    f[7] = 0.0
    v = (v.double() * f).bfloat16()
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    pool, slots, has, init = pool_for(lens, H, torch.float32, null=0)
    rows = f.view(1, D, 1)
    for n in range(len(lens)):
        pool[slots[n]] = (pool[slots[n]].double() * rows).float()
        init[n] *= rows
    before = pool.clone()
    out = torch.full(v.shape, float("nan")).bfloat16()
    emulated.prefill(lib, "prefill_tc", bv, q, k, v, g, beta, A_log, dt, cu, pool, slots, has, out=out)
    ro, rs = naive_kda(q, k, v, g, beta, A_log, dt, cu_seqlens=cu, initial_state=init)
    sc = torch.where(f > 0, f, torch.ones_like(f))
    assert (out[..., 7] == 0).all()
    assert rel_rms(out.double() / sc, ro.double() / sc) <= TOL
    for n in range(len(lens)):
        st = pool[slots[n]].double()
        assert (st[:, 7] == 0).all()
        assert rel_rms(st / sc.view(1, D, 1), rs[n].double() / sc.view(1, D, 1)) <= TOL, n
    assert torch.equal(pool[0], before[0]) and torch.equal(pool[len(lens) + 1:], before[len(lens) + 1:])


@pytest.mark.parametrize("bv", [128, 32])
def test_tensor_core_prefill_large_state_then_silent_chunk(lib, bv):
    """A large state (entries near 1e6) followed by a chunk that wipes it: every channel's decay
    underflows to 0 (gates of +30 with A_log = log 16) and v is 0, so U, the decayed state and the
    chunk's outputs are all exactly 0 while the state entering the chunk is large. The per-row
    scales of the state pass then span the whole exponent range (2^-6 for the state, 2^126 for a
    row of zeros); moving an accumulator between them in one multiply overflowed to inf and made
    0 x inf = NaN."""
    T, H = 128, 1
    q, k, v, g, beta, A_log, dt = inputs(T, H)
    g[:64] = -30.0  # no decay: the state stays large
    g[64:] = 30.0
    v[64:] = 0.0
    A_log = torch.full((H,), math.log(16.0))
    inp = (q, k, v, g.bfloat16(), beta, A_log, dt)
    cu = torch.tensor([0, T], dtype=torch.int32)
    pool, slots, has, init = pool_for([T], H, torch.float32, null=0)
    has[:] = True
    init[0] = torch.randn(H, D, D, dtype=torch.float64) * 1e6
    pool[slots[0]] = init[0].float()
    init[0] = pool[slots[0]].double()
    before = pool.clone()
    out = torch.full(v.shape, float("nan")).bfloat16()
    emulated.prefill(lib, "prefill_tc", bv, *inp, cu, pool, slots, has, out=out)
    assert not out.isnan().any() and not pool.isnan().any()
    assert (out[64:] == 0).all() and (pool[slots[0]] == 0).all()
    check_prefill(inp, cu, pool, before, slots, init, out, None)


@pytest.mark.parametrize("lb", [None, -5.0, -10.0])
def test_tensor_core_prefill_mixed_diagonal_paths(lib, lb):
    """Moderate gates (a 16-token block's diagonal on tensor cores) with spikes that make a few
    blocks' decay fall below 2^-120 (those diagonals run the exact CUDA-core path). With a lower
    bound of -5 no block can (16 x -5 nats is 2^-115): all diagonals on tensor cores."""
    T, H = 200, 2
    q, k, v, _, beta, A_log, dt = inputs(T, H, A=1.0)
    g = -2.0 + torch.randn(T, H, D)
    g[20, 0, 5] = g[21, 1, :] = 100.0   # block 1 steep for the Kimi gate (one token, e^-100)
    g[144:160, :, 7] = 30.0             # block 9 steep for the Kimi gate and a lower bound of -10
    g[100:110] = -30.0
    inp = (q, k, v, g.bfloat16(), beta, A_log, dt)
    outs = []
    for diag_exact in (False, True):  # the default, and every diagonal exact (KDA_SERVING_TC_DIAG)
        torch.manual_seed(1)  # the same pool and initial states for both
        res = run_prefill(lib, "prefill_tc", 64, [T], H, torch.float32, lb, inp=inp, null=0, diag_exact=diag_exact)
        check_prefill(*res, lb)
        outs.append(res[-1])
    assert not torch.equal(outs[0], outs[1])  # the default took the tensor-core diagonals somewhere


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["packed", "strided_gate", "in_place", "unaligned"])
def test_gated_rms_norm_vs_reference(lib, layout, w_dtype):
    """The standalone gated RMSNorm kernel over [M, H, 128] rows: packed, a gate that is a column
    slice of a wider projection, in place (out is x), and rows not 8-byte aligned (the scalar
    path); zero rows give zeros, +-30 gates saturate without NaN, the output is poisoned first."""
    torch.manual_seed(17)
    M, H = 7, 3
    x = (torch.randn(M, H, D) * 3).bfloat16()
    x[2, 1] = 0.0
    wide = (torch.randn(M, 2 * H * D) * 4).bfloat16()
    wide[0, :D] = 30.0
    wide[1, :D] = -30.0
    gate = wide[:, :H * D].view(M, H, D) if layout == "strided_gate" else wide[:, :H * D].contiguous().view(M, H, D)
    weight = (torch.rand(D) + 0.5).to(w_dtype)
    ref = ops.reference.gated_rms_norm(x, gate, weight, 1e-6, torch.empty_like(x))
    if layout == "unaligned":
        buf = torch.full((x.numel() + 1,), float("nan")).bfloat16()
        out = buf[1:].view(M, H, D)
        xin = torch.empty(x.numel() + 1).bfloat16()[1:].view(M, H, D)
        xin.copy_(x)
    else:
        xin = x.clone()
        out = xin if layout == "in_place" else torch.full_like(x, float("nan"))
    emulated.gated_rms_norm(lib, xin, gate, weight, 1e-6, out)
    assert not out.isnan().any()
    assert (out[2, 1] == 0).all()
    assert rel_rms(out, ref) <= 2e-3
    assert (out.float() - ref.float()).abs().max() <= 1e-2 * ref.float().abs().max()
