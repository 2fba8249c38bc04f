"""Faults on CPU: kill -9 mid-training then exact resume, corrupted/half-written checkpoints, NaN policy,
vocabulary mismatches. Slow: each case launches 2-process torchrun training."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from vq_megatron.integration.checkpoint import MANIFEST, complete_tags, latest_complete_tag

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "workers" / "train_with_faults.py"
SLICE = REPO / "data" / "c4_slice"
pytestmark = pytest.mark.slow

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.seq_length=32",
        "model.vocab_size=500", "model.vq.codebook_size=32", "training.micro_batch_size=4",
        "training.global_batch_size=8", "optim.warmup_steps=3", "training.log_interval=1",
        "model.hidden_dropout=0.1", "data.eval_sets={}"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _cmd(data, save_dir, *sets, faults=()):
    args = [f"data.train_prefix={data / 'train'}", f"data.tokenizer_model={data / 'sp500.model'}",
            f"training.save_dir={save_dir}", *TINY, *sets]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
            *faults, "--config", "configs/c4_small.yaml", *[a for s in args for a in ("--set", s)]]


def _run(cmd, expect_ok=True):
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == expect_ok, f"exit {proc.returncode}:\n{out[-6000:]}"
    return out


def _losses(run_dir, name="summary.json"):
    summary = json.loads((Path(run_dir) / name).read_text())
    return dict(zip(summary["steps_run"], summary["train_losses"]))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    subprocess.run([sys.executable, "-m", "vq_megatron.data.prepare", "--no-progress", "--input",
                    str(SLICE / "c4-train.slice.jsonl.gz"), "--max-docs", "150", "--output-prefix",
                    str(root / "train"), "--train-sp", "--vocab-size", "500", "--sp-model-prefix",
                    str(root / "sp500")], cwd=REPO, env=_env(), check=True, capture_output=True)
    return root


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("full")
    _run(_cmd(data, run, "training.steps=24", "training.save_interval=4"))
    return run, _losses(run)


def test_kill_9_mid_training_then_resume_matches_uninterrupted_run(data, tmp_path, uninterrupted):
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(data, run, "training.steps=24", "training.save_interval=4",
                                 faults=["--fault-sleep-per-step", "0.15"]),
                            cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and (latest_complete_tag(run) or "") < "step_00000008":
        time.sleep(0.2)
        assert proc.poll() is None, "training ended before it could be killed"
    time.sleep(0.3)                                   # now somewhere inside a step after step 8
    # kill -9 torchrun and both ranks at once (torch elastic starts ranks in sessions of their own).
    victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    assert len(victims) >= 3
    for victim in victims:
        victim.send_signal(signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(victims, timeout=30)
    assert not alive
    killed_at = latest_complete_tag(run)
    assert killed_at is not None and killed_at < "step_00000024"

    out = _run(_cmd(data, run, "training.steps=24", "training.save_interval=4"))
    assert f"resumed from {run / killed_at}" in out
    resumed = _losses(run)
    full = uninterrupted[1]
    assert resumed and all(resumed[s] == full[s] for s in resumed), (resumed, full)   # bit for bit


def test_half_written_checkpoint_is_never_resumed_from(uninterrupted):
    run, _ = uninterrupted
    newest = latest_complete_tag(run)
    fake = run / "step_99999999"                      # what a save killed half-way leaves behind
    fake.mkdir()
    (fake / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    try:
        assert latest_complete_tag(run) == newest and "step_99999999" not in complete_tags(run)
    finally:
        for p in fake.iterdir():
            p.unlink()
        fake.rmdir()


def test_corrupted_and_truncated_checkpoints_are_reported_with_the_previous_one_offered(data, tmp_path):
    run = tmp_path / "corrupt"
    _run(_cmd(data, run, "training.steps=8", "training.save_interval=4", "training.keep_last=3"))
    tags = complete_tags(run)
    assert tags == ["step_00000004", "step_00000008"] and (run / tags[-1] / MANIFEST).is_file()
    victim = run / tags[-1] / "mp_rank_00_model_states.pt"
    data_bytes = bytearray(victim.read_bytes())
    data_bytes[len(data_bytes) // 2] ^= 0xFF          # one flipped byte, same size
    victim.write_bytes(bytes(data_bytes))
    out = _run(_cmd(data, run, "training.steps=12", "training.save_interval=4"), expect_ok=False)
    assert f"checkpoint file {victim} does not match its SHA-256 checksum (corrupted)" in out
    assert "resume from it with --set training.resume_tag=step_00000004" in out

    victim.write_bytes(bytes(data_bytes[:100]))       # truncated
    out = _run(_cmd(data, run, "training.steps=12", "training.save_interval=4"), expect_ok=False)
    assert "(truncated?)" in out and str(victim) in out

    out = _run(_cmd(data, run, "training.steps=12", "training.save_interval=4",
                    "training.resume_tag=step_00000004"))
    assert f"resumed from {run / 'step_00000004'} at step 4" in out


def test_nan_loss_stops_or_is_skipped_as_configured(data, tmp_path):
    out = _run(_cmd(data, tmp_path / "stop", "training.steps=6", faults=["--fault-nan-at-step", "3"]),
               expect_ok=False)
    assert "non-finite training loss at step 3 micro-batch 0" in out and "nan_policy=skip" in out

    _run(_cmd(data, tmp_path / "skip", "training.steps=6", "training.nan_policy=skip",
              faults=["--fault-nan-at-step", "3"]))
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["skipped_microbatches"] == 1
    assert all(v == v for v in summary["train_losses"][3:]), summary["train_losses"]   # finite after the skip


def test_a_skipped_micro_batch_contributes_exactly_zero_gradient(data, tmp_path):
    """NaN and Inf skipped at step 3 micro-batch 0 leave the weights exactly where a run that masks that
    micro-batch out leaves them: every later step's loss is bit-identical."""
    masked = _losses(_run_and_dir(data, tmp_path / "masked", faults=["--fault-mask-at-step", "3"]))
    for value in ("nan", "inf"):
        skipped = _losses(_run_and_dir(data, tmp_path / value, "training.nan_policy=skip",
                                       faults=["--fault-nan-at-step", "3", "--fault-value", value]))
        assert [skipped[s] for s in range(4, 7)] == [masked[s] for s in range(4, 7)], (value, skipped, masked)
        assert [skipped[s] for s in (1, 2)] == [masked[s] for s in (1, 2)]


def test_too_many_skipped_micro_batches_stop_the_run(data, tmp_path):
    out = _run(_cmd(data, tmp_path / "stuck", "training.steps=8", "training.nan_policy=skip",
                    "training.max_skipped_microbatches=3", faults=["--fault-from-step", "3"]), expect_ok=False)
    assert "4 non-finite micro-batches in a row" in out and "training.max_skipped_microbatches=3" in out


def _run_and_dir(data, run_dir, *sets, faults=()):
    _run(_cmd(data, run_dir, "training.steps=6", *sets, faults=faults))
    return run_dir


def test_vocabulary_mismatch_between_data_and_model_is_refused(data, tmp_path):
    out = _run(_cmd(data, tmp_path / "vocab", "training.steps=2", "model.vocab_size=400",
                    "model.vq.codebook_size=16", "data.tokenizer_model=''"), expect_ok=False)
    assert "was tokenized with a 500-token vocabulary" in out and "model.vocab_size=400" in out
    out = _run(_cmd(data, tmp_path / "tok", "training.steps=2", f"data.tokenizer_model={data / 'sp500.model'}",
                    "model.vocab_size=600"), expect_ok=False)
    assert "has 500 pieces but model.vocab_size=600" in out
