#!/usr/bin/env bash
# End-to-end benchmark on the H200: ONE preset per device call; each is sized to end inside ~9.5 min.
#
#   device call (carry [".whl"], timeout_s 600):   bash bench/run_e2e_h200.sh PRESET [extra bench/e2e.py flags]
#
# Presets, most useful first (each is self-contained: a fresh machine reinstalls the wheels and
# re-saves the checkpoint it needs; a warm one reuses /tmp):
#   llama-both      Llama-3.1-8B, both shapes in one process per variant (--group-shapes): hf, corept, unsloth
#                   and their QLoRA forms, corept's runs profiled (~8.5 min; the 2026-11-29 second run's form)
#   qwen-both       the same for Qwen3-8B
#   llama-2k        Llama-3.1-8B 2x2048, all eight variants
#   llama-8k        Llama-3.1-8B 1x8192, all eight variants
#   qwen-2k         Qwen3-8B 2x2048, all eight variants
#   qwen-8k         Qwen3-8B 1x8192, all eight variants
#   maxseq-corept   longest sequence in 24 GiB (QLoRA r32, Llama-3.1-8B), corept_qlora_lean (lean mode): from 122880 up to 131072
#                   (Llama-3.1's positions), 8192 steps, 2 steps per probe: the second runs with AdamW's
#                   states allocated, as every later step does (~3 min a probe)
#   maxseq-hf       the same for hf_qlora: from 8192, 1024 steps (issue's figure: 9,216)
#   maxseq-unsloth  the same for unsloth_qlora, bracketed 65536..81920, 4096 steps, 2 steps per probe
#                   (issue's figure: 71,680; each probe compiles, ~2 min)
#   gpu-check       optional (~4 min; llama-2k is a check too): every variant on a 2-layer cut of
#                   Llama-3.1-8B (real widths), 2x2048, 1+2 steps; gpu-check-qwen: the Qwen3 cut
#   cuda-tests      no benchmark: the CUDA tests (kernels' CUDA twins, the offload's and the 4-bit MoE load's) against the
#                   image's torch/triton, the wheels on the path (~3 min); logs in $OUT/pytest-*.log;
#                   CUDA_TESTS_K narrows the kernels' selection (pytest -k; default "cuda")
#   regression      corept against an earlier commit's corept on the same machine (its wheels in .whl/prev/,
#                   built with `pip wheel --no-deps -w .whl/prev <old tree> <old tree>/kernels <old tree>/plugins/...`):
#                   Llama-3.1-8B corept, corept_prev, their QLoRA forms and unsloth, then Qwen3-8B corept and
#                   corept_prev, both shapes (~9 min)
#   regression-qlora  corept_qlora against corept_qlora_prev, Llama-3.1-8B and Qwen3-8B, both shapes (~4 min)
#   compile         issue 18's check: the compile-safety tests on CUDA (kernels/tests/test_compile.py,
#                   TRITON_INTERPRET=0), a 2-layer Llama-3.1-8B cut through corept compiled vs eager (LoRA and
#                   QLoRA, 2x2048 and 8x512 in one process: recompiles show), then Llama-3.1-8B corept,
#                   corept_eager and unsloth at 2x2048 and 8x512 (~9.5 min)
#   issue18-lora    Llama-3.1-8B LoRA r16 at 2x2048, 8x512 and 1x8192 in one process per variant: hf, corept
#                   (defaults: checkpointing auto, layers compiled), corept_eager (compile=False),
#                   corept_lean (checkpointing "corept"), unsloth (~8 min); MODEL=qwen3-8b for Qwen3-8B
#   issue18-both    one call for both: hf, corept, corept_lean, unsloth, hf_qlora, corept_qlora, unsloth_qlora
#                   at 2x2048 and 1x8192 (~9 min; SHAPES overrides the shapes)
#   issue18-qlora   the same with QLoRA: hf_qlora, corept_qlora, corept_qlora_eager, corept_qlora_lean,
#                   unsloth_qlora
#   packing         packed vs padded SFT through TRL's SFTTrainer (bench/packing.py, not bench/e2e.py): Llama-3.1-8B,
#                   LoRA r16, 16,384 tokens per optimizer step, heavy-tailed document lengths, one epoch of ~10 steps
#                   per run: corept_packed, hf_packed, unsloth (its default batching), corept_padded, hf_padded,
#                   unsloth_packed (~9 min; what does not fit is recorded as skipped)
#   packing-qlora   the same with QLoRA: corept_qlora_packed, hf_qlora_packed, unsloth_qlora, corept_qlora_padded,
#                   hf_qlora_padded, unsloth_qlora_packed
#                   (both: MODEL=qwen3-8b for Qwen3-8B; VARIANTS=a,b,... replaces the preset's variants, e.g. to
#                   rerun skipped ones; results $OUT/packing-<date>-<card>-<preset>-<model>.json/.md, merged on the
#                   CPU machine with: python3 bench/packing.py --merge <the .json files> --out bench/results)
#   grpo            GRPO through TRL's GRPOTrainer (bench/grpo_memory.py, not bench/e2e.py): Llama-3.1-8B, LoRA r16,
#                   one 256-token prompt per step, a group of 8 completions of exactly 1024 tokens, 1 warm-up + 2
#                   steps: hf (peft_config + TRL's checkpointing), corept, corept_lean; peak memory (generation and
#                   training apart), × hf, step/generation seconds, then generate() tok/s (hf's peft model; corept
#                   patched, then unpatched). What does not fit is recorded as skipped: rerun it with VARIANTS=...;
#                   VARIANTS=hf_qlora,corept_qlora for QLoRA (~3-4 min a variant: sampling dominates)
#   grpo-qlora      longest completion under 24 GiB (QLoRA, group 8, 2 steps per probe), corept_qlora_lean: from
#                   8192, 1024 steps; probes replace sampling by a chunked KV-cache prefill of random completions
#                   (the same cache, minutes less); VARIANTS=hf_qlora MAXLEN_START=2048 for HF's
#                   (both: MODEL=qwen3-8b for Qwen3-8B; results $OUT/grpomem-<date>-<card>-<preset>-<model>.json/.md)
#   moe             issue 24: gpt-oss-20b and Qwen3-30B-A3B (at half depth: qwen3-30b-a3b-24l) shapes (random bf16 weights), LoRA r16 on attention + the
#                   stacked experts (peft's target_parameters), 1x4096 and 4x1024 in one process per variant: hf, corept,
#                   unsloth (~9 min; never run yet: first check with MODELS in --models one at a time if it runs out)
#   custom          nothing preset: pass --models/--variants/--shapes/--maxseq yourself
# With less than 600 s of device time left, set E2E_CALL_S (seconds the call may take) lower.
# Variant order inside a preset is by importance (hf, corept, unsloth first): when a call runs out
# of time the driver records the rest as "skipped" and they can be rerun with `custom`.
# Results: $OUT/e2e-<date>-h200-<preset>.json/.md, worker logs $OUT/logs, setup log $OUT/setup.log.
# Afterwards, on the CPU machine: python3 bench/e2e.py --merge <the fetched .json files> --out bench/results
set -uo pipefail
T0=$SECONDS
cd "$(dirname "$0")/.." || exit 1
: "${OUT:?OUT must name the output folder}"
mkdir -p "$OUT"
PRESET=${1:-help}
shift || true
CALL_S=${E2E_CALL_S:-585}   # the device call's limit minus a margin; lower it when less device time is left
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 \
       UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false

