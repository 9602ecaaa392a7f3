"""Write a random-weight Kimi-Linear checkpoint in exactly the official format.

Tensors are written directly with safetensors (not ``save_pretrained``, which
renames the dense layer-0 MLP and casts ``A_log``/``dt_bias`` to bf16).
"""

from __future__ import annotations

import copy
import json
import math
import os
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from .layout import TensorSpec, expected_tensors
from .validate import validate_checkpoint

__all__ = ["write_checkpoint", "validate_checkpoint", "init_tensor"]

DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # the hub's usual shard size

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def write_checkpoint(
    config: dict,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    overrides: dict | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write ``config.json``, weights and ``generation_config.json`` into ``out_dir``.

    Args:
        config: a config.json dict (e.g. from ``load_preset``); written with the
            same key set, ``dtype`` (or ``torch_dtype``) set from ``dtype``.
        seed: each tensor draws from its own generator seeded by ``(seed, name)``,
            so values do not depend on sharding or write order.
        dtype: dtype of every tensor except ``A_log`` and ``dt_bias`` (always fp32).
        overrides: ``{tensor name: tensor}`` written instead of random values
            (shape and dtype are written as given, so tests can break them).
        max_shard_bytes: above this total, weights go to
            ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``;
            otherwise one ``model.safetensors``.

    Returns the output directory.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    overrides = dict(overrides or {})
    config = copy.deepcopy(config)
    # keep the caller's key set: older configs spell the key torch_dtype
    config["torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"] = _DTYPE_NAMES[dtype]
    specs = expected_tensors(config, dtype)
    unknown = set(overrides) - set(specs)
    if unknown:
        raise ValueError(f"overrides name tensors not in the checkpoint: {sorted(unknown)}")

    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", generation_config(config))
    _write_weights(out, specs, overrides, seed, config["initializer_range"], max_shard_bytes)
    return out


def generation_config(config: dict) -> dict:
    """generation_config.json: the special ids only, so engines keep their defaults."""
    return {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
    }


def init_tensor(name: str, spec: TensorSpec, seed: int, std: float) -> torch.Tensor:
    """Random values for one tensor, following fla/transformers' KDA init."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    if spec.init == "ones":
        t = torch.ones(spec.shape)
    elif spec.init == "zeros":
        t = torch.zeros(spec.shape)
    elif spec.init == "conv":  # torch Conv1d default bound: 1/sqrt(fan_in)
        bound = 1.0 / math.sqrt(spec.shape[-1])
        t = torch.empty(spec.shape).uniform_(-bound, bound, generator=gen)
    elif spec.init == "a_log":  # per-head decay rate in [1, 16)
        t = torch.empty(spec.shape).uniform_(1.0, 16.0, generator=gen).log()
    elif spec.init == "dt_bias":  # softplus(dt_bias) log-uniform in [1e-3, 1e-1]
        dt = torch.empty(spec.shape).uniform_(math.log(1e-3), math.log(1e-1), generator=gen).exp()
        t = dt + torch.log(-torch.expm1(-dt))
    else:
        t = torch.empty(spec.shape).normal_(0.0, std, generator=gen)
    return t.to(spec.dtype)


def _write_weights(out: Path, specs, overrides, seed, std, max_shard_bytes) -> None:
    for stale in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        stale.unlink()
    total = sum(_nbytes(name, spec, overrides) for name, spec in specs.items())
    groups = _shard_groups(specs, overrides, max_shard_bytes) if total > max_shard_bytes else [list(specs)]
    if len(groups) == 1:
        _save(_materialise(groups[0], specs, overrides, seed, std), out / "model.safetensors")
        return
    weight_map = {}
    for k, names in enumerate(groups, start=1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        # one shard in memory at a time, so the 48B config can be written
        _save(_materialise(names, specs, overrides, seed, std), out / fname)
        weight_map.update({n: fname for n in names})
    _write_json(
        out / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": weight_map},
    )


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors creates 0600; servers often run as another user


def _materialise(names, specs, overrides, seed, std) -> dict[str, torch.Tensor]:
    return {
        n: overrides[n].contiguous() if n in overrides else init_tensor(n, specs[n], seed, std)
        for n in names
    }


def _shard_groups(specs, overrides, max_shard_bytes) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for name, spec in specs.items():
        n = _nbytes(name, spec, overrides)
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    return groups


def _nbytes(name: str, spec: TensorSpec, overrides: dict) -> int:
    t = overrides.get(name)
    return t.numel() * t.element_size() if t is not None else spec.nbytes()


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
