#!/usr/bin/env bash
# Multi-GPU benchmark on the 2xH200 machine, ONE device call (kind nvidia-h200-x2, carry [".whl"], timeout_s 600):
#
#   bash bench/run_multigpu_h200x2.sh [extra bench/multigpu.py flags]
#
# Installs the wheels the image lacks (trl, datasets, bitsandbytes, importlib-metadata, ... : every
# .whl but Unsloth's) into /tmp/site_base, links corept's distributions into /tmp/site_corept, then
# runs bench/multigpu.py (single GPU vs DDP on Llama-3.1-8B, FSDP2 on Llama-3.1-70B, the CLI
# launchers) inside MG_CALL_S seconds (default 480, setup included). NVLink multicast stays off.
# Results: $OUT/multigpu-<date>-h200x2.json/.md, logs $OUT/logs, setup log $OUT/setup.log.
# Afterwards copy the .json/.md into bench/results/ and the table into docs/benchmarks.md.
set -uo pipefail
T0=$SECONDS
cd "$(dirname "$0")/.." || exit 1
: "${OUT:?OUT must name the output folder}"
mkdir -p "$OUT"
CALL_S=${MG_CALL_S:-480}
export NCCL_NVLS_ENABLE=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 \
       TOKENIZERS_PARALLELISM=false
PIP="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade"
(
  if [ ! -f /tmp/site_base/.mg-ok ]; then
    rm -rf /tmp/site_base
    $PIP --target /tmp/site_base $(ls .whl/*.whl | grep -v -E '/(unsloth|unsloth_zoo|cut_cross_entropy|msgspec|liger_kernel)-') \
      && touch /tmp/site_base/.mg-ok || { echo "FAILED: wheels into /tmp/site_base"; exit 1; }
  fi
  rm -rf /tmp/site_corept
  python3 -P bench/e2e.py --link-site /tmp/site_corept || { echo "FAILED: corept into /tmp/site_corept"; exit 1; }
  nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader
  nvidia-smi topo -m | head -5
  free -g | sed -n 2p
  python3 -P -c "import torch, transformers, peft, accelerate; print('image:', torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__, torch.cuda.device_count(), 'GPUs')"
  true
) > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
tail -6 "$OUT/setup.log"
echo "setup took $((SECONDS - T0))s"
exec python3 -P bench/multigpu.py --out "$OUT" --site-corept /tmp/site_corept --site-base /tmp/site_base \
  --budget-s $((CALL_S - (SECONDS - T0))) "$@"
