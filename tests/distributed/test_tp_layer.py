"""VQOutputLayer under tensor parallelism (torchrun, gloo on CPU / NCCL on GPU) vs single-process fp64."""

import pytest

from torchrun import run_torchrun

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("nproc", [2, 4])
def test_tp_layer_matches_single_process_reference(nproc):
    out = run_torchrun("tp_layer_checks.py", nproc)
    assert f"80 cases passed at TP={nproc}" in out
    assert f"40 two-level cases passed at TP={nproc}" in out
    assert f"8 log-prob/entropy cases passed at TP={nproc}" in out


def test_checkpoint_saved_at_tp2_loads_at_tp1_and_tp4(tmp_path):
    run_torchrun("tp_checkpoint.py", 2, "save", str(tmp_path))
    for nproc in (1, 4):
        out = run_torchrun("tp_checkpoint.py", nproc, "load", str(tmp_path))
        assert f"loaded at TP={nproc}" in out
