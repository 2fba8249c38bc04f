"""Pipeline parallel in the training driver, beyond per-step equality (tests/integration/test_layouts.py):
checkpoints and exact resume at PP=2, a resume at another layout refused clearly, and a PP=2 checkpoint
read back by vq-megatron-evaluate in one process (its stages merged) with the training run's perplexity.
Slow: five torchrun launches of the tiny layout-test model."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from experiments.layouts import HEADS, SLICE, TINY, prepare_tiny_data  # noqa: E402

pytestmark = pytest.mark.slow
STEPS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = prepare_tiny_data(tmp_path_factory.mktemp("pp_data"))
    # the validation documents prepare_tiny_data tokenized (its first 20), as text for vq-megatron-evaluate
    with gzip.open(SLICE / "c4-validation.slice.jsonl.gz", "rt") as docs:
        (root / "val.jsonl").write_text("".join(line for _, line in zip(range(20), docs)))
    return root


def _launch(data: Path, run_dir: Path, nproc: int, *sets: str, cli=(), expect_failure: bool = False) -> str:
    args = [f"data.train_prefix={data / 'train'}", "data.eval_sets={val: " + str(data / "val") + "}",
            f"data.tokenizer_model={data / 'sp.model'}", f"training.save_dir={run_dir}", *TINY,
            *HEADS["vq_refined"], f"training.steps={STEPS}", "training.save_interval=3", "data.eval_tokens=0", *sets]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "vq_megatron.train", "--config", "configs/c4_small.yaml", *[a for s in args for a in ("--set", s)],
           *cli]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert (proc.returncode != 0) == expect_failure, f"exit {proc.returncode}:\n{out[-6000:]}"
    return out


def _summary(run_dir: Path, name: str = "summary.json") -> dict:
    return json.loads((run_dir / name).read_text())


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("pp_runs") / "full"
    _launch(data, run, 2, "parallel.tensor_parallel=1", "parallel.pipeline_parallel=2")
    return run


def test_pipeline_run_resumes_exactly(data, tmp_path, uninterrupted):
    run = tmp_path / "resumed"
    pp2 = ("parallel.tensor_parallel=1", "parallel.pipeline_parallel=2")
    _launch(data, run, 2, *pp2, cli=["--exit-after-steps", "3"])
    assert (run / "step_00000003" / "layout.json").is_file() and not (run / "summary.json").exists()
    stage_files = sorted(p.name for p in (run / "step_00000003").glob("mp_rank_*_model_states.pt"))
    assert stage_files == ["mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]   # one per stage
    out = _launch(data, run, 2, *pp2)
    assert f"resumed from {run / 'step_00000003'} at step 3" in out
    resumed = _summary(run, "summary_until_3.json")["train_losses"] + _summary(run)["train_losses"]
    full = _summary(uninterrupted)
    assert resumed == full["train_losses"]                       # bit for bit
    assert _summary(run)["eval"] == full["eval"]
    assert full["head_parameters"] > 0   # counted on the last stage, reported by rank 0 (first stage)


def test_resuming_at_another_layout_is_refused(data, tmp_path, uninterrupted):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(uninterrupted, run)
    (run / "summary.json").unlink()
    out = _launch(data, run, 2, "parallel.tensor_parallel=2", "parallel.pipeline_parallel=1", expect_failure=True)
    assert "was written at tensor_parallel=1, pipeline_parallel=2, but this run has tensor_parallel=2, " \
           "pipeline_parallel=1" in out


def test_evaluate_reads_a_pipeline_checkpoint_in_one_process(data, uninterrupted):
    proc = subprocess.run([sys.executable, "-m", "vq_megatron.inference.evaluate", str(uninterrupted),
                           "--input", str(data / "val.jsonl"), "--json"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["eval_ppl"] == pytest.approx(_summary(uninterrupted)["eval"]["val_ppl"], rel=1e-6)
