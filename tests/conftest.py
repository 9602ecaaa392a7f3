import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (SM90) and the built extension")
    config.addinivalue_line("markers", "optin_kernel: exercises the opt-in chunked CUDA-core prefill kernel "
                                       "(scripts/gpu_check.sh runs these in a process of their own)")


@pytest.fixture(autouse=True)
def _fresh_seed():
    # fresh random inputs each run; the seed goes to the captured output, which pytest shows for a
    # failing test, so the failure can be rerun with torch.manual_seed(seed)
    seed = torch.seed() % (2**31)
    torch.manual_seed(seed)
    print(f"torch seed {seed}")
    yield seed


def rel_rms(x, ref):
    """||x - ref|| / ||ref||, in fp64; NaN anywhere gives inf so it never passes."""
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    d = ref.norm()
    return float((x - ref).norm() / d) if d > 0 else float((x - ref).norm())
