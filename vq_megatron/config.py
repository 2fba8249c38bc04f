"""Configuration of the VQ-Logits output layer, validated on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vq_megatron.checks import check_loss_options

__all__ = ["VQLogitsConfig", "MAP_INITS", "CODEBOOK_INITS", "BIAS_INITS", "REFINE_INITS", "TENSOR_PARALLEL_LOSSES"]

MAP_INITS = ("random", "contiguous", "frequency", "kmeans")
CODEBOOK_INITS = ("normal", "kmeans")
BIAS_INITS = ("zeros", "unigram")
REFINE_INITS = ("zeros", "svd")
TENSOR_PARALLEL_LOSSES = ("split", "replicated")


@dataclass
class VQLogitsConfig:
    """Options of VQOutputLayer (the `vq:` section of a model YAML).

    vocab_size: real vocabulary size V (before Megatron's padding to a multiple of the TP size).
    hidden_size: model width d.
    codebook_size: number of codes K, 1 <= K <= V.
    map_init: how tokens are assigned to codes: 'random' (balanced random), 'contiguous' (blocks of
        token ids), 'frequency' (frequency-balanced; needs token counts), 'kmeans' (k-means of given
        embedding rows; needs embeddings).
    codebook_init: 'normal' (N(0, codebook_init_std²)) or 'kmeans' (the k-means centroids; needs
        map_init='kmeans').
    codebook_init_std: std of the normal codebook init.
    per_token_bias: learn a bias b[v] per vocabulary token on top of the code logit.
    bias_init: 'zeros', or 'unigram': b[v] = log of the token's smoothed corpus frequency (needs token
        counts). Adam moves a parameter by about lr per step, so a zero bias needs thousands of steps to
        reach log-frequencies spanning ~10 nats; starting there makes the head a unigram model at step 0.
    seed: seed of the map and codebook initialisation (identical on every rank).
    kmeans_iters: Lloyd iterations for k-means initialisation / re-clustering.
    spherical_kmeans: cluster embeddings by cosine instead of Euclidean distance.
    label_smoothing: default label smoothing of the training loss (torch semantics, global vocab).
    z_loss: default weight of the z-loss (z_loss * logsumexp²) added to the training loss.
    recluster_interval: every this many training steps, re-cluster the map from the model's own input
        embedding rows (VQOutputLayer.rebuild_map; 0 = never, the map stays fixed).
    recluster_method: 'kmeans' (k-means of the rows) or 'nearest' (each token to its nearest current code).
    recluster_reinit_codebook: with 'kmeans', replace the codebook by the centroids (else keep it).
    refine_rank: rank r of the within-code refinement (0 = VQ-Logits as in the paper). r > 0 makes the
        distribution inside each code context-dependent: p(v|k,h) = softmax_{v∈k}(b_v + u_v·P h) with
        U [V, r] (vocab-sharded under TP) and P [r, d] (replicated); the loss stays exact and never N×V.
    refine_init: 'zeros' (U = 0, so training starts exactly as VQ-Logits) or 'svd' (the best rank-r fit
        U·P of the residual rows E - C[M] of the k-means embeddings; needs map_init and codebook_init
        'kmeans': the post-hoc conversion of a dense head W = E).
    refine_init_std: std of the normal init of P with refine_init='zeros' (U starts at 0, so P sets the
        scale of g = P·h that U's first gradients see). The default 0.1 puts the entries of g at about
        unit scale for layer-normed h with d ~ 100 (0.1·√d); 0.02 (the codebook's std) learns the
        refinement more slowly (docs/RESULTS.md, refine_sp8000: C4 ppl 315.5 vs 311.0 at 1,200 steps).
    tensor_parallel_loss: how the training loss uses tensor parallelism: 'split' (each TP rank computes the
        collapse for 1/TP of the tokens, the codebook gradient is summed over TP and the per-token losses
        all-gathered: the O(N·K·d) work shrinks with TP) or 'replicated' (every rank computes every token).
        The same loss and gradients either way (layers/vq_loss.py; benchmark/bench_tp_output_layer.py).
    """

    vocab_size: int
    hidden_size: int
    codebook_size: int = 1024
    map_init: str = "random"
    codebook_init: str = "normal"
    codebook_init_std: float = 0.02
    per_token_bias: bool = False
    bias_init: str = "zeros"
    seed: int = 1234
    kmeans_iters: int = 50
    spherical_kmeans: bool = False
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    recluster_interval: int = 0
    recluster_method: str = "kmeans"
    recluster_reinit_codebook: bool = False
    refine_rank: int = 0
    refine_init: str = "zeros"
    refine_init_std: float = 0.1
    tensor_parallel_loss: str = "split"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "codebook_size", "kmeans_iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"VQLogitsConfig.{name} must be a positive integer, got {value!r}")
        if self.codebook_size > self.vocab_size:
            raise ValueError(f"VQLogitsConfig.codebook_size={self.codebook_size} exceeds "
                             f"vocab_size={self.vocab_size}: a code must stand for at least one token")
        if self.map_init not in MAP_INITS:
            raise ValueError(f"VQLogitsConfig.map_init={self.map_init!r} is not one of {MAP_INITS}")
        if self.codebook_init not in CODEBOOK_INITS:
            raise ValueError(f"VQLogitsConfig.codebook_init={self.codebook_init!r} is not one of {CODEBOOK_INITS}")
        if self.codebook_init == "kmeans" and self.map_init != "kmeans":
            raise ValueError("VQLogitsConfig.codebook_init='kmeans' uses the k-means centroids, "
                             "so it needs map_init='kmeans'")
        if self.bias_init not in BIAS_INITS:
            raise ValueError(f"VQLogitsConfig.bias_init={self.bias_init!r} is not one of {BIAS_INITS}")
        if self.bias_init != "zeros" and not self.per_token_bias:
            raise ValueError("VQLogitsConfig.bias_init='unigram' needs per_token_bias=true")
        if not self.codebook_init_std > 0:
            raise ValueError(f"VQLogitsConfig.codebook_init_std must be > 0, got {self.codebook_init_std}")
        if not isinstance(self.recluster_interval, int) or self.recluster_interval < 0:
            raise ValueError(f"VQLogitsConfig.recluster_interval must be >= 0, got {self.recluster_interval!r}")
        if not isinstance(self.refine_rank, int) or isinstance(self.refine_rank, bool) or self.refine_rank < 0:
            raise ValueError(f"VQLogitsConfig.refine_rank must be an integer >= 0, got {self.refine_rank!r}")
        if self.refine_rank > self.hidden_size:
            raise ValueError(f"VQLogitsConfig.refine_rank={self.refine_rank} exceeds hidden_size={self.hidden_size}: "
                             "a rank-r map of d-dim hidden states has at most rank d")
        if self.refine_init not in REFINE_INITS:
            raise ValueError(f"VQLogitsConfig.refine_init={self.refine_init!r} is not one of {REFINE_INITS}")
        if self.refine_init == "svd" and not (self.map_init == "kmeans" and self.codebook_init == "kmeans"):
            raise ValueError("VQLogitsConfig.refine_init='svd' fits the residuals of the k-means rows, so it "
                             "needs map_init='kmeans' and codebook_init='kmeans'")
        if self.tensor_parallel_loss not in TENSOR_PARALLEL_LOSSES:
            raise ValueError(f"VQLogitsConfig.tensor_parallel_loss={self.tensor_parallel_loss!r} is not one of "
                             f"{TENSOR_PARALLEL_LOSSES}")
        if not self.refine_init_std > 0:
            raise ValueError(f"VQLogitsConfig.refine_init_std must be > 0, got {self.refine_init_std}")
        check_loss_options(self.label_smoothing, self.z_loss, self.refine_rank, prefix="VQLogitsConfig.")
        if self.recluster_method not in ("kmeans", "nearest"):
            raise ValueError(f"VQLogitsConfig.recluster_method={self.recluster_method!r} is not 'kmeans' "
                             "or 'nearest'")

    @classmethod
    def from_dict(cls, options: dict, **overrides) -> "VQLogitsConfig":
        """Build from a YAML mapping; unknown keys are an error, not silently ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown vq option(s) {unknown}; valid: {sorted(known)}")
        return cls(**{**options, **overrides})

    @property
    def needs_token_counts(self) -> bool:
        return self.map_init == "frequency" or self.bias_init == "unigram"

    @property
    def refined(self) -> bool:
        return self.refine_rank > 0

    def output_layer_parameters(self) -> int:
        """Trainable parameters of the VQ head: K·d (+ V for the per-token bias) (+ V·r + r·d refined)."""
        r = self.refine_rank
        return (self.codebook_size * self.hidden_size + (self.vocab_size if self.per_token_bias else 0)
                + self.vocab_size * r + r * self.hidden_size)
