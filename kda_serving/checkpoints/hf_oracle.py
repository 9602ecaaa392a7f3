"""Independent reference generations from transformers' own Kimi-Linear model.

transformers >= 5 ships ``models/kimi_linear`` (pure-torch KDA fallback on CPU),
so no remote code is needed. It differs from vLLM in one known detail: its MLA
``kv_a_layernorm`` uses eps 1e-6 where vLLM passes ``rms_norm_eps``; compare
logits with a tolerance, not bit-exactly.
"""

from __future__ import annotations

import functools
import inspect
import os

import torch


def hf_kimi_linear_available() -> bool:
    """Whether the installed transformers has the native ``kimi_linear`` model."""
    try:
        import transformers.models.kimi_linear.modeling_kimi_linear  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=2)
def load_hf_model(ckpt_dir: str, dtype: torch.dtype = torch.float32):
    """Load a checkpoint with transformers' ``KimiLinearForCausalLM`` (cached, eval mode)."""
    if not hf_kimi_linear_available():
        raise ImportError("transformers with models.kimi_linear (>= 5.0) is required for the HF oracle")
    from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearForCausalLM

    model = KimiLinearForCausalLM.from_pretrained(ckpt_dir, dtype=dtype)
    return model.eval()


@torch.no_grad()
def greedy_generate_hf(
    ckpt_dir: str | os.PathLike,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    dtype: torch.dtype = torch.float32,
    stop_at_eos: bool = False,
) -> list[int]:
    """Greedy-decode ``max_new_tokens`` after ``prompt_ids``; returns only the new ids.

    Prefill runs the whole prompt at once, then one token per step through the
    model's cache (the same prefill/decode split an engine uses). EOS does not
    stop decoding unless ``stop_at_eos``, to match engines run with ``ignore_eos``.
    """
    if not prompt_ids:
        raise ValueError("prompt_ids must not be empty")
    model = load_hf_model(str(ckpt_dir), dtype)
    eos = model.config.eos_token_id
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    # transformers renamed `past_key_values` to `cache` (5.2x); accept either
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out: list[int] = []
    past = None
    for _ in range(max_new_tokens):
        res = model(input_ids=ids, use_cache=True, **{key: past})
        past = getattr(res, key)
        nxt = int(res.logits[0, -1].float().argmax())
        out.append(nxt)
        if stop_at_eos and nxt == eos:
            break
        ids = torch.tensor([[nxt]], dtype=torch.long)
    return out
