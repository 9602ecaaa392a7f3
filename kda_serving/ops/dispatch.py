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
