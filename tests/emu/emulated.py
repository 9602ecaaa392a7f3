"""Build csrc/'s kernels and launchers for the SIMT emulator (simt_emulator.h) and call them on
CPU tensors through the same params structs the CUDA build fills.

Every ``csrc/**/*_launch.cu`` is compiled as C++ by g++ after a textual pass (``extern __shared__``
-> ``extern``, ``__shared__`` -> ``static``, ``k<<<cfg>>>(args)`` ->
``emu::Config(cfg).run([&] { k(args); })``), with simt_emulator.h force-included, and linked with
emu_api.cpp into one shared library loaded by ctypes. The ctypes structures below mirror the
params structs of csrc/; ``build()`` checks their sizes and last-field offsets against the C++
ones.
"""

from __future__ import annotations

import ctypes as C
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from kda_serving.ops import _ext

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
KINDS = {"prefill": 0, "prefill_chunked": 1, "prefill_tc": 2}
LAUNCH = re.compile(r"([\w:]+(?:<[^;<>]*>)?)<<<(.*?)>>>\(([^;]*)\);")


class PrefillParams(C.Structure):
    _fields_ = [(n, C.c_void_p) for n in ("q", "k", "v", "g", "beta")] + \
        [(n, C.c_int64) for n in ("q_st", "q_sh", "k_st", "k_sh", "v_st", "v_sh", "g_st", "g_sh",
                                  "beta_st", "beta_sh")] + \
        [("A_log", C.c_void_p), ("dt_bias", C.c_void_p), ("cu_seqlens", C.c_void_p), ("cu_seqlens_64", C.c_bool),
         ("state", C.c_void_p), ("state_ss", C.c_int64), ("state_bf16", C.c_bool), ("slots", C.c_void_p),
         ("has_initial_state", C.c_void_p), ("inter", C.c_void_p), ("inter_ss", C.c_int64),
         ("inter_offsets", C.c_void_p), ("inter_offsets_64", C.c_bool), ("o", C.c_void_p), ("o_st", C.c_int64),
         ("o_sh", C.c_int64), ("N", C.c_int), ("H", C.c_int), ("scale", C.c_float), ("has_lower_bound", C.c_bool),
         ("lower_bound", C.c_float), ("num_sms", C.c_int), ("tc_workspace", C.c_void_p),
         ("tc_chunk_slots", C.c_int64), ("tc_units", C.c_void_p), ("tc_units_a", C.c_int), ("tc_units_b", C.c_int),
         ("tc_units_c", C.c_int), ("tc_unit_first", C.c_int), ("tc_split_state", C.c_void_p),
         ("tc_diag_exact", C.c_bool)]


class DecodeNormArgs(C.Structure):
    _fields_ = [("gate", C.c_void_p), ("gate_sb", C.c_int64), ("gate_st", C.c_int64), ("gate_sh", C.c_int64),
                ("weight", C.c_void_p), ("weight_bf16", C.c_bool), ("eps", C.c_float)]


class DecodeParams(C.Structure):
    _fields_ = [(n, C.c_void_p) for n in ("q", "k", "v", "g", "beta")] + \
        [(f"{t}_{s}", C.c_int64) for t in ("q", "k", "v", "g", "beta") for s in ("sb", "st", "sh")] + \
        [("A_log", C.c_void_p), ("dt_bias", C.c_void_p), ("state", C.c_void_p), ("state_ss", C.c_int64),
         ("state_bf16", C.c_bool), ("slots", C.c_void_p), ("slots_sb", C.c_int64), ("slot_cols", C.c_int),
         ("verify", C.c_bool), ("num_accepted", C.c_void_p), ("o", C.c_void_p), ("o_sb", C.c_int64),
         ("o_st", C.c_int64), ("o_sh", C.c_int64), ("B", C.c_int), ("T", C.c_int), ("H", C.c_int),
         ("scale", C.c_float), ("has_lower_bound", C.c_bool), ("lower_bound", C.c_float), ("num_sms", C.c_int),
         ("conv_W", C.c_int), ("conv_R", C.c_int), ("early_state", C.c_bool), ("kernel", C.c_int),
         ("norm", DecodeNormArgs)]


