"""CUDA kernels vs the fp64 recurrence and the torch reference (needs Hopper + kda_serving._C)."""

import math

import pytest

torch = pytest.importorskip("torch")

from kda_serving.ops import _ext  # noqa: E402
from tests.gpu.common import EMULATE, kernels_available, sync  # noqa: E402

if not kernels_available():
    pytest.skip("CUDA extension or a Hopper GPU is not available", allow_module_level=True)

from kda_serving.ops import reference  # noqa: E402

pytestmark = pytest.mark.gpu

from tests.gpu.common import (D, DEV, POISON, TOL, make_gate, prefill_against_gold, rel_rms,  # noqa: E402
                              run_naive, setup_pool)


def make_inputs(T, H, lead=(), center=0.0):
    shp = (*lead, T, H)
    q = torch.randn(*shp, D).bfloat16().to(DEV)
    k = torch.randn(*shp, D).bfloat16().to(DEV)
    v = torch.randn(*shp, D).bfloat16().to(DEV)
    g = make_gate((*shp, D), center).bfloat16().to(DEV)
    beta = (torch.randn(*shp) * 3).bfloat16().to(DEV)
    A_log = torch.full((H,), math.log(16.0), device=DEV)
    dt_bias = (torch.randn(H * D) * 8).to(DEV)
    return q, k, v, g, beta, A_log, dt_bias


def make_pool(S, H, dtype):
    return torch.full((S, H, D, D), POISON, dtype=dtype, device=DEV)


@pytest.mark.parametrize("kernel", ["prefill_tc", "prefill"])
@pytest.mark.parametrize("lower_bound", [None, -5.0])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("center", [-8.0, 0.0, 8.0, None])
@pytest.mark.parametrize("H", [1, 4, 8, 32, 96])
def test_prefill_vs_naive(lower_bound, pool_dtype, center, H, kernel):
    """The tensor-core default and the token-serial kernel over the gate/bias sweep and H 1-96."""
    torch.manual_seed(hash((lower_bound, str(pool_dtype), center, H)) % 2**31)
    lens = [0, 1, 15, 16, 17, 64, 65] + ([3000] if H <= 4 else [300])
    lens += [5, 9]  # null sequences
    cu, pool, slots, has_init, init = setup_pool(lens, H, pool_dtype)
    inputs = make_inputs(int(cu[-1]), H, center=center)
    prefill_against_gold(getattr(_ext, kernel), inputs, cu, pool, slots, has_init, init, lower_bound)


