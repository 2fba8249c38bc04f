#!/usr/bin/env bash
# The checks that need CUDA GPUs, as one script (under 10 minutes on one H100/H200):
#   1. the TP layer checks with NCCL on all visible GPUs (up to 4), in fp32 and bf16, against the fp64
#      reference (tests/distributed/workers/tp_layer_checks.py), and the TP sampling checks (>= 2 GPUs);
#   2. a short bf16 training of a dense and a VQ model (two-level head) under torchrun, stopped half way
#      and resumed, compared with the uninterrupted run;
#   3. the output-layer benchmark (fp32 and bf16) and the TP benchmark (>= 2 GPUs), their JSON in $OUT.
# On a machine without a CUDA GPU it says so and exits 0: CPU correctness is `bash launch/run_tests.sh`.
# Env: OUT (benchmark/results/gpu), PYTHON (.venv/bin/python), STEPS (20).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT="${OUT:-benchmark/results/gpu}"
STEPS="${STEPS:-20}"
NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
if [[ "$NGPU" == 0 ]]; then
  echo "[gpu_check] no CUDA GPU is visible here: nothing to check (CPU checks: bash launch/run_tests.sh)"
  exit 0
fi
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
N=$(( NGPU > 4 ? 4 : NGPU ))
RUN=(-m torch.distributed.run --standalone --nproc_per_node="$N")
"$PY" -c 'import torch; print(f"[gpu_check] {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")' | tee "$OUT/device.txt"

echo "[gpu_check] 1/3 TP layer checks, NCCL, TP=$N"
for dtype in fp32 bf16; do
  VQ_CHECK_DTYPE=$dtype "$PY" "${RUN[@]}" tests/distributed/workers/tp_layer_checks.py 2>&1 | tee "$OUT/tp_layer_checks_$dtype.log" | grep "passed"
done
if (( N >= 2 )); then
  "$PY" "${RUN[@]}" tests/distributed/workers/tp_sampling_checks.py 2>&1 | tee "$OUT/tp_sampling_checks.log" | grep "ok at"
fi

echo "[gpu_check] 2/3 bf16 training with resume (dense, two-level VQ), $N GPU(s), TP=$N"
DATA="$(mktemp -d)"
trap 'rm -rf "$DATA"' EXIT
"$PY" -m vq_megatron.data.prepare --no-progress --input data/c4_slice/c4-train.slice.jsonl.gz --max-docs 300 \
  --output-prefix "$DATA/train" --train-sp --vocab-size 1000 --sp-model-prefix "$DATA/sp" >/dev/null
COMMON=(--set "data.train_prefix=$DATA/train" --set "data.tokenizer_model=$DATA/sp.model" --set "data.eval_sets={}"
        --set model.vocab_size=1000 --set model.vq.codebook_size=64 --set training.precision=bf16
        --set training.deepspeed_config=configs/deepspeed/zero1_bf16.json --set "training.steps=$STEPS"
        --set "parallel.tensor_parallel=$N" --set training.log_interval=1)
declare -A HEADS=([dense]="model.output_layer=dense" [vq_refined]="model.output_layer=vq model.vq.refine_rank=8")
for NAME in dense vq_refined; do
  HEAD_SETS=()
  for s in ${HEADS[$NAME]}; do HEAD_SETS+=(--set "$s"); done
  "$PY" "${RUN[@]}" -m vq_megatron.train --config configs/c4_small.yaml "${COMMON[@]}" "${HEAD_SETS[@]}" \
    --set "training.save_dir=$DATA/$NAME-full" > "$OUT/train_${NAME}_full.log" 2>&1
  "$PY" "${RUN[@]}" -m vq_megatron.train --config configs/c4_small.yaml "${COMMON[@]}" "${HEAD_SETS[@]}" \
    --set "training.save_dir=$DATA/$NAME-resumed" --exit-after-steps $(( STEPS / 2 )) > "$OUT/train_${NAME}_part1.log" 2>&1
  "$PY" "${RUN[@]}" -m vq_megatron.train --config configs/c4_small.yaml "${COMMON[@]}" "${HEAD_SETS[@]}" \
    --set "training.save_dir=$DATA/$NAME-resumed" > "$OUT/train_${NAME}_part2.log" 2>&1
  "$PY" - "$DATA/$NAME-full" "$DATA/$NAME-resumed" "$NAME" "$OUT" <<'EOF'
import json, sys
from pathlib import Path
full, resumed, name, out = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
a = json.loads((full / "summary.json").read_text())["train_losses"]
parts = sorted(resumed.glob("summary_until_*.json"))
b = json.loads(parts[0].read_text())["train_losses"] + json.loads((resumed / "summary.json").read_text())["train_losses"]
diff = max(abs(x - y) for x, y in zip(a, b))
ok = len(a) == len(b) and diff <= 1e-2 and a[-1] < a[0]
(out / f"train_{name}.json").write_text(json.dumps({"full": a, "resumed": b, "max_diff": diff, "ok": ok}, indent=1))
print(f"[gpu_check] {name}: bf16 loss {a[0]:.3f} -> {a[-1]:.3f}, resumed run differs by at most {diff:.2e}"
      f" {'ok' if ok else 'MISMATCH'}")
sys.exit(0 if ok else 1)
EOF
done

echo "[gpu_check] 3/3 benchmarks -> $OUT"
for dtype in fp32 bf16; do
  "$PY" benchmark/bench_output_layer.py --device cuda --dtype $dtype --out-dir "$OUT/output_layer_$dtype" | tail -12
done
if (( N >= 2 )); then
  "$PY" "${RUN[@]}" benchmark/bench_tp_output_layer.py --tokens 8192 --hidden-size 2048 --dtype bf16 \
    --out-dir "$OUT/tp_output_layer_bf16" | tail -12
fi
echo "[gpu_check] done: logs and JSON in $OUT"
