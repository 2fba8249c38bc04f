#!/usr/bin/env bash
# Issue 6: dense vs VQ-Logits (+ adaptive softmax) ablations on C4 at CPU scale; writes docs/results/ and the
# tables used by docs/RESULTS.md. Every grid is a file in configs/experiments/, run by experiments/run_grid.py
# (resumable: runs with a summary.json are skipped), then reported by experiments/report.py.
# Env: OMP_NUM_THREADS (2);
#      GRIDS (ablations_sp8000; e.g. "ablations_sp8000 ablations_gpt2" adds the GPT-2 BPE pair), grids to run;
#      SPEED (1: also the speed grids speed_sp8000 and speed_sp32000, tokens/s of dense vs VQ vs adaptive
#      without evaluation, median of 3 round-robin repeats).
# Extra args go to run_grid.py for the GRIDS (e.g. --only dense,vq_K512_freq_bias), not to the speed grids.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/python ]] || bash launch/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
.venv/bin/python -c "import matplotlib" 2>/dev/null || .venv/bin/python -m pip install -q matplotlib
grids=(${GRIDS:-ablations_sp8000})
speed=()
[[ "${SPEED:-1}" == 1 ]] && speed=(speed_sp8000 speed_sp32000)
status=0   # a failed run must not cost the reports of the others: run_grid.py says which failed
for grid in "${grids[@]}"; do
  .venv/bin/python experiments/run_grid.py "configs/experiments/$grid.yaml" "$@" || status=1
done
for grid in "${speed[@]}"; do
  .venv/bin/python experiments/run_grid.py "configs/experiments/$grid.yaml" || status=1
done
for grid in "${grids[@]}" "${speed[@]}"; do
  .venv/bin/python experiments/report.py "configs/experiments/$grid.yaml"
done
exit "$status"
