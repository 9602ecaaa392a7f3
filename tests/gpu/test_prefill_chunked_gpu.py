"""The chunked prefill kernels (tensor-core, the default, and the opt-in CUDA-core one) vs the fp64
recurrence and the token-serial kernel (needs Hopper + _C)."""

import math

import pytest

torch = pytest.importorskip("torch")

from kda_serving.ops import _ext  # noqa: E402
from tests.gpu.common import kernels_available, sync  # noqa: E402

if not kernels_available():
    pytest.skip("CUDA extension or a Hopper GPU is not available", allow_module_level=True)


pytestmark = pytest.mark.gpu

from tests.gpu.common import (D, DEV, TOL, check_against, make_gate, prefill_against_gold,  # noqa: E402
                              rel_rms, run_naive, setup_pool)


def make_inputs(T, H, center=0.0, strided=False):
    """bf16 q, k, v, g [T, H, D], beta [T, H]; strided: row-strided column slices of wider rows."""
    if strided:
        mixed = torch.randn(T, 3 * H * D + 64).bfloat16().to(DEV)
        q, k, v = (mixed[:, i * H * D:(i + 1) * H * D].view(T, H, D) for i in range(3))
        beta = (torch.randn(T, 2 * H) * 3).bfloat16().to(DEV)[:, :H]
    else:
        q, k, v = (torch.randn(T, H, D).bfloat16().to(DEV) for _ in range(3))
        beta = (torch.randn(T, H) * 3).bfloat16().to(DEV)
    g = make_gate((T, H, D), center).bfloat16().to(DEV)
    A_log = torch.full((H,), math.log(16.0), device=DEV)
    dt_bias = (torch.randn(H * D) * 8).to(DEV)
    return q, k, v, g, beta, A_log, dt_bias


LENS = [0, 1, 15, 16, 17, 64, 65, 1000]
KERNELS = [pytest.param("prefill_chunked", marks=pytest.mark.optin_kernel), "prefill_tc"]


@pytest.mark.parametrize("lower_bound", [None, -5.0])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("center", [-30.0, -8.0, 0.0, 8.0, 30.0, None])
@pytest.mark.parametrize("H", [1, 4])
@pytest.mark.parametrize("kernel", KERNELS)
def test_chunked_vs_naive(lower_bound, pool_dtype, center, H, kernel):
    torch.manual_seed(hash((lower_bound, str(pool_dtype), center, H)) % 2**31)
    lens = LENS + [5, 9]  # the last two are null
    cu, pool, slots, has_init, init = setup_pool(lens, H, pool_dtype)
    inputs = make_inputs(int(cu[-1]), H, center=center)
    prefill_against_gold(getattr(_ext, kernel), inputs, cu, pool, slots, has_init, init, lower_bound)


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("lower_bound", [None, -5.0])
@pytest.mark.parametrize("kernel", KERNELS)
def test_chunked_strided_inputs(idx_dtype, lower_bound, kernel):
    torch.manual_seed(3)
    H = 4
    cu, pool, slots, has_init, init = setup_pool([17, 0, 130, 64, 3], H, torch.float32, idx_dtype, n_null=1)
    inputs = make_inputs(int(cu[-1]), H, center=None, strided=True)
    assert not inputs[0].is_contiguous() and not inputs[4].is_contiguous()  # q, beta
    prefill_against_gold(getattr(_ext, kernel), inputs, cu, pool, slots, has_init, init, lower_bound)


@pytest.mark.parametrize("lower_bound", [None, -5.0])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H", [1, 4, 32])
@pytest.mark.parametrize("kernel", KERNELS)
def test_chunked_vs_token_serial(lower_bound, pool_dtype, H, kernel):
    torch.manual_seed(17 + H)
    lens = LENS + [5]
    cu, pool, slots, has_init, _ = setup_pool(lens, H, pool_dtype, n_null=1)
    q, k, v, g, beta, A_log, dt_bias = make_inputs(int(cu[-1]), H, center=None)
    pool2 = pool.clone()
    out1 = torch.full(v.shape, float("nan"), dtype=torch.bfloat16, device=DEV)
    out2 = out1.clone()
    _ext.prefill(q, k, v, g, beta, A_log, dt_bias, cu, pool, slots, has_init,
                 lower_bound=lower_bound, out=out1)
    getattr(_ext, kernel)(q, k, v, g, beta, A_log, dt_bias, cu, pool2, slots, has_init,
                          lower_bound=lower_bound, out=out2)
    sync()
    assert not out2.isnan().any()
    for n in range(len(lens)):
        a, b = int(cu[n]), int(cu[n + 1])
        if b > a and slots[n] > 0:
            assert rel_rms(out2[a:b], out1[a:b]) <= TOL, n
    used = set(int(x) for x in slots[slots > 0])
    for s in range(pool.shape[0]):
        if s in used:
            assert not pool2[s].isnan().any(), s
            assert rel_rms(pool2[s], pool[s]) <= TOL or torch.equal(pool2[s], pool[s]), s
        else:
            assert torch.equal(pool2[s], pool[s]), s


