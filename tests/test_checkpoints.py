"""Checkpoint presets, writer, validator, tokenizer and memory accounting (CPU only)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kda_serving.checkpoints import memory
from kda_serving.checkpoints.cli import make_checkpoint_main
from kda_serving.checkpoints.layout import expected_tensors, total_params
from kda_serving.checkpoints.presets import load_preset, preset_names, with_num_layers
from kda_serving.checkpoints.schedule import hybrid_layer_lists
from kda_serving.checkpoints.tokenizer import write_tokenizer
from kda_serving.checkpoints.validate import validate_checkpoint
from kda_serving.checkpoints.writer import write_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    config = load_preset("tiny")
    out = write_checkpoint(config, tmp_path_factory.mktemp("tiny"), seed=0)
    write_tokenizer(config, out)
    return out


def _reference_tiny_inventory() -> dict[str, tuple[list[int], str]]:
    """The tiny preset's tensors, spelled out from the official naming rules."""
    hidden, vocab, kda_p, d, h = 256, 1024, 2 * 128, 128, 2
    out = {
        "model.embed_tokens.weight": ([vocab, hidden], "BF16"),
        "model.norm.weight": ([hidden], "BF16"),
        "lm_head.weight": ([vocab, hidden], "BF16"),
    }
    for layer in range(4):
        p = f"model.layers.{layer}."
        out[p + "input_layernorm.weight"] = ([hidden], "BF16")
        out[p + "post_attention_layernorm.weight"] = ([hidden], "BF16")
        out[p + "mlp.gate_proj.weight"] = ([512, hidden], "BF16")
        out[p + "mlp.up_proj.weight"] = ([512, hidden], "BF16")
        out[p + "mlp.down_proj.weight"] = ([hidden, 512], "BF16")
        a = p + "self_attn."
        if layer < 3:
            for x in "qkv":
                out[a + f"{x}_proj.weight"] = ([kda_p, hidden], "BF16")
                out[a + f"{x}_conv1d.weight"] = ([kda_p, 1, 4], "BF16")
            out[a + "A_log"] = ([1, 1, h, 1], "F32")
            out[a + "dt_bias"] = ([kda_p], "F32")
            out[a + "f_a_proj.weight"] = ([d, hidden], "BF16")
            out[a + "f_b_proj.weight"] = ([kda_p, d], "BF16")
            out[a + "g_a_proj.weight"] = ([d, hidden], "BF16")
            out[a + "g_b_proj.weight"] = ([kda_p, d], "BF16")
            out[a + "b_proj.weight"] = ([h, hidden], "BF16")
            out[a + "o_norm.weight"] = ([d], "BF16")
            out[a + "o_proj.weight"] = ([hidden, kda_p], "BF16")
        else:  # MLA: 4 heads, nope 32 + rope 64, v 32, latent 256
            out[a + "q_proj.weight"] = ([4 * 96, hidden], "BF16")
            out[a + "kv_a_proj_with_mqa.weight"] = ([256 + 64, hidden], "BF16")
            out[a + "kv_a_layernorm.weight"] = ([256], "BF16")
            out[a + "kv_b_proj.weight"] = ([4 * 64, 256], "BF16")
            out[a + "o_proj.weight"] = ([hidden, 4 * 32], "BF16")
    return out