class ConvParams(C.Structure):
    _fields_ = [("x", C.c_void_p), ("x_sb", C.c_int64), ("x_st", C.c_int64), ("y", C.c_void_p),
                ("y_sb", C.c_int64), ("y_st", C.c_int64), ("weight", C.c_void_p), ("bias", C.c_void_p),
                ("weight_bf16", C.c_bool), ("pool", C.c_void_p), ("pool_ss", C.c_int64), ("pool_sr", C.c_int64),
                ("pool_sd", C.c_int64), ("pool_bf16", C.c_bool), ("slots", C.c_void_p), ("cu_seqlens", C.c_void_p),
                ("cu_seqlens_64", C.c_bool), ("has_initial_state", C.c_void_p), ("total_tokens", C.c_int64),
                ("num_accepted", C.c_void_p), ("N", C.c_int), ("T", C.c_int), ("D", C.c_int), ("W", C.c_int),
                ("R", C.c_int), ("silu", C.c_bool), ("vec8_min_elems", C.c_int64)]


class DecodeFusedParams(C.Structure):
    _fields_ = [("dec", DecodeParams), ("conv", ConvParams), ("path", C.c_int)]


class GatedRmsNormParams(C.Structure):
    _fields_ = [("x", C.c_void_p), ("gate", C.c_void_p), ("out", C.c_void_p)] + \
        [(n, C.c_int64) for n in ("x_s0", "x_s1", "g_s0", "g_s1", "o_s0", "o_s1", "M")] + \
        [("H", C.c_int), ("weight", C.c_void_p), ("weight_bf16", C.c_bool), ("vec", C.c_bool), ("eps", C.c_float)]


LAYOUTS = [(PrefillParams, "tc_diag_exact"), (DecodeParams, "norm"), (ConvParams, "vec8_min_elems"),
           (DecodeFusedParams, "path"), (GatedRmsNormParams, "eps")]
# kda_decode_fused.h kFused*, by the names KDA_SERVING_FUSED_DECODE_PATH takes.
FUSED_PATHS = {"auto": 0, "rows": 1, "single": 2}
# kda_decode.h kDecodeKernel*, by the names KDA_SERVING_DECODE_GRID takes.
DECODE_KERNELS = {"auto": 0, "rows": 1, "heads": 2}


