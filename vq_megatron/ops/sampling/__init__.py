"""Sampling without the N×V logits: the exact VQ-Logits sampler (CodeIndex + thresholds, O(K + cluster)),
the two-level head's sampler, and the dense sampler with the same tie rule (for materialised logits)."""

from vq_megatron.ops.sampling.code_index import CodeIndex
from vq_megatron.ops.sampling.dense import filtered_probs, sample_from_logits
from vq_megatron.ops.sampling.refined import refined_full_logits, refined_sample
from vq_megatron.ops.sampling.vq import vq_filtered_probs, vq_greedy, vq_sample

__all__ = ["CodeIndex", "vq_sample", "vq_greedy", "vq_filtered_probs", "refined_sample", "refined_full_logits",
           "filtered_probs", "sample_from_logits"]
