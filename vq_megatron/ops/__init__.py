"""Pure tensor math of VQ-Logits: code statistics, the collapsed loss, the materialised scatter."""

from vq_megatron.ops.clusters import code_counts, code_log_mass, gather_target, segment_logsumexp
from vq_megatron.ops.collapsed_cross_entropy import CollapsedCrossEntropy, collapsed_cross_entropy
from vq_megatron.ops.scatter import code_logits, scatter_code_logits

__all__ = [
    "code_counts", "code_log_mass", "gather_target", "segment_logsumexp",
    "CollapsedCrossEntropy", "collapsed_cross_entropy", "code_logits", "scatter_code_logits",
]
