"""Random KDA inputs for the op tests."""

import torch


def cu_from_lens(lens, dtype=torch.int32):
    c = [0]
    for n in lens:
        c.append(c[-1] + n)
    return torch.tensor(c, dtype=dtype)


def kda_inputs(T, H, K, *, g_mode="normal", dt_mode="normal", dtype=torch.float32, lead=()):
    shape = tuple(lead) + (T,) if lead else (T,)
    q = torch.randn(*shape, H, K, dtype=dtype)
    k = torch.randn(*shape, H, K, dtype=dtype)
    v = torch.randn(*shape, H, K, dtype=dtype)
    g = gate_values(g_mode, shape + (H, K)).to(dtype)
    beta = torch.randn(*shape, H, dtype=dtype) * 2
    A_log = torch.rand(H) * 2.0 - 1.0
    dt_bias = gate_values(dt_mode, (H * K,))
    return q, k, v, g, beta, A_log.float(), dt_bias.float()


def gate_values(mode, shape):
    if isinstance(mode, (int, float)):
        return torch.full(shape, float(mode))
    if mode == "uniform":
        return torch.rand(shape) * 16 - 8
    if mode == "normal":
        return torch.randn(shape) * 8
    raise ValueError(mode)
