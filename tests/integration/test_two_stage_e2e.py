"""Two-stage end to end: a dense run -> convert_head -> a VQ run whose map and codebook are the k-means of
that head, its refinement the SVD of the residuals, and its body the dense run's (model.init_from). After
loading, the body weights equal the dense checkpoint's and the map equals convert_head's k-means map.
Slow: two launches of 2-process training under torchrun (TP=2)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vq_megatron.integration.checkpoint import load_model_shards

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from experiments.layouts import prepare_tiny_data  # noqa: E402

pytestmark = pytest.mark.slow
TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.seq_length=32",
        "model.vocab_size=500", "training.micro_batch_size=4", "training.global_batch_size=8",
        "optim.warmup_steps=2", "data.eval_tokens=1024", "data.eval_sets={}"]
VQ = ('model.vq={codebook_size: 16, map_init: kmeans, codebook_init: kmeans, per_token_bias: true, '
      'bias_init: zeros, refine_rank: 4, refine_init: svd}')


def launch(data: Path, run_dir: Path, *sets: str) -> None:
    args = [f"data.train_prefix={data / 'train'}", f"data.tokenizer_model={data / 'sp.model'}",
            f"training.save_dir={run_dir}", *TINY, *sets]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "vq_megatron.train", "--config", "configs/c4_small.yaml", *[a for s in args for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


def test_dense_then_converted_vq_head_keeps_the_body(tmp_path):
    data = prepare_tiny_data(tmp_path / "data")
    dense = tmp_path / "dense"
    launch(data, dense, "model.output_layer=dense", "training.steps=4")
    rows = tmp_path / "rows.pt"
    subprocess.run([sys.executable, "-m", "vq_megatron.strategies.convert_head", str(dense), "--out", str(rows),
                    "--vocab-size", "500", "--codebook-size", "16", "--refine-rank", "4"],
                   cwd=REPO, check=True, capture_output=True)
    vq = tmp_path / "vq"
    launch(data, vq, "model.output_layer=vq", VQ, "training.steps=0", f"model.vq_init_embeddings={rows}",
           f"model.init_from={dense}")
    dense_shards, vq_shards = load_model_shards(dense), load_model_shards(vq)
    for rank, (d, v) in enumerate(zip(dense_shards, vq_shards)):
        body = [k for k in d if not k.startswith("output_layer.") and not k.endswith("_extra_state")]
        assert body and set(body) <= set(v)
        for key in body:
            assert torch.equal(d[key], v[key]), f"TP rank {rank}: {key} differs from the dense checkpoint"
    vq_map = torch.cat([s["output_layer.token_to_code"] for s in vq_shards])[:500]
    assert torch.equal(vq_map, torch.load(rows.with_suffix(".map.pt")))
    codebook = vq_shards[0]["output_layer.codebook"]
    torch.testing.assert_close(codebook, torch.load(rows.with_suffix(".codebook.pt")))
    refine = torch.cat([s["output_layer.refine_weight"] for s in vq_shards])[:500]
    torch.testing.assert_close(refine @ vq_shards[0]["output_layer.refine_proj"],
                               torch.load(rows.with_suffix(".refine_weight.pt")) @ torch.load(
                                   rows.with_suffix(".refine_proj.pt")), rtol=1e-4, atol=1e-5)
