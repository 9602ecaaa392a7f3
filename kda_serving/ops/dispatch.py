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


# KDA_SERVING_PREFILL_KERNEL value -> the extension's prefill entry.
PREFILL_KERNELS = {"tc": "prefill_tc", "serial": "prefill", "chunked": "prefill_chunked"}
DEFAULT_PREFILL_KERNEL = "tc"


def prefill_kernel_name() -> str:
    """``KDA_SERVING_PREFILL_KERNEL``: ``tc`` (the default; TF32 tensor cores, chunks of 64 tokens,
    measured faster than the other two on every benchmarked shape), ``serial`` (token-serial, the
    kernel long sequences are split for) or ``chunked`` (CUDA cores); unset or ``auto`` is the
    default. Read on every call."""
    raw = os.environ.get("KDA_SERVING_PREFILL_KERNEL", "").strip().lower()
    choice = DEFAULT_PREFILL_KERNEL if raw in ("", "auto") else raw
    if choice not in PREFILL_KERNELS:
        raise ValueError(f"KDA_SERVING_PREFILL_KERNEL: expected one of auto, {', '.join(PREFILL_KERNELS)}; "
                         f"got {raw!r}")
    return choice


def prefill_kernel():
    """The extension's prefill entry that ``KDA_SERVING_PREFILL_KERNEL`` selects."""
    from . import _ext
    return getattr(_ext, PREFILL_KERNELS[prefill_kernel_name()])


def decode_fused_selected() -> bool:
    """Whether the backend decodes with the single fused call (``kda_decode_fused``: conv update,
    recurrence and gated norm in one op), the default: on an H100 it measured faster than
    ``causal_conv1d_update`` + ``kda_decode`` at every batch (README), because only inside the op
    may the decode kernel load its state rows while the conv kernel runs.
    ``KDA_SERVING_DECODE_KERNEL=ops`` runs the separate ops. Read on every call."""
    return os.environ.get("KDA_SERVING_DECODE_KERNEL") != "ops"
