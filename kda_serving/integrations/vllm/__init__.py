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
    from vllm.model_executor.layers.mamba.gdn.kimi_gdn_linear_attn import KimiGatedDeltaNetAttention

    from .layer import KDAServingKimiDeltaAttention

    KimiGatedDeltaNetAttention.register_oot(KDAServingKimiDeltaAttention)
    logging.getLogger("kda_serving").info(
        "kda_serving: registered %s for Kimi-Linear KDA layers", KDAServingKimiDeltaAttention.__name__)


def is_registered() -> bool:
    from vllm.model_executor.custom_op import op_registry_oot
    return _LAYER_KEY in op_registry_oot


__all__ = ["register", "is_registered"]
