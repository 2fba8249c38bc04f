"""vq_megatron: VQ-Logits output layer (arXiv 2505.10202) for Megatron-core + DeepSpeed."""

__version__ = "0.1.0"
