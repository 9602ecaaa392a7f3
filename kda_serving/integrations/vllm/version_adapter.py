"""The two ``KimiGatedDeltaNetAttention._forward`` APIs of vLLM and what the plugin's layer needs
for each.

The API is read off the parameters of the parent class's ``_forward`` (never from the version
string, so a backport or a renamed build is judged by what it actually calls):

``fused-qkv`` (vLLM 0.32/0.33): ``_forward(mixed_qkv, g1, g2, beta, core_attn_out)``
    * one merged projection: ``mixed_qkv`` [n, 3P] laid out q | k | v; ``beta`` raw logits
      [1, n, H]; one conv weight ``conv1d.weight`` [3P, 1, W]; ``A_log`` [H];
    * the gated RMSNorm ``o_norm(o, g2)`` is part of ``_forward``;
    * the conv state keeps ``W-1+num_spec`` rows, so speculative verify rows are supported.

``split-qkv`` (vLLM 0.26; earlier releases with the same parameters are taken as the same API): ``_forward(q_proj_states, k_proj_states, v_proj_states, g1, beta,
core_attn_out)``
    * separate q/k/v projections [n, P] each; ``beta`` already sigmoided in ``forward``
      (``b_proj(x).float().sigmoid()``, fp32 [1, n, H]);
    * three conv layers ``q_conv1d``/``k_conv1d``/``v_conv1d`` with weights [P, 1, W];
      ``A_log`` stored as [1, 1, H, 1];
    * ``forward`` applies ``o_norm(core_attn_out, g2)`` after ``_forward``, so ``_forward``
      must leave the output un-normalised;
    * the conv state has only ``W-1`` rows (``kda_state_shape`` ignores ``num_spec``) and the
      in-tree ``_forward`` has no speculative path: speculative decoding is refused.

This module imports only torch, so the detection is testable without vLLM.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

FUSED_QKV = "fused-qkv"
SPLIT_QKV = "split-qkv"

_FUSED_PARAMS = ("mixed_qkv", "g1", "g2", "beta", "core_attn_out")
_SPLIT_PARAMS = ("q_proj_states", "k_proj_states", "v_proj_states", "g1", "beta", "core_attn_out")


class UnsupportedVLLMError(RuntimeError):
    """The installed vLLM's KDA layer has an API this plugin does not know."""


@dataclass(frozen=True)
class ForwardAPI:
    name: str                 # FUSED_QKV or SPLIT_QKV
    params: tuple[str, ...]   # _forward's parameters after self, in order
    norm_in_forward: bool     # _forward applies o_norm (else the caller does, after it)
    beta_activated: bool      # beta arrives sigmoided (our kernels take logits)
    supports_spec: bool       # the conv state holds num_spec extra rows for verify windows


API_FUSED = ForwardAPI(FUSED_QKV, _FUSED_PARAMS, norm_in_forward=True, beta_activated=False,
                       supports_spec=True)
API_SPLIT = ForwardAPI(SPLIT_QKV, _SPLIT_PARAMS, norm_in_forward=False, beta_activated=True,
                       supports_spec=False)


