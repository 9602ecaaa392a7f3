#!/usr/bin/env bash
# Repack a vLLM 0.26 wheel for a Hopper machine without network, small enough to carry in two
# 63 MB pieces (290 MiB as a wheel, ~111 MB this way). Dropped: what a Hopper run of Kimi-Linear
# never loads: the FlashAttention-2 library (Hopper uses FA3), the vllm-rs binary, the SM100
# attention sources, DeepGEMM's JIT headers (fp8 only) and its extensions for other Pythons.
#
#   scripts/pack_vllm_slim.sh VLLM_WHEEL OUTDIR    # writes OUTDIR/vllm-slim.tar.xz.partNN + .sha256
# On the GPU machine, with the pieces, the .sha256 and the dependency wheels in one folder:
# scripts/install_wheels_offline.sh FOLDER TARGET (joins, checks, unpacks, installs), then
# export PYTHONPATH=TARGET.
set -euo pipefail
WHEEL=${1:?vllm wheel}
OUTDIR=${2:?output directory}
mkdir -p "$OUTDIR"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m zipfile -e "$WHEEL" "$work"
cd "$work"
rm -f vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/vllm-rs
rm -rf vllm/third_party/fmha_sm100 vllm/third_party/deep_gemm/include
find vllm/third_party/deep_gemm -name '_C.cpython-*.so' ! -name '_C.cpython-312-*' -delete
tar cf - vllm vllm-*.dist-info | xz -T0 -9e >"$OUTDIR/vllm-slim.tar.xz"
cd "$OUTDIR"
sha256sum vllm-slim.tar.xz >vllm-slim.tar.xz.sha256
split -b 63000000 -d vllm-slim.tar.xz vllm-slim.tar.xz.part
rm vllm-slim.tar.xz
ls -l "$OUTDIR"
