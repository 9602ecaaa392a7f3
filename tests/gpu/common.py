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
D = 128
POISON = 1e30
TOL = 5e-3


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


def check_against(out, pool, before, cu, slots, o_ref, s_ref):
    """Prefill result vs the gold: null sequences zero, live ones within TOL, other slots untouched."""
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
            assert rel_rms(st, s_ref[n]) <= TOL or s_ref[n].abs().max() == 0, n
    used = set(int(s) for s in slots[valid])
    for s in range(pool.shape[0]):
        if s not in used:
            assert torch.equal(pool[s], before[s]), s
