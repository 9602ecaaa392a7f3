"""A continuous-batching simulation: every request sees exactly what it would see alone."""

import random

import pytest
import torch

from kda_serving.backend import KDALayerParams, KDAStateCache, build_kda_batch, kda_mixer_forward
from tests.conftest import rel_rms

H, W = 2, 4
D = 32
# (device, activation dtype, head dim, tolerance): the CPU reference in fp32, and on a Hopper GPU
# the CUDA kernels, which take bf16 activations and head dim 128
# (the GPU setup twice: decodes through the conv update + decode pair, and through the fused call)
_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
SETUPS = [pytest.param(("cpu", torch.float32, 32, 1e-5, None), id="cpu"),
          pytest.param(("cuda", torch.bfloat16, 128, 5e-3, None), id="cuda", marks=_GPU),
          pytest.param(("cuda", torch.bfloat16, 128, 5e-3, "ops"), id="cuda-decode-ops", marks=_GPU)]


def make_params(lb, device="cpu", d=D):
    return KDALayerParams(num_heads=H, head_dim=d, conv_weight=torch.randn(3 * H * d, W, device=device) * 0.5,
                          conv_bias=torch.randn(3 * H * d, device=device) * 0.1,
                          A_log=torch.rand(H, device=device) - 0.5,
                          dt_bias=torch.randn(H * d, device=device), norm_weight=torch.rand(d, device=device) + 0.5,
                          norm_eps=1e-6, lower_bound=lb)


def make_stream(n, device="cpu", dtype=torch.float32, d=D):
    f = dict(device=device, dtype=dtype)
    return dict(x=torch.randn(n, 3 * H * d, **f), g=torch.randn(n, H, d, **f) * 4,
                beta=torch.randn(n, H, **f) * 2, gate=torch.randn(n, H, d, **f))


def make_cache(max_requests, spec, device="cpu", d=D, conv_dtype=torch.float32):
    return KDAStateCache(num_layers=1, max_requests=max_requests, num_heads=H, head_dim=d,
                         conv_width=W, num_spec_tokens=spec, conv_dtype=conv_dtype, device=device)


def run_alone(stream, params, spec, device="cpu", d=D, conv_dtype=torch.float32):
    cache = make_cache(1, spec, device, d, conv_dtype)
    slots = cache.allocate("r")
    n = stream["x"].shape[0]
    st = torch.tensor([slots] if spec else slots[:1], dtype=torch.int32, device=device)
    batch = build_kda_batch([0, n], [0], st, num_spec_tokens=spec, num_decodes=0 if spec else None)
    return kda_mixer_forward(stream["x"], stream["g"], stream["beta"], stream["gate"], params, batch,
                             cache.conv[0], cache.state[0])


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("spec", [0, 2])
@pytest.mark.parametrize("lb", [None, -5.0])
def test_every_request_matches_running_alone(setup, spec, lb, monkeypatch):
    device, dtype, d, tol, decode_kernel = setup
    if decode_kernel:
        monkeypatch.setenv("KDA_SERVING_DECODE_KERNEL", decode_kernel)
    else:
        monkeypatch.delenv("KDA_SERVING_DECODE_KERNEL", raising=False)
    rng = random.Random(torch.initial_seed())
    params = make_params(lb, device, d)
    L = 1 + spec
    reqs = {i: dict(stream=make_stream(rng.randint(3, 40), device, dtype, d), prompt=None, pos=0,
                    acc=1, outs=[]) for i in range(12)}
    for r in reqs.values():
        r["prompt"] = rng.randint(1, r["stream"]["x"].shape[0])
    cache = make_cache(6, spec, device, d, dtype)
    waiting, running = list(reqs), []
    steps = 0
    while waiting or running:
        steps += 1
        assert steps < 500
        while waiting and len(running) < 6 and rng.random() < 0.7:
            rid = waiting.pop(0)
            cache.allocate(rid)
            running.append(rid)
        dec = [i for i in running if reqs[i]["pos"] >= reqs[i]["prompt"]]
        pre = [i for i in running if reqs[i]["pos"] < reqs[i]["prompt"]]
        rows, qsl, ncomp, slots, acc, keep = [], [0], [], [], [], []
        for i in dec:   # decode-first, as engines order them
            r = reqs[i]
            s = r["stream"]
            left = s["x"].shape[0] - r["pos"]
            a = rng.randint(1, min(L, left))
            idx = list(range(r["pos"], r["pos"] + a))
            junk = make_stream(L - a, device, dtype, d)
            rows.append({k: torch.cat([s[k][idx], junk[k]]) for k in s})
            keep.append((i, qsl[-1], a))
            qsl.append(qsl[-1] + L)
            ncomp.append(r["pos"])
            slots.append(cache.slots_of(i))
            acc.append(r["acc"])
            r["next_acc"] = a
        for i in pre:
            r = reqs[i]
            n = rng.randint(1, r["prompt"] - r["pos"])
            rows.append({k: v[r["pos"]:r["pos"] + n] for k, v in r["stream"].items()})
            keep.append((i, qsl[-1], n))
            qsl.append(qsl[-1] + n)
            ncomp.append(r["pos"])
            slots.append(cache.slots_of(i))
        if not rows:
            continue
        pad_tokens = rng.randint(0, 3)
        rows.append(make_stream(pad_tokens, device, dtype, d))   # padding tokens at the end of the step
        qsl.append(qsl[-1])                       # and a zero-length padding request on slot 0
        ncomp.append(0)
        slots.append([0] * L)
        step = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
        st = torch.tensor(slots if spec else [s[0] for s in slots], dtype=torch.int32, device=device)
        batch = build_kda_batch(qsl, ncomp, st, num_spec_tokens=spec, num_decodes=len(dec),
                                num_accepted_tokens=torch.tensor(acc + [1] * (len(qsl) - 1 - len(acc)),
                                                                 dtype=torch.int32))
        out = torch.full((step["x"].shape[0], H, d), float("nan"), device=device, dtype=dtype)
        kda_mixer_forward(step["x"], step["g"], step["beta"], step["gate"], params, batch,
                          cache.conv[0], cache.state[0], out=out)
        assert torch.equal(out[qsl[-1]:], torch.zeros_like(out[qsl[-1]:]))
        for i, start, n in keep:
            r = reqs[i]
            r["outs"].append(out[start:start + n])
            r["pos"] += n
            if i in dec:
                r["acc"] = r["next_acc"]
            if r["pos"] == r["stream"]["x"].shape[0]:
                cache.release(i)
                running.remove(i)
    for i, r in reqs.items():
        alone = run_alone(r["stream"], params, spec, device, d, dtype)
        assert rel_rms(torch.cat(r["outs"]), alone) <= tol, f"request {i}"
    assert cache.num_free_slots == cache.num_slots - 1


