"""Every bad input raises a clear error naming the argument, and leaves the pools untouched."""

import pytest
import torch

from kda_serving import ops
from tests.ops.helpers import cu_from_lens, kda_inputs


def prefill_args():
    q, k, v, g, beta, A_log, dt = kda_inputs(10, 2, 32)
    return dict(q=q, k=k, v=v, g=g, beta=beta, A_log=A_log, dt_bias=dt,
                cu_seqlens=cu_from_lens([4, 6]), state_pool=torch.full((4, 2, 32, 32), 1e30),
                slots=torch.tensor([1, 2], dtype=torch.int32),
                has_initial_state=torch.tensor([True, False]))


def call_prefill(a):
    a = dict(a)
    pos = [a.pop(n) for n in ("q", "k", "v", "g", "beta", "A_log", "dt_bias")]
    return ops.kda_prefill(*pos, **a)


BAD_PREFILL = [
    ("q", lambda a: a["q"].double(), TypeError, "q: expected dtype"),
    ("k", lambda a: a["k"][:, :1], ValueError, "k: expected shape"),
    ("v", lambda a: a["v"][:5], ValueError, "v: expected shape"),
    ("g", lambda a: a["g"][..., :16], ValueError, "g: expected shape"),
    ("beta", lambda a: a["beta"][:, None], ValueError, "beta: expected shape"),
    ("A_log", lambda a: a["A_log"].double(), TypeError, "A_log: expected dtype float32"),
    ("A_log", lambda a: a["A_log"][:1], ValueError, "A_log: expected 2 elements"),
    ("dt_bias", lambda a: a["dt_bias"][:-1], ValueError, "dt_bias: expected 64 elements"),
    ("cu_seqlens", lambda a: a["cu_seqlens"].float(), TypeError, "cu_seqlens: expected dtype"),
    ("cu_seqlens", lambda a: torch.tensor([0, 6, 4], dtype=torch.int32), ValueError, "cu_seqlens: expected non-decreasing"),
    ("cu_seqlens", lambda a: torch.tensor([0, 4, 9], dtype=torch.int32), ValueError, "to 10 tokens"),
    ("state_pool", lambda a: a["state_pool"].half(), TypeError, "state_pool: expected dtype"),
    ("state_pool", lambda a: a["state_pool"][:, :1], ValueError, "state_pool: expected shape"),
    ("slots", lambda a: a["slots"][:1], ValueError, "slots: expected shape [2]"),
    ("slots", lambda a: torch.tensor([1, 4], dtype=torch.int32), ValueError, "slots: slot 4 out of range"),
    ("slots", lambda a: torch.tensor([2, 2], dtype=torch.int32), ValueError, "slots: a slot appears more than once"),
    ("slots", lambda a: a["slots"].float(), TypeError, "slots: expected dtype"),
    ("has_initial_state", lambda a: a["has_initial_state"].int(), TypeError, "has_initial_state: expected dtype bool"),
    ("lower_bound", lambda a: -6.0, ValueError, "lower_bound: expected None or a float in [-5, 0)"),
    ("lower_bound", lambda a: 0.0, ValueError, "lower_bound"),
    ("scale", lambda a: -1.0, ValueError, "scale: expected a positive float"),
    ("intermediate_states", lambda a: torch.zeros(2, 2, 32, 32), ValueError, "intermediate_offsets: expected"),
    ("out", lambda a: torch.empty(10, 2, 31), ValueError, "out: expected shape"),
]


@pytest.mark.parametrize("name,mutate,exc,msg", BAD_PREFILL, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_PREFILL)])
def test_bad_prefill_argument_raises_and_writes_nothing(name, mutate, exc, msg):
    a = prefill_args()
    pool = a["state_pool"]
    before = pool.clone()
    a[name] = mutate(a)
    with pytest.raises(exc, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        call_prefill(a)
    assert torch.equal(pool, before)


def test_good_prefill_args_pass():
    call_prefill(prefill_args())


def test_bad_decode_arguments():
    q, k, v, g, beta, A_log, dt = kda_inputs(2, 2, 32, lead=(3,))
    pool = torch.full((8, 2, 32, 32), 1e30)
    before = pool.clone()
    with pytest.raises(ValueError, match=r"slots: expected shape \[3, C >= 2\] for verify"):
        ops.kda_decode(q, k, v, g, beta, A_log, dt, state_pool=pool, slots=torch.zeros(3, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="num_accepted_tokens: only valid with 2-D slots"):
        ops.kda_decode(q[:, :1], k[:, :1], v[:, :1], g[:, :1], beta[:, :1], A_log, dt, state_pool=pool,
                       slots=torch.tensor([1, 2, 3]), num_accepted_tokens=torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"num_accepted_tokens: expected values in \[1, 2\]"):
        ops.kda_decode(q, k, v, g, beta, A_log, dt, state_pool=pool,
                       slots=torch.tensor([[1, 2], [3, 4], [5, 6]]), num_accepted_tokens=torch.tensor([1, 3, 1]))
    with pytest.raises(TypeError, match="q: expected a torch.Tensor"):
        ops.kda_decode(None, k, v, g, beta, A_log, dt, state_pool=pool, slots=torch.tensor([1, 2, 3]))
    assert torch.equal(pool, before)


def test_bad_conv_arguments():
    x = torch.randn(6, 8)
    pool = torch.zeros(3, 3, 8)
    with pytest.raises(ValueError, match=r"weight: expected shape \[8, W\]"):
        ops.causal_conv1d_prefill(x, torch.randn(8, 6), cu_seqlens=cu_from_lens([6]), conv_pool=pool,
                                  slots=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"conv_pool: expected shape \[S, R >= 3, 8\]"):
        ops.causal_conv1d_prefill(x, torch.randn(8, 4), cu_seqlens=cu_from_lens([6]),
                                  conv_pool=torch.zeros(3, 2, 8), slots=torch.tensor([1]))
    with pytest.raises(ValueError, match="activation: expected 'silu' or None"):
        ops.causal_conv1d_update(x[None], torch.randn(8, 4), conv_pool=pool, slots=torch.tensor([1]),
                                 activation="relu")
