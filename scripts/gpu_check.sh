#!/usr/bin/env bash
# On a Hopper GPU machine: build the extension with every core, run the GPU tests and the
# benchmarks, writing logs and benchmark JSON to OUTDIR.
#
#   scripts/gpu_check.sh OUTDIR [STAGE...]     stages: build tests bench long profile tests-tc ab
#                                              (default: the first four)
#
# build: the extension (skipped when a built kda_serving/_C*.so is present and KDA_SERVING_REBUILD
# is unset; KDA_SERVING_BUILD_DEFINES builds opt-in variants, which doctor.txt and the benchmark
# JSON then name). tests: the GPU tests except the 128K-token split cases; the opt-in chunked CUDA-core
# prefill (KDA_SERVING_PREFILL_KERNEL=chunked) runs in a process of its own, next to the other
# kernels' process, so a fault in one (an illegal address leaves the CUDA context unusable) cannot
# take the other's results with it. bench: prefill (all kernels), decode (and bench_copy.py: what a
# plain copy of decode-sized traffic reaches), the conv prefill, one layer (BENCHES picks some, e.g.
# BENCHES="decode layer"). long: the
# long-context prefill benchmark (extra arguments in LONG_ARGS, e.g. "--heads 8 --max-tokens 131072") and
# the 128K-token split tests. profile: the tensor-core prefill's cycles per phase
# (scripts/profile_tc_phases.cu) at H96 1x8192, H32 1x32768 and H8 1x131072 (unsplit), for this
# tree (also with KDA_SERVING_TC_DIAG=exact and with the bounded gate), the trees in PROFILE_TREES
# and this tree built with each define in PROFILE_DEFINES.
# tests-tc: only the GPU tests of the tensor-core prefill, the conv kernels and the split prefill
# (about 260, three minutes on an H100). ab: the timing-only builds (-DKDA_TC_TIMING_ONLY) of
# profile_tc_phases.cu and profile_conv.cu for this tree and each tree in AB_TREES (directories
# with csrc/ and scripts/: mkdir -p T/scripts && git archive COMMIT csrc | tar -x -C T && cp
# scripts/profile_* T/scripts/) and of this tree with each define in AB_DEFINES (e.g.
# AB_DEFINES="-DKDA_TC_STATE_WGMMA=1", the state pass's opt-in wgmma products), built side by side
# and run interleaved, case by case, into OUTDIR/ab.txt (medians of 7 runs per case) and
# OUTDIR/ab.json (scripts/ab_json.py; a variant without a result is a row with "error").
# Set KDA_SERVING_COMMIT to name the commit in the JSON when the tree has no .git. WHEELS=DIR
# installs the wheels in DIR (e.g. flash-linear-attention and fla-core 0.6.0, the benchmarks'
# baseline) into WHEELS_TARGET (default /tmp/kda-wheels) first and puts it on PYTHONPATH, for a
# machine without network (scripts/install_wheels_offline.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check-out}
shift || true
STAGES=${*:-build tests bench long}
mkdir -p "$OUT"
if [[ -n "${WHEELS:-}" ]]; then
  target=${WHEELS_TARGET:-/tmp/kda-wheels}
  scripts/install_wheels_offline.sh "$WHEELS" "$target" >"$OUT/wheels.log" 2>&1 || { echo "wheels failed: $OUT/wheels.log"; exit 1; }
  export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHONUNBUFFERED=1
rc=0
has() { [[ " $STAGES " == *" $1 "* ]]; }
step() {  # step NAME CMD...: run (at most STEP_TIMEOUT s), log to OUT/NAME.log, print its tail
  local name=$1; shift
  local t0=$SECONDS
  timeout "${STEP_TIMEOUT:-3600}" "$@" >"$OUT/$name.log" 2>&1 || { rc=1; echo "FAILED: $name"; }
  echo "== $name ($((SECONDS - t0)) s)"; tail -n "${TAIL:-6}" "$OUT/$name.log"
}

