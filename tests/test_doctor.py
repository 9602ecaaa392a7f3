"""`kda-serving doctor` on this machine, and the prefill kernel it names."""

import pytest

from kda_serving import doctor


def test_report_runs_and_names_the_path():
    rows = dict(doctor.report())
    assert {"torch", "GPU", "CUDA extension", "KDA op path", "vLLM plugin registered"} <= rows.keys()


@pytest.mark.parametrize("env,name", [(None, "tensor cores (default)"), ("auto", "tensor cores (default)"),
                                      ("serial", "token-serial"), ("chunked", "CUDA cores"),
                                      ("tc", "tensor cores (default)"), ("bogus", "invalid")])
def test_prefill_kernel_follows_the_env(monkeypatch, env, name):
    if env is None:
        monkeypatch.delenv("KDA_SERVING_PREFILL_KERNEL", raising=False)
    else:
        monkeypatch.setenv("KDA_SERVING_PREFILL_KERNEL", env)
    assert name in doctor._prefill_kernel_name()
