"""ModelConfig (the `model:` section) is read and validated without importing megatron's models."""

import subprocess
import sys
from pathlib import Path

import pytest

from vq_megatron.models import ModelConfig


def test_reading_a_run_config_imports_no_megatron_model():
    code = ("import sys; from vq_megatron.training.config import load_run_config; "
            "cfg = load_run_config('configs/c4_small.yaml'); cfg.model.vq_config(); "
            "heavy = [m for m in sys.modules if m.startswith(('megatron.core.models', 'deepspeed'))]; "
            "print(heavy); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                   cwd=Path(__file__).resolve().parents[3])


def test_vq_options_are_validated_with_the_model_section():
    with pytest.raises(ValueError, match="refine_rank"):
        ModelConfig(output_layer="vq", vq={"codebook_size": 16, "refine_rank": -1})
    with pytest.raises(ValueError, match="unknown vq option"):
        ModelConfig(output_layer="vq", vq={"codebook_sise": 16})
    assert ModelConfig(output_layer="vq", vq={"codebook_size": 16, "refine_rank": 4}).vq_config().refine_rank == 4
