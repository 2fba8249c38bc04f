"""Warnings that do not apply to the machine they are printed on, filtered when vq_megatron is imported.

Transformer Engine and Apex are CUDA-only, so on a machine without CUDA megatron-core's "Transformer Engine
and Apex are not installed. Falling back to ..." (four of them at import) and "Apex is not installed.
Falling back to Torch Norm", megatron's "When using async grad allreduce / sequence parallelism it is
recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS to 1" (a CUDA stream setting, printed
by every tensor-parallel linear layer), and torch's "No CUDA runtime is found, using CUDA_HOME=...", tell the
user nothing they could act on. With a GPU they stay, because there they mean slower kernels. Every other
warning is left alone. (megatron's "full scope is deprecated" cuda-graph warning is avoided at its source
instead: our TransformerConfigs pass the non-deprecated `cuda_graph_modules=[]`.)
"""

from __future__ import annotations

import logging
import re
import warnings

__all__ = ["CPU_ONLY_NOISE", "CUDA_CONNECTIONS", "silence_inapplicable_warnings"]

CPU_ONLY_NOISE = ("Transformer Engine and Apex are not installed. Falling back to",
                  "Apex is not installed. Falling back to Torch Norm")
# megatron/core/tensor_parallel/layers.py, both variants of the message
CUDA_CONNECTIONS = r"When using (async grad allreduce|sequence parallelism) it is recommended to set the " \
                   r"environment variable CUDA_DEVICE_MAX_CONNECTIONS"


def silence_inapplicable_warnings() -> None:
    import torch

    if torch.cuda.is_available():
        return
    for text in CPU_ONLY_NOISE:
        warnings.filterwarnings("ignore", message=re.escape(text), category=UserWarning)
    warnings.filterwarnings("ignore", message=CUDA_CONNECTIONS, category=UserWarning)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)   # "No CUDA runtime is found"
