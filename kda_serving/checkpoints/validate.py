"""Check a checkpoint folder against the tensor inventory its config.json implies."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from .layout import expected_tensors
from .schedule import kda_layer_indices

_SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def validate_checkpoint(ckpt_dir: str | os.PathLike) -> None:
    """Raise ``ValueError`` naming the first tensor that is missing, mis-shaped or mis-typed.

    KDA tensors are checked first (they are what our kernels consume), then the
    rest; tensors the config does not imply are reported as unexpected. Only
    safetensors headers are read, so this is cheap for any checkpoint size.
    """
    ckpt = Path(ckpt_dir)
    config = json.loads((ckpt / "config.json").read_text())
    dtype = getattr(torch, config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    expected = expected_tensors(config, dtype)
    found = read_tensor_headers(ckpt)

    kda_prefixes = tuple(f"model.layers.{i}.self_attn." for i in kda_layer_indices(config))
    order = sorted(expected, key=lambda n: not n.startswith(kda_prefixes))
    for name in order:
        spec = expected[name]
        if name not in found:
            raise ValueError(f"missing tensor {name}")
        shape, st_dtype = found[name]
        if list(shape) != list(spec.shape):
            raise ValueError(f"{name}: expected shape {list(spec.shape)}, got {list(shape)}")
        want = _SAFETENSORS_DTYPES[spec.dtype]
        if st_dtype != want:
            raise ValueError(f"{name}: expected dtype {want}, got {st_dtype}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise ValueError(f"unexpected tensor {extra[0]} ({len(extra)} unexpected in all)")


def read_tensor_headers(ckpt_dir: str | os.PathLike) -> dict[str, tuple[list[int], str]]:
    """``{name: (shape, safetensors dtype string)}`` over one file or an indexed shard set."""
    ckpt = Path(ckpt_dir)
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (ckpt / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{ckpt}: no model.safetensors or model.safetensors.index.json")
    out = {}
    for fname in files:
        with safe_open(str(ckpt / fname), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = (list(sl.get_shape()), sl.get_dtype())
    return out
