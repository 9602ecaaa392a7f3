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
