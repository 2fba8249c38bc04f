"""Exact VQ sampling under tensor parallelism (torchrun, gloo on CPU / NCCL on GPU) vs single process."""

import pytest

from torchrun import run_torchrun

pytestmark = pytest.mark.distributed


def test_tp_sampling_matches_single_process():
    out = run_torchrun("tp_sampling_checks.py", 2)
    assert "tp_sampling: ok at TP=2" in out and "two-level head" in out
