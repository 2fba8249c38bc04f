"""VQGPTModel with the VQ head as the last pipeline stage's output layer, under megatron-core's 1F1B
pipeline schedule (torchrun; gloo on CPU, NCCL on GPU), against a PP=1 run of the same weights and data.

A PP=1/TP=1 run saves the model with dist_checkpointing plus its losses and every parameter gradient;
PP=2 (TP=1) and PP=2 x TP=2 runs build per-stage models from other seeds, load that checkpoint and must
reproduce the per-microbatch losses and all gradients (VQ codebook and bias included, rtol 1e-5), with
both of megatron's p2p paths. See workers/pp_checks.py.
"""

import re

import pytest

from torchrun import run_torchrun

pytestmark = pytest.mark.distributed

WORKER = "pp_checks.py"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The PP=1, TP=1 run: checkpoint + losses + gradients in a directory shared by the tests below."""
    out_dir = tmp_path_factory.mktemp("pp_reference")
    output = run_torchrun(WORKER, 1, "save", str(out_dir), timeout=120)
    assert "pp_checks: saved PP=1 reference" in output
    return out_dir, output


def _losses(output: str, after: str) -> list[str]:
    """The four 7-decimal losses printed after `after` (torchrun may interleave ranks' lines)."""
    match = re.search(re.escape(after) + r"[^\n]*?losses (\d+\.\d{7}) (\d+\.\d{7}) (\d+\.\d{7}) (\d+\.\d{7})",
                      output)
    assert match, output[-4000:]
    return list(match.groups())


@pytest.mark.parametrize("tp, pp", [(1, 2), (2, 2)], ids=["pp2", "pp2xtp2"])
def test_pipeline_schedule_matches_pp1(reference, tp, pp):
    out_dir, ref_output = reference
    output = run_torchrun(WORKER, tp * pp, "check", str(out_dir), str(tp), str(pp), timeout=120)
    assert f"pp_checks: PP={pp} TP={tp} matches PP=1" in output, output[-4000:]
    # Every rank reported: the first stage without, the last stage with the VQ head and the losses.
    for tp_rank in range(tp):
        assert re.search(rf"pp 0/{pp} tp {tp_rank}/{tp}\] first stage: \d+ parameter grads match", output)
        assert re.search(rf"pp {pp - 1}/{pp} tp {tp_rank}/{tp}\] last stage: \d+ parameter grads match", output)
    # The schedule's printed losses are the PP=1 ones (the worker itself checks them at rtol 1e-5).
    got = [float(x) for x in _losses(output, f"pp {pp - 1}/{pp} tp 0/{tp}]")]
    want = [float(x) for x in _losses(ref_output, "saved PP=1 reference")]
    assert got == pytest.approx(want, rel=1e-5, abs=0)
