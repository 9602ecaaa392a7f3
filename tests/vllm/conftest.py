import os
import tempfile

# serve.py writes its entry-point folder and the tiny checkpoint under this cache; keep the
# tests out of the user's ~/.cache
os.environ.setdefault("KDA_SERVING_CACHE", tempfile.mkdtemp(prefix="kda-serving-test-cache-"))

import pytest  # noqa: E402

# one plain TP=1 reference run shared by the engine-variant tests (TP=2, speculative decoding)
VARIANT_PROMPTS = [[11, 22, 33, 44, 55, 66, 77, 88] * 6, list(range(100, 140)), [5, 6, 7] * 10,
                   list(range(500, 620))]
VARIANT_ENGINE = dict(max_model_len=512, max_num_batched_tokens=128, max_num_seqs=8, enable_prefix_caching=False)
VARIANT_MAX_TOKENS = 12


@pytest.fixture(scope="session")
def variant_ckpt(tmp_path_factory):
    from .helpers import write_tiny
    return write_tiny(tmp_path_factory.mktemp("variants") / "tiny")


@pytest.fixture(scope="session")
def plain_greedy(variant_ckpt):
    from .helpers import run_offline
    rc, out, res = run_offline(variant_ckpt, VARIANT_PROMPTS, VARIANT_MAX_TOKENS, VARIANT_ENGINE)
    assert rc == 0 and res, out[-4000:]
    return res
