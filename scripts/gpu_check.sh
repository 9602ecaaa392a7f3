#!/usr/bin/env bash
# On a Hopper GPU machine: build the extension with every core, run the GPU tests, then the
# benchmarks, writing logs and benchmark JSON to OUTDIR.
#
# The opt-in kernels (KDA_SERVING_PREFILL_KERNEL=chunked / tc, not yet validated on a GPU) run
# in processes of their own, after everything else: a fault in one of them (an illegal address
# leaves the CUDA context unusable) cannot take the default kernels' results with it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check-out}
mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
rc=0
KDA_SERVING_CUDA=1 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || { echo "build failed: $OUT/build.log"; exit 1; }
python3 -m kda_serving.cli doctor | tee "$OUT/doctor.txt"

python3 -m pytest -q -ra -m "gpu and not optin_kernel" tests >"$OUT/pytest-gpu.log" 2>&1 || rc=1
tail -3 "$OUT/pytest-gpu.log"
for b in scripts/bench_prefill.py scripts/bench_decode.py scripts/bench_layer.py; do
  python3 "$b" --out "$OUT" >"$OUT/$(basename "$b" .py).log" 2>&1 || rc=1
  tail -20 "$OUT/$(basename "$b" .py).log"
done

python3 -m pytest -q -ra -m "gpu and optin_kernel" tests >"$OUT/pytest-gpu-optin.log" 2>&1 || rc=1
tail -3 "$OUT/pytest-gpu-optin.log"
python3 scripts/bench_prefill.py --chunked --out "$OUT" >"$OUT/bench_prefill-chunked.log" 2>&1 || rc=1
tail -20 "$OUT/bench_prefill-chunked.log"
exit $rc
