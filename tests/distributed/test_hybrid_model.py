"""megatron-core's HybridModel with the VQ head (and dense) at TP=2, loaded from a TP=1 dist checkpoint,
sequence parallelism off and on: loss, gradients and the loss-vs-own-logits identity (workers/hybrid_checks.py)."""

import pytest

from torchrun import run_torchrun

pytestmark = pytest.mark.distributed


def test_hybrid_model_at_tp2_matches_tp1_from_a_dist_checkpoint(tmp_path):
    assert "saved TP=1 vq reference" in run_torchrun("hybrid_checks.py", 1, "save", str(tmp_path), timeout=180)
    out = run_torchrun("hybrid_checks.py", 2, "check", str(tmp_path), timeout=300)
    assert "hybrid_checks: TP=2 HybridModel (dense and VQ, SP off and on) matches TP=1" in out
    for rank in (0, 1):
        for head in ("vq", "dense"):
            for sp in ("False", "True"):
                assert f"rank {rank} {head} sp={sp}: loss and" in out, out[-3000:]
