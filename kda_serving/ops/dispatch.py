"""Chooses the CUDA kernels or the torch reference for each call, and logs the choice once."""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("kda_serving")
_logged: set[str] = set()


def extension_loaded() -> bool:
    from . import _ext
    return _ext.load()


def use_cuda_kernels(t: torch.Tensor) -> bool:
    """True when the built extension can run on ``t``'s device (SM90+) and is not disabled."""
    if os.environ.get("KDA_SERVING_BACKEND", "auto") == "reference":
        return False
    if t.device.type != "cuda" or not extension_loaded():
        return False
    return torch.cuda.get_device_capability(t.device) >= (9, 0)


def op_path(t: torch.Tensor) -> str:
    return "cuda" if use_cuda_kernels(t) else "reference"


def log_path_once(op: str, path: str) -> None:
    key = f"{op}:{path}"
    if key not in _logged:
        _logged.add(key)
        logger.info("kda_serving.%s runs the %s path", op, path)


def prefill_kernel():
    """The extension's prefill entry that ``KDA_SERVING_PREFILL_KERNEL`` selects: ``chunked``
    (CUDA cores; measured slower than the token-serial default) or ``tc`` (TF32 tensor cores;
    measured faster than the default but slower than fla, with a workspace that grows with the
    call; README, docs/kernels.md); anything else the default. Read on every call."""
    from . import _ext
    choice = os.environ.get("KDA_SERVING_PREFILL_KERNEL")
    return {"chunked": _ext.prefill_chunked, "tc": _ext.prefill_tc}.get(choice, _ext.prefill)


def decode_fused_selected() -> bool:
    """Whether the backend decodes with the single fused call (``kda_decode_fused``: conv update,
    recurrence and gated norm in one op), the default: on an H100 it measured faster than
    ``causal_conv1d_update`` + ``kda_decode`` at every batch (README), because only inside the op
    may the decode kernel load its state rows while the conv kernel runs.
    ``KDA_SERVING_DECODE_KERNEL=ops`` runs the separate ops. Read on every call."""
    return os.environ.get("KDA_SERVING_DECODE_KERNEL") != "ops"