@pytest.mark.parametrize("kernel", ["prefill_tc", "prefill",
                                    pytest.param("prefill_chunked", marks=pytest.mark.optin_kernel)])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_prefill_intermediate_states(pool_dtype, idx_dtype, kernel):
    torch.manual_seed(7)
    H, lens = 4, [0, 1, 63, 64, 65, 200]
    N = len(lens)
    cu = torch.tensor([0] + lens).cumsum(0).to(DEV, idx_dtype)
    q, k, v, g, beta, A_log, dt_bias = make_inputs(int(cu[-1]), H, center=None)
    counts = [n // 64 for n in lens]
    offsets = torch.tensor([0] + counts[:-1]).cumsum(0).to(DEV, idx_dtype)
    inter = torch.full((sum(counts) + 1, H, D, D), POISON, dtype=pool_dtype, device=DEV)
    pool = make_pool(N + 1, H, pool_dtype)
    slots = torch.arange(1, N + 1, dtype=torch.int32, device=DEV)
    has_init = torch.zeros(N, dtype=torch.bool, device=DEV)
    out = torch.full(v.shape, float("nan"), dtype=torch.bfloat16, device=DEV)
    getattr(_ext, kernel)(q, k, v, g, beta, A_log, dt_bias, cu, pool, slots, has_init,
                          inter=inter, inter_offsets=offsets, out=out)
    sync()
    _, _, ckpts = run_naive(q, k, v, g, beta, A_log, dt_bias, cu, torch.zeros(N, H, D, D), None, every=64)
    for n in range(N):
        for i in range(counts[n]):
            got = inter[int(offsets[n]) + i]
            assert rel_rms(got, ckpts[n][i]) <= TOL, (n, i)
    # spare row untouched (compared in the buffer's dtype: bf16 holds 1e30 as 1.0003e30)
    assert torch.equal(inter[-1], torch.full_like(inter[-1], POISON))


# KDA_SERVING_DECODE_GRID values: the row-block decode kernel, the head kernel (T <= 8).
DECODE_GRIDS = ["rows", "heads"]


@pytest.mark.parametrize("lower_bound", [None, -5.0])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("grid", DECODE_GRIDS)
def test_decode_vs_naive(lower_bound, pool_dtype, T, grid, monkeypatch):
    monkeypatch.setenv("KDA_SERVING_DECODE_GRID", grid)
    torch.manual_seed(11 + T)
    B, H = 6, 4
    q, k, v, g, beta, A_log, dt_bias = make_inputs(T, H, lead=(B,), center=None)
    pool = make_pool(B + 3, H, pool_dtype)
    slots = torch.tensor([3, 0, 5, -1, 1, 7], dtype=torch.int32, device=DEV)
    init = torch.zeros(B, H, D, D, device=DEV)
    for n in range(B):
        if slots[n] > 0:
            pool[slots[n]] = (torch.randn(H, D, D, device=DEV) * 0.3).to(pool_dtype)
            init[n] = pool[slots[n]].float()
    before = pool.clone()
    # Strided q/k/v, as column slices of a fused projection.
    fused = torch.cat([q, k, v], dim=-1)
    qs, ks, vs = fused[..., :D], fused[..., D:2 * D], fused[..., 2 * D:]
    out = torch.full(v.shape, float("nan"), dtype=torch.bfloat16, device=DEV)
    _ext.decode(qs, ks, vs, g, beta, A_log, dt_bias, pool, slots, lower_bound=lower_bound, out=out)
    sync()
    cu = torch.arange(B + 1) * T
    flat = lambda t: t.reshape(B * T, *t.shape[2:])  # noqa: E731
    o_ref, s_ref = run_naive(flat(q), flat(k), flat(v), flat(g), flat(beta), A_log, dt_bias, cu, init,
                             lower_bound)
    o_ref = o_ref.reshape(B, T, H, D)
    assert not out.isnan().any()
    for n in range(B):
        if slots[n] > 0:
            assert rel_rms(out[n], o_ref[n]) <= TOL
            assert rel_rms(pool[slots[n]], s_ref[n]) <= TOL
        else:
            assert (out[n] == 0).all()
    used = {int(s) for s in slots if s > 0}
    for s in range(pool.shape[0]):
        if s not in used:
            assert torch.equal(pool[s], before[s])


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grid", DECODE_GRIDS)
def test_verify_equals_sequential_decodes(pool_dtype, grid, monkeypatch):
    monkeypatch.setenv("KDA_SERVING_DECODE_GRID", grid)
    torch.manual_seed(5)
    B, T, H = 4, 4, 4
    q, k, v, g, beta, A_log, dt_bias = make_inputs(T, H, lead=(B,), center=0.0)
    S = 1 + B * T + B
    pool = make_pool(S, H, pool_dtype)
    slots = torch.arange(1, 1 + B * T, dtype=torch.int32, device=DEV).reshape(B, T)
    slots[3] = torch.tensor([0, 0, 0, 0])  # null row
    num_acc = torch.tensor([1, 2, 4, 1], dtype=torch.int32, device=DEV)
    for n in range(B):
        a = int(num_acc[n])
        if slots[n, a - 1] > 0:
            pool[slots[n, a - 1]] = (torch.randn(H, D, D, device=DEV) * 0.3).to(pool_dtype)
    seq_pool = pool.clone()
    out = torch.full(v.shape, float("nan"), dtype=torch.bfloat16, device=DEV)
    _ext.decode(q, k, v, g, beta, A_log, dt_bias, pool, slots, num_acc, out=out)

    # Sequential single-token decodes through scratch slots.
    scratch = torch.arange(1 + B * T, 1 + B * T + B, dtype=torch.int32, device=DEV)
    start = slots.gather(1, (num_acc.long() - 1)[:, None]).squeeze(1)
    valid = start > 0
    seq_pool[scratch[valid]] = seq_pool[start[valid].long()]
    run_slots = torch.where(valid, scratch, torch.zeros_like(scratch))
    seq_out = torch.empty_like(out)
    for t in range(T):
        seq_out[:, t:t + 1] = _ext.decode(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1],
                                          beta[:, t:t + 1], A_log, dt_bias, seq_pool, run_slots)
        for n in range(B):
            if valid[n] and slots[n, t] > 0:
                seq_pool[slots[n, t]] = seq_pool[scratch[n]]
    sync()
    assert not out.isnan().any()
    assert rel_rms(out, seq_out) <= TOL
    assert (out[3] == 0).all()
    for n in range(B):
        for t in range(T):
            s = int(slots[n, t])
            if s > 0 and valid[n]:
                assert rel_rms(pool[s], seq_pool[s]) <= TOL


