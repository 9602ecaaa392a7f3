"""kda_decode_fused equals conv update → decode → gated RMSNorm composed by hand from the public ops."""

import pytest
import torch

from kda_serving import ops
from tests.conftest import rel_rms
from tests.ops.helpers import kda_inputs

H, K = 2, 32
C = 3 * H * K


def layer(W=4, R=None, S=12, pool_dtype=torch.float32, bias=True):
    """Conv weights and both pools; pools filled with random history / states, slot 0 with 1e30."""
    R = W - 1 if R is None else R
    conv_weight = torch.randn(C, W) * 0.5
    conv_bias = torch.randn(C) if bias else None
    conv_pool = torch.randn(S, R, C)
    state_pool = (torch.randn(S, H, K, K) * 0.3).to(pool_dtype)
    conv_pool[0] = 1e30
    state_pool[0] = 1e30
    return conv_weight, conv_bias, conv_pool, state_pool


def step_inputs(B, T, strided=True):
    _, _, _, g, beta, A_log, dt = kda_inputs(T, H, K, lead=(B,))
    x = torch.randn(B, T, C + 8)
    mixed = x[..., 4:4 + C] if strided else x[..., :C].contiguous()  # rows strided as engines give them
    out_gate = torch.randn(B, T, H, K)
    norm_weight = torch.rand(K) + 0.5
    return mixed, g, beta, A_log, dt, out_gate, norm_weight


def composed(mixed, g, beta, A_log, dt, cw, cb, conv_pool, state_pool, slots, acc, lb, gate, nw, eps):
    """The unfused path, from the public ops (as the mixer composes it)."""
    conv_slots = slots[:, 0] if slots.dim() == 2 else slots
    x = ops.causal_conv1d_update(mixed, cw, cb, conv_pool=conv_pool, slots=conv_slots,
                                 num_accepted_tokens=acc)
    P = H * K
    q, k, v = (x[..., i * P:(i + 1) * P].unflatten(-1, (H, K)) for i in range(3))
    o = ops.kda_decode(q, k, v, g, beta, A_log, dt, state_pool=state_pool, slots=slots,
                       num_accepted_tokens=acc, lower_bound=lb)
    if gate is not None:
        o = ops.gated_rms_norm(o, gate, nw, eps)
    return o


@pytest.mark.parametrize("lb", [None, -5.0])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("W", [2, 4])
def test_decode_equals_composition(lb, pool_dtype, norm, W):
    B, T = 5, 1
    cw, cb, cpool, spool = layer(W=W, pool_dtype=pool_dtype)
    mixed, g, beta, A_log, dt, gate, nw = step_inputs(B, T)
    slots = torch.tensor([3, 0, 7, -1, 1], dtype=torch.int32)
    ref_c, ref_s = cpool.clone(), spool.clone()
    ref = composed(mixed, g, beta, A_log, dt, cw, cb, ref_c, ref_s, slots, None, lb,
                   gate if norm else None, nw, 1e-6)
    out = torch.full((B, T, H, K), float("nan"))
    got = ops.kda_decode_fused(mixed, g, beta, A_log, dt, conv_weight=cw, conv_bias=cb, conv_pool=cpool,
                               state_pool=spool, slots=slots, lower_bound=lb,
                               out_gate=gate if norm else None, norm_weight=nw if norm else None, out=out)
    assert got is out
    assert rel_rms(out, ref) <= 1e-6
    assert torch.equal(cpool, ref_c)
    assert rel_rms(spool, ref_s) <= 1e-6
    for n in (1, 3):  # null rows: zero output
        assert torch.equal(out[n], torch.zeros_like(out[n]))
    for s in (0, 2, 4, 5, 6, 8, 9, 10, 11):  # untouched slots stay bit-identical
        assert torch.equal(cpool[s], ref_c[s]) and torch.equal(spool[s], ref_s[s])
    assert (cpool[0] == 1e30).all() and (spool[0] == 1e30).all()


@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("norm", [False, True])
def test_verify_with_num_accepted_equals_composition(W, norm):
    B, T = 4, 3
    cw, cb, cpool, spool = layer(W=W, R=W - 1 + T - 1, S=16, bias=W != 3)
    mixed, g, beta, A_log, dt, gate, nw = step_inputs(B, T)
    slots = torch.tensor([[1, 2, 3], [4, 5, 6], [0, 0, 0], [10, 11, 12]], dtype=torch.int32)
    acc = torch.tensor([1, 3, 2, 2], dtype=torch.int32)
    ref_c, ref_s = cpool.clone(), spool.clone()
    ref = composed(mixed, g, beta, A_log, dt, cw, cb, ref_c, ref_s, slots, acc, None,
                   gate if norm else None, nw, 1e-5)
    out = ops.kda_decode_fused(mixed, g, beta, A_log, dt, conv_weight=cw, conv_bias=cb, conv_pool=cpool,
                               state_pool=spool, slots=slots, num_accepted_tokens=acc,
                               out_gate=gate if norm else None, norm_weight=nw if norm else None,
                               norm_eps=1e-5)
    assert rel_rms(out, ref) <= 1e-6
    assert torch.equal(cpool, ref_c)
    assert rel_rms(spool, ref_s) <= 1e-6
    assert torch.equal(out[2], torch.zeros_like(out[2]))


