"""vLLM plugin: kda_serving's KDA backend as the KDA layer of Kimi-Linear models.

Entry point (``vllm.general_plugins``): ``kda_serving = kda_serving.integrations.vllm:register``.
vLLM calls it once in every process it starts (API server, engine core, each worker).
"""

from __future__ import annotations

import logging
import os

_LAYER_KEY = "KimiGatedDeltaNetAttention"


def _setup_logging() -> None:
    log = logging.getLogger("kda_serving")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [kda_serving pid=%(process)d] %(message)s",
                                               "%m-%d %H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(os.environ.get("KDA_SERVING_LOG_LEVEL", "INFO"))
        log.propagate = False


def register() -> None:
    """Register the KDA layer and, on vLLM's CPU platform, the CPU fixes.

    Idempotent and light: imports only vLLM's shared KDA layer module (never the Kimi model
    modules, which must be imported by vLLM itself after its own setup).
    """
    _setup_logging()
    from vllm.model_executor.custom_op import op_registry_oot

    from .cpu_compat import apply_cpu_fixes

    apply_cpu_fixes()
    if _LAYER_KEY in op_registry_oot:
        return
    log = logging.getLogger("kda_serving")
    try:
        from vllm.model_executor.layers.mamba.gdn.kimi_gdn_linear_attn import KimiGatedDeltaNetAttention
    except ImportError as e:  # a vLLM whose Kimi-Linear KDA layer lives elsewhere
        log.error("kda_serving: this vLLM has no shared KimiGatedDeltaNetAttention (%s); "
                  "Kimi-Linear keeps vLLM's own KDA layers", e)
        return

    from .version_adapter import UnsupportedVLLMError
    try:
        from .layer import FORWARD_API, KDAServingKimiDeltaAttention
    except UnsupportedVLLMError as e:
        log.error("kda_serving: %s; Kimi-Linear keeps vLLM's own KDA layers", e)
        return

    from .host_lengths import install as keep_host_lengths
    keep_host_lengths()  # lets long prompts be split across SMs without a device sync
    KimiGatedDeltaNetAttention.register_oot(KDAServingKimiDeltaAttention)
    log.info("kda_serving: registered %s for Kimi-Linear KDA layers (vLLM %s _forward API)",
             KDAServingKimiDeltaAttention.__name__, FORWARD_API.name)


def is_registered() -> bool:
    from vllm.model_executor.custom_op import op_registry_oot
    return _LAYER_KEY in op_registry_oot


__all__ = ["register", "is_registered"]
