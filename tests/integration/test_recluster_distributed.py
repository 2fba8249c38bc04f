"""Re-clustering under data and tensor parallelism with ZeRO: the map is computed once and installed on every
rank, and a re-initialised codebook survives the next optimizer step (DeepSpeed's fp32 master copy is
updated too). Slow: 2- and 4-process torchrun training."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "workers" / "recluster_check.py"
sys.path.insert(0, str(REPO))
from experiments.layouts import prepare_tiny_data  # noqa: E402

pytestmark = pytest.mark.slow
LR = 1e-4


@pytest.mark.parametrize("nproc,tp,zero", [(2, 1, 1), (2, 1, 2), (4, 2, 2)])
def test_recluster_agrees_everywhere_and_survives_zero(tmp_path, nproc, tp, zero):
    data = prepare_tiny_data(tmp_path / "data")
    sets = [f"data.train_prefix={data / 'train'}", f"data.tokenizer_model={data / 'sp.model'}", "data.eval_sets={}",
            f"training.save_dir={tmp_path / 'run'}", "model.num_layers=1", "model.hidden_size=32",
            "model.num_attention_heads=4", "model.seq_length=32", "model.vocab_size=500", "training.steps=4",
            "training.micro_batch_size=4", f"training.global_batch_size={4 * nproc // tp}",
            f"parallel.tensor_parallel={tp}", f"training.deepspeed_config=configs/deepspeed/zero{zero}_fp32.json",
            "model.output_layer=vq", "model.vq.codebook_size=16", "model.vq.recluster_interval=2",
            "model.vq.recluster_reinit_codebook=true", "model.vq.kmeans_iters=5", f"optim.lr={LR}",
            f"optim.min_lr={LR}", "optim.warmup_steps=0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER),
           "--recluster-step", "2", "--lr", str(LR), "--config", "configs/c4_small.yaml",
           *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "recluster probe: ok" in out and "re-clustered the VQ map" in out
