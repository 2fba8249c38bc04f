"""GPT models with a swappable output layer, and the factory that reads `output_layer: dense|vq|adaptive`.

`vq_megatron.models.config` (ModelConfig) imports no megatron model, so reading a run config stays light;
the model classes are imported on first use.
"""

from vq_megatron.models.config import OUTPUT_LAYERS, ModelConfig

__all__ = ["ModelConfig", "OUTPUT_LAYERS", "LossHeadGPTModel", "VQGPTModel", "AdaptiveGPTModel", "build_gpt_model",
           "head_parameter_count"]

_LAZY = {"LossHeadGPTModel", "VQGPTModel", "AdaptiveGPTModel", "build_gpt_model", "head_parameter_count"}


def __getattr__(name):
    if name in _LAZY:
        from vq_megatron.models import gpt

        return getattr(gpt, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