@pytest.mark.parametrize("env,kernel", [(None, "prefill_tc"), ("auto", "prefill_tc"), ("tc", "prefill_tc"),
                                        ("serial", "prefill"),
                                        pytest.param("chunked", "prefill_chunked", marks=pytest.mark.optin_kernel)])
def test_env_var_selects_the_kernel(monkeypatch, env, kernel):
    """kda_serving.ops.kda_prefill runs the kernel KDA_SERVING_PREFILL_KERNEL names, the tensor-core
    one when unset; an unknown name is refused before anything runs."""
    from kda_serving.ops import kda_prefill
    torch.manual_seed(5)
    H = 2
    cu, pool, slots, has_init, _ = setup_pool([40, 7], H, torch.float32, n_null=0)
    q, k, v, g, beta, A_log, dt_bias = make_inputs(int(cu[-1]), H, center=None)

    def run(fn_pool, value):
        if value is None:
            monkeypatch.delenv("KDA_SERVING_PREFILL_KERNEL", raising=False)
        else:
            monkeypatch.setenv("KDA_SERVING_PREFILL_KERNEL", value)
        return kda_prefill(q, k, v, g, beta, A_log, dt_bias, cu_seqlens=cu, state_pool=fn_pool,
                           slots=slots, has_initial_state=has_init)

    pools = [pool.clone() for _ in range(3)]
    o_chosen = run(pools[0], env)
    o_direct = getattr(_ext, kernel)(q, k, v, g, beta, A_log, dt_bias, cu, pools[1], slots, has_init)
    sync()
    assert torch.equal(o_chosen, o_direct) and torch.equal(pools[0], pools[1])
    with pytest.raises(ValueError, match="KDA_SERVING_PREFILL_KERNEL"):
        run(pools[2], "fast")
    assert torch.equal(pools[2], pool)


@pytest.mark.parametrize("lower_bound", [None, -5.0])
def test_tc_adversarial_and_long(lower_bound):
    """Tensor-core kernel: 64 identical keys, cosine-0.99 keys, +-30 gate spikes with A_log = log 16,
    then a 6000-token sequence with slow decay (state errors accumulate over many chunks)."""
    torch.manual_seed(11)
    H = 4
    lens = [200, 6000]
    cu, pool, slots, has_init, init = setup_pool(lens, H, torch.float32, n_null=0)
    q, k, v, g, beta, A_log, dt_bias = make_inputs(int(cu[-1]), H, center=None)
    k[10:74] = k[10]
    k[80:200] = (torch.randn(H, D, device=DEV) + 0.07 * torch.randn(120, H, D, device=DEV)).bfloat16()
    g[:200:5] = 30.0
    g[2:200:7] = -30.0
    beta[:200:3] = 30.0
    g[200:] = -6.0
    dt_bias = dt_bias.clamp(-1.0, 1.0)
    prefill_against_gold(_ext.prefill_tc, (q, k, v, g, beta, A_log, dt_bias), cu, pool, slots, has_init, init,
                         lower_bound)