def forward_params(cls) -> tuple[str, ...]:
    """Names of ``cls._forward``'s parameters after ``self`` (decorators using functools.wraps
    are looked through)."""
    fn = getattr(cls, "_forward", None)
    if fn is None:
        raise UnsupportedVLLMError(f"{cls.__name__} has no _forward method")
    names = [p.name for p in inspect.signature(fn).parameters.values()
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if names and names[0] == "self":
        names = names[1:]
    return tuple(names)


def detect_forward_api(cls) -> ForwardAPI:
    """The API of ``cls._forward`` (vLLM's ``KimiGatedDeltaNetAttention`` or a subclass)."""
    names = forward_params(cls)
    for api in (API_FUSED, API_SPLIT):
        if names == api.params:
            return api
    raise UnsupportedVLLMError(
        f"{cls.__module__}.{cls.__name__}._forward{names}: kda_serving supports "
        f"_forward{_FUSED_PARAMS} (vLLM 0.32/0.33) and _forward{_SPLIT_PARAMS} (vLLM 0.26)")


# ----------------------------------------------------------------------------- split-qkv helpers

def concat_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_tokens: int | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """q | k | v projections [n, P] each → mixed_qkv [m, 3P] (m = num_tokens or n).

    A copy: vLLM 0.26 runs three separate GEMMs, so the columns are not adjacent in memory. When
    they already are (views of one [n, 3P] buffer) the view is returned without copying.
    """
    m = q.shape[0] if num_tokens is None else min(num_tokens, q.shape[0])
    q, k, v = q[:m], k[:m], v[:m]
    P = q.shape[-1]
    if (out is None and q.dim() == 2 and q.stride(1) == 1 and q.stride(0) == k.stride(0) == v.stride(0)
            and q.stride(0) >= 3 * P and k.data_ptr() == q.data_ptr() + P * q.element_size()
            and v.data_ptr() == q.data_ptr() + 2 * P * q.element_size()):
        return q.as_strided((m, 3 * P), (q.stride(0), 1))
    return torch.cat([q, k, v], dim=-1, out=out) if out is not None else torch.cat([q, k, v], dim=-1)


def _logit_bounds(dtype: torch.dtype) -> tuple[float, float]:
    fi = torch.finfo(dtype)
    # the largest value below 1 and the smallest normal above 0 of the beta dtype
    return fi.tiny, 1.0 - fi.eps / 2


def beta_to_logits(beta: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Undo vLLM 0.26's ``sigmoid`` on beta: our kernels take beta logits and fuse the sigmoid.

    ``logit(clamp(beta, tiny, 1 - eps/2))`` in fp32, then cast to ``dtype`` (the activation
    dtype: the CUDA kernels take bf16 beta, as vLLM 0.32 hands them). The clamp only touches
    beta == 0 (fp32 sigmoid underflow, logits < -103) and beta == 1 (logits > ~16.6, where fp32
    rounds sigmoid up to 1); both map to logits whose sigmoid equals the clamped beta, so
    ``sigmoid(beta_to_logits(beta))`` differs from ``beta`` by at most ~6e-8 everywhere. vLLM
    0.26 computes beta from a bf16 projection; for 1e-4 < |logit| < 8 the round trip restores
    that bf16 value exactly (closer to 0 it is off by < 3e-7, the fp32 resolution of beta near
    0.5), beyond 8 the difference is invisible after the sigmoid.

    The CUDA kernels fuse the sigmoid, so taking activated beta would mean changing them; the
    two elementwise ops here cost O(tokens·heads) per layer.
    """
    b = beta.float()
    lo, hi = _logit_bounds(torch.float32)
    logits = torch.logit(b.clamp(lo, hi))
    return logits if dtype is None else logits.to(dtype)


class FusedConvWeight:
    """The q/k/v conv weights [P, 1, W] (or [P, W]) as one [3P, W] tensor, built once.

    Rebuilt only when a source weight changes (its tensor version or storage moves, e.g. a
    weight reload), so steps do not pay the concatenation.
    """

    def __init__(self):
        self._key = None
        self._weight = None

    @staticmethod
    def _key_of(ws):
        return tuple((w.data_ptr(), w._version, tuple(w.shape), w.dtype, w.device) for w in ws)

    def get(self, q_w: torch.Tensor, k_w: torch.Tensor, v_w: torch.Tensor) -> torch.Tensor:
        ws = (q_w.detach(), k_w.detach(), v_w.detach())
        key = self._key_of(ws)
        if key != self._key:
            flat = [w.reshape(w.shape[0], w.shape[-1]) for w in ws]
            self._weight = torch.cat(flat, dim=0).contiguous()
            self._key = key
        return self._weight

    def concat_bias(self, q_b, k_b, v_b):
        if q_b is None and k_b is None and v_b is None:
            return None
        if q_b is None or k_b is None or v_b is None:
            raise UnsupportedVLLMError("q/k/v conv biases must be all set or all None")
        return torch.cat([q_b, k_b, v_b]).contiguous()


def a_log_heads(A_log: torch.Tensor) -> torch.Tensor:
    """A_log as [H] (vLLM 0.26 keeps [1, 1, H, 1], 0.32 keeps [H]); a view, no copy."""
    if A_log.dim() != 1:
        if A_log.numel() != max(A_log.shape):
            raise UnsupportedVLLMError(f"A_log: expected one non-unit dim, got shape {list(A_log.shape)}")
        return A_log.view(-1)
    return A_log


def check_spec_supported(api: ForwardAPI, num_spec: int) -> None:
    """Refuse speculative decoding where the vLLM API cannot carry it (raised at layer build)."""
    if num_spec and not api.supports_spec:
        raise NotImplementedError(
            f"kda_serving: speculative decoding (num_speculative_tokens={num_spec}) is not supported "
            f"with this vLLM's KDA layer API ({api.name}: _forward{api.params}): its conv state has "
            "no rows for draft tokens and its KDA layer has no verify path. Use vLLM >= 0.32 for "
            "speculative decoding, or run without --speculative-config.")
