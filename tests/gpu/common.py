"""Shared pieces of the GPU tests: constants, the error metric, gate fixtures, the fp64 gold run.

``KDA_SERVING_EMULATE_GPU_TESTS=1`` runs these tests on the CPU with the kernels on the SIMT
emulator (tests/emu), to check the tests themselves where no GPU is at hand; the large shapes
take long there, so select with -k. CUDA-graph capture is GPU-only and skips.
"""

import os

import torch

from kda_serving.ops.naive import naive_kda

EMULATE = os.environ.get("KDA_SERVING_EMULATE_GPU_TESTS") == "1"
DEV = "cpu" if EMULATE else "cuda"
D = 128
POISON = 1e30
TOL = 5e-3


def kernels_available() -> bool:
    """The CUDA kernels can run: a Hopper GPU with the built extension, or the emulator."""
    if not EMULATE:
        from kda_serving.ops import _ext
        return _ext.available()
    from kda_serving.ops import dispatch
    from tests.emu import emulated
    from tests.emu.emulated_extension import install
    if emulated.cuda_include() is None:
        return False
    install(emulated.build())
    dispatch.use_cuda_kernels = lambda t: True
    return True


def sync() -> None:
    if not EMULATE:
        torch.cuda.synchronize()


def rel_rms(out, ref):
    """||out - ref|| / ||ref|| on the host in fp64; any NaN/inf in ``out`` gives inf."""
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_gate(shape, center):
    """Raw gate logits around ``center`` (None: U(-8, 8)) with spikes of +-30."""
    g = torch.empty(shape).uniform_(-8, 8) if center is None else center + torch.randn(shape)
    spikes = torch.rand(shape) < 0.05
    g[spikes] = torch.where(torch.rand(shape) < 0.5, -30.0, 30.0)[spikes]
    return g


def run_naive(q, k, v, g, beta, A_log, dt_bias, cu, init, lower_bound, every=None):
    """The fp64 gold on host copies; returns (o, final[, checkpoints])."""
    args = [t.cpu() for t in (q, k, v, g, beta, A_log, dt_bias)]
    kw = dict(cu_seqlens=cu.cpu(), initial_state=init.cpu().double(), lower_bound=lower_bound)
    if every:
        kw["checkpoint_every"] = every
    return naive_kda(*args, **kw)


def setup_pool(lens, H, pool_dtype, idx_dtype=torch.int32, n_null=2):
    """cu_seqlens, a pool poisoned everywhere, slots 2.. with the last ``n_null`` sequences null
    (slots 0, -1, ...), random initial states for ~60% of the live sequences and those states."""
    N = len(lens)
    cu = torch.tensor([0] + lens).cumsum(0).to(DEV, idx_dtype)
    pool = torch.full((N + 4, H, D, D), POISON, dtype=pool_dtype, device=DEV)
    slots = torch.arange(2, N + 2, dtype=torch.int32, device=DEV)
    for i in range(1, n_null + 1):
        slots[-i] = 1 - i  # 0, -1, ...
    has_init = torch.rand(N, device=DEV) < 0.6
    init = torch.zeros(N, H, D, D, device=DEV)
    for n in range(N):
        if has_init[n] and slots[n] > 0:
            pool[slots[n]] = (torch.randn(H, D, D, device=DEV) * 0.3).to(pool_dtype)
            init[n] = pool[slots[n]].float()
    return cu, pool, slots, has_init, init


def prefill_against_gold(fn, inputs, cu, pool, slots, has_init, init, lower_bound):
    """One prefill call ``fn`` (an ``_ext`` prefill entry) into a NaN-poisoned output, checked
    against the fp64 gold with ``check_against``."""
    q, k, v, g, beta, A_log, dt_bias = inputs
    before = pool.clone()
    out = torch.full(v.shape, float("nan"), dtype=torch.bfloat16, device=v.device)
    fn(q, k, v, g, beta, A_log, dt_bias, cu, pool, slots, has_init, lower_bound=lower_bound, out=out)
    sync()
    o_ref, s_ref = run_naive(q, k, v, g, beta, A_log, dt_bias, cu, init, lower_bound)
    check_against(out, pool, before, cu, slots, o_ref, s_ref)


def check_against(out, pool, before, cu, slots, o_ref, s_ref, tol_state=TOL):
    """Prefill result vs the gold: null sequences zero, live outputs within TOL and final states
    within ``tol_state``, other slots untouched."""
    assert not out.isnan().any()
    valid = slots > 0
    N = slots.numel()
    for n in range(N):
        a, b = int(cu[n]), int(cu[n + 1])
        if not valid[n]:
            assert (out[a:b] == 0).all(), n
        elif b > a:
            assert rel_rms(out[a:b], o_ref[a:b]) <= TOL, n
        if valid[n]:
            st = pool[slots[n]]
            assert not st.isnan().any(), n
            assert rel_rms(st, s_ref[n]) <= tol_state or s_ref[n].abs().max() == 0, n
    used = set(int(s) for s in slots[valid])
    for s in range(pool.shape[0]):
        if s not in used:
            assert torch.equal(pool[s], before[s]), s
