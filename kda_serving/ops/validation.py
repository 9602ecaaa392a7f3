"""Argument checks for the public ops: each error names the argument, what was expected and what came.

Checks here never sync with the device. Value checks that would (slot range, monotone cu_seqlens)
run only when KDA_SERVING_DEBUG=1 or on CPU, where they are free.
"""

from __future__ import annotations

import os

import torch

FLOAT_INPUTS = (torch.bfloat16, torch.float16, torch.float32)
POOL_DTYPES = (torch.float32, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def debug_checks_enabled(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" or os.environ.get("KDA_SERVING_DEBUG") == "1"


def check_tensor(name, t, *, dtypes=None, ndim=None, shape=None, device=None):
    """Validate one tensor; ``shape`` entries of None match anything."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype {names}, got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {list(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(e is not None and e != s for e, s in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
            raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")
    return t


def check_lower_bound(lower_bound):
    if lower_bound is None:
        return None
    if not isinstance(lower_bound, (int, float)) or not (-5.0 <= float(lower_bound) < 0.0):
        raise ValueError(f"lower_bound: expected None or a float in [-5, 0), got {lower_bound!r}")
    return float(lower_bound)


def check_scale(scale, K):
    if scale is None:
        return K ** -0.5
    if not isinstance(scale, (int, float)) or not float(scale) > 0.0:
        raise ValueError(f"scale: expected a positive float, got {scale!r}")
    return float(scale)


def check_gate_params(A_log, dt_bias, H, K, device):
    check_tensor("A_log", A_log, dtypes=(torch.float32,), device=device)
    if A_log.numel() != H:
        raise ValueError(f"A_log: expected {H} elements (one per head), got shape {list(A_log.shape)}")
    check_tensor("dt_bias", dt_bias, dtypes=(torch.float32,), device=device)
    if dt_bias.numel() != H * K:
        raise ValueError(f"dt_bias: expected {H * K} elements ([H*K]), got shape {list(dt_bias.shape)}")


def check_state_pool(state_pool, H, V, K, device):
    check_tensor("state_pool", state_pool, dtypes=POOL_DTYPES, ndim=4, shape=(None, H, V, K), device=device)


def check_slot_values(name, slots, num_slots):
    """Slots must be < num_slots; a slot is used at most once (values <= 0 are null and skipped)."""
    if not debug_checks_enabled(slots) or slots.numel() == 0:
        return
    flat = slots.reshape(-1).long()
    if int(flat.max()) >= num_slots:
        raise ValueError(f"{name}: slot {int(flat.max())} out of range for a pool of {num_slots} slots")
    live = flat[flat > 0]
    if live.numel() != live.unique().numel():
        raise ValueError(f"{name}: a slot appears more than once in one call")


def check_cu_seqlens(cu_seqlens, total, device):
    check_tensor("cu_seqlens", cu_seqlens, dtypes=INDEX_DTYPES, ndim=1, device=device)
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens: expected at least one element ([N+1]), got shape [0]")
    if debug_checks_enabled(cu_seqlens):
        c = cu_seqlens.long()
        if int(c[0]) != 0 or bool((c[1:] < c[:-1]).any()) or int(c[-1]) != total:
            raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to {total} tokens, "
                             f"got {c.tolist()[:8]}{'...' if c.numel() > 8 else ''}")


def check_decode_slots(slots, B, T, device):
    """Decode slots: [B], or [B, C >= T] for speculative verify (C > T: a row drafted fewer tokens)."""
    if isinstance(slots, torch.Tensor) and slots.dim() == 2:
        check_tensor("slots", slots, dtypes=INDEX_DTYPES, shape=(B, None), device=device)
        if slots.shape[1] < T:
            raise ValueError(f"slots: expected shape [{B}, C >= {T}] for verify, got {list(slots.shape)}")
    else:
        check_tensor("slots", slots, dtypes=INDEX_DTYPES, shape=(B,), device=device)
