from vq_megatron.layers.vq_output_layer import VQOutputLayer

__all__ = ["VQOutputLayer"]