def conv_case(W, R, D_, pool_dtype, w_dtype):
    weight = torch.randn(D_, W, device=DEV).to(w_dtype)
    bias = torch.randn(D_, device=DEV).to(w_dtype)
    return weight, bias


@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("extra_rows", [0, 3])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_pad", [0, 4])  # 0: eight channels per thread; 4: unaligned rows, one per thread
def test_conv_prefill(W, extra_rows, pool_dtype, w_dtype, x_pad):
    torch.manual_seed(W * 10 + extra_rows)
    D_, R = 384, W - 1 + extra_rows
    lens = [0, 1, 2, 5, 40, 3, 7, 200]  # the last one spans 64-token tiles
    N = len(lens)
    cu = torch.tensor([0] + lens).cumsum(0).to(DEV, torch.int32)
    x = torch.randn(int(cu[-1]), D_ + x_pad, device=DEV).bfloat16()[:, :D_]
    weight, bias = conv_case(W, R, D_, pool_dtype, w_dtype)
    pool = torch.randn(N + 3, R, D_, device=DEV).to(pool_dtype)
    slots = torch.tensor([1, 2, 3, 4, 5, 0, -1, 6], dtype=torch.int32, device=DEV)
    has_init = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool, device=DEV)
    ref_pool = pool.clone()
    ref = torch.empty(x.shape, dtype=x.dtype, device=DEV)
    reference.causal_conv1d_prefill(x, weight, bias, cu, ref_pool, slots, has_init, "silu", ref)
    out = torch.full(x.shape, float("nan"), dtype=x.dtype, device=DEV)
    _ext.conv_prefill(x, weight, bias, cu, pool, slots, has_init, out=out)
    sync()
    assert not out.isnan().any()
    assert rel_rms(out, ref) <= TOL
    assert torch.equal(pool, ref_pool)


@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("spec", [False, True])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_pad", [0, 4])  # 0: eight channels per thread; 4: unaligned rows, one per thread
def test_conv_update(W, T, spec, pool_dtype, x_pad):
    torch.manual_seed(W + 10 * T)
    B, D_ = 5, 256
    R = W - 1 + (T - 1 if spec else 0)
    x = torch.randn(B, T, D_ + x_pad, device=DEV).bfloat16()[..., x_pad:]
    weight, bias = conv_case(W, R, D_, pool_dtype, torch.float32)
    pool = torch.randn(B + 2, R, D_, device=DEV).to(pool_dtype)
    slots = torch.tensor([1, 0, 3, -1, 5], dtype=torch.int32, device=DEV)
    num_acc = torch.randint(1, T + 1, (B,), dtype=torch.int32, device=DEV) if spec else None
    check_conv_update(x, weight, bias, pool, slots, num_acc)


