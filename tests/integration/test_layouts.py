"""The training driver gives the same run in every parallel layout: per-step losses and the final eval
perplexity of (TP=1, DP=1, gradient accumulation 2), (TP=1, DP=2), (TP=2, DP=1) and (TP=2, DP=2) agree, for
the dense head, VQ-Logits and the two-level VQ head, under ZeRO-1 and ZeRO-2, with gradient clipping
active, with sequence parallelism on at TP=2, and with pipeline parallelism (PP=2 alone, × TP=2, × DP=2).
Same global batch and seed everywhere; DP ranks read interleaved micro-batches, so the samples of a step
are the same. Slow: every layout is one torchrun launch
(~15 s on 2 cores, 4 processes oversubscribed); runs are shared between the tests of this module.
"""

import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from experiments.layouts import CLIP, HEADS, LAYOUTS, max_step_diff, prepare_tiny_data, train  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_tiny_data(tmp_path_factory.mktemp("layout_data"))


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Launch each (layout, head, zero, sp) once per module: {key: summary}."""
    root, done = tmp_path_factory.mktemp("layout_runs"), {}

    def get(layout: str, head: str, zero: int = 1, sp: bool = False, extra: tuple = ()) -> dict:
        key = (layout, head, zero, sp, *extra)
        if key not in done:
            name = "_".join(map(str, key)).replace("=", "-").replace(".", "-")
            done[key] = train(data, root / name, layout, head, zero, sp, extra)
        return done[key]
    return get


def assert_same_run(reference: dict, other: dict, what: str, tolerance: float = 2e-6) -> None:
    diff = max_step_diff(reference, other)
    assert diff <= tolerance, f"{what}: per-step losses differ by up to {diff:.3e}"
    ppl, other_ppl = reference["eval"]["val_ppl"], other["eval"]["val_ppl"]
    assert math.isclose(ppl, other_ppl, rel_tol=tolerance), f"{what}: eval ppl {other_ppl} vs {ppl}"


@pytest.mark.parametrize("head", list(HEADS))
def test_layouts_agree_under_zero1(runs, head):
    reference = runs("tp1_dp1_ga2", head)
    assert all(norm > CLIP for norm in reference["grad_norms"]), reference["grad_norms"]  # clipping acts
    moved = abs(reference["train_losses"][-1] - reference["train_losses"][0])
    assert moved > 1e-3, f"the run barely trains ({moved:.1e}): the comparison would be vacuous"
    for layout in [name for name in LAYOUTS if not name.startswith("pp")]:   # pipeline cases: below
        assert_same_run(reference, runs(layout, head), f"{head} {layout} vs tp1_dp1_ga2")


@pytest.mark.parametrize("layout,head,zero,sp", [
    ("pp2_dp1", "dense", 1, False), ("pp2_dp1", "vq", 1, False), ("pp2_dp1", "vq_refined", 1, False),
    ("pp2_tp2", "dense", 1, False), ("pp2_tp2", "vq_refined", 1, False), ("pp2_dp2", "vq", 2, False),
    ("pp2_dp1", "vq", 2, False),   # ZeRO-2 with 2 micro-batches: 1F1B's F F B B on the first stage
    ("pp2_tp2", "vq_refined", 1, True)])
def test_pipeline_parallel_equals_the_single_process_run(runs, layout, head, zero, sp):
    """megatron's 1F1B schedule under DeepSpeed (ZeRO-1/2), the VQ head on the last stage: the same
    per-step losses and eval perplexity as one process, from the same (layout-independent) initial model."""
    assert_same_run(runs("tp1_dp1_ga2", head), runs(layout, head, zero, sp),
                    f"{head} {layout} zero{zero} sp={sp} vs tp1_dp1_ga2", tolerance=2e-4 if sp else 2e-6)


def test_zero2_equals_zero1_with_data_parallel(runs):
    for layout in ("tp1_dp2", "tp2_dp2"):
        assert_same_run(runs(layout, "vq_refined"), runs(layout, "vq_refined", zero=2),
                        f"vq_refined {layout} zero2 vs zero1")


@pytest.mark.parametrize("head", list(HEADS))
def test_sequence_parallel_equals_sp_off(runs, head):
    assert_same_run(runs("tp2_dp1", head), runs("tp2_dp1", head, sp=True), f"{head} SP on vs off at TP=2",
                    tolerance=2e-4)


@pytest.mark.parametrize("head", ["dense", "vq_refined"])
def test_multi_token_prediction_agrees_across_layouts(runs, head):
    """MTP (one depth) through the collapsed loss for VQ, megatron's own for dense: TP=2 and DP=2 equal the
    single process, and the MTP loss is logged and moves the run (it is not a no-op)."""
    mtp = ("model.mtp_num_layers=1",)
    reference = runs("tp1_dp1_ga2", head, extra=mtp)
    for layout in ("tp2_dp1", "tp1_dp2"):
        assert_same_run(reference, runs(layout, head, extra=mtp), f"{head} MTP {layout} vs tp1_dp1_ga2")
    assert max_step_diff(reference, runs("tp1_dp1_ga2", head)) > 1e-4   # MTP changes the training
    mtp_losses = reference["mtp_losses"]["mtp_1_loss"]
    assert len(mtp_losses) == len(reference["train_losses"]) and all(4 < x < 8 for x in mtp_losses), mtp_losses
    tp2 = runs("tp2_dp1", head, extra=mtp)["mtp_losses"]["mtp_1_loss"]
    assert max(abs(a - b) for a, b in zip(mtp_losses, tp2)) < 1e-5


def test_hybrid_backbone_trains_the_same_at_tp2(runs):
    """model.backbone: hybrid (megatron-core's HybridModel, "*-" per layer) with the two-level VQ head in the
    driver: TP=2 equals TP=1."""
    hybrid = ("model.backbone=hybrid",)
    reference = runs("tp1_dp1_ga2", "vq_refined", extra=hybrid)
    assert_same_run(reference, runs("tp2_dp1", "vq_refined", extra=hybrid), "hybrid vq_refined tp2 vs tp1")
    moved = abs(reference["train_losses"][-1] - reference["train_losses"][0])
    assert moved > 1e-3, f"the hybrid run barely trains ({moved:.1e})"
