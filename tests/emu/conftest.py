import pytest

from . import emulated


@pytest.fixture(scope="session")
def lib():
    """The emulated kernels (skips without g++ or the CUDA headers)."""
    if emulated.cuda_include() is None:
        pytest.skip("no CUDA headers (cuda_bf16.h) on this machine")
    lib = emulated.build()
    yield lib
    lib.emu_set_order(0, 1)


@pytest.fixture
def kernel_path(lib, monkeypatch):
    """kda_serving.ops takes its CUDA-kernel path on CPU tensors, run by the emulated kernels."""
    from kda_serving.ops import dispatch

    from .emulated_extension import install
    install(lib)
    monkeypatch.setattr(dispatch, "use_cuda_kernels", lambda t: True)
    yield lib
