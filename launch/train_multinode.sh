#!/usr/bin/env bash
# Multi-node training under the DeepSpeed launcher with a hostfile (configs/hostfile.example).
# From the first node (ssh to the others):   bash launch/train_multinode.sh --config configs/c4_small.yaml
# Without ssh (start it on every node):      NO_SSH=1 NODE_RANK=<i> bash launch/train_multinode.sh --config ...
# Env: HOSTFILE (configs/hostfile.example), NUM_NODES (hosts in HOSTFILE), NUM_GPUS (per node, default:
#      slots in HOSTFILE), MASTER_ADDR (first host; required with NO_SSH), MASTER_PORT (29500),
#      NO_SSH (0), NODE_RANK (with NO_SSH), PYTHON_BIN_DIR (.venv/bin), OMP_NUM_THREADS (1).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${PYTHON_BIN_DIR:-.venv/bin}"
HOSTFILE="${HOSTFILE:-configs/hostfile.example}"
[[ -f "$HOSTFILE" ]] || { echo "error: hostfile $HOSTFILE not found" >&2; exit 2; }
HOSTS=$(grep -cvE '^\s*(#|$)' "$HOSTFILE")
NUM_NODES="${NUM_NODES:-$HOSTS}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
ARGS=(--hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" --master_port "${MASTER_PORT:-29500}")
[[ -n "${NUM_GPUS:-}" ]] && ARGS+=(--num_gpus "$NUM_GPUS")
[[ -n "${MASTER_ADDR:-}" ]] && ARGS+=(--master_addr "$MASTER_ADDR")
if [[ "${NO_SSH:-0}" == 1 ]]; then
  [[ -n "${NODE_RANK:-}" && -n "${MASTER_ADDR:-}" ]] || {
    echo "error: NO_SSH=1 needs NODE_RANK and MASTER_ADDR" >&2; exit 2; }
  ARGS+=(--no_ssh --node_rank "$NODE_RANK")
fi
exec "$BIN/deepspeed" "${ARGS[@]}" --module vq_megatron.train "$@"