def test_tiny_checkpoint_matches_official_format(tiny_dir):
    found = {}
    with safe_open(str(tiny_dir / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name in f.keys():
            sl = f.get_slice(name)
            found[name] = (list(sl.get_shape()), sl.get_dtype())
    assert found == _reference_tiny_inventory()
    validate_checkpoint(tiny_dir)

    tensors = load_file(str(tiny_dir / "model.safetensors"))
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())
    a_log = tensors["model.layers.0.self_attn.A_log"]
    assert ((a_log >= 0) & (a_log < torch.log(torch.tensor(16.0)))).all()
    dt = torch.nn.functional.softplus(tensors["model.layers.0.self_attn.dt_bias"])
    assert ((dt > 0.9e-3) & (dt < 0.11)).all()
    assert (tensors["model.layers.1.self_attn.o_norm.weight"] == 1).all()


def test_config_and_generation_config(tiny_dir):
    official = load_preset("kimi-linear-48b-a3b")
    written = json.loads((tiny_dir / "config.json").read_text())
    # same key set as the real checkpoint, plus a small max length cap for engines
    assert set(written) == set(official) | {"max_position_embeddings"}
    assert written["dtype"] == "bfloat16"
    assert written["linear_attn_config"] == {
        "full_attn_layers": [4],
        "head_dim": 128,
        "kda_layers": [1, 2, 3],
        "num_heads": 2,
        "short_conv_kernel_size": 4,
    }
    assert written["kv_lora_rank"] + written["qk_rope_head_dim"] in (320, 512, 576)
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert gen["bos_token_id"] == written["bos_token_id"]
    assert gen["eos_token_id"] == written["eos_token_id"]


def test_all_presets_partition_layers_and_avoid_k3_keys():
    assert set(preset_names()) >= {"tiny", "small", "kimi-linear-48b-a3b"}
    for name in preset_names():
        config = load_preset(name)
        lin = config["linear_attn_config"]
        n = config["num_hidden_layers"]
        assert sorted(lin["kda_layers"] + lin["full_attn_layers"]) == list(range(1, n + 1))
        assert n in lin["full_attn_layers"]
        # these keys would make vLLM build Kimi-K3 layers with other weight names
        assert not {"use_full_rank_gate", "gate_lower_bound"} & set(lin)
        assert "mla_use_output_gate" not in config


def test_48b_inventory_matches_official_counts():
    config = load_preset("kimi-linear-48b-a3b")
    assert len(expected_tensors(config)) == 20_493
    assert total_params(config) == 49_122_681_728


@pytest.mark.parametrize("num_layers", [1, 2, 4, 5, 7, 8, 12, 27])
def test_layer_schedule_is_three_to_one_with_last_mla(num_layers):
    kda, mla = hybrid_layer_lists(num_layers)
    assert sorted(kda + mla) == list(range(1, num_layers + 1))
    assert num_layers in mla
    for layer in range(1, num_layers):  # every 4th is MLA, except the forced last one
        assert (layer in mla) == (layer % 4 == 0)
    config = with_num_layers(load_preset("tiny"), num_layers)
    assert config["linear_attn_config"]["kda_layers"] == kda
    assert config["first_k_dense_replace"] == num_layers  # stays dense


def test_schedule_reproduces_48b_lists():
    lin = load_preset("kimi-linear-48b-a3b")["linear_attn_config"]
    assert hybrid_layer_lists(27) == (lin["kda_layers"], lin["full_attn_layers"])


def test_validate_names_missing_tensor(tmp_path):
    config = load_preset("tiny")
    write_checkpoint(config, tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.0.self_attn.q_conv1d.weight"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"^missing tensor model\.layers\.0\.self_attn\.q_conv1d\.weight$"):
        validate_checkpoint(tmp_path)


def test_validate_names_misshaped_and_mistyped_tensor(tmp_path):
    config = load_preset("tiny")
    bad = {"model.layers.0.self_attn.dt_bias": torch.zeros(255)}
    write_checkpoint(config, tmp_path, overrides=bad)
    msg = r"model\.layers\.0\.self_attn\.dt_bias: expected shape \[256\], got \[255\]"
    with pytest.raises(ValueError, match=msg):
        validate_checkpoint(tmp_path)
    bad = {"model.layers.1.self_attn.A_log": torch.zeros(1, 1, 2, 1, dtype=torch.bfloat16)}
    write_checkpoint(config, tmp_path, overrides=bad)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.A_log: expected dtype F32, got BF16"):
        validate_checkpoint(tmp_path)


def test_sharded_write_has_index_and_validates(tmp_path):
    config = load_preset("small")
    write_checkpoint(config, tmp_path, max_shard_bytes=8_000_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(expected_tensors(config))
    assert index["metadata"]["total_size"] == sum(s.nbytes() for s in expected_tensors(config).values())
    assert not (tmp_path / "model.safetensors").exists()
    validate_checkpoint(tmp_path)


def test_cli_refuses_48b_without_force(tmp_path, capsys):
    assert make_checkpoint_main(["--preset", "kimi-linear-48b-a3b", "--out", str(tmp_path / "big")]) == 2
    assert "--force" in capsys.readouterr().err
    assert not (tmp_path / "big").exists()


def test_cli_reduced_layers(tmp_path):
    out = tmp_path / "t6"
    assert make_checkpoint_main(["--preset", "tiny", "--num-layers", "6", "--out", str(out), "--seed", "3"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["linear_attn_config"]["full_attn_layers"] == [4, 6]
    assert (out / "tokenizer.json").exists()


def test_tokenizer_special_tokens_and_chat_template(tiny_dir):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    config = json.loads((tiny_dir / "config.json").read_text())
    base = config["bos_token_id"]
    assert len(tok) <= config["vocab_size"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        config["bos_token_id"],
        config["eos_token_id"],
        config["pad_token_id"],
    )
    offsets = {"[BOS]": 0, "[EOS]": 1, "<|im_end|>": 2, "<|im_user|>": 3, "<|im_assistant|>": 4,
               "<|im_system|>": 10, "<|tool_call_begin|>": 13, "<|im_middle|>": 17, "[PAD]": 255}
    for text, off in offsets.items():
        assert tok.encode(text, add_special_tokens=False) == [base + off], text

    messages = [{"role": "user", "content": "Hello, Kimi!"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_system|>system<|im_middle|>You are a helpful assistant provided by Moonshot-AI.<|im_end|>"
        "<|im_user|>user<|im_middle|>Hello, Kimi!<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>"
    )
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[-1] == base + 17 and ids.count(base + 2) == 2
    assert tok.decode(ids) == text
    plain = "HelloWorld 12345 中文abc"
    assert tok.decode(tok.encode(plain, add_special_tokens=False)) == plain


def test_memory_reproduces_reference_numbers():
    config = load_preset("kimi-linear-48b-a3b")
    assert memory.kda_recurrent_state_bytes(config) == 2_097_152
    assert memory.kda_conv_state_bytes(config) == 73_728
    assert memory.kda_state_bytes_per_layer(config) == 2_170_880
    assert memory.kda_state_bytes_per_layer(config, tp=4) == 2_170_880 // 4
    assert memory.mla_kv_bytes_per_token(config) == 8_064
    req = memory.request_memory(config, 131_072)
    assert req.kda_state == 43_417_600
    assert req.total / 2**20 == pytest.approx(1049.40625)
    assert memory.all_mla_request_bytes(config, 131_072) == 3888 * 2**20
    assert memory.hybrid_saving(config, 131_072) == pytest.approx(0.730, abs=5e-4)
    assert memory.hybrid_saving(config, 1 << 20) == pytest.approx(0.739, abs=5e-4)
    assert memory.hybrid_saving(config, 1 << 30) == pytest.approx(20 / 27, abs=1e-3)


def test_hf_transformers_loads_tiny_and_decodes(tiny_dir):
    oracle = pytest.importorskip("kda_serving.checkpoints.hf_oracle")
    if not oracle.hf_kimi_linear_available():
        pytest.skip("transformers without models.kimi_linear")
    model = oracle.load_hf_model(str(tiny_dir))
    prompt = [5, 100, 200, 300, 400, 500, 600, 700]
    new = oracle.greedy_generate_hf(tiny_dir, prompt, 8)
    assert len(new) == 8 and len(set(new)) > 1
    # cached decode must equal greedy argmax of full no-cache forwards
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits
            assert not torch.isnan(logits).any()
            ids.append(int(logits[0, -1].argmax()))
    assert ids[len(prompt):] == new


def test_vllm_config_accepts_tiny(tiny_dir):
    configs = pytest.importorskip("vllm.transformers_utils.configs.kimi_linear")
    raw = json.loads((tiny_dir / "config.json").read_text())
    cfg = configs.KimiLinearConfig(**raw)
    assert not cfg.is_moe and cfg.is_mla and cfg.is_linear_attn
    assert cfg.max_position_embeddings == 4096
