"""Engine-agnostic KDA attention backend: step metadata, state cache, mixer forward."""

from .batch import KDABatch, build_kda_batch
from .mixer import KDALayerParams, kda_mixer_forward
from .state_cache import KDAStateCache

__all__ = ["KDABatch", "build_kda_batch", "KDALayerParams", "kda_mixer_forward", "KDAStateCache"]
