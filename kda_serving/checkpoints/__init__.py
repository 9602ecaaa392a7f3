"""Kimi-Linear config presets, exact-format checkpoint writer, offline tokenizer."""

from .presets import load_preset, preset_names, with_num_layers
from .schedule import hybrid_layer_lists
from .tokenizer import write_tokenizer
from .validate import validate_checkpoint
from .writer import write_checkpoint

__all__ = [
    "hybrid_layer_lists",
    "load_preset",
    "preset_names",
    "validate_checkpoint",
    "with_num_layers",
    "write_checkpoint",
    "write_tokenizer",
]
