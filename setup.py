"""Build for kda-serving.

KDA_SERVING_CUDA=auto (default) builds the CUDA extension ``kda_serving._C`` when torch has
CUDA and nvcc is found; ``1`` requires it; ``0`` installs pure Python. KDA_SERVING_BUILD_DEFINES
(e.g. ``-DKDA_TC_STATE_WGMMA=1``) builds the kernels' opt-in variants (kda_serving/build_defines.py).
"""

import glob
import os
import runpy
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _build_defines():
    """KDA_SERVING_BUILD_DEFINES, checked (kda_serving/build_defines.py, loaded by path)."""
    mod = runpy.run_path(os.path.join(ROOT, "kda_serving", "build_defines.py"))
    try:
        return mod["parse"](os.environ.get(mod["ENV"]))
    except ValueError as e:
        raise SystemExit(str(e)) from None


def _want_cuda():
    mode = os.environ.get("KDA_SERVING_CUDA", "auto").strip().lower()
    if mode not in ("0", "1", "auto"):
        raise SystemExit(f"KDA_SERVING_CUDA must be 0, 1 or auto, got {mode!r}")
    if mode == "0":
        return False
    try:
        import torch
        torch_cuda = torch.version.cuda
    except ImportError:
        torch_cuda = None
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc") or (
        os.path.join(cuda_home, "bin", "nvcc") if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")) else None)
    if torch_cuda and nvcc:
        return True
    if mode == "1":
        missing = [name for name, ok in (("a CUDA build of torch", torch_cuda), ("nvcc", nvcc)) if not ok]
        raise SystemExit("KDA_SERVING_CUDA=1 but " + " and ".join(missing) + " not found; "
                         "install them or set KDA_SERVING_CUDA=0 for the pure-Python build")
    return False


def _cutlass_include():
    local = os.path.join(ROOT, "third_party", "cutlass", "include")
    if os.path.isdir(local):
        return [local]
    try:
        import cutlass_library
    except ImportError:
        return []
    base = os.path.dirname(cutlass_library.__file__)
    for cand in (os.path.join(base, "source", "include"), os.path.join(base, "include")):
        if os.path.isfile(os.path.join(cand, "cutlass", "cutlass.h")):
            return [cand]
    return []


def _extensions():
    if not _want_cuda():
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    defines = _build_defines()
    sources = ["csrc/torch_bindings.cpp"] + sorted(glob.glob("csrc/**/*.cu", recursive=True))
    include_dirs = [os.path.join(ROOT, "csrc")] + _cutlass_include()
    ext = CUDAExtension(
        name="kda_serving._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20"] + defines,
            # Accurate expf: no --use_fast_math.
            "nvcc": ["-O3", "-std=c++20", "-gencode", "arch=compute_90a,code=sm_90a",
                     "-lineinfo", "--expt-relaxed-constexpr"] + defines,
        },
    )
    # BuildExtension honours MAX_JOBS for parallel compilation (ninja).
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="kda-serving",
    version="0.1.0",
    description="Kimi Delta Attention kernels and backends for vLLM and SGLang",
    packages=find_packages(include=["kda_serving", "kda_serving.*"]),
    package_data={"kda_serving.checkpoints": ["presets/*.json", "chat_template.jinja"]},
    python_requires=">=3.10,<3.13",
    install_requires=["torch>=2.4"],
    extras_require={"test": ["pytest"]},
    entry_points={
        "console_scripts": ["kda-serving = kda_serving.cli:main"],
        "vllm.general_plugins": ["kda_serving = kda_serving.integrations.vllm:register"],
        "sglang.srt.plugins": ["kda_serving = kda_serving.integrations.sglang:register"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