def check_conv_update(x, weight, bias, pool, slots, num_acc):
    """The kernel's update (output NaN-poisoned first) against the reference's, pools bit-equal."""
    ref_pool = pool.clone()
    ref = torch.empty(x.shape, device=DEV, dtype=x.dtype)
    reference.causal_conv1d_update(x, weight, bias, ref_pool, slots, num_acc, "silu", ref)
    out = torch.full_like(ref, float("nan"))
    _ext.conv_update(x, weight, bias, pool, slots, num_acc, out=out)
    sync()
    assert not out.isnan().any()
    assert rel_rms(out, ref) <= TOL
    assert torch.equal(pool, ref_pool)


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
def test_conv_update_wide(pool_dtype):
    """B * D at the size from which the extension runs the eight-channel update kernel."""
    torch.manual_seed(3)
    B, D_, W = 128, 8192, 4
    x = torch.randn(B, 1, D_, device=DEV).bfloat16()
    weight, bias = conv_case(W, W - 1, D_, pool_dtype, torch.bfloat16)
    pool = torch.randn(B + 8, W - 1, D_, device=DEV).to(pool_dtype)
    slots = (torch.randperm(B + 7, device=DEV)[:B] + 1).to(torch.int32)
    slots[5] = 0
    check_conv_update(x, weight, bias, pool, slots, None)


def run_pair(x, weight, conv_pool, state_pool, slots, g, beta, A_log, dt_bias, y, out, impl=None):
    """One decode step as the backend runs it: conv update of mixed_qkv x [B, 1, 3P] into y, then
    the KDA step on column views of y. impl None: the kernels (the decode may start while the conv
    update finishes and waits for it before reading q, k, v); else the torch reference."""
    H = g.shape[2]
    P = H * D
    if impl is None:
        _ext.conv_update(x, weight, None, conv_pool, slots, None, out=y)
    else:
        impl.causal_conv1d_update(x, weight, None, conv_pool, slots, None, "silu", y)
    q, k, v = (y[..., j * P:(j + 1) * P].unflatten(-1, (H, D)) for j in range(3))
    if impl is None:
        _ext.decode(q, k, v, g, beta, A_log, dt_bias, state_pool, slots, out=out)
    else:
        impl.kda_decode(q, k, v, g, beta, A_log, dt_bias, state_pool, slots, None, lower_bound=None,
                        scale=D ** -0.5, out=out)


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
def test_conv_update_then_decode(graph, pool_dtype):
    """Four decode steps of the conv update + KDA pair vs the reference, eagerly or replaying one
    captured step; the kernels' outputs, states and conv rows must not depend on how the two
    kernels overlap (replay equals eager bit for bit)."""
    if graph and EMULATE:
        pytest.skip("CUDA graphs need a GPU")
    torch.manual_seed(21)
    B, H, W, steps = 64, 8, 4, 4
    P = H * D
    weight = (torch.randn(3 * P, W, device=DEV) / W).bfloat16()
    _, _, _, _, _, A_log, dt_bias = make_inputs(1, H)
    slots = (torch.randperm(B + 4, device=DEV)[:B] + 1).to(torch.int32)
    slots[3] = 0
    conv0 = torch.randn(B + 5, W - 1, 3 * P, device=DEV).bfloat16()
    state0 = (torch.randn(B + 5, H, D, D, device=DEV) * 0.3).to(pool_dtype)
    xs = [torch.randn(B, 1, 3 * P, device=DEV).bfloat16() for _ in range(steps)]
    gs = [make_gate((B, 1, H, D), None).bfloat16().to(DEV) for _ in range(steps)]
    betas = [(torch.randn(B, 1, H, device=DEV) * 3).bfloat16() for _ in range(steps)]
    pools = {name: (conv0.clone(), state0.clone()) for name in ("eager", "ref", "graph")}
    y = torch.empty(B, 1, 3 * P, dtype=torch.bfloat16, device=DEV)
    outs = {name: [] for name in pools}
    for i in range(steps):
        for name, impl in (("eager", None), ("ref", reference)):
            out = torch.full((B, 1, H, D), float("nan"), dtype=torch.bfloat16, device=DEV)
            run_pair(xs[i], weight, *pools[name], slots, gs[i], betas[i], A_log, dt_bias, y, out, impl)
            outs[name].append(out)
    sync()
    for i in range(steps):
        assert not outs["eager"][i].isnan().any()
        assert rel_rms(outs["eager"][i], outs["ref"][i]) <= TOL
    assert torch.equal(pools["eager"][0], pools["ref"][0])
    assert rel_rms(pools["eager"][1].float(), pools["ref"][1].float()) <= TOL
    if not graph:
        return
    x, g, beta = xs[0].clone(), gs[0].clone(), betas[0].clone()
    out = torch.empty(B, 1, H, D, dtype=torch.bfloat16, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on scratch pools (lazy module loading)
        run_pair(x, weight, conv0.clone(), state0.clone(), slots, g, beta, A_log, dt_bias, y, out)
    torch.cuda.current_stream().wait_stream(side)
    cg = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cg):
        run_pair(x, weight, *pools["graph"], slots, g, beta, A_log, dt_bias, y, out)
    for i in range(steps):
        x.copy_(xs[i]); g.copy_(gs[i]); beta.copy_(betas[i])
        out.fill_(float("nan"))
        cg.replay()
        sync()
        assert torch.equal(out, outs["eager"][i])
    assert torch.equal(pools["graph"][0], pools["eager"][0])
    assert torch.equal(pools["graph"][1], pools["eager"][1])


