"""A checkpoint with a missing or mis-shaped KDA tensor fails at load, naming the tensor."""

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from kda_serving.integrations.vllm.checkpoint_check import check_tensors, expected_kda_shapes  # noqa: E402
from kda_serving.serve import vllm_cannot_start  # noqa: E402

from .helpers import run_offline, write_tiny  # noqa: E402

PREFIX = "model.layers.1.self_attn"


def headers(expected, **changes):
    h = {f"{PREFIX}.{k}": (v[0], "BF16") for k, v in expected.items()}
    for k, v in changes.items():
        if v is None:
            del h[f"{PREFIX}.{k}"]
        else:
            h[f"{PREFIX}.{k}"] = (v, "BF16")
    return h


def test_check_tensors_accepts_both_conv_and_a_log_layouts():
    exp = expected_kda_shapes(256, 2, 128, 4)
    check_tensors(headers(exp), PREFIX, exp)
    check_tensors(headers(exp, **{"q_conv1d.weight": [256, 4], "A_log": [1, 1, 2, 1]}), PREFIX, exp)


@pytest.mark.parametrize("name, shape, message", [
    ("k_proj.weight", None, "model.layers.1.self_attn.k_proj.weight is missing"),
    ("dt_bias", [255], "model.layers.1.self_attn.dt_bias: expected shape [256], got [255]"),
])
def test_check_tensors_names_the_tensor(name, shape, message):
    exp = expected_kda_shapes(256, 2, 128, 4)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_tensors(headers(exp, **{name: shape}), PREFIX, exp)


@pytest.mark.skipif(vllm_cannot_start() is not None, reason=str(vllm_cannot_start()))
@pytest.mark.parametrize("case", ["missing", "misshaped"])
def test_vllm_load_fails_naming_the_tensor(tmp_path, case):
    ckpt = write_tiny(tmp_path / "tiny")
    tensors = load_file(str(ckpt / "model.safetensors"))
    name = f"{PREFIX}.g_b_proj.weight"
    if case == "missing":
        del tensors[name]
    else:
        tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 1, dtype=tensors[name].dtype)
    save_file(tensors, str(ckpt / "model.safetensors"), {"format": "pt"})
    rc, out, result = run_offline(ckpt, [[1, 2, 3]], 1, dict(max_model_len=128), timeout=240)
    assert rc != 0 and result is None
    assert f"KDA checkpoint tensor {name}" in out, out[-4000:]
