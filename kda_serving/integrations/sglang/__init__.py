"""SGLang plugin: puts kda-serving's KDA kernels behind SGLang's KDA kernel dispatcher.

Entry point (declared in setup.py)::

    [sglang.srt.plugins]
    kda_serving = kda_serving.integrations.sglang:register

SGLang runs ``register()`` in every process (launcher, engine, each TP scheduler, detokenizer)
and applies the registered hooks right after. ``register()`` adds one class-REPLACE hook:
``sglang.srt.layers.attention.linear.kernels.kda_triton.TritonKDAKernel`` becomes
:class:`~kda_serving.integrations.sglang.kernel.KDAServingKernel`, a subclass of it. SGLang's
``KDAKernelDispatcher`` builds its Triton kernel object from that name, so every phase that runs
on ``triton`` (the default for decode, packed decode, extend and target verify) runs our kernels,
while ``--linear-attn-backend`` stays ``triton``: the radix-cache ``extra_buffer`` strategy,
overlap scheduling and both CUDA-graph kinds stay on, and ``isinstance(.., TritonKDAKernel)``
checks (prefill-graph capture, safe-gate routing) keep holding. Triton remains the fallback for
batches our ops do not cover.

Environment:
    KDA_SERVING_SGLANG=0            do not register (SGLang runs its own Triton kernels).
    KDA_SERVING_SGLANG_PHASES=...   comma list out of ``decode,extend,verify`` (default: all);
                                    phases left out run SGLang's Triton kernels.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("kda_serving")

TRITON_KDA_KERNEL = "sglang.srt.layers.attention.linear.kernels.kda_triton.TritonKDAKernel"

_registered = False


def enabled() -> bool:
    return os.environ.get("KDA_SERVING_SGLANG", "1").strip().lower() not in ("0", "false", "off", "no")


def register() -> None:
    """``sglang.srt.plugins`` entry point: light (imports only SGLang's kernel-wrapper module) and
    idempotent (a second call in the same process does nothing)."""
    global _registered
    if _registered:
        return
    if not enabled():
        logger.info("kda_serving SGLang plugin disabled by KDA_SERVING_SGLANG")
        _registered = True
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from .kernel import KDAServingKernel

    HookRegistry.register(TRITON_KDA_KERNEL, KDAServingKernel, HookType.REPLACE)
    _registered = True
    logger.info("kda_serving: SGLang KDA kernels (%s) registered for %s",
                KDAServingKernel.__name__, TRITON_KDA_KERNEL)


def install() -> None:
    """Register and apply at once, for processes that do not go through ``load_plugins()``
    (scripts, tests). Also idempotent."""
    register()
    if enabled():
        from sglang.srt.plugins.hook_registry import HookRegistry
        HookRegistry.apply_hooks()


__all__ = ["register", "install", "enabled", "TRITON_KDA_KERNEL"]