def test_verify_equals_sequential_fused_decodes():
    """A verify step of T tokens = T single-token fused steps (conv window and state carried)."""
    B, T, W = 3, 3, 4
    cw, cb, cpool, spool = layer(W=W, R=W - 1 + T - 1, S=16)
    mixed, g, beta, A_log, dt, _, _ = step_inputs(B, T)
    slots = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=torch.int32)
    acc = torch.ones(B, dtype=torch.int32)
    # single-token steps on a second pool pair with R = W-1 (window at rows [0, W-1))
    seq_c = cpool[:, :W - 1].clone()
    seq_s = spool.clone()
    work = torch.tensor([13, 14, 15], dtype=torch.int32)
    seq_s[work.long()] = seq_s[slots[:, 0].long()]
    seq_c[work.long()] = seq_c[slots[:, 0].long()]
    out = ops.kda_decode_fused(mixed, g, beta, A_log, dt, conv_weight=cw, conv_bias=cb, conv_pool=cpool,
                               state_pool=spool, slots=slots, num_accepted_tokens=acc)
    for t in range(T):
        o = ops.kda_decode_fused(mixed[:, t:t + 1], g[:, t:t + 1], beta[:, t:t + 1], A_log, dt,
                                 conv_weight=cw, conv_bias=cb, conv_pool=seq_c, state_pool=seq_s,
                                 slots=work)
        assert rel_rms(out[:, t:t + 1], o) <= 1e-6
        assert rel_rms(spool[slots[:, t].long()], seq_s[work.long()]) <= 1e-6
    # the verify row keeps the last R inputs: its last W-1 rows are the sequential window
    assert torch.equal(cpool[slots[:, 0].long(), -(W - 1):], seq_c[work.long()])


def test_null_rows_touch_nothing():
    """Start slot <= 0 (via num_accepted) or conv slot <= 0: zero output, neither pool touched."""
    B, T = 3, 2
    cw, cb, cpool, spool = layer(R=4)
    mixed, g, beta, A_log, dt, gate, nw = step_inputs(B, T)
    slots = torch.tensor([[2, 0], [0, 5], [6, 7]], dtype=torch.int32)
    acc = torch.tensor([2, 2, 1], dtype=torch.int32)  # row 0: start slot 0; row 1: conv slot 0
    before_c, before_s = cpool.clone(), spool.clone()
    out = ops.kda_decode_fused(mixed, g, beta, A_log, dt, conv_weight=cw, conv_bias=cb, conv_pool=cpool,
                               state_pool=spool, slots=slots, num_accepted_tokens=acc, out_gate=gate,
                               norm_weight=nw)
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))
    assert out[2].abs().sum() > 0
    for s in range(cpool.shape[0]):
        if s not in (6, 7):
            assert torch.equal(cpool[s], before_c[s]) and torch.equal(spool[s], before_s[s])
    assert torch.equal(cpool[7], before_c[7])  # conv state lives in the row's first slot only


def test_default_out_dtype_and_bf16_inputs():
    B, T = 2, 1
    cw, cb, cpool, spool = layer()
    mixed, g, beta, A_log, dt, gate, nw = step_inputs(B, T)
    mixed, g, beta, gate = (t.bfloat16() for t in (mixed, g, beta, gate))
    slots = torch.tensor([2, 4], dtype=torch.int64)
    ref_c, ref_s = cpool.clone(), spool.clone()
    ref = composed(mixed, g, beta, A_log, dt, cw, cb, ref_c, ref_s, slots, None, None, gate, nw, 1e-6)
    out = ops.kda_decode_fused(mixed, g, beta, A_log, dt, conv_weight=cw, conv_bias=cb, conv_pool=cpool,
                               state_pool=spool, slots=slots, out_gate=gate, norm_weight=nw)
    assert out.dtype == torch.bfloat16 and out.shape == (B, T, H, K)
    assert torch.equal(out, ref)
    assert torch.equal(cpool, ref_c)


def fused_args():
    B, T = 2, 2
    cw, cb, cpool, spool = layer(R=4, S=6)
    mixed, g, beta, A_log, dt, gate, nw = step_inputs(B, T)
    return dict(mixed_qkv=mixed, g=g, beta=beta, A_log=A_log, dt_bias=dt, conv_weight=cw, conv_bias=cb,
                conv_pool=cpool, state_pool=spool, slots=torch.tensor([[1, 2], [3, 4]], dtype=torch.int32),
                num_accepted_tokens=torch.tensor([1, 2], dtype=torch.int32), out_gate=gate, norm_weight=nw)


def call_fused(a):
    a = dict(a)
    pos = [a.pop(n) for n in ("mixed_qkv", "g", "beta", "A_log", "dt_bias")]
    return ops.kda_decode_fused(*pos, **a)