# (KDA_SERVING_FUSED_DECODE_PATH, KDA_SERVING_DECODE_GRID): the conv + decode pair (T <= 8) with the
# row-block or the head decode kernel, the three-kernel path, the single kernel (T <= 8).
FUSED_PATHS = ["auto", "auto+heads", "rows", "single"]


def set_fused_path(monkeypatch, path):
    fused, _, grid = path.partition("+")
    monkeypatch.setenv("KDA_SERVING_FUSED_DECODE_PATH", fused)
    monkeypatch.setenv("KDA_SERVING_DECODE_GRID", grid or "rows")


def fused_case(B, T, H, W, pool_dtype, verify):
    """Layer tensors for the fused decode: strided mixed_qkv, conv/state pools poisoned with 1e30
    except the rows a live sequence reads. Returns a dict of kernel arguments."""
    C = 3 * H * D
    R = W - 1 + (T - 1 if verify else 0)
    raw = torch.randn(B, T, C + 64, device=DEV).bfloat16()
    mixed = raw[..., 32:32 + C]  # rows strided, as a column slice of a wider projection
    _, _, _, g, beta, A_log, dt_bias = make_inputs(T, H, lead=(B,), center=None)
    conv_weight = torch.randn(C, W, device=DEV) * 0.5
    conv_bias = torch.randn(C, device=DEV)
    if verify:
        S = 2 + B * T
        slots = torch.arange(2, 2 + B * T, dtype=torch.int32, device=DEV).reshape(B, T)
        if B > 1:
            slots[1] = 0  # null row
        num_acc = torch.randint(1, T + 1, (B,), dtype=torch.int32, device=DEV)
        start = slots.gather(1, (num_acc.long() - 1)[:, None]).squeeze(1)
        conv_slots = slots[:, 0]
    else:
        S = B + 4
        slots = torch.arange(2, 2 + B, dtype=torch.int32, device=DEV)
        slots[1::3] = 0
        slots[2::4] = -1
        num_acc, start, conv_slots = None, slots, slots
    state_pool = make_pool(S, H, pool_dtype)
    conv_pool = torch.full((S, R, C), POISON, device=DEV).to(pool_dtype)
    init = torch.zeros(B, H, D, D, device=DEV)
    for n in range(B):
        if start[n] > 0 and conv_slots[n] > 0:
            state_pool[start[n]] = (torch.randn(H, D, D, device=DEV) * 0.3).to(pool_dtype)
            init[n] = state_pool[start[n]].float()
            conv_pool[conv_slots[n]] = torch.randn(R, C, device=DEV).to(pool_dtype)
    return dict(mixed=mixed, g=g, beta=beta, A_log=A_log, dt_bias=dt_bias, conv_weight=conv_weight,
                conv_bias=conv_bias, conv_pool=conv_pool, state_pool=state_pool, slots=slots,
                num_acc=num_acc, init=init, live=(start > 0) & (conv_slots > 0))