@pytest.mark.parametrize("H", [2, 24, 48])  # two sequences: 32, 64, 128 value rows per state CTA on 132 SMs
def test_tc_value_row_magnitudes(H):
    """Tensor-core kernel, value rows of very different magnitudes: v's column and the initial
    state's row r scaled together by 1e-30 .. 1e30 (row 7 by 0). The rows of the state evolve
    independently, so each row's output and final state, divided by its factor, must match fp64;
    the state's products may take it as fp16 times a power of two per row, and one scale for all
    rows would flush the small rows or overflow on the large ones."""
    torch.manual_seed(13)
    lens = [70, 130]
    cu, pool, slots, has_init, init = setup_pool(lens, H, torch.float32, n_null=0)
    has_init[:] = True
    q, k, v, g, beta, A_log, dt_bias = make_inputs(int(cu[-1]), H, center=None)
    f = torch.tensor([10.0 ** e for e in (-30, -6, 0, 4, 30)], dtype=torch.float64, device=DEV)[
        torch.arange(D, device=DEV) % 5]
    f[7] = 0.0
    v = (v.double() * f).bfloat16()
    for n in range(len(lens)):
        init[n] = (torch.randn(H, D, D, device=DEV, dtype=torch.float64) * 0.3 * f.view(1, D, 1)).float()
        pool[slots[n]] = init[n]
    before = pool.clone()
    out = torch.full(v.shape, float("nan"), dtype=torch.bfloat16, device=DEV)
    _ext.prefill_tc(q, k, v, g, beta, A_log, dt_bias, cu, pool, slots, has_init, lower_bound=None, out=out)
    sync()
    o_ref, s_ref = run_naive(q, k, v, g, beta, A_log, dt_bias, cu, init, None)
    sc = torch.where(f > 0, f, torch.ones_like(f)).cpu()
    out = out.cpu()
    assert (out[..., 7] == 0).all()
    assert rel_rms(out.double() / sc, o_ref.double() / sc) <= TOL
    for n in range(len(lens)):
        st = pool[slots[n]].double().cpu()
        assert (st[:, 7] == 0).all()
        assert rel_rms(st / sc.view(1, D, 1), s_ref[n].double() / sc.view(1, D, 1)) <= TOL, n
    untouched = [s for s in range(pool.shape[0]) if s not in set(slots.tolist())]
    assert all(torch.equal(pool[s], before[s]) for s in untouched)


@pytest.mark.parametrize("H", [2, 48])  # two sequences: 32 and 128 value rows per state CTA on 132 SMs
def test_tc_large_state_then_silent_chunk(H):
    """Tensor-core kernel: a large state (entries near 1e6, gates that keep it) followed by a chunk
    whose decays underflow to 0 in every channel and whose v is 0, so that chunk's outputs and
    the final state are exactly 0: the state pass's per-row scales span the exponent range there
    (a row of zeros takes 2^126), and no product may become inf or NaN."""
    torch.manual_seed(14)
    lens = [128, 128]
    cu, pool, slots, has_init, init = setup_pool(lens, H, torch.float32, n_null=0)
    has_init[:] = True
    q, k, v, g, beta, A_log, dt_bias = make_inputs(int(cu[-1]), H)
    for n in range(len(lens)):
        a = int(cu[n])
        g[a:a + 64] = -30.0
        g[a + 64:a + 128] = 30.0
        v[a + 64:a + 128] = 0.0
        init[n] = torch.randn(H, D, D, device=DEV) * 1e6
        pool[slots[n]] = init[n]
    dt_bias = dt_bias.clamp(-1.0, 1.0)
    out = torch.full(v.shape, float("nan"), dtype=torch.bfloat16, device=DEV)
    _ext.prefill_tc(q, k, v, g, beta, A_log, dt_bias, cu, pool, slots, has_init, lower_bound=None, out=out)
    sync()
    assert not out.isnan().any() and not pool.isnan().any()
    for n in range(len(lens)):
        a = int(cu[n])
        assert (out[a + 64:a + 128] == 0).all() and (pool[slots[n]] == 0).all()
    o_ref, _ = run_naive(q, k, v, g, beta, A_log, dt_bias, cu, init, None)
    for n in range(len(lens)):
        a = int(cu[n])
        assert rel_rms(out[a:a + 64].cpu(), o_ref[a:a + 64]) <= TOL


@pytest.mark.parametrize("lower_bound", [None, -5.0, -10.0])
def test_tc_diagonal_block_paths(lower_bound, monkeypatch):
    """Tensor-core kernel, both paths of a diagonal block in one call: moderate gates (tensor
    cores) with a few blocks past 2^-120 of decay (exact CUDA-core path): one token at e^-100 in
    one channel, a whole block pinned (Kimi gate, or the bound -10); with the bound -5 every block
    runs on tensor cores, the pinned one with its scales near their 2^60 limit. Again with every
    diagonal exact (KDA_SERVING_TC_DIAG=exact): also within tolerance, and not the same bits."""
    H = 4
    lens = [17, 300, 2000]
    outs = []
    for mode in ("auto", "exact"):
        monkeypatch.setenv("KDA_SERVING_TC_DIAG", mode)
        torch.manual_seed(12)  # the same inputs, pool and initial states for both
        cu, pool, slots, has_init, init = setup_pool(lens, H, torch.float32, n_null=0)
        T = int(cu[-1])
        q, k, v, _, beta, _, _ = make_inputs(T, H)
        g = (-2.0 + torch.randn(T, H, D)).bfloat16().to(DEV)
        A_log = torch.zeros(H, device=DEV)
        dt_bias = torch.zeros(H * D, device=DEV)
        g[40, 0, 5] = g[41, 1, :] = 100.0
        g[160:176, :, 7] = 30.0
        g[500:520] = -30.0
        prefill_against_gold(_ext.prefill_tc, (q, k, v, g, beta, A_log, dt_bias), cu, pool, slots, has_init, init,
                             lower_bound)
        outs.append(pool[slots.long()].clone())
    assert not torch.equal(outs[0], outs[1])


