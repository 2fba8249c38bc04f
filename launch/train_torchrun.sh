#!/usr/bin/env bash
# torchrun variant (single or multi node): one call per node.
#   bash launch/train_torchrun.sh --config configs/c4_small.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash launch/train_torchrun.sh --config ...
# Env: NPROC_PER_NODE (GPUs, else 2), NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1),
#      MASTER_PORT (29500), PYTHON_BIN_DIR (.venv/bin).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${PYTHON_BIN_DIR:-.venv/bin}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE="$("$BIN/python" -c 'import torch; print(torch.cuda.device_count() or 2)' 2>/dev/null || echo 2)"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$BIN/python" -m torch.distributed.run --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --nproc_per_node "$NPROC_PER_NODE" --master_addr "${MASTER_ADDR:-127.0.0.1}" \
  --master_port "${MASTER_PORT:-29500}" -m vq_megatron.train "$@"
