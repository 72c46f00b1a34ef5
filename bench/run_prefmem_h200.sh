#!/usr/bin/env bash
# DPO/KTO memory benchmark on the H200 (bench/preference_memory.py), one device call of at most ~3 minutes:
#
#   device call (carry [".whl"], timeout_s 200):   bash bench/run_prefmem_h200.sh [extra bench/preference_memory.py flags]
#
# Default plan, most useful first: hf, corept, hf_logits at 2048 tokens per row, then the same at 4096;
# what no longer fits in the call's budget is recorded as skipped. A second call for the long case:
#   bash bench/run_prefmem_h200.sh --lengths 4096 --variants hf,corept
# The image lacks trl, datasets (and their dill, multiprocess) and importlib-metadata (corept's plugin
# discovery): they come from .whl/ (bash ../shared/gpu/fetch-wheels.sh on the CPU machine) into
# /tmp/site_pref; corept's own packages are linked into /tmp/site_corept (no build).
# PREFMEM_CALL_S (default 170) is the whole call's length in seconds, setup included.
# Results: $OUT/prefmem-<date>-h200.json/.md, worker logs $OUT/logs, setup log $OUT/setup.log.
set -uo pipefail
T0=$SECONDS
cd "$(dirname "$0")/.." || exit 1
: "${OUT:?OUT must name the output folder}"
mkdir -p "$OUT"
CALL_S=${PREFMEM_CALL_S:-170}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

PIP="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade"
(
  if [ ! -f /tmp/site_pref/.ok ]; then
    rm -rf /tmp/site_pref
    WHEELS=$(ls .whl/*.whl 2>/dev/null | grep -E '/(trl|datasets|dill|multiprocess|importlib_metadata|zipp|lazy_importer)-')
    [ "$(echo "$WHEELS" | grep -c .)" -eq 7 ] || { echo "FAILED: .whl/ lacks some of trl, datasets, dill, lazy_importer," \
      "multiprocess, importlib_metadata, zipp (found: $WHEELS); carry .whl"; exit 1; }
    $PIP --target /tmp/site_pref $WHEELS && touch /tmp/site_pref/.ok || { echo "FAILED: wheels into /tmp/site_pref"; exit 1; }
  fi
  rm -rf /tmp/site_corept
  python3 -P bench/e2e.py --link-site /tmp/site_corept || { echo "FAILED: corept into /tmp/site_corept"; exit 1; }
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
) > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
tail -3 "$OUT/setup.log"
echo "setup took $((SECONDS - T0))s"

BUDGET=$((CALL_S - (SECONDS - T0)))
exec python3 -P bench/preference_memory.py --out "$OUT" --tag h200 --site-base /tmp/site_pref \
  --site-corept /tmp/site_corept --budget-s "$BUDGET" "$@"