def test_tc_workspace_checked_and_reusable():
    """The tensor-core kernel's workspace: too small, or not fp32, is refused with an error naming
    it before anything runs (pool and output untouched; ops._ext checks it, the binding again); a
    NaN-poisoned one of exactly the size asked for gives the same results as the cached default."""
    torch.manual_seed(5)
    H, lens = 2, [70, 0, 129]
    cu, pool, slots, has_init, _ = setup_pool(lens, H, torch.float32, n_null=1)
    inputs = make_inputs(int(cu[-1]), H)
    need = _ext.tc_workspace_floats(int(cu[-1]), len(lens), H)
    before = pool.clone()
    out = torch.full(inputs[2].shape, float("nan"), dtype=torch.bfloat16, device=DEV)
    for bad in (torch.empty(need - 1, device=DEV), torch.empty(need, device=DEV, dtype=torch.bfloat16),
                torch.empty(need + 1, device=DEV)[1:]):  # too small, not fp32, not 16-byte aligned
        with pytest.raises(ValueError, match="workspace"):
            _ext.prefill_tc(*inputs, cu, pool, slots, has_init, out=out, workspace=bad)
    sync()
    assert torch.equal(pool, before) and torch.isnan(out.float()).all()
    o1 = _ext.prefill_tc(*inputs, cu, pool, slots, has_init)
    p1 = pool.clone()
    pool.copy_(before)
    ws = torch.full((need,), float("nan"), device=DEV)
    o2 = _ext.prefill_tc(*inputs, cu, pool, slots, has_init, workspace=ws)
    sync()
    assert torch.equal(o1, o2) and torch.equal(p1, pool)


def test_tc_token_windows_match_one_call(monkeypatch):
    """Over KDA_SERVING_TC_WORKSPACE_MB the tensor-core prefill runs in token windows that cut
    sequences at multiples of 64 of their tokens: with an fp32 pool the outputs, final states and
    checkpoints are those of one call, bit for bit, and match the fp64 gold."""
    torch.manual_seed(8)
    H, lens = 2, [1500, 0, 333, 64, 129]
    cu, pool0, slots, has_init, init = setup_pool(lens, H, torch.float32, n_null=1)
    inputs = make_inputs(int(cu[-1]), H)
    counts = [n // 64 for n in lens]
    offsets = torch.tensor([0] + counts[:-1]).cumsum(0).to(DEV, torch.int64)
    record_mb = 4 * H * _ext.TC_RECORD_FLOATS / (1 << 20)
    runs = []
    for limit_mb in (None, 7 * record_mb):  # one call; windows of at most 7 chunk slots
        if limit_mb is None:
            monkeypatch.delenv("KDA_SERVING_TC_WORKSPACE_MB", raising=False)
        else:
            monkeypatch.setenv("KDA_SERVING_TC_WORKSPACE_MB", str(limit_mb))
        pool = pool0.clone()
        inter = torch.full((sum(counts), H, D, D), float("nan"), device=DEV)
        out = _ext.prefill_tc(*inputs, cu, pool, slots, has_init, inter=inter, inter_offsets=offsets)
        sync()
        runs.append((out, pool, inter))
    (o1, p1, i1), (o2, p2, i2) = runs
    # the null sequence's checkpoint rows stay NaN in both
    assert torch.equal(o1, o2) and torch.equal(p1, p2) and torch.equal(i1.isnan(), i2.isnan())
    assert torch.equal(i1.nan_to_num(), i2.nan_to_num()) and not i2[:sum(counts[:-1])].isnan().any()
    o_ref, s_ref = run_naive(*inputs, cu, init, None)
    check_against(o2, p2, pool0, cu, slots, o_ref, s_ref)