def cuda_include() -> Path | None:
    """A directory with cuda_bf16.h: $CUDA_HOME/include, next to nvcc, or /usr/local/cuda*."""
    cands = []
    if os.environ.get("CUDA_HOME"):
        cands.append(Path(os.environ["CUDA_HOME"]) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(Path(os.path.realpath(nvcc)).parent.parent / "include")
    cands += sorted(Path("/usr/local").glob("cuda*/include"), reverse=True)
    return next((c for c in cands if (c / "cuda_bf16.h").exists()), None)


def _emulator_source(text: str) -> str:
    text = text.replace("extern __shared__", "extern")
    text = re.sub(r"\b__shared__\b", "static", text)
    return LAUNCH.sub(lambda m: f"::emu::Config({m.group(2)}).run([&] {{ {m.group(1)}({m.group(3)}); }});", text)


def build(extra_flags: tuple[str, ...] = ()) -> C.CDLL:
    """Compile (cached by a hash of the sources and flags) and load the emulated kernels.
    ``extra_flags`` (or KDA_SERVING_EMU_FLAGS, space-separated) go to g++, e.g. -fsanitize=address
    (then run Python with libasan preloaded)."""
    inc = cuda_include()
    if inc is None or shutil.which("g++") is None:
        raise RuntimeError("the emulated kernels need g++ and the CUDA headers (cuda_bf16.h)")
    extra = tuple(extra_flags) + tuple(os.environ.get("KDA_SERVING_EMU_FLAGS", "").split())
    sources = sorted(p for p in CSRC.rglob("*") if p.suffix in (".h", ".cuh", ".cu"))
    digest = hashlib.sha256(" ".join(extra).encode())
    for p in sources + [HERE / "simt_emulator.h", HERE / "emu_api.cpp", Path(__file__)]:
        digest.update(p.read_bytes())
    cache = Path(tempfile.gettempdir()) / f"kda-emu-{digest.hexdigest()[:16]}"
    lib = cache / "libkda_emu.so"
    if not lib.exists():
        _compile(sources, inc, cache, lib, extra)
    so = C.CDLL(str(lib))
    so.emu_layout.restype = C.c_int64
    for i, (struct, last) in enumerate(LAYOUTS):
        if so.emu_layout(2 * i) != C.sizeof(struct) or so.emu_layout(2 * i + 1) != getattr(struct, last).offset:
            raise RuntimeError(f"the ctypes mirror {struct.__name__} does not match csrc/")
    if so.emu_layout(2 * len(LAYOUTS)) != _ext.TC_RECORD_FLOATS:
        raise RuntimeError("kda_serving.ops._ext.TC_RECORD_FLOATS does not match csrc/ kTcRecordFloats")
    if so.emu_layout(2 * len(LAYOUTS) + 1) != FUSED_PATHS["single"]:
        raise RuntimeError("FUSED_PATHS does not match csrc/ kFused*")
    if so.emu_layout(2 * len(LAYOUTS) + 2) != DECODE_KERNELS["heads"]:
        raise RuntimeError("DECODE_KERNELS does not match csrc/ kDecodeKernel*")
    so.emu_set_order.argtypes = [C.c_int, C.c_uint64]
    so.emu_item_div.argtypes = [C.c_int, C.c_int64, C.POINTER(C.c_int64), C.POINTER(C.c_int)]
    so.emu_prefill.argtypes = [C.c_int, C.POINTER(PrefillParams)]
    so.emu_decode.argtypes = [C.POINTER(DecodeParams)]
    so.emu_decode_fused.argtypes = [C.POINTER(DecodeFusedParams)]
    so.emu_conv.argtypes = [C.c_int, C.POINTER(ConvParams)]
    so.emu_gated_rms_norm.argtypes = [C.POINTER(GatedRmsNormParams)]
    return so


def _compile(sources, inc, cache: Path, lib: Path, extra: tuple[str, ...]) -> None:
    work = Path(tempfile.mkdtemp(prefix="kda-emu-build-"))
    for p in sources:
        dst = work / "csrc" / p.relative_to(CSRC)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(_emulator_source(p.read_text()))
    flags = ["-O2", "-U_FORTIFY_SOURCE", "-std=c++20", "-fPIC", "-pthread", f"-I{inc}", f"-I{work / 'csrc'}",
             f"-I{HERE}", "-include", str(HERE / "simt_emulator.h"), *extra]
    units = [(work / "csrc" / p.relative_to(CSRC), "c++") for p in sources if p.suffix == ".cu"]
    units.append((HERE / "emu_api.cpp", "c++"))

    def compile_one(i_unit):
        i, (src, lang) = i_unit
        obj = work / f"unit{i}.o"
        res = subprocess.run(["g++", *flags, "-x", lang, "-c", str(src), "-o", str(obj)], capture_output=True,
                             text=True)
        if res.returncode != 0:
            raise RuntimeError(f"building {src.name} for the emulator failed:\n{res.stderr[-4000:]}")
        return obj

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        objs = list(pool.map(compile_one, enumerate(units)))
    out = work / "libkda_emu.so"
    res = subprocess.run(["g++", "-shared", "-pthread", *extra, *map(str, objs), "-o", str(out)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise RuntimeError("linking the emulated kernels failed:\n" + res.stderr[-4000:])
    cache.mkdir(parents=True, exist_ok=True)
    os.replace(out, lib)


def _ptr(t):
    return None if t is None else t.data_ptr()


def sms_for_rows(kind: str, rows: int | None, seq_heads: int) -> int:
    """An SM count that makes the launcher pick ``rows`` value rows per CTA for ``seq_heads``
    (sequence, head) pairs (launch_utils.h pick_block_rows; the chunked launcher's 64 / 32; the
    tensor-core state pass's 128 / 64 / 32); ``rows=None``: an H100's 132 SMs, the launcher decides."""
    if rows is None:
        return 132
    if kind == "prefill_chunked":
        return 1 if rows == 64 else 2 * seq_heads + 1
    if kind == "prefill_tc":  # tc_state_rows: 128 rows on 1 SM, 64 on 2 per pair, 32 when SMs are plenty
        return {128: 1, 64: 2 * seq_heads, 32: 1 << 20}[rows]
    return {32: 1, 16: 8 * seq_heads, 8: 8 * seq_heads + 1}[rows]


def prefill(lib, kind: str, rows: int, q, k, v, g, beta, A_log, dt_bias, cu_seqlens, state_pool, slots,
            has_initial_state, *, lower_bound=None, scale=None, inter=None, inter_offsets=None, out=None,
            workspace=None, split=None, diag_exact=False):
    """One emulated launch of a prefill kernel; returns ``out`` [T, H, 128] bf16, pool updated.
    ``workspace``: the tensor-core kernel's (allocated here when not given); ``split``: a split
    tensor-core call's (units [U, 8] int32, units_a, units_b, units_c, split_state fp32);
    ``diag_exact``: its diagonal blocks all on the exact path (KDA_SERVING_TC_DIAG=exact)."""
    out = torch.empty(v.shape, dtype=torch.bfloat16) if out is None else out
    keep = dict(slots=slots.to(torch.int32).contiguous(), has=has_initial_state.contiguous(),
                A_log=A_log.float().contiguous(), dt=dt_bias.float().reshape(-1).contiguous())
    N, H = cu_seqlens.numel() - 1, q.shape[1]
    p = PrefillParams(
        q=_ptr(q), k=_ptr(k), v=_ptr(v), g=_ptr(g), beta=_ptr(beta),
        q_st=q.stride(0), q_sh=q.stride(1), k_st=k.stride(0), k_sh=k.stride(1), v_st=v.stride(0), v_sh=v.stride(1),
        g_st=g.stride(0), g_sh=g.stride(1), beta_st=beta.stride(0), beta_sh=beta.stride(1),
        A_log=_ptr(keep["A_log"]), dt_bias=_ptr(keep["dt"]), cu_seqlens=_ptr(cu_seqlens),
        cu_seqlens_64=cu_seqlens.dtype == torch.int64, state=_ptr(state_pool), state_ss=state_pool.stride(0),
        state_bf16=state_pool.dtype == torch.bfloat16, slots=_ptr(keep["slots"]), has_initial_state=_ptr(keep["has"]),
        inter=_ptr(inter), inter_ss=inter.stride(0) if inter is not None else 0, inter_offsets=_ptr(inter_offsets),
        inter_offsets_64=inter_offsets is not None and inter_offsets.dtype == torch.int64,
        o=_ptr(out), o_st=out.stride(0), o_sh=out.stride(1), N=N, H=H,
        scale=q.shape[-1] ** -0.5 if scale is None else scale, has_lower_bound=lower_bound is not None,
        lower_bound=lower_bound or 0.0, num_sms=sms_for_rows(kind, rows, N * H))
    if kind == "prefill_tc":
        need = _ext.tc_workspace_floats(q.shape[0], N, H)
        if workspace is None:
            workspace = torch.full((need,), float("nan"))  # poisoned: a record read before written shows
        if workspace.dtype != torch.float32 or not workspace.is_contiguous() or workspace.numel() < need:
            raise RuntimeError(f"workspace must be contiguous fp32 with at least {need} elements")  # as the binding
        p.tc_workspace, p.tc_chunk_slots = _ptr(workspace), _ext.tc_chunk_slots(q.shape[0], N)
        p.tc_diag_exact = diag_exact
        if split is not None:
            units, p.tc_units_a, p.tc_units_b, p.tc_units_c, split_state = split
            if units.dtype != torch.int32 or not units.is_contiguous() or split_state.dtype != torch.float32:
                raise RuntimeError("units must be contiguous int32, split_state fp32")  # as the binding
            p.tc_units, p.tc_split_state = _ptr(units), _ptr(split_state)
    if lib.emu_prefill(KINDS[kind], C.byref(p)) != 0:
        raise RuntimeError(f"emulated {kind} launch failed")
    return out


def _decode_params(g, beta, A_log, dt_bias, state_pool, slots, num_accepted, lower_bound, scale, out, rows, keep,
                   kernel):
    B, T, H = g.shape[:3]
    s = slots.to(torch.int32).contiguous()
    verify = s.dim() == 2
    keep.update(slots=s, A_log=A_log.float().contiguous(), dt=dt_bias.float().reshape(-1).contiguous(),
                acc=num_accepted.to(torch.int32).contiguous() if (verify and num_accepted is not None) else None)
    p = DecodeParams(g=_ptr(g), beta=_ptr(beta), g_sb=g.stride(0), g_st=g.stride(1), g_sh=g.stride(2),
                     beta_sb=beta.stride(0), beta_st=beta.stride(1), beta_sh=beta.stride(2),
                     A_log=_ptr(keep["A_log"]), dt_bias=_ptr(keep["dt"]), state=_ptr(state_pool),
                     state_ss=state_pool.stride(0), state_bf16=state_pool.dtype == torch.bfloat16,
                     slots=_ptr(s), slots_sb=s.stride(0), slot_cols=s.shape[1] if verify else 1, verify=verify,
                     num_accepted=_ptr(keep["acc"]), o=_ptr(out), o_sb=out.stride(0), o_st=out.stride(1),
                     o_sh=out.stride(2), B=B, T=T, H=H, scale=g.shape[-1] ** -0.5 if scale is None else scale,
                     has_lower_bound=lower_bound is not None, lower_bound=lower_bound or 0.0,
                     num_sms=sms_for_rows("decode", rows, B * H),
                     kernel=DECODE_KERNELS[kernel or os.environ.get("KDA_SERVING_DECODE_GRID")
                                           or ("auto" if rows is None else "rows")])
    return p


def decode(lib, rows: int, q, k, v, g, beta, A_log, dt_bias, state_pool, slots, num_accepted=None, *,
           lower_bound=None, scale=None, out=None, kernel=None):
    """One emulated decode / verify launch on [B, T, H, 128] inputs; slots [B] or [B, C].
    kernel: "auto", "rows" (the row-block kernel; ``rows`` value rows per CTA) or "heads" (the head
    kernel, T <= 8); None reads KDA_SERVING_DECODE_GRID as the binding does, and without it takes
    the row-block kernel when ``rows`` is given, else the launcher's choice."""
    out = torch.empty(v.shape, dtype=torch.bfloat16) if out is None else out
    keep = {}
    p = _decode_params(g, beta, A_log, dt_bias, state_pool, slots, num_accepted, lower_bound, scale, out, rows, keep,
                       kernel)
    p.q, p.k, p.v = _ptr(q), _ptr(k), _ptr(v)
    p.q_sb, p.q_st, p.q_sh = q.stride()[:3]
    p.k_sb, p.k_st, p.k_sh = k.stride()[:3]
    p.v_sb, p.v_st, p.v_sh = v.stride()[:3]
    if lib.emu_decode(C.byref(p)) != 0:
        raise RuntimeError("emulated decode launch failed")
    return out


def _conv_layer(x, weight, bias, conv_pool, D, keep, silu=True) -> ConvParams:
    keep.update(w=weight.contiguous(), b=bias.contiguous() if bias is not None else None)
    return ConvParams(weight=_ptr(keep["w"]), bias=_ptr(keep["b"]), weight_bf16=weight.dtype == torch.bfloat16,
                      pool=_ptr(conv_pool), pool_ss=conv_pool.stride(0), pool_sr=conv_pool.stride(1),
                      pool_sd=conv_pool.stride(2), pool_bf16=conv_pool.dtype == torch.bfloat16, D=D,
                      W=weight.shape[1], R=conv_pool.shape[1], silu=silu)


def conv_prefill(lib, x, weight, bias, cu_seqlens, conv_pool, slots, has_initial_state, out=None, silu=True):
    """Emulated causal_conv1d_prefill (+SiLU): x [T, D] bf16 -> out [T, D] bf16, pool updated."""
    out = torch.empty_like(x) if out is None else out
    keep = dict(slots=slots.to(torch.int32).contiguous(), has=has_initial_state.contiguous())
    p = _conv_layer(x, weight, bias, conv_pool, x.shape[1], keep, silu)
    p.x, p.x_st, p.y, p.y_st = _ptr(x), x.stride(0), _ptr(out), out.stride(0)
    p.slots, p.cu_seqlens, p.cu_seqlens_64 = _ptr(keep["slots"]), _ptr(cu_seqlens), cu_seqlens.dtype == torch.int64
    p.has_initial_state, p.total_tokens, p.N = _ptr(keep["has"]), x.shape[0], cu_seqlens.numel() - 1
    if lib.emu_conv(0, C.byref(p)) != 0:
        raise RuntimeError("emulated conv prefill launch failed")
    return out


def conv_update(lib, x, weight, bias, conv_pool, slots, num_accepted=None, out=None, silu=True, vec8_min_elems=0):
    """Emulated causal_conv1d_update (+SiLU): x [B, T, D] bf16 -> out, pool updated. vec8_min_elems:
    B * D from which the eight-channel kernel runs on aligned rows (0: always, the default here so
    small cases reach it; the extension uses kConvVec8MinElems)."""
    out = torch.empty_like(x) if out is None else out
    keep = dict(slots=slots.to(torch.int32).contiguous(),
                acc=num_accepted.to(torch.int32).contiguous() if num_accepted is not None else None)
    p = _conv_layer(x, weight, bias, conv_pool, x.shape[2], keep, silu)
    p.x, p.x_sb, p.x_st = _ptr(x), x.stride(0), x.stride(1)
    p.y, p.y_sb, p.y_st = _ptr(out), out.stride(0), out.stride(1)
    p.slots, p.num_accepted, p.N, p.T = _ptr(keep["slots"]), _ptr(keep["acc"]), x.shape[0], x.shape[1]
    p.vec8_min_elems = vec8_min_elems
    if lib.emu_conv(1, C.byref(p)) != 0:
        raise RuntimeError("emulated conv update launch failed")
    return out


def gated_rms_norm(lib, x, gate, weight, eps, out, vec=None):
    """Emulated gated_rms_norm on [M, H, 128] bf16 views (out may be x). vec: the 8-byte access
    path, None for what the binding picks (every row start 8-byte aligned)."""
    keep = dict(w=weight.contiguous())
    p = GatedRmsNormParams()
    p.x, p.gate, p.out = _ptr(x), _ptr(gate), _ptr(out)
    p.x_s0, p.x_s1 = x.stride()[:2]
    p.g_s0, p.g_s1 = gate.stride()[:2]
    p.o_s0, p.o_s1 = out.stride()[:2]
    p.M, p.H = x.shape[0], x.shape[1]
    p.weight, p.weight_bf16, p.eps = _ptr(keep["w"]), weight.dtype == torch.bfloat16, eps
    if vec is None:
        vec = all(t.data_ptr() % 8 == 0 and t.stride(0) % 4 == 0 and t.stride(1) % 4 == 0 for t in (x, gate, out))
    p.vec = vec
    if lib.emu_gated_rms_norm(C.byref(p)) != 0:
        raise RuntimeError("emulated gated RMSNorm launch failed")
    return out


def decode_fused(lib, rows: int, mixed_qkv, g, beta, A_log, dt_bias, conv_weight, conv_bias, conv_pool, state_pool,
                 slots, num_accepted=None, *, lower_bound=None, scale=None, out_gate=None, norm_weight=None,
                 norm_eps=1e-6, out=None, path=None, conv_out=None, kernel=None):
    """Emulated kda_decode_fused: conv update + decode / verify (+ gated RMSNorm) from mixed_qkv.
    rows: 8 / 16 / 32 value rows per CTA of the decode kernel, None for the launcher's choice.
    path: "auto" (the conv + decode pair for T <= 8), "rows" (the three-kernel path) or "single" (one
    kernel for T <= 8); None reads
    KDA_SERVING_FUSED_DECODE_PATH as the binding does. conv_out: the conv outputs' buffer (contiguous
    bf16, at least B*T*3*H*K elements), as the binding takes it; None allocates one. kernel: the pair
    path's decode kernel, as for decode()."""
    B, T, H = g.shape[:3]
    out = torch.empty(B, T, H, g.shape[-1], dtype=torch.bfloat16) if out is None else out
    keep = {}
    p = DecodeFusedParams()
    p.dec = _decode_params(g, beta, A_log, dt_bias, state_pool, slots, num_accepted, lower_bound, scale, out, rows,
                           keep, kernel)
    p.path = FUSED_PATHS[path or os.environ.get("KDA_SERVING_FUSED_DECODE_PATH") or "auto"]
    p.conv = _conv_layer(mixed_qkv, conv_weight, conv_bias, conv_pool, mixed_qkv.shape[2], keep)
    p.conv.x, p.conv.x_sb, p.conv.x_st = _ptr(mixed_qkv), mixed_qkv.stride(0), mixed_qkv.stride(1)
    p.conv.num_accepted, p.conv.N, p.conv.T = p.dec.num_accepted, B, T
    p.dec.conv_W, p.dec.conv_R = p.conv.W, p.conv.R
    D = mixed_qkv.shape[2]  # the pair path's conv outputs [B, T, D], packed
    keep["y"] = torch.empty(B * T * D, dtype=torch.bfloat16) if conv_out is None else conv_out
    if keep["y"].dtype != torch.bfloat16 or not keep["y"].is_contiguous() or keep["y"].numel() < B * T * D:
        raise ValueError("conv_out must be contiguous bf16 with at least B*T*D elements")
    p.conv.y, p.conv.y_sb, p.conv.y_st = _ptr(keep["y"]), T * D, D
    if out_gate is not None:
        keep["nw"] = norm_weight.contiguous()
        nm = p.dec.norm
        nm.gate, nm.gate_sb, nm.gate_st, nm.gate_sh = _ptr(out_gate), *out_gate.stride()[:3]
        nm.weight, nm.weight_bf16, nm.eps = _ptr(keep["nw"]), norm_weight.dtype == torch.bfloat16, norm_eps
    if lib.emu_decode_fused(C.byref(p)) != 0:
        raise RuntimeError("emulated fused decode launch failed")
    return out
