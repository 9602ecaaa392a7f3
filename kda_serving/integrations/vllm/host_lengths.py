"""A host copy of the non-speculative ``query_start_loc`` on vLLM's GDN attention metadata.

``kda_prefill`` splits long prompts across SMs (``ops/split_plan.py``) only when it can read the
sequence lengths on the host, and reading the device ``non_spec_query_start_loc`` would sync.
vLLM's metadata builder has the host offsets (``CommonAttentionMetadata.query_start_loc_cpu``)
but does not keep them, so ``install()`` wraps ``GDNAttentionMetadataBuilder.build`` to attach
them to every metadata object it returns, under ``ATTR``. The wrapper only adds an attribute;
other GDN models (and builders that subclass this one) are unaffected.
"""

from __future__ import annotations

import functools
import logging

import torch

ATTR = "kda_serving_non_spec_qsl_cpu"
_MARK = "_kda_serving_host_lengths"

log = logging.getLogger("kda_serving")


def non_spec_qsl_cpu(md, common) -> torch.Tensor | None:
    """Host offsets of the non-speculative rows, laid out like ``md.non_spec_query_start_loc``,
    or None when they cannot be derived without a device read."""
    qsl = getattr(common, "query_start_loc_cpu", None)
    if not isinstance(qsl, torch.Tensor) or qsl.device.type != "cpu" or qsl.dim() != 1:
        return None
    if getattr(md, "spec_sequence_masks", None) is None:
        return qsl                                   # every row is non-speculative
    masks = getattr(md, "spec_sequence_masks_cpu", None)
    if not isinstance(masks, torch.Tensor) or masks.numel() != qsl.numel() - 1:
        return None
    lens = (qsl[1:] - qsl[:-1])[~masks.bool()]
    out = torch.zeros(lens.numel() + 1, dtype=qsl.dtype)
    torch.cumsum(lens, 0, out=out[1:])
    return out


def install() -> bool:
    """Wrap the GDN metadata builder once per process; False when this vLLM has none."""
    try:
        from vllm.v1.attention.backends.gdn_attn import GDNAttentionMetadataBuilder as builder
    except ImportError:
        return False
    if getattr(builder.build, _MARK, False):
        return True
    original = builder.build

    @functools.wraps(original)
    def build(self, common_prefix_len, common_attn_metadata, *args, **kwargs):
        md = original(self, common_prefix_len, common_attn_metadata, *args, **kwargs)
        try:
            setattr(md, ATTR, non_spec_qsl_cpu(md, common_attn_metadata))
        except (AttributeError, TypeError):          # a frozen / slotted metadata class
            pass
        return md

    setattr(build, _MARK, True)
    builder.build = build
    return True


__all__ = ["ATTR", "install", "non_spec_qsl_cpu"]
