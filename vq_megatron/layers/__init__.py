"""Output layers (heads only): the VQ head and the adaptive-softmax peer."""

from vq_megatron.layers.adaptive_softmax import AdaptiveSoftmaxHead
from vq_megatron.layers.vq_output_layer import VQOutputLayer

__all__ = ["VQOutputLayer", "AdaptiveSoftmaxHead"]
