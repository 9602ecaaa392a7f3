"""Kimi-Linear config presets.

The JSON files in ``presets/`` next to this module are the single source of
truth (the repo's ``configs/*.json`` are symlinks to them), so an installed
package finds them without the source tree.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from .schedule import hybrid_layer_lists

PRESET_DIR = Path(__file__).resolve().parent / "presets"


def preset_names() -> list[str]:
    """Names accepted by :func:`load_preset`, e.g. ``["kimi-linear-48b-a3b", "small", "tiny"]``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name_or_path: str | Path) -> dict:
    """Return a config.json dict for a preset name or a path to a config file.

    A directory path is read as a checkpoint folder (its ``config.json``).
    """
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        path = PRESET_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ValueError(
            f"unknown preset {str(name_or_path)!r}: expected one of {preset_names()} "
            "or a path to a config.json"
        )
    with open(path) as f:
        return json.load(f)


def with_num_layers(config: dict, num_layers: int) -> dict:
    """A copy of ``config`` with ``num_layers`` layers in the 3:1 KDA:MLA pattern.

    The last layer stays MLA. Dense-only configs (``num_experts`` null) keep every
    layer dense, because transformers decides dense vs MoE by
    ``first_k_dense_replace`` alone.
    """
    out = copy.deepcopy(config)
    kda, mla = hybrid_layer_lists(num_layers)
    out["num_hidden_layers"] = num_layers
    out["linear_attn_config"]["kda_layers"] = kda
    out["linear_attn_config"]["full_attn_layers"] = mla
    if out.get("num_experts") is None:
        out["first_k_dense_replace"] = num_layers
    else:
        out["first_k_dense_replace"] = min(out["first_k_dense_replace"], num_layers)
    return out
