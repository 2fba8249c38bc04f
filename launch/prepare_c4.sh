#!/usr/bin/env bash
# Download English C4 shards and turn them into Megatron indexed datasets.
#
#   C4_SHARDS=2 VOCAB_SIZE=32000 bash launch/prepare_c4.sh [extra prepare flags...]
#
# Steps: download C4_SHARDS train shards and C4_VALID_SHARDS validation shards
# (existing files are kept), train a SentencePiece model on the train shards,
# tokenize train and validation with it. Extra arguments go to both
# vq_megatron.data.prepare runs (e.g. --on-error skip, --max-docs N).
#
# Environment (defaults in brackets):
#   C4_SHARDS        train shards to use, of 1024 [1]
#   C4_VALID_SHARDS  validation shards to use, of 8 [1]
#   RAW_DIR          where the .json.gz shards go [<repo>/runs/c4_raw]
#   OUT_DIR          where .bin/.idx and the tokenizer go [<repo>/runs/c4_data]
#   VOCAB_SIZE       SentencePiece vocabulary size [32000]
#   SP_TYPE          bpe or unigram [bpe]
#   SP_TRAIN_DOCS    documents used to train the tokenizer [200000]
#   WORKERS          tokenizer processes [nproc]
#   PYTHON           interpreter with vq_megatron's dependencies [python]
#   C4_BASE_URL      mirror of https://huggingface.co/datasets/allenai/c4/resolve/main
#
# C4: ODC-BY 1.0 (AllenAI, allenai/c4); also subject to the Common Crawl terms of use.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
C4_SHARDS="${C4_SHARDS:-1}"
C4_VALID_SHARDS="${C4_VALID_SHARDS:-1}"
RAW_DIR="${RAW_DIR:-$REPO_ROOT/runs/c4_raw}"
OUT_DIR="${OUT_DIR:-$REPO_ROOT/runs/c4_data}"
VOCAB_SIZE="${VOCAB_SIZE:-32000}"
SP_TYPE="${SP_TYPE:-bpe}"
SP_TRAIN_DOCS="${SP_TRAIN_DOCS:-200000}"
WORKERS="${WORKERS:-$(nproc)}"
PYTHON="${PYTHON:-python}"

# Tokenizer workers are processes; keep each one single-threaded.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Works from a source checkout without `pip install`.
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" -m vq_megatron.data.download --split train --c4-shards "$C4_SHARDS" --out-dir "$RAW_DIR"
"$PYTHON" -m vq_megatron.data.download --split validation --c4-shards "$C4_VALID_SHARDS" --out-dir "$RAW_DIR"

train_files=()
for ((i = 0; i < C4_SHARDS; i++)); do
    train_files+=("$RAW_DIR/$(printf 'c4-train.%05d-of-01024.json.gz' "$i")")
done
valid_files=()
for ((i = 0; i < C4_VALID_SHARDS; i++)); do
    valid_files+=("$RAW_DIR/$(printf 'c4-validation.%05d-of-00008.json.gz' "$i")")
done

mkdir -p "$OUT_DIR"
SP_PREFIX="$OUT_DIR/c4_en_sp${VOCAB_SIZE}_${SP_TYPE}"

"$PYTHON" -m vq_megatron.data.prepare \
    --input "${train_files[@]}" \
    --output-prefix "$OUT_DIR/c4_en_train_text_document" \
    --train-sp --vocab-size "$VOCAB_SIZE" --sp-type "$SP_TYPE" \
    --sp-train-docs "$SP_TRAIN_DOCS" --sp-model-prefix "$SP_PREFIX" \
    --workers "$WORKERS" "$@"

"$PYTHON" -m vq_megatron.data.prepare \
    --input "${valid_files[@]}" \
    --output-prefix "$OUT_DIR/c4_en_validation_text_document" \
    --sp-model "$SP_PREFIX.model" \
    --workers "$WORKERS" "$@"

echo "done: $OUT_DIR/c4_en_{train,validation}_text_document.{bin,idx}, tokenizer $SP_PREFIX.model"