# variants=("TREE:DEFINE" ...): this tree, each tree in $1, and this tree built with each define in
# $2 (the profile and ab stages); a comma joins defines into one variant
# (-DKDA_TC_STATE_WGMMA=1,-DKDA_TC_PREP_WARPS=8), which variant_flags splits for nvcc.
variant_flags() { local d=${1#*:}; echo "${d//,/ }"; }
set_variants() {
  variants=(".:")
  for t in $1; do variants+=("$t:"); done
  for d in $2; do variants+=(".:$d"); done
}

if has build; then
  if [[ -n "${KDA_SERVING_REBUILD:-}" ]] || ! ls kda_serving/_C*.so >/dev/null 2>&1; then
    step build env KDA_SERVING_CUDA=1 python3 setup.py build_ext --inplace
    ls kda_serving/_C*.so >/dev/null 2>&1 || { echo "build failed: $OUT/build.log"; exit 1; }
  fi
  python3 -m kda_serving.cli doctor | tee "$OUT/doctor.txt"
fi
if has tests; then
  threads=$(( $(nproc) / 2 ))
  limit=${TESTS_TIMEOUT:-1200}  # seconds per test process: a hung kernel must not hold the GPU
  OMP_NUM_THREADS=$threads timeout "$limit" python3 -m pytest -q -ra -m "gpu and not optin_kernel" -k "not 1x128K" tests \
    >"$OUT/pytest-gpu.log" 2>&1 & p1=$!
  OMP_NUM_THREADS=$threads timeout "$limit" python3 -m pytest -q -ra -m "gpu and optin_kernel" tests \
    >"$OUT/pytest-gpu-optin.log" 2>&1 & p2=$!
  wait $p1 || rc=1
  wait $p2 || rc=1
  for f in pytest-gpu pytest-gpu-optin; do echo "== $f"; grep -E "^(FAILED|ERROR)" "$OUT/$f.log" | head -20; tail -n 2 "$OUT/$f.log"; done
fi
if has bench; then
  benches=" ${BENCHES:-prefill decode conv layer} "
  [[ $benches == *" prefill "* ]] && TAIL=22 step bench_prefill python3 scripts/bench_prefill.py --kernels serial chunked --out "$OUT"
  [[ $benches == *" decode "* ]] && TAIL=22 step bench_decode python3 scripts/bench_decode.py --out "$OUT"
  [[ $benches == *" decode "* ]] && TAIL=8 step bench_copy python3 scripts/bench_copy.py --out "$OUT"
  [[ $benches == *" conv "* ]] && TAIL=12 step bench_conv python3 scripts/bench_conv.py --out "$OUT"
  [[ $benches == *" layer "* ]] && TAIL=30 step bench_layer python3 scripts/bench_layer.py --profile --out "$OUT"
fi
if has profile; then
  # PROFILE_TREES: other source trees to time beside this one, case by case in the same call,
  # each a directory with csrc/ and scripts/profile_tc_phases.cu (here:
  # mkdir -p T && git archive COMMIT csrc scripts/profile_tc_phases.cu | tar -x -C T);
  # PROFILE_DEFINES: this tree built with each define too (e.g. -DKDA_TC_STATE_WGMMA=1).
  set_variants "${PROFILE_TREES:-}" "${PROFILE_DEFINES:-}"
  n=0
  for v in "${variants[@]}"; do
    t=${v%%:*} d=$(variant_flags "$v")
    step "profile-build-$n" nvcc -std=c++20 -O3 -gencode arch=compute_90a,code=sm_90a $d -I"$t/csrc" \
      "$t/scripts/profile_tc_phases.cu" -o "$OUT/.profile_tc_$n"
    n=$((n + 1))
  done
  for shape in "1 8192 96" "1 32768 32" "1 131072 8"; do
    echo "### . KDA_SERVING_TC_DIAG=exact $shape" >>"$OUT/profile-tc.log"
    KDA_SERVING_TC_DIAG=exact "$OUT/.profile_tc_0" $shape >>"$OUT/profile-tc.log" 2>&1 || rc=1
    echo "### . KDA_SERVING_PROFILE_GATE=bounded $shape" >>"$OUT/profile-tc.log"
    KDA_SERVING_PROFILE_GATE=bounded "$OUT/.profile_tc_0" $shape >>"$OUT/profile-tc.log" 2>&1 || rc=1
    n=0
    for v in "${variants[@]}"; do
      echo "### ${v%:} $shape" >>"$OUT/profile-tc.log"
      "$OUT/.profile_tc_$n" $shape >>"$OUT/profile-tc.log" 2>&1 || rc=1
      n=$((n + 1))
    done
  done
  grep -E "###|ms" "$OUT/profile-tc.log"
  rm -f "$OUT"/.profile_tc_*
fi
if has tests-tc; then
  OMP_NUM_THREADS=$(nproc) timeout "${TESTS_TIMEOUT:-1200}" python3 -m pytest -q -ra -m gpu \
    tests/gpu/test_prefill_chunked_gpu.py tests/gpu/test_kernels_gpu.py tests/gpu/test_split_prefill_gpu.py \
    -k "test_tc_ or prefill_tc or conv_prefill or conv_update or tensor_core or varlen" >"$OUT/pytest-gpu-tc.log" 2>&1 || rc=1
  grep -E "^(FAILED|ERROR)" "$OUT/pytest-gpu-tc.log" | head -20; tail -n 2 "$OUT/pytest-gpu-tc.log"
fi
if has ab; then
  # Variants: this tree, each tree in AB_TREES, and this tree built with each define in AB_DEFINES
  # (e.g. AB_DEFINES="-DKDA_TC_STATE_WGMMA=1"); "tree:define" each, named so in ab.txt.
  set_variants "${AB_TREES:-}" "${AB_DEFINES:-}"
  n=0; pids=()
  for v in "${variants[@]}"; do
    t=${v%%:*} d=$(variant_flags "$v")
    nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -DKDA_TC_TIMING_ONLY $d -I"$t/csrc" "$t/scripts/profile_tc_phases.cu" \
      -o "$OUT/.ab_tc_$n" >"$OUT/.ab_build_tc_$n.log" 2>&1 & pids+=($!)
    nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a $d -I"$t/csrc" "$t/scripts/profile_conv.cu" \
      -o "$OUT/.ab_conv_$n" >"$OUT/.ab_build_conv_$n.log" 2>&1 & pids+=($!)
    n=$((n + 1))
  done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  for f in "$OUT"/.ab_build_*.log; do [[ -s $f ]] && { echo "build output ($f):"; tail -n 5 "$f"; }; done
  for c in "kimi 1 8192 96" "bounded 1 8192 96" "kimi 8 1024 96" "kimi 1 32768 32" "kimi 8 4096 32" conv; do
    n=0
    for v in "${variants[@]}"; do
      echo "### ${v%:} $c" >>"$OUT/ab.txt"
      if [[ $c == conv ]]; then
        timeout 120 "$OUT/.ab_conv_$n" 1 16384 12288 >>"$OUT/ab.txt" 2>&1 || rc=1
      else
        set -- $c
        KDA_SERVING_PROFILE_GATE=$1 KDA_SERVING_PROFILE_REPS=7 timeout 120 "$OUT/.ab_tc_$n" "${@:2}" >>"$OUT/ab.txt" 2>&1 || rc=1
      fi
      n=$((n + 1))
    done
  done
  grep -E "###|total|floor" "$OUT/ab.txt"
  python3 scripts/ab_json.py "$OUT/ab.txt" "$OUT/ab.json" --commit "${KDA_SERVING_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}" || rc=1
  rm -f "$OUT"/.ab_*
fi
if has long; then
  TAIL=40 step bench_prefill-long python3 scripts/bench_prefill.py --long --out "$OUT" ${LONG_ARGS:-}
  step pytest-gpu-long python3 -m pytest -q -ra -m gpu -k "1x128K" tests
fi
exit $rc
