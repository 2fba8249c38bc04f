#!/usr/bin/env bash
# Issue 6: dense vs VQ-Logits (+ adaptive softmax) ablations on C4 at CPU scale; writes docs/results/ and the
# tables used by docs/RESULTS.md. Resumable: runs with a summary.json are skipped.
# Env: OMP_NUM_THREADS (2), VOCAB (8000; 32000 for the paper's size), TOKENIZER (sentencepiece | gpt2),
#      SPEED (1: also measure tokens/s dense vs VQ vs adaptive at V=8000 and V=32000, no eval). Extra args go to run_ablations.py.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/python ]] || bash launch/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
.venv/bin/python -c "import matplotlib" 2>/dev/null || .venv/bin/python -m pip install -q matplotlib
.venv/bin/python benchmark/run_ablations.py --tokenizer "${TOKENIZER:-sentencepiece}" --vocab "${VOCAB:-8000}" "$@"
if [[ "${SPEED:-1}" == 1 ]]; then
  .venv/bin/python benchmark/run_ablations.py --speed --speed-repeats 3
  .venv/bin/python benchmark/run_ablations.py --vocab 32000 --speed --speed-repeats 3
fi