case "$PRESET" in
  llama-both|qwen-both|llama-2k|llama-8k|qwen-2k|qwen-8k|maxseq-corept|maxseq-hf|maxseq-unsloth|gpu-check|gpu-check-qwen|cuda-tests|regression|regression-qlora|compile|issue18-lora|issue18-qlora|issue18-both|packing|packing-qlora|grpo|grpo-qlora|moe|custom) ;;
  *) sed -n '2,/^set /p' "$0" | sed '$d'; exit 2 ;;
esac

# 1. Wheels, split so no stack sees another's packages: base = all but unsloth's own; unsloth = all.
PIP="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade"
(
  if [ ! -f /tmp/site_base/.e2e-ok ]; then
    rm -rf /tmp/site_base
    $PIP --target /tmp/site_base $(ls .whl/*.whl | grep -v -E '/(unsloth|unsloth_zoo|cut_cross_entropy|msgspec)-') \
      && touch /tmp/site_base/.e2e-ok || { echo "FAILED: wheels into /tmp/site_base"; exit 1; }
  fi
  if [ ! -f /tmp/site_unsloth/.e2e-ok ]; then
    rm -rf /tmp/site_unsloth
    $PIP --target /tmp/site_unsloth .whl/*.whl && touch /tmp/site_unsloth/.e2e-ok \
      || { echo "FAILED: wheels into /tmp/site_unsloth"; exit 1; }
  fi
  # 2. corept's own distributions (entry points need dist-infos): linked from this tree, no build.
  if ls .whl/prev/*.whl > /dev/null 2>&1; then  # an earlier commit's corept, for the *_prev variants
    rm -rf /tmp/site_corept_prev
    $PIP --target /tmp/site_corept_prev .whl/prev/*.whl || { echo "FAILED: .whl/prev into /tmp/site_corept_prev"; exit 1; }
  fi
  rm -rf /tmp/site_corept
  python3 -P bench/e2e.py --link-site /tmp/site_corept \
    || $PIP --no-build-isolation --target /tmp/site_corept . ./kernels ./plugins/llama ./plugins/qwen \
    || { echo "FAILED: corept into /tmp/site_corept"; exit 1; }
  # diagnostics only (never fatal): the GPU as found, disk and memory, the image's versions
  nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.max.sm,power.draw --format=csv,noheader
  df -h /tmp | tail -1
  free -g | sed -n 2p
  python3 -P -c "import torch, transformers, peft; print('image:', torch.__version__, transformers.__version__, peft.__version__)"
  true
) > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
tail -5 "$OUT/setup.log"
echo "setup took $((SECONDS - T0))s"

if [ "$PRESET" = cuda-tests ]; then
  rc=0
  TRITON_INTERPRET=0 PYTHONPATH=/tmp/site_corept:kernels/tests:/tmp/site_base timeout 240 \
    python3 -m pytest -q -p no:cacheprovider -rs kernels/tests -k "${CUDA_TESTS_K:-cuda}" > "$OUT/pytest-kernels.log" 2>&1 || rc=1
  tail -3 "$OUT/pytest-kernels.log"
  PYTHONPATH=/tmp/site_corept:tests:/tmp/site_base timeout 180 \
    python3 -m pytest -q -p no:cacheprovider -rs tests/training/test_checkpointing.py tests/training/test_cuda_memory.py \
    tests/loading/test_experts_onload.py::test_4bit_moe_load_never_holds_the_16bit_experts_on_the_gpu \
    > "$OUT/pytest-offload.log" 2>&1 || rc=1
  tail -3 "$OUT/pytest-offload.log"
  exit $rc
fi

SITES=(--site-base /tmp/site_base --site-corept /tmp/site_corept --site-unsloth /tmp/site_unsloth
       --site-corept-prev /tmp/site_corept_prev)
ALL=hf,corept,unsloth,hf_qlora,corept_qlora,unsloth_qlora,liger,hf_bf16
SIX=hf,corept,unsloth,hf_qlora,corept_qlora,unsloth_qlora
case "$PRESET" in
  llama-both) ARGS=(--models llama-3.1-8b --shapes 2x2048,1x8192 --group-shapes --variants $SIX
                    --profile corept,corept_qlora) ;;
  qwen-both)  ARGS=(--models qwen3-8b --shapes 2x2048,1x8192 --group-shapes --variants $SIX
                    --profile corept,corept_qlora) ;;
  llama-2k) ARGS=(--models llama-3.1-8b --shapes 2x2048 --variants $ALL) ;;
  llama-8k) ARGS=(--models llama-3.1-8b --shapes 1x8192 --variants $ALL) ;;
  qwen-2k)  ARGS=(--models qwen3-8b --shapes 2x2048 --variants $ALL) ;;
  qwen-8k)  ARGS=(--models qwen3-8b --shapes 1x8192 --variants $ALL) ;;
  maxseq-corept)  ARGS=(--variants none --maxseq corept_qlora_lean --maxseq-start 122880 --maxseq-max 131072
                        --maxseq-step 8192 --maxseq-steps 2 --maxseq-timeout 270) ;;
  maxseq-hf)      ARGS=(--variants none --maxseq hf_qlora --maxseq-start 8192 --maxseq-step 1024) ;;
  maxseq-unsloth) ARGS=(--variants none --maxseq unsloth_qlora --maxseq-start 65536 --maxseq-max 81920
                        --maxseq-step 4096 --maxseq-steps 2 --maxseq-timeout 420) ;;
  gpu-check)      ARGS=(--models llama-3.1-8b-2l --shapes 2x2048 --variants $ALL --steps 2 --warmup 1) ;;
  gpu-check-qwen) ARGS=(--models qwen3-8b-2l --shapes 2x2048 --variants $ALL --steps 2 --warmup 1) ;;
  regression) exec_twice=1 ;;
  regression-qlora) ARGS=(--models llama-3.1-8b,qwen3-8b --shapes 2x2048,1x8192 --group-shapes
                          --variants corept_qlora,corept_qlora_prev) ;;
  issue18-lora)  ARGS=(--models "${MODEL:-llama-3.1-8b}" --shapes 2x2048,8x512,1x8192 --group-shapes
                       --variants hf,corept,corept_eager,corept_lean,unsloth) ;;
  issue18-both)  ARGS=(--models "${MODEL:-llama-3.1-8b}" --shapes "${SHAPES:-2x2048,1x8192}" --group-shapes
                       --variants hf,corept,corept_lean,unsloth,hf_qlora,corept_qlora,unsloth_qlora) ;;
  issue18-qlora) ARGS=(--models "${MODEL:-llama-3.1-8b}" --shapes 2x2048,8x512,1x8192 --group-shapes
                       --variants hf_qlora,corept_qlora,corept_qlora_eager,corept_qlora_lean,unsloth_qlora) ;;
  moe)      ARGS=(--models "${MODELS:-gpt-oss-20b,qwen3-30b-a3b-24l}" --shapes 1x4096,4x1024 --group-shapes
                  --variants "${VARIANTS:-hf,corept,unsloth}") ;;
  custom)   ARGS=() ;;
esac
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -o -i -E 'h100|h200|a100' | tr A-Z a-z)
case "$PRESET" in
  packing|packing-qlora)  # bench/packing.py, one process per run (its own driver, the same site folders)
    PACK=corept_packed,hf_packed,unsloth,corept_padded,hf_padded,unsloth_packed
    [ "$PRESET" = packing-qlora ] && PACK=corept_qlora_packed,hf_qlora_packed,unsloth_qlora,corept_qlora_padded,hf_qlora_padded,unsloth_qlora_packed
    exec python3 -P bench/packing.py --models "${MODEL:-llama-3.1-8b}" --variants "${VARIANTS:-$PACK}" \
      --site-base /tmp/site_base --site-corept /tmp/site_corept --site-unsloth /tmp/site_unsloth --out "$OUT" \
      --tag "${CARD:-gpu}-$PRESET-${MODEL:-llama-3.1-8b}" --budget-s $((CALL_S - (SECONDS - T0) - 5)) "$@" ;;
  grpo|grpo-qlora)  # bench/grpo_memory.py, one process per variant or probe (its own driver, the same site folders)
    if [ "$PRESET" = grpo ]; then
      GRPO=(--variants "${VARIANTS:-hf,corept,corept_lean}")
    else
      GRPO=(--variants none --maxlen "${VARIANTS:-corept_qlora_lean}" --cap-gib 24 --maxlen-start "${MAXLEN_START:-8192}"
            --maxlen-step 1024 --maxlen-steps 2 --maxlen-timeout 300)
    fi
    exec python3 -P bench/grpo_memory.py --model "${MODEL:-llama-3.1-8b}" "${GRPO[@]}" \
      --site-base /tmp/site_base --site-corept /tmp/site_corept --out "$OUT" \
      --tag "${CARD:-gpu}-$PRESET-${MODEL:-llama-3.1-8b}" --budget-s $((CALL_S - (SECONDS - T0) - 5)) "$@" ;;
esac
if [ "$PRESET" = compile ]; then
  TRITON_INTERPRET=0 PYTHONPATH=/tmp/site_corept:kernels/tests:/tmp/site_base timeout 150 \
    python3 -m pytest -q -p no:cacheprovider -rs kernels/tests/test_compile.py > "$OUT/pytest-compile.log" 2>&1
  tail -3 "$OUT/pytest-compile.log"
  python3 -P bench/e2e.py --steps 3 --warmup 2 --models llama-3.1-8b-2l --shapes 2x2048,8x512 --group-shapes \
    --variants corept,corept_eager,corept_qlora,corept_qlora_eager "${SITES[@]}" --out "$OUT" \
    --tag "${CARD:-gpu}-compile-check" --budget-s 150 "$@"
  exec python3 -P bench/e2e.py --steps 8 --warmup 2 --models llama-3.1-8b --shapes 2x2048,8x512 --group-shapes \
    --variants corept,corept_eager,unsloth "${SITES[@]}" --out "$OUT" --tag "${CARD:-gpu}-compile-llama" \
    --budget-s $((CALL_S - (SECONDS - T0))) "$@"
fi
if [ "${exec_twice:-0}" = 1 ]; then  # two models, the first with more variants; one results file each
  python3 -P bench/e2e.py --steps 8 --warmup 2 --models llama-3.1-8b --shapes 2x2048,1x8192 --group-shapes \
    --variants corept,corept_prev,corept_qlora,corept_qlora_prev,unsloth "${SITES[@]}" --out "$OUT" \
    --tag "${CARD:-gpu}-regression-llama" --budget-s $((CALL_S - (SECONDS - T0) - 150)) "$@"
  exec python3 -P bench/e2e.py --steps 8 --warmup 2 --models qwen3-8b --shapes 2x2048,1x8192 --group-shapes \
    --variants corept,corept_prev "${SITES[@]}" --out "$OUT" --tag "${CARD:-gpu}-regression-qwen" \
    --budget-s $((CALL_S - (SECONDS - T0))) "$@"
fi
BUDGET=$((CALL_S - (SECONDS - T0) - 5))
python3 -P bench/e2e.py --steps 8 --warmup 2 "${ARGS[@]}" "${SITES[@]}" --out "$OUT" --tag "${CARD:-gpu}-$PRESET" \
  --budget-s "$BUDGET" "$@"
rc=$?
for f in "$OUT"/logs/*+*; do [ -e "$f" ] && cp "$f" "${f//+/_}"; done  # the device tool skips names with '+'
exit $rc
