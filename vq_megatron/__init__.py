"""vq_megatron: VQ-Logits output layer (arXiv 2505.10202) for Megatron-core + DeepSpeed."""

from vq_megatron.quiet import silence_inapplicable_warnings

__version__ = "0.1.0"

silence_inapplicable_warnings()   # before megatron-core is imported: its CPU-only noise comes at import
