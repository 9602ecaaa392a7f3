#!/usr/bin/env bash
# Compile-only check of every csrc/**/*.cu (and the standalone scripts/*.cu tools) for sm_90a, and
# of the tensor-core prefill with its opt-in build defines (EXTRA below); needs nvcc, not torch or
# a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
JOBS=${JOBS:-$(nproc)}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

compile_one() {  # compile_one "SRC [DEFINE]" OUTDIR NVCC
  local src=${1%% *} def="" out=$2 nvcc=$3
  [[ $1 == *" "* ]] && def=${1#* }
  local name="$(echo "$1" | tr '/ =' '___')"
  local obj="$out/$name.o" log="$out/$name.log"
  local t0=$SECONDS
  if "$nvcc" -std=c++17 -O3 -c -gencode arch=compute_90a,code=sm_90a $def -Icsrc "$src" -o "$obj" >"$log" 2>&1; then
    echo "ok    $1 ($((SECONDS - t0))s)"
  else
    echo "FAIL  $1"
    sed 's/^/      /' "$log"
    return 1
  fi
}
export -f compile_one

mapfile -t FILES < <(find csrc scripts -name '*.cu' | sort)
if [ ${#FILES[@]} -eq 0 ]; then echo "no .cu files under csrc"; exit 1; fi
# Opt-in builds that the extension does not compile by default.
EXTRA=("csrc/prefill/kda_prefill_tc_launch.cu -DKDA_TC_STATE_WGMMA=1")
FILES+=("${EXTRA[@]}")
start=$SECONDS
printf '%s\n' "${FILES[@]}" | xargs -P "$JOBS" -I{} bash -c 'compile_one "$1" "$2" "$3"' _ {} "$OUT" "$NVCC"
rc=$?
echo "compile_check: ${#FILES[@]} files, $((SECONDS - start))s, $([ $rc -eq 0 ] && echo passed || echo FAILED)"
exit $rc
