"""Tensor inventory of a Kimi-Linear checkpoint, derived from its config.json.

Names, shapes and dtypes follow the official Kimi-Linear-48B-A3B safetensors
(every tensor bf16 except the KDA ``A_log`` and ``dt_bias``, which are fp32).
For the 48B config these rules give exactly its 20,493 tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .schedule import is_moe_layer, kda_layer_indices, mla_layer_indices


@dataclass(frozen=True)
class TensorSpec:
    """Shape, dtype and init rule of one checkpoint tensor.

    ``init`` is one of ``normal`` (N(0, initializer_range)), ``ones``, ``zeros``,
    ``conv`` (uniform like torch's Conv1d default), ``a_log``, ``dt_bias``.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    init: str = "normal"

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def nbytes(self) -> int:
        return self.numel() * torch.empty((), dtype=self.dtype).element_size()


def expected_tensors(config: dict, dtype: torch.dtype = torch.bfloat16) -> dict[str, TensorSpec]:
    """Every tensor name of the checkpoint, in file order, with its spec."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    out: dict[str, TensorSpec] = {"model.embed_tokens.weight": TensorSpec((vocab, hidden), dtype)}
    kda = set(kda_layer_indices(config))
    mla = set(mla_layer_indices(config))
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out[p + "input_layernorm.weight"] = TensorSpec((hidden,), dtype, "ones")
        out[p + "post_attention_layernorm.weight"] = TensorSpec((hidden,), dtype, "ones")
        attn = kda_tensors(config, dtype) if layer in kda else mla_tensors(config, dtype)
        out.update({p + "self_attn." + k: v for k, v in attn.items()})
        ffn = moe_tensors(config, dtype) if is_moe_layer(config, layer) else dense_mlp_tensors(config, dtype)
        out.update({p + k: v for k, v in ffn.items()})
    out["model.norm.weight"] = TensorSpec((hidden,), dtype, "ones")
    if not config.get("tie_word_embeddings", False):
        out["lm_head.weight"] = TensorSpec((vocab, hidden), dtype)
    return out


def kda_tensors(config: dict, dtype: torch.dtype = torch.bfloat16) -> dict[str, TensorSpec]:
    """One KDA layer's tensors, names relative to ``model.layers.L.self_attn.``."""
    hidden = config["hidden_size"]
    lin = config["linear_attn_config"]
    heads, dim, width = lin["num_heads"], lin["head_dim"], lin["short_conv_kernel_size"]
    proj = heads * dim
    f32 = torch.float32
    return {
        "q_proj.weight": TensorSpec((proj, hidden), dtype),
        "k_proj.weight": TensorSpec((proj, hidden), dtype),
        "v_proj.weight": TensorSpec((proj, hidden), dtype),
        "q_conv1d.weight": TensorSpec((proj, 1, width), dtype, "conv"),
        "k_conv1d.weight": TensorSpec((proj, 1, width), dtype, "conv"),
        "v_conv1d.weight": TensorSpec((proj, 1, width), dtype, "conv"),
        "A_log": TensorSpec((1, 1, heads, 1), f32, "a_log"),
        "f_a_proj.weight": TensorSpec((dim, hidden), dtype),
        "f_b_proj.weight": TensorSpec((proj, dim), dtype),
        "dt_bias": TensorSpec((proj,), f32, "dt_bias"),
        "b_proj.weight": TensorSpec((heads, hidden), dtype),
        "g_a_proj.weight": TensorSpec((dim, hidden), dtype),
        "g_b_proj.weight": TensorSpec((proj, dim), dtype),
        "o_norm.weight": TensorSpec((dim,), dtype, "ones"),
        "o_proj.weight": TensorSpec((hidden, proj), dtype),
    }


def mla_tensors(config: dict, dtype: torch.dtype = torch.bfloat16) -> dict[str, TensorSpec]:
    """One MLA layer's tensors (no q-LoRA), names relative to ``self_attn.``."""
    if config.get("q_lora_rank") is not None:
        raise ValueError("q_lora_rank must be null for Kimi-Linear (plain q_proj)")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    nope, rope, v = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    latent = config["kv_lora_rank"]
    return {
        "q_proj.weight": TensorSpec((heads * (nope + rope), hidden), dtype),
        "kv_a_proj_with_mqa.weight": TensorSpec((latent + rope, hidden), dtype),
        "kv_a_layernorm.weight": TensorSpec((latent,), dtype, "ones"),
        "kv_b_proj.weight": TensorSpec((heads * (nope + v), latent), dtype),
        "o_proj.weight": TensorSpec((hidden, heads * v), dtype),
    }


def dense_mlp_tensors(config: dict, dtype: torch.dtype = torch.bfloat16) -> dict[str, TensorSpec]:
    """SwiGLU MLP of a dense layer, names relative to ``model.layers.L.``."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    return _swiglu("mlp.", hidden, inter, dtype)


def moe_tensors(config: dict, dtype: torch.dtype = torch.bfloat16) -> dict[str, TensorSpec]:
    """MoE block (router, routed and shared experts), names relative to ``model.layers.L.``."""
    hidden, n = config["hidden_size"], config["num_experts"]
    inter = config["moe_intermediate_size"]
    p = "block_sparse_moe."
    out = {
        p + "gate.weight": TensorSpec((n, hidden), dtype),
        # zero bias: implementations disagree on whether it enters the weights
        p + "gate.e_score_correction_bias": TensorSpec((n,), dtype, "zeros"),
    }
    for e in range(n):
        q = f"{p}experts.{e}."
        out[q + "w1.weight"] = TensorSpec((inter, hidden), dtype)
        out[q + "w2.weight"] = TensorSpec((hidden, inter), dtype)
        out[q + "w3.weight"] = TensorSpec((inter, hidden), dtype)
    shared = inter * config.get("num_shared_experts", 0)
    if shared:
        out.update(_swiglu(p + "shared_experts.", hidden, shared, dtype))
    return out


def _swiglu(prefix: str, hidden: int, inter: int, dtype: torch.dtype) -> dict[str, TensorSpec]:
    return {
        prefix + "gate_proj.weight": TensorSpec((inter, hidden), dtype),
        prefix + "up_proj.weight": TensorSpec((inter, hidden), dtype),
        prefix + "down_proj.weight": TensorSpec((hidden, inter), dtype),
    }


def total_params(config: dict) -> int:
    """Parameter count of the checkpoint (49,122,681,728 for the 48B config)."""
    return sum(s.numel() for s in expected_tensors(config).values())