def fused_reference(c, lower_bound, out_gate, norm_weight, eps):
    """conv update -> decode -> gated norm from the reference ops, on clones of the pools.
    Returns (out, conv_pool, state_pool, conv output x)."""
    conv_pool, state_pool = c["conv_pool"].clone(), c["state_pool"].clone()
    slots, num_acc = c["slots"], c["num_acc"]
    B, T = c["g"].shape[:2]
    H = c["g"].shape[2]
    x = torch.empty(B, T, 3 * H * D, dtype=torch.bfloat16, device=DEV)
    conv_slots = slots[:, 0] if slots.dim() == 2 else slots
    reference.causal_conv1d_update(c["mixed"], c["conv_weight"], c["conv_bias"], conv_pool, conv_slots,
                                   num_acc, "silu", x)
    q, k, v = (x[..., i * H * D:(i + 1) * H * D].unflatten(-1, (H, D)) for i in range(3))
    out = torch.empty(B, T, H, D, dtype=torch.bfloat16, device=DEV)
    reference.kda_decode(q, k, v, c["g"], c["beta"], c["A_log"], c["dt_bias"], state_pool, slots, num_acc,
                         lower_bound, D ** -0.5, out)
    if out_gate is not None:
        reference.gated_rms_norm(out, out_gate, norm_weight, eps, out)
    return out, conv_pool, state_pool, x


def run_fused(c, lower_bound=None, out_gate=None, norm_weight=None, eps=1e-6, out=None):
    return _ext.decode_fused(c["mixed"], c["g"], c["beta"], c["A_log"], c["dt_bias"], c["conv_weight"],
                             c["conv_bias"], c["conv_pool"], c["state_pool"], c["slots"], c["num_acc"],
                             lower_bound=lower_bound, out_gate=out_gate, norm_weight=norm_weight,
                             norm_eps=eps, out=out)


