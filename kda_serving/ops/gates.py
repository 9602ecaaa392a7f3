"""Pre-processing shared by every KDA path: gate activation, beta sigmoid, L2 norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F

L2_EPS = 1e-6


def kda_gate(g: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
             lower_bound: float | None) -> torch.Tensor:
    """Log-space per-channel decay from the raw gate ``g [..., H, K]``; the result is <= 0.

    ``lower_bound=None``: Kimi-Linear's unbounded gate ``-exp(A_log)·softplus(g + dt_bias)``.
    Otherwise the bounded gate ``lower_bound·sigmoid(exp(A_log)·(g + dt_bias))``.
    Computed in the dtype of ``g`` (callers upcast first).
    """
    H, K = g.shape[-2], g.shape[-1]
    a = A_log.to(g.dtype).reshape(H, 1).exp()
    x = g + dt_bias.to(g.dtype).reshape(H, K)
    if lower_bound is None:
        return -a * F.softplus(x)
    return lower_bound * torch.sigmoid(a * x)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """``x / sqrt(sum(x²) + 1e-6)`` over the last dim (eps inside the sqrt, as every KDA kernel)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2_EPS)