def test_invalid_metadata_raises_before_state_changes():
    cache = make_cache(4, 0)
    for rid in range(3):
        cache.allocate(rid)
    params = make_params(None)
    s = make_stream(6)
    before = [t.clone() for t in (cache.conv[0], cache.state[0])]

    def run(qsl, ncomp, slots):
        batch = build_kda_batch(qsl, ncomp, torch.tensor(slots, dtype=torch.int32))
        kda_mixer_forward(s["x"], s["g"], s["beta"], s["gate"], params, batch, cache.conv[0], cache.state[0])

    with pytest.raises(ValueError, match="slot 9 out of range"):
        run([0, 1, 6], [3, 0], [1, 9])
    with pytest.raises(ValueError, match="state_slots: a slot is used by more than one request"):
        run([0, 1, 6], [3, 0], [2, 2])
    with pytest.raises(ValueError, match="query_start_loc: expected non-decreasing"):
        run([0, 4, 2], [3, 0], [1, 2])
    with pytest.raises(ValueError, match="num_computed_tokens: expected 2 entries"):
        run([0, 1, 6], [3], [1, 2])
    with pytest.raises(ValueError, match="batch: 8 tokens of work but mixed_qkv has 6 rows"):
        run([0, 1, 8], [3, 0], [1, 2])
    with pytest.raises(TypeError, match="state_slots: expected an int32/int64 tensor"):
        build_kda_batch([0, 6], [0], torch.tensor([1.0]))
    with pytest.raises(ValueError, match="num_decodes: required when num_spec_tokens > 0"):
        build_kda_batch([0, 2], [1], torch.tensor([[1, 2]]), num_spec_tokens=1)
    assert torch.equal(cache.conv[0], before[0]) and torch.equal(cache.state[0], before[1])


def test_state_cache_slots_forks_and_accounting():
    cache = KDAStateCache(num_layers=2, max_requests=2, num_heads=H, head_dim=D, num_spec_tokens=1)
    a, b = cache.allocate("a"), cache.allocate("b")
    assert 0 not in a + b and len(set(a + b)) == 4
    with pytest.raises(RuntimeError, match="full"):
        cache.allocate("c")
    cache.state[1][a[0]] = 3.0
    cache.copy_slot(a[0], b[0])
    assert torch.equal(cache.state[1][b[0]], cache.state[1][a[0]])
    with pytest.raises(ValueError, match="dst: slot 0 out of range"):
        cache.copy_slot(a[0], 0)
    cache.release("a")
    assert cache.allocate("c") and torch.count_nonzero(cache.state[1][cache.slots_of("c")]) == 0
    per = H * D * D * 4 + 3 * 3 * H * D * 2
    # with one draft token a request holds 2 slots, each with W-1+1 conv rows
    assert cache.bytes_per_request_per_layer() == 2 * (H * D * D * 4 + 4 * 3 * H * D * 2)
    assert KDAStateCache.state_bytes(H, D) == per
    # Kimi-Linear-48B at TP1: 32 heads x 128 -> 2,097,152 B fp32 state + 73,728 B bf16 conv state
    assert KDAStateCache.state_bytes(32, 128) == 2_097_152 + 73_728
    assert KDAStateCache.requests_fitting(10 * per + 5, per) == 10
