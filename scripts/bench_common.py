"""Shared benchmark plumbing: timing, the HBM copy bandwidth, memory deltas, the JSON record, tables.

Timings are medians. On CUDA each sample is bracketed by its own CUDA event pair; on the CPU
(``--smoke``) by ``time.perf_counter`` after the call returns. Nothing here flushes L2: the
prefill shapes move far more than L2 holds, and the decode timing rotates over enough state to
miss it (see ``graph_time_ms``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # scripts run as files: make the package importable from a checkout
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kda_serving.ops import _ext  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results"


@contextlib.contextmanager
def env_set(**env):
    """The KDA_SERVING_* switches in env set for the calls inside (the package reads them at each
    call), the previous values restored after."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def with_env(fn, **env):
    """``fn`` wrapped to run with the KDA_SERVING_* switches in env set (``env_set``)."""
    def run():
        with env_set(**env):
            return fn()
    return run


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the JSON record")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, few iterations: checks the plumbing (runs on the CPU too)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return p


def pick_device(arg: str | None) -> torch.device:
    return torch.device(arg or ("cuda" if torch.cuda.is_available() else "cpu"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, *, warmup: int = 3, iters: int = 20, budget_s: float = 3.0) -> float:
    """Median wall time of one ``fn()`` call in ms, after ``warmup`` calls.

    Covers exactly what ``fn`` launches, host-side work included (it sits between the event pair).
    The sample count drops below ``iters`` (to at least 3) when one call is slow, so a shape costs
    about ``budget_s`` seconds.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type != "cuda":
        samples = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)
    first = _event_samples(fn, 1)[0]
    n = max(3, min(iters, int(budget_s * 1e3 / max(first, 1e-3))))
    return statistics.median(_event_samples(fn, n))


def _event_samples(fn, n: int) -> list[float]:
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in pairs]


def graph_time_ms(fns, device: torch.device, *, reps: int, samples: int = 20, warmup: int = 2) -> float:
    """Median time of one call in ms, replayed from a CUDA graph.

    The graph holds ``reps`` calls, cycling through ``fns`` (each works on its own slots and input
    buffers, so the set of states touched per replay can exceed L2, as it does across a model's
    layers). One sample is one ``graph.replay()`` between a CUDA event pair, divided by ``reps``:
    the graph launch is amortised and the number is GPU time per call. On the CPU the calls
    run eagerly and are timed the same way.
    """
    def body():
        for i in range(reps):
            fns[i % len(fns)]()

    if device.type != "cuda":
        return time_ms(body, device, warmup=1, iters=samples) / reps
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # compile / autotune every kernel before capture
        for _ in range(warmup):
            body()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    graph.replay()
    torch.cuda.synchronize(device)
    return statistics.median(_event_samples(graph.replay, samples)) / reps


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """HBM bandwidth in bytes/s: a device-to-device copy of ``nbytes`` (read + written) over its
    median time. Measured in the same process as the kernels it normalises."""
    if device.type != "cuda":
        nbytes = min(nbytes, 1 << 24)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, iters=30)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3)


def bandwidth_and_fla(device: torch.device) -> tuple[float, str | None]:
    """The copy bandwidth of ``device`` and why fla cannot run there (None when it can), printed."""
    from kda_serving.baselines import fla_ops
    reason = fla_ops.unavailable_reason(device)
    if reason:
        print(f"fla skipped: {reason}")
    return copy_bandwidth(device), reason


def run_case_timed(run, *args, **kwargs) -> dict:
    """``run(*args, **kwargs)`` -> a result row; records the seconds the case took (set-up, checks
    and first-call compilation included) as ``bench_wall_s`` and prints a progress line, so a run
    under a time limit can be planned from an earlier log."""
    t0 = time.perf_counter()
    row = run(*args, **kwargs)
    row["bench_wall_s"] = round(time.perf_counter() - t0, 1)
    times = "  ".join(f"{k[:-3]} {v:.3g} ms" for k, v in row.items() if k.endswith("_ms") and isinstance(v, float))
    print(f"done: {row['case']} ({row['bench_wall_s']:.0f} s)  {times}", flush=True)
    return row


def floor_ms(nbytes: int, bandwidth: float) -> float:
    """Time to move ``nbytes`` at the measured copy bandwidth: the HBM floor."""
    return nbytes / bandwidth * 1e3


def peak_extra_bytes(fn, device: torch.device) -> int | None:
    """Device memory ``fn`` allocates at its peak above what was allocated before the call
    (outputs it returns included). None on the CPU."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    extra = torch.cuda.max_memory_allocated(device) - base
    del result
    return extra


def free_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 1 << 62
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


def rel_rms(x: torch.Tensor, ref: torch.Tensor, piece: int = 1 << 24) -> float:
    """||x - ref|| / ||ref|| in fp64; inf when x has a NaN or inf. Summed over pieces of
    ``piece`` elements, so a 1M-token output does not need an fp64 copy of itself."""
    x, ref = x.reshape(-1), ref.reshape(-1)
    num = den = 0.0
    for s in range(0, x.numel(), piece):
        a, b = x[s:s + piece].double(), ref[s:s + piece].double()
        if not torch.isfinite(a).all():
            return math.inf
        num += float((a - b).square().sum())
        den += float(b.square().sum())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def ratio(a, b):
    """a / b, or None when either is missing."""
    return a / b if a is not None and b else None


def _git(*args) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:
        return None


def source_commit() -> str:
    """The commit measured: KDA_SERVING_COMMIT (trees copied without .git), else git's HEAD."""
    return os.environ.get("KDA_SERVING_COMMIT") or _git("rev-parse", "--short=12", "HEAD") or "nogit"


def run_metadata(script: str, device: torch.device, argv, bandwidth: float) -> dict:
    commit = source_commit()
    meta = {
        "script": script,
        "device": device_name(device),
        "device_slug": "cpu" if device.type == "cpu" else slug(device_name(device)),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "fla": _version("flash-linear-attention") or _version("fla-core"),
        "commit": commit,
        # a tree copied elsewhere names its commit in KDA_SERVING_COMMIT; its git state says nothing
        "dirty": None if os.environ.get("KDA_SERVING_COMMIT") else bool(_git("status", "--porcelain",
                                                                             "--untracked-files=no")),
        "argv": list(argv),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_bandwidth_gbps": bandwidth / 1e9,
        # the switches that pick kernels, splits and workspaces (KDA_SERVING_COMMIT is "commit")
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("KDA_SERVING_") and k != "KDA_SERVING_COMMIT"},
        # the extension's opt-in build defines (None: no extension loaded)
        "build_options": _ext.build_options(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        meta.update(sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                    memory_gib=p.total_memory / 2**30)
    return meta


def write_json(out_dir: Path, meta: dict, results: list[dict], **extra) -> Path:
    """Write ``<out_dir>/<script>[-<mode>][-<option>...]-<device-slug>-<commit>.json`` and return its
    path; a ``mode`` other than "default" names the file, so runs of one script in other modes
    coexist, and so does each opt-in build define the extension was built with (e.g.
    ``-tc_state_wgmma`` for KDA_TC_STATE_WGMMA)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mode = extra.get("mode")
    tag = f"-{mode}" if mode not in (None, "default") else ""
    tag += "".join(f"-{name.lower().removeprefix('kda_')}" for name, on in (meta.get("build_options") or {}).items()
                   if on)
    path = out_dir / f"{meta['script']}{tag}-{meta['device_slug']}-{meta['commit']}.json"
    record = dict(meta, **extra, results=results)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e3 else f"{v:.0f}"
    return str(v)


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """``columns``: (key in each row, header). Missing values print as '-'."""
    cells = [[h for _, h in columns]] + [[_cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
