"""End to end on CPU: data prep -> 2-process TP=2 training under the DeepSpeed launcher (dense and VQ),
exact resume, and a two-"node" run over loopback. Slow (each launch costs ~10 s of start-up)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLICE = REPO / "data" / "c4_slice"
pytestmark = pytest.mark.slow

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.seq_length=64",
        "model.vocab_size=1000", "model.vq.codebook_size=64", "training.micro_batch_size=4",
        "training.global_batch_size=8", "optim.lr=3e-3", "optim.warmup_steps=5", "training.log_interval=1",
        "data.interval_eval_tokens=2048", "data.eval_tokens=4096"]


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def _run(cmd, timeout=600, env=None):
    proc = subprocess.run(cmd, cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    prep = [sys.executable, "-m", "vq_megatron.data.prepare", "--no-progress"]
    _run(prep + ["--input", str(SLICE / "c4-train.slice.jsonl.gz"), "--max-docs", "300",
                 "--output-prefix", str(root / "train"), "--train-sp", "--vocab-size", "1000",
                 "--sp-model-prefix", str(root / "sp1000")])
    _run(prep + ["--input", str(SLICE / "c4-validation.slice.jsonl.gz"), "--max-docs", "40",
                 "--output-prefix", str(root / "val"), "--sp-model", str(root / "sp1000.model")])
    return root


def _sets(data, save_dir, *extra):
    sets = [f"data.train_prefix={data / 'train'}", f"data.eval_sets.c4_val={data / 'val'}",
            f"data.tokenizer_model={data / 'sp1000.model'}",
            f"training.save_dir={save_dir}", *TINY, *extra]
    return [arg for s in sets for arg in ("--set", s)]


def _deepspeed(data, save_dir, *extra, port, cli=()):
    return _run(["bash", "launch/train_deepspeed.sh", "--config", "configs/c4_small.yaml",
                 *_sets(data, save_dir, *extra), *cli], env=_env(NUM_GPUS="2", MASTER_PORT=str(port)))


def _summary(run_dir, name="summary.json"):
    return json.loads((Path(run_dir) / name).read_text())


@pytest.mark.parametrize("head,zero", [("dense", 2), ("vq", 0)])   # ZeRO-1 runs in the resume test below
def test_training_under_deepspeed_launcher_lowers_the_loss(data, tmp_path, head, zero):
    # Zero-initialised bias: the VQ run starts at ln V like the dense one (unigram init would start lower).
    out = _deepspeed(data, tmp_path / head, f"model.output_layer={head}", "training.steps=30",
                     "model.vq.map_init=random", "model.vq.bias_init=zeros",
                     f"training.deepspeed_config=configs/deepspeed/zero{zero}_fp32.json",
                     "training.eval_interval=10", "training.save_interval=10", "training.keep_last=2",
                     port=29611 if head == "dense" else 29612)
    assert "[rank 0/2]" in out and "[rank 1/2]" in out and "tp_rank=1/2" in out
    s = _summary(tmp_path / head)
    losses = s["train_losses"]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < losses[0] - 0.1, losses
    assert 1 < s["eval"]["c4_val_ppl"] < 1000 and s["head_parameters"] > 0
    # the config's VQ head is the two-level one: K·d + V (bias) + V·r + r·d with K=64, d=64, V=1000, r=8
    assert s["head_parameters"] == (64 * 64 + 1000 + 1000 * 8 + 8 * 64 if head == "vq" else 1024 * 64)
    ckpts = sorted(p.name for p in (tmp_path / head).glob("step_*"))
    assert ckpts == ["step_00000020", "step_00000030"]                  # keep_last=2
    assert (tmp_path / head / "latest_complete").read_text().strip() == "step_00000030"
    metrics = (tmp_path / head / "metrics.csv").read_text()
    assert "train,loss" in metrics and "eval,c4_val_ppl" in metrics
    assert list((tmp_path / head / "tensorboard").iterdir())


def test_resume_and_two_node_run_reproduce_the_uninterrupted_losses(data, tmp_path):
    common = ("model.output_layer=vq", "training.steps=8", "model.hidden_dropout=0.1",
              "model.attention_dropout=0.1", "data.eval_sets={}")
    _deepspeed(data, tmp_path / "full", *common, port=29613)
    full = _summary(tmp_path / "full")["train_losses"]

    out = _deepspeed(data, tmp_path / "resumed", *common, port=29614, cli=["--exit-after-steps", "4"])
    assert not (tmp_path / "resumed" / "summary.json").exists()
    out = _deepspeed(data, tmp_path / "resumed", *common, port=29615)
    assert "resumed from" in out and "at step 4" in out
    resumed = _summary(tmp_path / "resumed", "summary_until_4.json")["train_losses"] + \
        _summary(tmp_path / "resumed")["train_losses"]
    assert resumed == full                         # bit for bit, dropout included

    # Two "nodes" over loopback: one launcher per node, one process each, --no_ssh, same master.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    cmd = ["bash", "launch/train_multinode.sh", "--config", "configs/c4_small.yaml",
           *_sets(data, tmp_path / "two_nodes", *common)]
    env = dict(HOSTFILE=str(hostfile), NO_SSH="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29616")
    node1 = subprocess.Popen(cmd, cwd=REPO, env=_env(**env, NODE_RANK="1"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        out0 = _run(cmd, env=_env(**env, NODE_RANK="0"))
        out1 = node1.communicate(timeout=300)[0]
    finally:
        node1.kill()
    assert node1.returncode == 0, out1[-6000:]
    assert "[rank 0/2]" in out0 + out1 and "[rank 1/2]" in out0 + out1
    assert "nnodes=2" in out0 and "node_rank=1" in out1
    assert _summary(tmp_path / "two_nodes")["train_losses"] == full
