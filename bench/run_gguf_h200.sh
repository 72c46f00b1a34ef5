#!/usr/bin/env bash
# GGUF quantizer speed on the GPU machine: one device call (carry [".whl"], ~4 min).
#   bash bench/run_gguf_h200.sh
# Writes $OUT/gguf-<date>-<gpu>-cuda.json (the quantizers on the GPU and the whole 8B export through
# corept.save) and $OUT/gguf-<date>-<gpu>-cpu.json (the quantizers on the machine's CPU cores).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
: "${OUT:?OUT must name the output folder}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TMPDIR=/tmp
PIP="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade"
$PIP --target /tmp/site_gguf .whl/gguf-*.whl .whl/importlib_metadata-*.whl .whl/zipp-*.whl .whl/lazy_importer-*.whl || { echo "FAILED: gguf wheel"; exit 1; }
rm -rf /tmp/site_corept
python3 -P bench/e2e.py --link-site /tmp/site_corept || { echo "FAILED: corept link"; exit 1; }
export PYTHONPATH=/tmp/site_corept:/tmp/site_gguf
GPU=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower())" 2>/dev/null || echo gpu)
DAY=$(date +%F)
python3 -P bench/gguf_export.py --device cuda --export q4_k_m q8_0 --out "$OUT/gguf-$DAY-$GPU-cuda.json"
python3 -P bench/gguf_export.py --device cpu --repeats 1 --out "$OUT/gguf-$DAY-$GPU-cpu.json"
