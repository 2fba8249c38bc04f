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


def test_the_cuda_device_max_connections_advice_is_filtered_on_cpu():
    """megatron's tensor-parallel linear layers advise a CUDA stream setting on every run; without CUDA the
    filter drops exactly the two messages megatron's source contains, nothing else."""
    import re
    from pathlib import Path

    import megatron.core.tensor_parallel.layers as layers
    from vq_megatron.quiet import CUDA_CONNECTIONS

    source = " ".join(Path(layers.__file__).read_text().split())
    messages = [m.replace('" "', "") for m in re.findall(r'"When using [^)]*?maximum speedup"', source)]
    assert len(messages) == 2 and all(re.match(CUDA_CONNECTIONS, m.strip('"')) for m in messages), messages
    code = "import vq_megatron, warnings\n" + "".join(
        f"warnings.warn({m!s})\n" for m in messages) + "warnings.warn('CUDA_DEVICE_MAX_CONNECTIONS elsewhere')\n"
    err = _stderr(code)
    assert "it is recommended to set" not in err and "CUDA_DEVICE_MAX_CONNECTIONS elsewhere" in err
    assert "it is recommended to set" in _stderr(code.replace("import vq_megatron, warnings", "import warnings"))
