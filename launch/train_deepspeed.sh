#!/usr/bin/env bash
# Single-node training under the DeepSpeed launcher. On a GPU node: one process per GPU (NCCL); on a CPU
# machine the same script runs NUM_GPUS processes with gloo.
#   bash launch/train_deepspeed.sh --config configs/c4_small.yaml --set model.output_layer=dense
# Env: NUM_GPUS (default: all visible GPUs, else 2 CPU processes), MASTER_PORT (29500), PYTHON_BIN_DIR
#      (default .venv/bin), OMP_NUM_THREADS (1: the deepspeed launcher does not set it; 4x slower otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${PYTHON_BIN_DIR:-.venv/bin}"
if [[ -z "${NUM_GPUS:-}" ]]; then
  NUM_GPUS="$("$BIN/python" -c 'import torch; print(torch.cuda.device_count() or 2)' 2>/dev/null || echo 2)"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$BIN/deepspeed" --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" \
  --module vq_megatron.train "$@"
