"""The plugin entry point, the CPU fallbacks and the serve command line, without an engine."""

import subprocess
import sys

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from kda_serving.integrations.vllm import cpu_compat  # noqa: E402
from kda_serving.serve import PLUGIN_TARGET, build_command, plugin_env, split_model  # noqa: E402

from .helpers import vllm_env  # noqa: E402

REGISTER_CHECK = r"""
import sys
from kda_serving.integrations.vllm import register
register(); register()
from vllm.model_executor.custom_op import op_registry_oot
from vllm.model_executor.layers.mamba.gdn.kimi_gdn_linear_attn import KimiGatedDeltaNetAttention
cls = op_registry_oot["KimiGatedDeltaNetAttention"]
assert issubclass(cls, KimiGatedDeltaNetAttention) and cls.__name__ == "KDAServingKimiDeltaAttention"
heavy = sorted(m for m in sys.modules if m.startswith("vllm.models.kimi_k3"))
assert not heavy, heavy
from vllm.plugins import load_general_plugins
load_general_plugins()  # through the entry point: must be a no-op now
print("OK")
"""


def test_register_is_idempotent_light_and_found_through_the_entry_point():
    proc = subprocess.run([sys.executable, "-c", REGISTER_CHECK], env=vllm_env(), capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_cpu_cache_insert_and_paged_gather_round_trip():
    blocks, bs, L, R = 5, 4, 6, 2
    cache = torch.zeros(blocks, bs, L + R)
    T = 7
    kv_c, k_pe = torch.randn(T, L), torch.randn(T, 1, R)
    # sequence 0 uses blocks [3, 1], sequence 1 uses block [4]; one padding token (slot -1)
    slots = torch.tensor([12, 13, 14, 15, 4, 16, -1])
    k = cpu_compat.key_concat_kv_cache_insert(None, torch.randn(T, 2, 3), k_pe, kv_c, cache, slots)
    assert k.shape == (T, 2, 3 + R)
    torch.testing.assert_close(k[:, 0, 3:], k_pe[:, 0])
    flat = cache.view(-1, L + R)
    torch.testing.assert_close(flat[slots[:6]], torch.cat([kv_c, k_pe[:, 0]], -1)[:6])
    assert int((flat.abs().sum(-1) > 0).sum()) == 6  # the padding token wrote nothing
    # gather positions 2..5 of sequence 0 (blocks 3, 1) and 0..0 of sequence 1 (block 4)
    block_table = torch.tensor([[3, 1], [4, 0]])
    dst = torch.zeros(5, L + R)
    cu = torch.tensor([0, 4, 5])
    cpu_compat.gather_context_latent(cache, dst, block_table, cu, torch.tensor([0, 0, 0, 0, 1]), 5,
                                     seq_starts=torch.tensor([0, 0]))
    want = torch.stack([flat[12], flat[13], flat[14], flat[15], flat[16]])
    torch.testing.assert_close(dst, want)


def test_serve_defaults_and_pass_through(tmp_path):
    cmd, env = build_command([str(tmp_path), "--api-key", "secret", "--port", "9000"])
    i = cmd.index("--host")
    assert cmd[i + 1] == "127.0.0.1"
    assert cmd[cmd.index("--api-key") + 1] == "secret" and cmd[cmd.index("--model") + 1] == str(tmp_path)
    assert "vllm.entrypoints.openai.api_server" in cmd
    cmd, _ = build_command([str(tmp_path), "--host", "0.0.0.0"])
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd.count("--host") == 1
    assert split_model(["--model", "x", "--port", "1"]) == ("x", ["--port", "1"])
    assert split_model(["--port", "1"]) == (None, ["--port", "1"])


def test_plugin_env_makes_the_entry_point_visible_to_fresh_interpreters():
    env = plugin_env({"PATH": "/usr/bin:/bin", "VLLM_PLUGINS": "other"})
    assert env["VLLM_PLUGINS"] == "other,kda_serving"
    code = ("import importlib.metadata as m; print([e.value for e in m.entry_points(group='vllm.general_plugins') "
            "if e.name == 'kda_serving'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60).stdout
    assert PLUGIN_TARGET in out
