"""Check a KDA layer's checkpoint tensors before vLLM builds the layer.

vLLM's loaders report a missing KDA tensor as an uninitialised fused parameter
(``in_proj_qkvgfab``...) and a mis-shaped one as a bare assertion; this check names the
checkpoint tensor, what was expected and what was found. It reads only safetensors headers.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=4)
def _headers(model_dir: str) -> dict[str, tuple[list[int], str]]:
    from kda_serving.checkpoints.validate import read_tensor_headers
    return read_tensor_headers(model_dir)


def expected_kda_shapes(hidden: int, heads: int, head_dim: int, width: int) -> dict[str, list[list[int]]]:
    """Accepted full (unsharded) shapes of one KDA layer's tensors, relative to ``self_attn.``."""
    P = heads * head_dim
    conv = [[P, 1, width], [P, width]]
    return {
        "q_proj.weight": [[P, hidden]], "k_proj.weight": [[P, hidden]], "v_proj.weight": [[P, hidden]],
        "b_proj.weight": [[heads, hidden]],
        "f_a_proj.weight": [[head_dim, hidden]], "f_b_proj.weight": [[P, head_dim]],
        "g_a_proj.weight": [[head_dim, hidden]], "g_b_proj.weight": [[P, head_dim]],
        "q_conv1d.weight": conv, "k_conv1d.weight": conv, "v_conv1d.weight": conv,
        "A_log": [[heads], [1, 1, heads, 1]], "dt_bias": [[P]],
        "o_norm.weight": [[head_dim]], "o_proj.weight": [[hidden, P]],
    }


def check_tensors(headers: dict, prefix: str, expected: dict[str, list[list[int]]]) -> None:
    """Raise ValueError naming the first missing or mis-shaped tensor under ``prefix``."""
    for rel, shapes in expected.items():
        name = f"{prefix}.{rel}"
        if name not in headers:
            raise ValueError(f"KDA checkpoint tensor {name} is missing")
        shape = list(headers[name][0])
        if shape not in shapes:
            want = " or ".join(str(s) for s in shapes)
            raise ValueError(f"KDA checkpoint tensor {name}: expected shape {want}, got {shape}")


def check_kda_layer_tensors(vllm_config, config, prefix: str) -> None:
    """Check the layer ``prefix`` (e.g. ``model.layers.0.self_attn``) of a local safetensors
    checkpoint; other sources (hub names, dummy weights) are left to vLLM."""
    if os.environ.get("KDA_SERVING_SKIP_CHECKPOINT_CHECK") == "1":
        return
    if not prefix.startswith("model.layers."):  # a draft model's layers come from another folder
        return
    model = getattr(vllm_config.model_config, "model", None)
    load_format = str(getattr(vllm_config.load_config, "load_format", "auto"))
    if not model or not Path(model).is_dir() or load_format not in ("auto", "safetensors"):
        return
    if not any(Path(model).glob("*.safetensors")):
        return
    lin = config.linear_attn_config
    expected = expected_kda_shapes(config.hidden_size, lin["num_heads"], lin["head_dim"],
                                   lin["short_conv_kernel_size"])
    check_tensors(_headers(str(Path(model).resolve())), prefix, expected)
