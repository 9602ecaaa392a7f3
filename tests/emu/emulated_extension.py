"""The ``torch.ops.kda_serving`` ops on CPU tensors, run by the emulated kernels: the schemas are read
from csrc/torch_bindings.cpp and registered for the CPU dispatch key, so ``kda_serving.ops`` can take
its CUDA-kernel path (``_ext`` wrappers, split prefill on the kernels, fused decode, the backend's
kernel dispatch) on this machine. Argument checks stay those of ``kda_serving.ops``; the C++
binding checks are not emulated."""

from __future__ import annotations

import re

import torch

from . import emulated

_LIB = None  # the torch.library fragment; registrations live as long as the process
CONV_VEC8_MIN_ELEMS = 1 << 20  # what the extension passes: kConvVec8MinElems, csrc/conv/conv1d.h


def schemas() -> dict[str, str]:
    """Op name -> schema, from the ``m.def(...)`` calls of csrc/torch_bindings.cpp."""
    text = (emulated.CSRC / "torch_bindings.cpp").read_text()
    out = {}
    for call in re.findall(r"m\.def\(\s*((?:\"[^\"]*\"\s*)+)\)", text):
        schema = "".join(re.findall(r"\"([^\"]*)\"", call))
        out[schema.split("(", 1)[0]] = schema
    return out


def install(lib) -> None:
    """Register CPU implementations of every kda_serving op backed by ``lib`` (once)."""
    global _LIB
    if _LIB is not None:
        return
    frag = torch.library.Library("kda_serving", "FRAGMENT")
    have = {n for n in schemas() if hasattr(torch.ops.kda_serving, n)}
    for name, schema in schemas().items():
        if name not in have:
            frag.define(schema)

    def prefill(kind):
        def run(q, k, v, g, beta, A_log, dt_bias, cu_seqlens, state_pool, slots, has_initial_state, lower_bound,
                scale, inter, inter_offsets, out, workspace=None):
            emulated.prefill(lib, kind, None, q, k, v, g, beta, A_log, dt_bias, cu_seqlens, state_pool, slots,
                             has_initial_state, lower_bound=lower_bound, scale=scale, inter=inter,
                             inter_offsets=inter_offsets, out=out, workspace=workspace)
        return run

    def prefill_tc_split(q, k, v, g, beta, A_log, dt_bias, cu_seqlens, state_pool, slots, has_initial_state,
                         lower_bound, scale, out, workspace, units, units_a, units_b, units_c, split_state):
        emulated.prefill(lib, "prefill_tc", None, q, k, v, g, beta, A_log, dt_bias, cu_seqlens, state_pool, slots,
                         has_initial_state, lower_bound=lower_bound, scale=scale, out=out, workspace=workspace,
                         split=(units, units_a, units_b, units_c, split_state))

    def decode(q, k, v, g, beta, A_log, dt_bias, state_pool, slots, num_accepted, lower_bound, scale, out):
        emulated.decode(lib, None, q, k, v, g, beta, A_log, dt_bias, state_pool, slots, num_accepted,
                        lower_bound=lower_bound, scale=scale, out=out)

    def conv_prefill(x, weight, bias, cu_seqlens, conv_pool, slots, has_initial_state, silu, out):
        emulated.conv_prefill(lib, x, weight, bias, cu_seqlens, conv_pool, slots, has_initial_state, out=out,
                              silu=silu)

    def conv_update(x, weight, bias, conv_pool, slots, num_accepted, silu, out):
        emulated.conv_update(lib, x, weight, bias, conv_pool, slots, num_accepted, out=out, silu=silu,
                             vec8_min_elems=CONV_VEC8_MIN_ELEMS)

    def decode_fused(mixed_qkv, g, beta, A_log, dt_bias, conv_weight, conv_bias, conv_pool, state_pool, slots,
                     num_accepted, lower_bound, scale, out_gate, norm_weight, norm_eps, out, conv_out=None):
        emulated.decode_fused(lib, None, mixed_qkv, g, beta, A_log, dt_bias, conv_weight, conv_bias, conv_pool,
                              state_pool, slots, num_accepted, lower_bound=lower_bound, scale=scale,
                              out_gate=out_gate, norm_weight=norm_weight, norm_eps=norm_eps, out=out,
                              conv_out=conv_out)

    def gated_rms_norm(x, gate, weight, eps, out):
        emulated.gated_rms_norm(lib, x, gate, weight, eps, out)

    impls = {"kda_prefill": prefill("prefill"), "kda_prefill_chunked": prefill("prefill_chunked"),
             "kda_prefill_tc": prefill("prefill_tc"), "kda_prefill_tc_split": prefill_tc_split, "kda_decode": decode,
             "causal_conv1d_prefill": conv_prefill, "causal_conv1d_update": conv_update,
             "kda_decode_fused": decode_fused, "gated_rms_norm": gated_rms_norm}
    missing = set(schemas()) - set(impls)
    if missing:
        raise RuntimeError(f"no emulated implementation for {sorted(missing)}")
    for name, fn in impls.items():
        frag.impl(name, fn, "CPU")
    _LIB = frag
