"""Warnings that cannot apply on a CPU-only machine are filtered when vq_megatron is imported; others stay."""

import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the filter applies only without CUDA "
                                                                  "(with a GPU these warnings mean something)")


def _stderr(code: str) -> str:
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_megatrons_cpu_only_noise_is_gone_and_real_warnings_stay():
    err = _stderr("import vq_megatron, warnings\n"
                  "import megatron.core.optimizer, megatron.core.models.gpt.gpt_layer_specs as specs\n"
                  "specs.get_gpt_layer_local_spec()\n"
                  "warnings.warn('a warning that means something')\n")
    assert "Transformer Engine and Apex are not installed" not in err
    assert "Apex is not installed. Falling back to Torch Norm" not in err
    assert "a warning that means something" in err


def test_without_the_package_megatron_does_print_them():
    """The control: the same imports without vq_megatron print the noise (so the test above is not vacuous)."""
    err = _stderr("import megatron.core.optimizer, megatron.core.models.gpt.gpt_layer_specs as specs\n"
                  "specs.get_gpt_layer_local_spec()\n")
    assert "Transformer Engine and Apex are not installed" in err and "Falling back to Torch Norm" in err


def test_model_configs_do_not_trigger_the_deprecated_cuda_graph_scope_warning():
    err = _stderr("import vq_megatron\n"
                  "from vq_megatron.models import ModelConfig\n"
                  "ModelConfig().transformer_config(tensor_parallel=1)\n")
    assert "full scope is deprecated" not in err
    control = _stderr("from megatron.core.transformer import TransformerConfig\n"
                      "TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2)\n")
    assert "full scope is deprecated" in control                    # megatron's own default does warn
