"""Kimi-Linear layer schedule: which decoder layers are KDA and which are MLA.

Checkpoints list layers 1-indexed in ``linear_attn_config`` (``kda_layers``,
``full_attn_layers``); everything here returns 0-indexed layer numbers unless a
name says otherwise.
"""

from __future__ import annotations

MLA_EVERY = 4  # 3 KDA layers, then 1 MLA layer


def hybrid_layer_lists(num_layers: int) -> tuple[list[int], list[int]]:
    """1-indexed ``(kda_layers, full_attn_layers)`` for a ``num_layers`` stack.

    Every fourth layer is MLA and the last layer is always MLA, as in the
    27-layer checkpoint (MLA at 4, 8, ..., 24, 27).
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    mla = [i for i in range(1, num_layers + 1) if i % MLA_EVERY == 0 or i == num_layers]
    kda = [i for i in range(1, num_layers + 1) if i not in set(mla)]
    return kda, mla


def kda_layer_indices(config: dict) -> list[int]:
    """0-indexed KDA layers of a config, checked to partition the stack."""
    kda, mla = _checked_lists(config)
    return [i - 1 for i in kda]


def mla_layer_indices(config: dict) -> list[int]:
    """0-indexed MLA (full attention) layers of a config."""
    kda, mla = _checked_lists(config)
    return [i - 1 for i in mla]


def is_moe_layer(config: dict, layer: int) -> bool:
    """Whether 0-indexed ``layer`` has a MoE block (vLLM's rule; dense otherwise)."""
    return (
        config.get("num_experts") is not None
        and layer >= config["first_k_dense_replace"]
        and layer % config.get("moe_layer_freq", 1) == 0
    )


def _checked_lists(config: dict) -> tuple[list[int], list[int]]:
    lin = config["linear_attn_config"]
    kda, mla = list(lin["kda_layers"]), list(lin["full_attn_layers"])
    n = config["num_hidden_layers"]
    if sorted(kda + mla) != list(range(1, n + 1)):
        raise ValueError(
            "linear_attn_config: kda_layers and full_attn_layers must partition "
            f"1..{n} (1-indexed), got kda_layers={kda} full_attn_layers={mla}"
        )
    return kda, mla
