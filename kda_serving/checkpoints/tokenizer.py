"""Offline builder for a small byte-level BPE tokenizer in Kimi's layout.

The real Kimi tokenizer is a tiktoken file of 163,584 byte-level BPE ranks followed
by 256 special ids. This builder keeps that shape at toy size: 256 byte tokens,
merges learned from a built-in text, filler up to ``num_base`` (= the config's
``bos_token_id``), then the 256 specials at Kimi's offsets, so the config's
bos/eos/pad ids line up. Pre-tokenisation uses Kimi's own split regex. Nothing
here touches the network.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

NUM_SPECIAL = 256

# Kimi's pre-tokeniser: Han runs apart, letter runs split on case, digits in
# groups of up to 3, then cl100k-style punctuation and whitespace rules.
KIMI_PATTERN = "|".join(
    [
        r"[\p{Han}]+",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
        r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
        r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

# Named specials by offset above num_base (K2-family layout); the rest are reserved.
# The bool says whether the token is special (skipped on decode).
SPECIAL_OFFSETS: dict[int, tuple[str, bool]] = {
    0: ("[BOS]", True),
    1: ("[EOS]", True),
    2: ("<|im_end|>", True),
    3: ("<|im_user|>", True),
    4: ("<|im_assistant|>", True),
    6: ("<|start_header_id|>", True),
    7: ("<|end_header_id|>", True),
    9: ("[EOT]", True),
    10: ("<|im_system|>", True),
    11: ("<|tool_calls_section_begin|>", False),
    12: ("<|tool_calls_section_end|>", False),
    13: ("<|tool_call_begin|>", False),
    14: ("<|tool_call_argument_begin|>", False),
    15: ("<|tool_call_end|>", False),
    17: ("<|im_middle|>", True),
    254: ("[UNK]", True),
    255: ("[PAD]", True),
}

TRAINING_TEXT = """\
Kimi Linear is a hybrid model: three layers of delta attention, then one layer of latent attention.
The delta layers keep a fixed-size state for every request, so memory does not grow with the context.
The latent attention layers keep a compressed cache of 576 numbers per token and per layer.
A request with 128K tokens of context needs about one gigabyte of cache instead of almost four.
def softplus(x):
    return math.log1p(math.exp(x)) if x < 20 else x
for i in range(10):
    print(i, i * i, 2 ** i)
The quick brown fox jumps over the lazy dog. The lazy dog sleeps in the sun all day long.
Numbers such as 12, 345, 6789 and 3.14159 are split into groups of at most three digits.
Hello, world! How are you today? I'm fine, thanks. We've been testing the tokenizer; it's working.
Q: what is the capital of France? A: The capital of France is Paris.
Q: write a haiku about the sea. A: waves fold into foam / the tide forgets the sand / salt wind carries on
Recurrent state is stored per head as a matrix of keys by values, updated by the delta rule at every token.
Prefill processes the prompt in chunks of sixty-four tokens; decode advances the state one token at a time.
Speculative decoding verifies several draft tokens at once and keeps the state after each accepted token.
The gate decays each key channel: g = -exp(A_log) * softplus(f + dt_bias), computed in float32 precision.
Benchmarks report the median latency in milliseconds and the fraction of the memory bandwidth floor reached.
class Request:
    def __init__(self, prompt, max_tokens=128, temperature=0.0):
        self.prompt = prompt
        self.max_tokens = max_tokens
if __name__ == "__main__":
    main(sys.argv[1:])
你好，世界。今天天气很好。我们正在测试分词器。
{"name": "get_weather", "arguments": {"city": "Beijing", "unit": "celsius"}}
<html><body><p>Attention is all you need, but state is cheaper.</p></body></html>
"""


def build_tokenizer(num_base: int = 768, text: str = TRAINING_TEXT) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` with ``num_base`` BPE ids and 256 specials after them.

    Ids ``0..255`` are the bytes, then learned merges, then unreachable filler
    tokens if the text runs out of merges; specials sit at ``num_base + offset``.
    """
    if num_base < 256:
        raise ValueError(f"num_base must be >= 256 (one id per byte), got {num_base}")
    pre = _pre_tokenizer()
    byte_chars = _byte_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    merges = _learn_merges([p for p, _ in pre.pre_tokenize_str(text)], vocab, num_base)
    filler = 0
    while len(vocab) < num_base:  # unreachable: no merge ever builds these strings
        vocab[f"<|base_filler_{filler}|>"] = len(vocab)
        filler += 1

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    for offset in range(NUM_SPECIAL):
        content, special = special_token(num_base, offset)
        added = AddedToken(content, special=special, normalized=False)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
        if tok.token_to_id(content) != num_base + offset:
            raise RuntimeError(f"special token {content} landed at {tok.token_to_id(content)}")
    return tok


def special_token(num_base: int, offset: int) -> tuple[str, bool]:
    """``(content, is_special)`` of the special at ``num_base + offset``."""
    return SPECIAL_OFFSETS.get(offset, (f"<|reserved_token_{num_base + offset}|>", True))


def write_tokenizer(config: dict, out_dir: str | Path) -> Tokenizer:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

    The layout follows the config: ``num_base = bos_token_id`` (Kimi puts ``[BOS]``
    first among the specials) and the tokenizer's bos/eos/pad are the tokens at
    the config's ids, so both agree on what ends a turn.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    num_base = config["bos_token_id"]
    if config["vocab_size"] < num_base + NUM_SPECIAL:
        raise ValueError(
            f"vocab_size {config['vocab_size']} is smaller than the tokenizer "
            f"({num_base} base ids + {NUM_SPECIAL} specials)"
        )
    tok = build_tokenizer(num_base)
    tok.save(str(out / "tokenizer.json"))

    names = {
        "bos_token": tok.id_to_token(config["bos_token_id"]),
        "eos_token": tok.id_to_token(config["eos_token_id"]),
        "pad_token": tok.id_to_token(config["pad_token_id"]),
        "unk_token": "[UNK]",
    }
    decoder = {}
    for offset in range(NUM_SPECIAL):
        content, special = special_token(num_base, offset)
        decoder[str(num_base + offset)] = {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
    tokenizer_config = {
        "added_tokens_decoder": decoder,
        **names,
        "add_bos_token": False,
        "add_eos_token": False,
        "chat_template": chat_template(),
        "clean_up_tokenization_spaces": False,
        "model_max_length": _max_length(config),
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    _dump(out / "tokenizer_config.json", tokenizer_config)
    _dump(out / "special_tokens_map.json", names)
    return tok


def chat_template() -> str:
    """Kimi's chat template (K2 family), shipped next to this module."""
    return (Path(__file__).resolve().parent / "chat_template.jinja").read_text()


def _max_length(config: dict) -> int:
    return config.get("model_max_length") or config.get("max_position_embeddings") or 1 << 20


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(KIMI_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _byte_to_unicode() -> list[str]:
    """Byte-level alphabet: printable bytes map to themselves, others to 256+."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def _learn_merges(pieces: list[str], vocab: dict[str, int], target: int) -> list[tuple[str, str]]:
    """Greedy BPE on pre-tokenised pieces until ``vocab`` has ``target`` ids.

    Ties break on the pair itself, so the result does not depend on library versions.
    """
    words = Counter(tuple(p) for p in pieces)
    merges: list[tuple[str, str]] = []
    while len(vocab) < target:
        pairs: Counter = Counter()
        for word, n in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        words = Counter({_merge(w, best): n for w, n in words.items()})
    return merges


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _dump(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
