#!/usr/bin/env python
"""vLLM end to end: vLLM's in-tree KDA vs kda-serving's plugin on Kimi-Linear with dummy weights.

For each engine (``intree``: ``VLLM_PLUGINS=`` so no plugin loads; ``ours``: the kda_serving
plugin) a fresh interpreter runs the offline ``LLM`` measurements and exits (so the GPU memory
is freed), then a fresh OpenAI server is started and measured through HTTP. One JSON record
(``benchmarks/results/vllm_e2e_<device>_<time>.json``) and a markdown table come out of one run:

1. agreement: raw logits (``logprobs_mode=raw_logits``, top-K) of the first generated tokens on
   fixed prompts, with deterministic weights of a usable scale (vLLM's dummy loader is patched in
   every vLLM process through a generated ``sitecustomize.py``; ``--vllm-dummy-weights`` keeps
   vLLM's near-zero ones); relative error ||a-b||/||a|| over the ids both engines rank in their top-K,
   and the greedy tokens;
2. prefill: time to first token (max_tokens=1) and prompt tokens/s for 1x32K, 1x128K, 16x8K;
3. decode tokens/s at batch 1, 16, 64: B*(N-1) / (t(N tokens) - t(1 token));
4. server: TTFT of a streamed /v1/completions request (token-id prompts) for 1x8K and 1x32K.

Usage (GPU):
    python scripts/vllm_e2e.py                       # real 48B config, layers picked to fit
    python scripts/vllm_e2e.py --layers 27           # the whole model (one H200, ~98 GB weights)
    python scripts/vllm_e2e.py --quick               # smoke: small shapes
CPU smoke (vllm-cpu 0.32, the tiny config; vLLM's in-tree KDA needs Triton on a GPU):
    python scripts/vllm_e2e.py --quick --engines ours
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "benchmarks" / "results"
# the plugin's layer logs "... runs KDAServingKimiDeltaAttention" where vLLM binds the state pools
# through the layer (0.32); every vLLM logs which path our ops take on their first call
OUR_LAYER_LOG = re.compile(r"runs KDAServingKimiDeltaAttention|kda_serving\.kda_(prefill|decode\w*) runs the ")
GiB = 1 << 30

FULL = dict(agree_lens=[128, 1024, 8192, 32768], agree_steps=4, topk=20,
            prefill={"1x32K": (1, 32768), "1x128K": (1, 131072 - 64), "16x8K": (16, 8192)},
            decode_batches=[1, 16, 64], decode_prompt=512, decode_tokens=128,
            server={"1x8K": 8192, "1x32K": 32768}, reps=3, max_model_len=131072)
QUICK = dict(agree_lens=[16, 96], agree_steps=3, topk=8,
             prefill={"1x512": (1, 512), "1x2K": (1, 2048), "4x256": (4, 256)},
             decode_batches=[1, 4], decode_prompt=32, decode_tokens=8,
             server={"1x256": 256}, reps=1, max_model_len=4096)


# ----------------------------------------------------------------------------- helpers

def has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def device_info() -> dict:
    import torch
    info = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        from importlib.metadata import version
        info["vllm"] = next((version(d) for d in ("vllm", "vllm-cpu") if _dist_exists(d)), None)
    except Exception:  # noqa: BLE001
        info["vllm"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, device_memory_gib=round(p.total_memory / GiB, 1),
                    capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda)
    else:
        import platform
        info.update(device=f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                    device_memory_gib=None)
    return info


def _dist_exists(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version
    try:
        version(name)
        return True
    except PackageNotFoundError:
        return False


def weight_bytes(config: dict) -> int:
    from kda_serving.checkpoints.layout import total_params
    return total_params(config) * 2  # bf16


def pick_layers(config: dict, gpu_bytes: int, reserve_bytes: int, utilization: float) -> int:
    """The most layers (3:1 KDA:MLA, last MLA) whose bf16 weights leave ``reserve_bytes`` of the
    engine's share of the GPU for KV cache, KDA states and activations."""
    from kda_serving.checkpoints import with_num_layers
    budget = gpu_bytes * utilization - reserve_bytes
    best = None
    for n in range(4, config["num_hidden_layers"] + 1):
        if weight_bytes(with_num_layers(config, n)) <= budget:
            best = n
    if best is None:
        raise SystemExit(f"even 4 layers ({weight_bytes(with_num_layers(config, 4)) / GiB:.1f} GiB) do not fit "
                         f"{gpu_bytes / GiB:.0f} GiB minus {reserve_bytes / GiB:.0f} GiB reserve")
    return best


