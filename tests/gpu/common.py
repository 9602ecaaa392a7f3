"""Shared pieces of the GPU tests: constants, the error metric, gate fixtures, the fp64 gold run."""

import torch

from kda_serving.ops.naive import naive_kda

DEV = "cuda"
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
