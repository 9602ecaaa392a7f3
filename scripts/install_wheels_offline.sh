#!/usr/bin/env bash
# Install wheels brought to a machine without network into a separate target directory, keeping
# the machine's own torch / triton (docs/vllm.md, "Installing vLLM 0.26 on a GPU machine without
# network"). Wheels too large to bring in one go may come as pieces NAME.whl.partNN (from
# `split -b 56M -d NAME.whl NAME.whl.part`); they are joined first and checked against
# NAME.whl.sha256 when that file exists. A slimmed vLLM from scripts/pack_vllm_slim.sh
# (vllm-slim.tar.xz.partNN + .sha256) is joined, checked and unpacked into TARGET the same way.
#
#   scripts/install_wheels_offline.sh WHEEL_DIR TARGET      # then: export PYTHONPATH=TARGET:$PYTHONPATH
set -euo pipefail
DIR=${1:?wheel directory}
TARGET=${2:?target directory}
shopt -s nullglob
for first in "$DIR"/*.whl.part00; do
  whl=${first%.part00}
  if [ ! -e "$whl" ]; then
    cat "$whl".part[0-9][0-9] >"$whl.tmp" && mv "$whl.tmp" "$whl"
    echo "joined $(basename "$whl") from $(ls "$whl".part[0-9][0-9] | wc -l) pieces"
  fi
  if [ -e "$whl.sha256" ]; then
    want=$(cut -d' ' -f1 <"$whl.sha256")
    got=$(sha256sum "$whl" | cut -d' ' -f1)
    [ "$want" = "$got" ] || { echo "sha256 mismatch for $(basename "$whl"): $got, want $want"; exit 1; }
  fi
done
for first in "$DIR"/*.tar.xz.part00; do
  arc=${first%.part00}
  cat "$arc".part[0-9][0-9] >"$arc"
  if [ -e "$arc.sha256" ]; then
    (cd "$(dirname "$arc")" && sha256sum -c --quiet "$(basename "$arc").sha256") || { echo "sha256 mismatch for $arc"; exit 1; }
  fi
  mkdir -p "$TARGET" && tar xJf "$arc" -C "$TARGET" && rm "$arc"
  echo "unpacked $(basename "$arc") into $TARGET"
done
wheels=("$DIR"/*.whl)
[ ${#wheels[@]} -gt 0 ] || { echo "no wheels in $DIR"; exit 1; }
python3 -m pip install --no-index --no-deps --target "$TARGET" "${wheels[@]}"
echo "installed ${#wheels[@]} wheels into $TARGET"
