"""The DeepSpeed JSON the driver builds from a run config."""

import json
from pathlib import Path

import pytest

from vq_megatron.training.config import load_run_config
from vq_megatron.training.trainer import deepspeed_config

REPO = Path(__file__).resolve().parents[3]


def test_batch_sizes_clipping_and_precision_come_from_the_run_config():
    cfg = load_run_config(REPO / "configs" / "c4_small.yaml", ["training.micro_batch_size=2",
                                                               "training.global_batch_size=16", "optim.clip_grad=0.5"])
    ds = deepspeed_config(cfg, data_parallel=2)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is False


def test_zero3_is_refused_with_a_clear_error(tmp_path):
    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cfg = load_run_config(REPO / "configs" / "c4_small.yaml", [f"training.deepspeed_config={ds}"])
    with pytest.raises(ValueError, match="ZeRO stage 3 is not supported.*zero1_fp32.json"):
        deepspeed_config(cfg, data_parallel=1)


def test_pipeline_parallel_hands_the_accumulation_boundary_to_the_schedule():
    """Under PP megatron's schedule runs (and averages) the micro-batches: DeepSpeed must not divide by them
    again nor reduce at a boundary of its own; engine.step() is the boundary."""
    cfg = load_run_config(REPO / "configs" / "c4_small.yaml", ["parallel.pipeline_parallel=2",
                                                               "training.micro_batch_size=2",
                                                               "training.global_batch_size=16"])
    ds = deepspeed_config(cfg, data_parallel=2)
    assert ds["gradient_accumulation_steps"] == 1 and ds["managed_gradient_accumulation"] is False
    assert ds["train_batch_size"] == 4 and ds["train_micro_batch_size_per_gpu"] == 2
    assert cfg.gradient_accumulation(data_parallel=2) == 4           # the schedule's micro-batches
    assert "managed_gradient_accumulation" not in deepspeed_config(
        load_run_config(REPO / "configs" / "c4_small.yaml"), data_parallel=1)


def test_pipeline_parallel_refuses_zero0_naming_what_to_use():
    cfg = load_run_config(REPO / "configs" / "c4_small.yaml", ["parallel.pipeline_parallel=2",
                                                               "training.deepspeed_config=configs/deepspeed/zero0_fp32.json"])
    with pytest.raises(ValueError, match="ZeRO stage 0 cannot train with parallel.pipeline_parallel=2.*zero1_fp32"):
        deepspeed_config(cfg, data_parallel=1)