@pytest.mark.parametrize("lower_bound", [None, -5.0])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("W,T,verify", [(4, 1, False), (2, 1, False), (4, 3, True), (3, 4, True)])
@pytest.mark.parametrize("B,H", [(6, 4), (1, 1), (8, 32)])  # row blocks 16, 8 and 32
@pytest.mark.parametrize("path", FUSED_PATHS)
def test_decode_fused_vs_reference_and_gold(lower_bound, pool_dtype, norm, W, T, verify, B, H, path, monkeypatch):
    set_fused_path(monkeypatch, path)
    torch.manual_seed(hash((lower_bound, str(pool_dtype), norm, W, T, B, H)) % 2**31)
    c = fused_case(B, T, H, W, pool_dtype, verify)
    out_gate = torch.randn(B, T, H, D, device=DEV).bfloat16() if norm else None
    norm_weight = (torch.rand(D, device=DEV) + 0.5) if norm else None
    ref_out, ref_conv, ref_state, x = fused_reference(c, lower_bound, out_gate, norm_weight, 1e-6)
    state_before = c["state_pool"].clone()
    out = torch.full((B, T, H, D), float("nan"), dtype=torch.bfloat16, device=DEV)
    run_fused(c, lower_bound, out_gate, norm_weight, out=out)
    sync()
    live = c["live"].cpu()
    assert not out.isnan().any()
    assert rel_rms(out, ref_out) <= TOL
    # the conv pool holds copies of inputs and window rows: exact
    assert torch.equal(c["conv_pool"], ref_conv)
    written = set()
    slots = c["slots"].cpu()
    for n in range(B):
        row = slots[n].reshape(-1).tolist()
        if not live[n]:
            assert (out[n] == 0).all()
            continue
        for s in (row if verify else row[:1]):
            if s > 0:
                written.add(s)
                assert rel_rms(c["state_pool"][s], ref_state[s]) <= TOL
    for s in range(c["state_pool"].shape[0]):  # untouched slots bit-identical (1e30 fill)
        if s not in written:
            assert torch.equal(c["state_pool"][s], state_before[s])
    # fp64 gold on the (bf16) conv outputs, from each live row's start state
    q, k, v = (x[..., i * H * D:(i + 1) * H * D].unflatten(-1, (H, D)) for i in range(3))
    flat = lambda t: t.reshape(B * T, *t.shape[2:])  # noqa: E731
    cu = torch.arange(B + 1) * T
    o_gold, s_gold = run_naive(flat(q), flat(k), flat(v), flat(c["g"]), flat(c["beta"]), c["A_log"],
                               c["dt_bias"], cu, c["init"], lower_bound)
    o_gold = o_gold.reshape(B, T, H, D)
    if norm:
        o_gold = o_gold * torch.rsqrt(o_gold.pow(2).mean(-1, keepdim=True) + 1e-6) * norm_weight.cpu().double() \
            * torch.sigmoid(out_gate.cpu().double())
    for n in range(B):
        if live[n]:
            assert rel_rms(out[n], o_gold[n]) <= TOL
            last = int(slots[n, T - 1]) if verify else int(slots[n])
            if last > 0:
                assert rel_rms(c["state_pool"][last], s_gold[n]) <= TOL