BAD = [
    ("mixed_qkv", lambda a: a["mixed_qkv"].double(), TypeError, "mixed_qkv: expected dtype"),
    ("mixed_qkv", lambda a: a["mixed_qkv"][..., :-1], ValueError, "mixed_qkv: expected shape [2, 2, 192]"),
    ("mixed_qkv", lambda a: a["mixed_qkv"][0], ValueError, "mixed_qkv: expected 3 dims"),
    ("g", lambda a: a["g"][:, :1], ValueError, "g: expected shape"),
    ("beta", lambda a: a["beta"][..., :1], ValueError, "beta: expected shape"),
    ("A_log", lambda a: a["A_log"][:1], ValueError, "A_log: expected 2 elements"),
    ("dt_bias", lambda a: a["dt_bias"][:-1], ValueError, "dt_bias: expected 64 elements"),
    ("conv_weight", lambda a: a["conv_weight"][:, :1], ValueError, "conv_weight: expected shape [192, W]"),
    ("conv_weight", lambda a: a["conv_weight"][:-1], ValueError, "conv_weight: expected shape"),
    ("conv_bias", lambda a: a["conv_bias"].bfloat16(), TypeError, "conv_bias: expected dtype float32"),
    ("conv_bias", lambda a: a["conv_bias"][:-1], ValueError, "conv_bias: expected shape [192]"),
    ("conv_pool", lambda a: a["conv_pool"][:, :2], ValueError, "conv_pool: expected shape [S, R >= 3, 192]"),
    ("conv_pool", lambda a: a["conv_pool"].int(), TypeError, "conv_pool: expected dtype"),
    ("state_pool", lambda a: a["state_pool"][:, :1], ValueError, "state_pool: expected shape"),
    ("slots", lambda a: a["slots"][:, :1], ValueError, "slots: expected shape [2, C >= 2] for verify"),
    ("slots", lambda a: torch.tensor([[1, 2], [3, 6]], dtype=torch.int32), ValueError, "slots: slot 6 out of range"),
    ("slots", lambda a: torch.tensor([[1, 2], [2, 4]], dtype=torch.int32), ValueError, "more than once"),
    ("num_accepted_tokens", lambda a: torch.tensor([1, 3], dtype=torch.int32), ValueError,
     "num_accepted_tokens: expected values in [1, 2]"),
    ("num_accepted_tokens", lambda a: a["num_accepted_tokens"].float(), TypeError, "num_accepted_tokens: expected dtype"),
    ("out_gate", lambda a: a["out_gate"][..., :4], ValueError, "out_gate: expected shape"),
    ("out_gate", lambda a: None, ValueError, "out_gate: expected a tensor"),
    ("norm_weight", lambda a: None, ValueError, "norm_weight: expected a tensor"),
    ("norm_weight", lambda a: a["norm_weight"][:4], ValueError, "norm_weight: expected shape [32]"),
    ("norm_eps", lambda a: 0.0, ValueError, "norm_eps: expected a positive float"),
    ("lower_bound", lambda a: 1.0, ValueError, "lower_bound: expected None"),
    ("scale", lambda a: -1.0, ValueError, "scale: expected a positive float"),
    ("out", lambda a: torch.empty(2, 2, 2, 16), ValueError, "out: expected shape [2, 2, 2, 32]"),
]


@pytest.mark.parametrize("name,bad,exc,msg", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_arguments_raise_before_any_write(name, bad, exc, msg):
    a = fused_args()
    a[name] = bad(a)
    before_c, before_s = a["conv_pool"].clone(), a["state_pool"].clone()
    with pytest.raises(exc, match=msg.replace("[", r"\[").replace("]", r"\]")):
        call_fused(a)
    # the pools of the good arguments are untouched (a bad pool argument is a different tensor)
    if name not in ("conv_pool", "state_pool"):
        assert torch.equal(a["conv_pool"], before_c) and torch.equal(a["state_pool"], before_s)


def test_num_accepted_needs_2d_slots_and_fitting_conv_window():
    a = fused_args()
    a["slots"] = a["slots"][:, 0].contiguous()
    with pytest.raises(ValueError, match="num_accepted_tokens: only valid with 2-D slots"):
        call_fused(a)
    a = fused_args()
    a["conv_pool"] = a["conv_pool"][:, :3].contiguous()  # R = W-1: no room for an offset window
    with pytest.raises(ValueError, match=r"num_accepted_tokens: expected values in \[1, 1\]"):
        call_fused(a)


def test_zero_rows():
    cw, cb, cpool, spool = layer()
    mixed, g, beta, A_log, dt, _, _ = step_inputs(0, 1)
    out = ops.kda_decode_fused(mixed, g, beta, A_log, dt, conv_weight=cw, conv_bias=cb, conv_pool=cpool,
                               state_pool=spool, slots=torch.zeros(0, dtype=torch.int32))
    assert out.shape == (0, 1, H, K)