def write_model_dir(config: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def base_env(engine: str, cpu: bool) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", VLLM_HOST_IP="127.0.0.1",
               TOKENIZERS_PARALLELISM="false")
    if cpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        env["VLLM_KIMI_K3_GEMM_AR"] = "0"
    else:
        import importlib.util
        if importlib.util.find_spec("flashinfer") is None:  # vLLM 0.26 wheels carried without it
            env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    if engine == "ours":
        from kda_serving.serve import plugin_env
        env.pop("VLLM_PLUGINS", None)
        env = plugin_env(env)
        env["VLLM_PLUGINS"] = "kda_serving"
    else:
        env["VLLM_PLUGINS"] = ""  # an empty allow-list: no general plugin loads
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def prompts(seed: int, lens: list[int], vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    hi = min(vocab, 150000) - 1
    return [[rng.randint(100, hi) for _ in range(n)] for n in lens]


# ----------------------------------------------------------------------------- child: offline

def scaled_init(name: str, p) -> None:
    """Deterministic weights of a usable scale, by full parameter name (vLLM's dummy weights are
    U(-1e-3, 1e-3) everywhere, norms included, which makes every layer's contribution to the
    logits vanish and an agreement check meaningless)."""
    import zlib

    import torch
    # drawn on the parameter's device: a CPU generator took 150 s for 12 GiB of weights
    dev = p.device
    g = torch.Generator(device=dev).manual_seed(zlib.crc32(name.encode()))
    shape = tuple(p.shape)
    kw = dict(generator=g, device=dev)
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        t = 1 + 0.1 * torch.randn(shape, **kw)
    elif name.endswith("A_log"):
        t = torch.empty(shape, device=dev).uniform_(0, 2.7, generator=g)
    elif name.endswith("dt_bias") or "bias" in name.rsplit(".", 1)[-1]:
        t = 0.5 * torch.randn(shape, **kw)
    elif "conv1d" in name:
        t = torch.randn(shape, **kw) / shape[-1] ** 0.5
    elif len(shape) >= 2:
        t = torch.randn(shape, **kw) / shape[-1] ** 0.5
    else:
        t = 0.1 * torch.randn(shape, **kw)
    with torch.no_grad():
        p.copy_(t.to(p.dtype))


SITECUSTOMIZE = """\
import os, sys
if os.environ.get("KDA_E2E_SCALED_WEIGHTS") == "1":
    sys.path.insert(0, {scripts!r})
    sys.path.insert(0, {root!r})
    from kda_serving.integrations.vllm.import_hook import when_imported
    import vllm_e2e
    when_imported("vllm.model_executor.model_loader.dummy_loader", vllm_e2e.patch_dummy_loader)
"""


def scaled_weights_path(work: Path) -> str:
    """A folder whose ``sitecustomize.py`` patches vLLM's dummy loader in every process vLLM
    starts (engine core, workers), when KDA_E2E_SCALED_WEIGHTS=1; the loader module itself is
    patched only when vLLM imports it."""
    d = work / "site"
    d.mkdir(parents=True, exist_ok=True)
    (d / "sitecustomize.py").write_text(SITECUSTOMIZE.format(scripts=str(Path(__file__).resolve().parent),
                                                             root=str(ROOT)))
    return str(d)


def patch_dummy_loader(module=None) -> None:
    """After vLLM's dummy init, and before its post-load processing, give every parameter
    ``scaled_init`` values."""
    if module is None:
        from vllm.model_executor.model_loader import dummy_loader as module
    DummyModelLoader = module.DummyModelLoader
    if getattr(DummyModelLoader, "_kda_e2e_scaled", False):
        return
    original = DummyModelLoader.load_weights

    def load_weights(self, model, model_config):
        original(self, model, model_config)
        for name, p in model.named_parameters():
            if p.numel():
                scaled_init(name, p)
    DummyModelLoader.load_weights = load_weights
    DummyModelLoader._kda_e2e_scaled = True


def child_offline(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    shapes, vocab = spec["shapes"], spec["vocab"]
    llm = LLM(model=spec["model"], load_format="dummy", skip_tokenizer_init=True, seed=0,
              logprobs_mode="raw_logits", enable_prefix_caching=False, **spec["engine"])
    sched = llm.llm_engine.vllm_config.scheduler_config
    res = {"max_num_batched_tokens": sched.max_num_batched_tokens}

    def run(ps, max_tokens, logprobs=None):
        sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs)
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in ps], sp, use_tqdm=False)
        return time.perf_counter() - t0, outs

    seed = iter(range(1000, 100000))
    # agreement (also the first warm-up)
    _, outs = run(prompts(7, shapes["agree_lens"], vocab), shapes["agree_steps"], shapes["topk"])
    res["agreement"] = [{"tokens": list(o.outputs[0].token_ids),
                         "logits": [{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]}
                        for o in outs]
    # prefill: warm each shape once, then time fresh prompts
    res["prefill"] = {}
    for name, (b, n) in shapes["prefill"].items():
        run(prompts(next(seed), [n] * b, vocab), 1)
        ts = [run(prompts(next(seed), [n] * b, vocab), 1)[0] for _ in range(shapes["reps"])]
        t = statistics.median(ts)
        res["prefill"][name] = {"batch": b, "prompt_len": n, "ttft_s": t, "prefill_tok_s": b * n / t, "samples_s": ts}
    # decode
    res["decode"] = {}
    N = shapes["decode_tokens"]
    for b in shapes["decode_batches"]:
        run(prompts(next(seed), [shapes["decode_prompt"]] * b, vocab), N)
        samples = []
        for _ in range(shapes["reps"]):
            t1, _ = run(prompts(next(seed), [shapes["decode_prompt"]] * b, vocab), 1)
            tn, outs = run(prompts(next(seed), [shapes["decode_prompt"]] * b, vocab), N)
            assert all(len(o.outputs[0].token_ids) == N for o in outs)
            samples.append(b * (N - 1) / max(tn - t1, 1e-9))
        res["decode"][f"B{b}"] = {"batch": b, "prompt_len": shapes["decode_prompt"], "new_tokens": N,
                                  "decode_tok_s": statistics.median(samples), "samples_tok_s": samples}
    return res


# ----------------------------------------------------------------------------- server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_ttft(port: int, model: str, prompt: list[int], max_tokens: int, timeout: float) -> tuple[float, float]:
    """(TTFT, total seconds) of one streamed /v1/completions request with a token-id prompt."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "ignore_eos": True, "return_token_ids": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:2000]!r}")
    ttft = None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if ttft is None and chunk.get("choices"):
            ttft = time.perf_counter() - t0
    total = time.perf_counter() - t0
    conn.close()
    if ttft is None:
        raise RuntimeError("the stream carried no choices")
    return ttft, total


def run_server(engine: str, spec: dict, env: dict, log_path: Path, timeout: float) -> dict:
    port = free_port()
    e = spec["engine"]
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", spec["model"],
           "--served-model-name", "m", "--host", "127.0.0.1", "--port", str(port), "--load-format", "dummy",
           "--skip-tokenizer-init", "--no-enable-prefix-caching", "--seed", "0",
           "--max-model-len", str(e["max_model_len"]), "--max-num-seqs", str(e["max_num_seqs"]),
           "--gpu-memory-utilization", str(e.get("gpu_memory_utilization", 0.9)),
           "--tensor-parallel-size", str(e.get("tensor_parallel_size", 1))]
    if e.get("enforce_eager"):
        cmd.append("--enforce-eager")
    if e.get("max_num_batched_tokens"):
        cmd += ["--max-num-batched-tokens", str(e["max_num_batched_tokens"])]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready after {timeout}s; see {log_path}")
            time.sleep(2)
        out = {}
        seeds = iter(range(5000, 9000))
        for name, n in spec["shapes"]["server"].items():
            stream_ttft(port, "m", prompts(next(seeds), [n], spec["vocab"])[0], 2, timeout)  # warm-up
            samples = [stream_ttft(port, "m", prompts(next(seeds), [n], spec["vocab"])[0], 2, timeout)
                       for _ in range(spec["shapes"]["reps"])]
            out[name] = {"prompt_len": n, "ttft_s": statistics.median(s[0] for s in samples),
                         "samples_ttft_s": [s[0] for s in samples]}
        return out
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


# ----------------------------------------------------------------------------- comparison

def compare(ref: list[dict], other: list[dict]) -> dict:
    rows = []
    for i, (a, b) in enumerate(zip(ref, other)):
        steps = []
        for s, (la, lb) in enumerate(zip(a["logits"], b["logits"])):
            if a["tokens"][:s] != b["tokens"][:s]:
                break  # different contexts from here on
            ids = [t for t in la if t in lb]
            num = sum((la[t] - lb[t]) ** 2 for t in ids) ** 0.5
            den = sum(la[t] ** 2 for t in ids) ** 0.5
            steps.append({"step": s, "rel_err": num / den if den else float("nan"),
                          "max_abs_err": max((abs(la[t] - lb[t]) for t in ids), default=float("nan")),
                          "topk_overlap": len(ids) / max(len(la), 1),
                          "same_token": a["tokens"][s] == b["tokens"][s]})
        rows.append({"prompt": i, "steps": steps})
    first = [r["steps"][0]["rel_err"] for r in rows if r["steps"]]
    return {"first_token_rel_err_max": max(first) if first else None,
            "first_token_rel_err_mean": statistics.fmean(first) if first else None,
            "greedy_tokens_equal": sum(a["tokens"] == b["tokens"] for a, b in zip(ref, other)),
            "prompts": len(ref), "per_prompt": rows}


def table(rec: dict) -> str:
    engines = [e for e in ("intree", "ours") if e in rec["engines"] and "error" not in rec["engines"][e]]
    lines = [f"Device: {rec['device']['device']} · vLLM {rec['device'].get('vllm')} · torch {rec['device']['torch']} · "
             f"{rec['config']} with {rec['layers']} layers · {rec.get('weights', 'dummy')} weights", "",
             "| metric | " + " | ".join(engines) + (" | ours / in-tree |" if len(engines) == 2 else " |"),
             "|---|" + "---|" * (len(engines) + (1 if len(engines) == 2 else 0))]

    def row(label, values, higher_better):
        cells = [f"{v:,.3f}" if v < 10 else f"{v:,.0f}" for v in values]
        ratio = ""
        if len(values) == 2 and values[0]:
            ratio = f" | {values[1] / values[0]:.2f}x" if higher_better else f" | {values[0] / values[1]:.2f}x faster"
        lines.append(f"| {label} | " + " | ".join(cells) + ratio + (" |" if ratio else " |"))
    first = rec["engines"][engines[0]] if engines else {}
    for name in first.get("prefill", {}):
        row(f"prefill {name} TTFT (s)", [rec["engines"][e]["prefill"][name]["ttft_s"] for e in engines], False)
        row(f"prefill {name} (tok/s)", [rec["engines"][e]["prefill"][name]["prefill_tok_s"] for e in engines], True)
    for name in first.get("decode", {}):
        row(f"decode {name} (tok/s)", [rec["engines"][e]["decode"][name]["decode_tok_s"] for e in engines], True)
    for name in first.get("server", {}):
        row(f"server {name} TTFT (s)", [rec["engines"][e]["server"][name]["ttft_s"] for e in engines], False)
    if rec.get("agreement"):
        a = rec["agreement"]
        lines += ["", f"Agreement (first generated token, raw logits, top-K ids of both): max rel. error "
                      f"{a['first_token_rel_err_max']:.2e}, mean {a['first_token_rel_err_mean']:.2e}; "
                      f"greedy tokens equal on {a['greedy_tokens_equal']}/{a['prompts']} prompts."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="preset or config.json (default: kimi-linear-48b-a3b on a "
                                                   "GPU, tiny on CPU)")
    ap.add_argument("--layers", default="auto", help="'auto' (fit the GPU), 'full' or a number (3:1, last MLA)")
    ap.add_argument("--engines", default="intree,ours")
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    ap.add_argument("--no-server", action="store_true")
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / torch.compile (always on CPU)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--reserve-gib", type=float, default=20.0,
                    help="GPU memory kept free of weights by --layers auto (KV cache, states, activations)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--vllm-dummy-weights", action="store_true",
                    help="keep vLLM's U(-1e-3, 1e-3) dummy weights offline (default: scaled deterministic "
                         "weights, so the agreement check sees every layer)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="per engine phase, seconds")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        spec = json.loads(Path(args.child).read_text())
        print("E2E_RESULT " + json.dumps(child_offline(spec)), flush=True)
        return

    from kda_serving.checkpoints import load_preset, with_num_layers
    cuda = has_cuda()
    shapes = dict(QUICK if args.quick else FULL)
    if args.reps:
        shapes["reps"] = args.reps
    config = load_preset(args.config or ("kimi-linear-48b-a3b" if cuda else "tiny"))
    dev = device_info()
    if args.layers == "full":
        layers = config["num_hidden_layers"]
    elif args.layers == "auto":
        if cuda:
            import torch
            total = torch.cuda.get_device_properties(0).total_memory
            layers = pick_layers(config, total, int(args.reserve_gib * GiB), args.gpu_memory_utilization)
        else:
            layers = config["num_hidden_layers"]
    else:
        layers = int(args.layers)
    if layers != config["num_hidden_layers"]:
        config = with_num_layers(config, layers)
    max_len = min(shapes["max_model_len"],
                  config.get("max_position_embeddings") or config.get("model_max_length") or 1 << 20)
    engine = dict(max_model_len=max_len, max_num_seqs=max(64, max(shapes["decode_batches"])),
                  gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager or not cuda)
    if args.max_num_batched_tokens:
        engine["max_num_batched_tokens"] = args.max_num_batched_tokens
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = Path(tempfile.mkdtemp(prefix="vllm-e2e-"))
    model = write_model_dir(config, work / "model")
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    spec = {"model": str(model), "engine": engine, "shapes": shapes, "vocab": config["vocab_size"]}
    from bench_common import source_commit  # beside this file; imports torch, which is loaded by now
    rec = {"benchmark": "vllm_e2e", "time": stamp, "commit": source_commit(), "device": dev,
           "weights": "vllm-dummy" if args.vllm_dummy_weights else "scaled-dummy", "config": args.config or
           ("kimi-linear-48b-a3b" if cuda else "tiny"), "layers": layers,
           "kda_layers": len(config["linear_attn_config"]["kda_layers"]),
           "weights_gib": round(weight_bytes(config) / GiB, 1), "engine_args": engine, "shapes": shapes,
           "quick": args.quick, "engines": {}}
    print(f"model: {rec['config']} with {layers} layers ({rec['weights_gib']} GiB bf16), device {dev['device']}",
          flush=True)

    slug = re.sub(r"[^A-Za-z0-9]+", "-", dev["device"]).strip("-").lower()
    path = args.out / f"vllm_e2e_{slug}_{stamp}{'_quick' if args.quick else ''}.json"
    for eng in [e for e in args.engines.split(",") if e]:
        # the record so far, rewritten before each engine: a run stopped by a time limit keeps it
        path.write_text(json.dumps(rec, indent=2))
        if eng not in ("intree", "ours"):
            raise SystemExit(f"unknown engine {eng!r}: expected intree or ours")
        env = base_env(eng, not cuda)
        if not args.vllm_dummy_weights:
            env["KDA_E2E_SCALED_WEIGHTS"] = "1"
            env["PYTHONPATH"] = os.pathsep.join([scaled_weights_path(work)] + env["PYTHONPATH"].split(os.pathsep))
        spec_path = work / f"{eng}.json"
        spec_path.write_text(json.dumps(spec))
        log_path = logs / f"{stamp}_{eng}_offline.log"
        print(f"[{eng}] offline LLM ... (log: {log_path})", flush=True)
        t0 = time.perf_counter()
        with open(log_path, "wb") as log:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
                                  env=env, stdout=subprocess.PIPE, stderr=log, timeout=args.timeout)
        out = proc.stdout.decode(errors="replace")
        with open(log_path, "ab") as log:
            log.write(proc.stdout)
        found = [json.loads(line[len("E2E_RESULT "):]) for line in out.splitlines() if line.startswith("E2E_RESULT ")]
        text = log_path.read_text(errors="replace")
        uses_ours = bool(OUR_LAYER_LOG.search(text))
        if proc.returncode != 0 or not found:
            rec["engines"][eng] = {"error": f"offline run exited {proc.returncode}; see {log_path}"}
            print(f"[{eng}] FAILED: {text[-3000:]}", flush=True)
            continue
        if uses_ours != (eng == "ours"):  # recorded as this engine's failure; the next engine still runs
            rec["engines"][eng] = {"error": f"the KDA layers were {'ours' if uses_ours else 'in-tree'}; see {log_path}"}
            print(f"[{eng}] FAILED: {rec['engines'][eng]['error']}", flush=True)
            continue
        res = found[0]
        res["offline_wall_s"] = time.perf_counter() - t0
        if not args.no_server:
            slog = logs / f"{stamp}_{eng}_server.log"
            print(f"[{eng}] server ... (log: {slog})", flush=True)
            try:
                res["server"] = run_server(eng, spec, env, slog, args.timeout)
            except Exception as e:  # noqa: BLE001
                res["server_error"] = f"{type(e).__name__}: {e}"
                print(f"[{eng}] server FAILED: {e}", flush=True)
        rec["engines"][eng] = res
        print(f"[{eng}] done in {time.perf_counter() - t0:.0f}s", flush=True)

    ok = {e: r for e, r in rec["engines"].items() if "error" not in r}
    if "intree" in ok and "ours" in ok:
        rec["agreement"] = compare(ok["intree"]["agreement"], ok["ours"]["agreement"])
    path.write_text(json.dumps(rec, indent=2))
    md = table(rec) if ok else "no engine finished\n"
    path.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {path}")
    if len(ok) != len([e for e in args.engines.split(",") if e]):
        sys.exit(1)


if __name__ == "__main__":
    main()