@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("path", FUSED_PATHS)
def test_decode_fused_cuda_graph_replay_equals_eager(verify, norm, path, monkeypatch):
    if EMULATE:
        pytest.skip("CUDA graphs need a GPU")
    set_fused_path(monkeypatch, path)
    torch.manual_seed(7 + verify + 2 * norm)
    B, T, H, W = 8, (3 if verify else 1), 4, 4
    c = fused_case(B, T, H, W, torch.float32, verify)
    out_gate = torch.randn(B, T, H, D, device=DEV).bfloat16() if norm else None
    norm_weight = torch.rand(D, device=DEV) + 0.5 if norm else None
    eager = dict(c, conv_pool=c["conv_pool"].clone(), state_pool=c["state_pool"].clone())
    scratch = dict(c, conv_pool=c["conv_pool"].clone(), state_pool=c["state_pool"].clone())
    out_eager = torch.full((B, T, H, D), float("nan"), dtype=torch.bfloat16, device=DEV)
    run_fused(eager, out_gate=out_gate, norm_weight=norm_weight, out=out_eager)
    out = torch.full((B, T, H, D), float("nan"), dtype=torch.bfloat16, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on scratch pools (lazy module loading)
        run_fused(scratch, out_gate=out_gate, norm_weight=norm_weight, out=torch.empty_like(out))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_fused(c, out_gate=out_gate, norm_weight=norm_weight, out=out)
    sync()
    assert out.isnan().all()  # capture runs nothing
    graph.replay()
    sync()
    assert torch.equal(out, out_eager)
    assert torch.equal(c["conv_pool"], eager["conv_pool"])
    assert torch.equal(c["state_pool"], eager["state_pool"])


def test_decode_fused_conv_buffer_reused_and_checked():
    """The fused decode's conv outputs go to one per-device buffer, reused by every call that fits
    (NaN-poisoned in between: nothing is read before it is written); a conv_out that is too small
    or not bf16 is refused by the binding, naming it, before any pool is touched."""
    torch.manual_seed(29)
    B, T, H, W = 6, 1, 4, 4
    c = fused_case(B, T, H, W, torch.float32, False)
    ref_out, ref_conv, ref_state, _ = fused_reference(c, None, None, None, 1e-6)
    pools0 = c["conv_pool"].clone(), c["state_pool"].clone()
    run_fused(c, out=torch.empty(B, T, H, D, dtype=torch.bfloat16, device=DEV))
    buf = _ext.DECODE_SCRATCH.current(c["mixed"].device)
    assert buf.numel() >= B * T * 3 * H * D
    buf.fill_(float("nan"))
    c["conv_pool"].copy_(pools0[0])
    c["state_pool"].copy_(pools0[1])
    out = run_fused(c, out=torch.full((B, T, H, D), float("nan"), dtype=torch.bfloat16, device=DEV))
    sync()
    assert _ext.DECODE_SCRATCH.current(c["mixed"].device) is buf
    assert not out.isnan().any() and rel_rms(out, ref_out) <= TOL
    assert torch.equal(c["conv_pool"], ref_conv)
    if EMULATE:
        return  # the binding's checks run on the GPU build only
    before = c["conv_pool"].clone(), c["state_pool"].clone()
    args = (c["mixed"], c["g"], c["beta"], c["A_log"], c["dt_bias"].reshape(-1), c["conv_weight"], c["conv_bias"],
            c["conv_pool"], c["state_pool"], c["slots"], c["num_acc"], None, D ** -0.5, None, None, 1e-6,
            torch.empty(B, T, H, D, dtype=torch.bfloat16, device=DEV))
    for bad in (torch.empty(B * T * 3 * H * D - 1, dtype=torch.bfloat16, device=DEV),
                torch.empty(B * T * 3 * H * D, dtype=torch.float32, device=DEV)):
        with pytest.raises(RuntimeError, match="conv_out"):
            torch.ops.kda_serving.kda_decode_fused(*args, bad)
    sync()
    assert torch.equal(c["conv_pool"], before[0]) and torch.equal(c["state_pool"], before[1])


@pytest.mark.parametrize("layout", ["packed", "strided_gate", "in_place", "unaligned"])
def test_gated_rms_norm_kernel(layout):
    """ops.gated_rms_norm on the GPU kernel vs the torch reference: the prefill output's norm
    (rows of [T, H, 128]), with a column-slice gate, in place, and unaligned rows."""
    from kda_serving import ops
    torch.manual_seed(23)
    T, H = 3001, 8
    x = (torch.randn(T, H, D, device=DEV) * 3).bfloat16()
    x[5] = 0.0
    wide = (torch.randn(T, 3 * H * D, device=DEV) * 4).bfloat16()
    wide[7] = 30.0
    gate = wide[:, H * D:2 * H * D].view(T, H, D)
    if layout != "strided_gate":
        gate = gate.contiguous()
    w = (torch.rand(D, device=DEV) + 0.5).bfloat16()
    ref = reference.gated_rms_norm(x, gate, w, 1e-6, torch.empty_like(x))
    if layout == "unaligned":
        xin = torch.empty(x.numel() + 1, device=DEV, dtype=torch.bfloat16)[1:].view(T, H, D)
        xin.copy_(x)
        out = torch.full((x.numel() + 1,), float("nan"), device=DEV, dtype=torch.bfloat16)[1:].view(T, H, D)
    else:
        xin = x.clone()
        out = xin if layout == "in_place" else torch.full_like(x, float("nan"))
    ops.gated_rms_norm(xin, gate, w, 1e-6, out=out)
    sync()
    assert not out.isnan().any() and (out[5] == 0).all()
    assert rel_rms(out, ref) <= 2e-3
    assert (out.float() - ref.float()).abs().max() <= 1e-2 * ref.float().abs().max()
