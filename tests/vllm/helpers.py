"""Shared pieces of the vLLM tests: tiny checkpoints, a server process, offline runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from kda_serving.serve import plugin_env

STARTUP_TIMEOUT_S = 300


def write_tiny(out_dir: Path, overrides: dict | None = None) -> Path:
    from kda_serving.checkpoints import load_preset, write_checkpoint, write_tokenizer
    config = load_preset("tiny")
    write_checkpoint(config, out_dir, seed=0, overrides=overrides)
    write_tokenizer(config, out_dir)
    return out_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_env(**extra) -> dict:
    """Environment for vLLM subprocesses: the plugin in every process, offline, loopback only."""
    env = plugin_env()
    env.update(HF_HUB_OFFLINE="1", VLLM_HOST_IP="127.0.0.1", VLLM_NO_USAGE_STATS="1",
               VLLM_CPU_KVCACHE_SPACE="1", VLLM_KIMI_K3_GEMM_AR="0", TOKENIZERS_PARALLELISM="false")
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Server:
    """``kda-serving serve CKPT --port P ARGS`` in its own session; stopped by SIGTERM, then SIGKILL."""

    def __init__(self, ckpt: Path, args: list[str], log_path: Path):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "kda_serving.serve", str(ckpt), "--port", str(self.port), *args]
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=vllm_env(), stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-6000:]}")
            if self.healthy():
                return
            time.sleep(1.0)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()[-6000:]}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:  # anything of ours left in the session (engine core, workers)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._log.close()


OFFLINE_SCRIPT = r"""
import json, sys
def main():
    from vllm import LLM, SamplingParams
    cfg = json.loads(sys.argv[1])
    llm = LLM(model=cfg["model"], enforce_eager=True, seed=0, disable_log_stats=False, **cfg["engine"])
    sp = SamplingParams(temperature=0, max_tokens=cfg["max_tokens"], ignore_eos=True, logprobs=cfg["top_k"])
    outs = llm.generate([{"prompt_token_ids": p} for p in cfg["prompts"]], sp, use_tqdm=False)
    res = [(list(o.outputs[0].token_ids),
            [{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]) for o in outs]
    print("KDA_RESULT " + json.dumps(res), flush=True)
    if cfg["engine"].get("speculative_config"):
        for metric in llm.get_metrics():
            if metric.name.startswith("vllm:spec_decode_num_accepted_tokens"):
                print("KDA_ACCEPTED", getattr(metric, "value", None), flush=True)
if __name__ == "__main__":
    main()
"""


def run_offline(model: Path, prompts: list[list[int]], max_tokens: int, engine: dict,
                env_extra: dict | None = None, timeout: float = 420) -> tuple[int, str, list | None]:
    """Offline ``LLM.generate`` in a fresh interpreter; returns (exit code, output, token lists)."""
    cfg = {"model": str(model), "prompts": prompts, "max_tokens": max_tokens, "engine": engine, "top_k": TOP_K}
    proc = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, json.dumps(cfg)],
                          env=vllm_env(**(env_extra or {})), capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)
    out = proc.stdout + proc.stderr
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith("KDA_RESULT "):
            result = [(ids, [{int(k): v for k, v in d.items()} for d in tops])
                      for ids, tops in json.loads(line[len("KDA_RESULT "):])]
    return proc.returncode, out, result


# vLLM runs bf16 and some CPU kernels (GEMMs, MLA) round differently for different batch
# shapes or rank counts, so one run may pick another token where the top logits tie within
# bf16 resolution; after that the sequences legitimately differ. A state leak or a wrong slot
# moves logprobs far more than this and changes tokens that are not near-ties. The test models
# have random weights and nearly flat distributions (top logprobs around -ln(vocab)), so a tie
# may hold three or more tokens: the top TOP_K are compared, not only the top two.
TIE_TOL = 0.02
TOP_K = 5


def assert_same_greedy(ref, other, what):
    """(ids, [{id: logprob} top-TOP_K per step]) pairs: identical tokens, or identical up to a step
    where both runs saw a near-tie. Returns whether they diverged."""
    (a_ids, a_top), (b_ids, b_top) = ref, other
    t = next((i for i, (x, y) in enumerate(zip(a_ids, b_ids)) if x != y), None)
    for s in range(len(a_ids) if t is None else t):
        assert abs(a_top[s][a_ids[s]] - b_top[s][b_ids[s]]) < 0.05, f"{what}: logprob moved at step {s}"
    if t is None:
        assert a_ids == b_ids, what
        return False
    for ids, top, alt in ((a_ids, a_top, b_ids), (b_ids, b_top, a_ids)):
        assert alt[t] in top[t] and top[t][ids[t]] - top[t][alt[t]] <= TIE_TOL, (
            f"{what}: tokens differ at step {t} ({a_ids[t]} vs {b_ids[t]}) without a tie: top-{TOP_K} {top[t]}")
    return True
