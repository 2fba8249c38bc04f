#!/usr/bin/env bash
# The README's main job: install, prepare the bundled C4 slice, train a small GPT four times under the
# DeepSpeed launcher -- megatron's dense head, the dense head plus a unigram-initialised per-token bias,
# VQ-Logits as in the paper (vq.refine_rank=0) and the two-level VQ head (VQ-Logits + rank-8 within-code
# refinement, the configs' default) -- with identical body, data, steps and seed, evaluate them on C4
# validation (+ WikiText-2 valid when ../shared/data is present) and print a side-by-side table.
# Defaults run on CPU (2 processes, TP=2, a few minutes per run); the same script scales by config.
# Env: CONFIG (configs/c4_small.yaml), OUT (runs/c4_small), DATA (runs/data), VOCAB_SIZE (8000),
#      STEPS (from CONFIG), WIKITEXT (../shared/data/wikitext-2/wiki.valid.tokens.gz), NUM_GPUS,
#      REFINE_RANK (8: the two-level head's rank), RESUME (0: start the runs afresh),
#      MAIN_RUNS ("dense dense_bias vq_logits vq_refined": which of the runs, in this order). Extra arguments are
#      passed to the trainer of every run (e.g. --set ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
PY=.venv/bin/python
CONFIG="${CONFIG:-configs/c4_small.yaml}"
OUT="${OUT:-runs/c4_small}"
DATA="${DATA:-runs/data}"
VOCAB_SIZE="${VOCAB_SIZE:-8000}"
WIKITEXT="${WIKITEXT:-../shared/data/wikitext-2/wiki.valid.tokens.gz}"
SP_MODEL="$DATA/c4_sp$VOCAB_SIZE.model"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

mkdir -p "$DATA"
if [[ ! -f "$DATA/c4_train.idx" || ! -f "$SP_MODEL" ]]; then
  echo "[main] tokenizer ($VOCAB_SIZE pieces) + C4 train slice -> $DATA"
  $PY -m vq_megatron.data.prepare --input data/c4_slice/c4-train.slice.jsonl.gz --output-prefix "$DATA/c4_train" \
    --train-sp --vocab-size "$VOCAB_SIZE" --sp-model-prefix "${SP_MODEL%.model}" --workers 2
  $PY -m vq_megatron.data.prepare --input data/c4_slice/c4-validation.slice.jsonl.gz \
    --output-prefix "$DATA/c4_val" --sp-model "$SP_MODEL" --workers 2
fi
SETS=(--set "data.eval_sets.c4_val=$DATA/c4_val")
if [[ -f "$WIKITEXT" ]]; then
  [[ -f "$DATA/wikitext2_valid.idx" ]] || $PY -m vq_megatron.data.prepare --input "$WIKITEXT" \
    --output-prefix "$DATA/wikitext2_valid" --sp-model "$SP_MODEL" --workers 2
  SETS+=(--set "data.eval_sets.wikitext2=$DATA/wikitext2_valid")
else
  echo "[main] $WIKITEXT not found: WikiText evaluation skipped (see ../shared/data/README.md)"
fi

# run name -> the head's overrides (everything else comes from $CONFIG)
# dense_bias: a VQ head with K = V and the identity map is exactly the dense head plus a per-token bias with
# the VQ heads' unigram init -- megatron's output layer has no bias, so this row shows what the bias alone buys.
declare -A HEADS=([dense]="model.output_layer=dense"
                  [dense_bias]="model.output_layer=vq model.vq.refine_rank=0 model.vq.codebook_size=$VOCAB_SIZE model.vq.map_init=contiguous model.vq.codebook_init_std=0.02"
                  [vq_logits]="model.output_layer=vq model.vq.refine_rank=0"
                  [vq_refined]="model.output_layer=vq model.vq.refine_rank=${REFINE_RANK:-8}")
read -r -a RUNS <<< "${MAIN_RUNS:-dense dense_bias vq_logits vq_refined}"
for RUN in "${RUNS[@]}"; do
  [[ -n "${HEADS[$RUN]:-}" ]] || { echo "[main] MAIN_RUNS: unknown run '$RUN' (known: ${!HEADS[*]})" >&2; exit 2; }
done
for RUN in "${RUNS[@]}"; do
  [[ "${RESUME:-0}" == 1 ]] || rm -rf "${OUT:?}/$RUN"
  HEAD_SETS=()
  for s in ${HEADS[$RUN]}; do HEAD_SETS+=(--set "$s"); done
  echo "[main] training $RUN (${HEADS[$RUN]}) -> $OUT/$RUN"
  bash launch/train_deepspeed.sh --config "$CONFIG" "${HEAD_SETS[@]}" \
    --set "model.vocab_size=$VOCAB_SIZE" --set "data.train_prefix=$DATA/c4_train" \
    --set "data.tokenizer_model=$SP_MODEL" --set "training.save_dir=$OUT/$RUN" "${SETS[@]}" \
    ${STEPS:+--set "training.steps=$STEPS"} "$@"
done
echo "[main] dense vs dense + bias vs VQ-Logits vs the two-level VQ head (first row is the baseline):"
$PY -m vq_megatron.compare "${RUNS[@]/#/$OUT/}" --out "$OUT/comparison"
