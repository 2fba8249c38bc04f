"""Pure tensor math of the VQ head (torch only, no torch.distributed): code statistics, the collapsed
loss, the within-code refinement, the materialised scatter, entropy, k-means, map initialisation, sampling.

Names: K = num_codes (VQLogitsConfig.codebook_size), V = vocab_size, d = hidden size, r = refine_rank,
N = number of tokens (rows); z = h·Cᵀ the code logits, B the per-code log-mass of the bias.
"""

from vq_megatron.ops.clusters import (CodeMembers, accumulation_dtype, code_counts, code_log_mass, gather_target,
                                      segment_logsumexp)
from vq_megatron.ops.collapsed_cross_entropy import (CollapsedCrossEntropy, CollapseOptions, CollapseStatistics,
                                                     collapse_statistics, collapsed_cross_entropy, reduce_loss)
from vq_megatron.ops.entropy import code_entropy, code_mean_bias, vq_logits_entropy, within_code_entropy
from vq_megatron.ops.scatter import code_logits, scatter_code_logits
from vq_megatron.ops.within_code import (refine_scores, refined_logits, target_code_pairs, target_refine_score,
                                         within_code_logsumexp)

__all__ = [
    "CodeMembers", "accumulation_dtype", "code_counts", "code_log_mass", "gather_target", "segment_logsumexp",
    "CollapsedCrossEntropy", "CollapseOptions", "CollapseStatistics", "collapse_statistics",
    "collapsed_cross_entropy", "reduce_loss", "code_logits", "scatter_code_logits",
    "code_entropy", "code_mean_bias", "vq_logits_entropy", "within_code_entropy",
    "refine_scores", "refined_logits", "target_code_pairs", "target_refine_score", "within_code_logsumexp",
]
