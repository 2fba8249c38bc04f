"""VQOutputLayer: a drop-in for megatron-core's ColumnParallelLinear output layer.

Tensor parallelism (size T, optional):
- codebook [K, d]: replicated on every TP rank (marked tensor_model_parallel=False, as Megatron marks
  layernorm weights), initialised identically (broadcast from TP rank 0);
- token_to_code: this rank's vocabulary range [V_pad/T] of the map, padded slots = -1; bias likewise.
  A non-persistent replicated copy of the whole map (V ints) serves the collapsed loss, whose bias terms
  need one packed all-gather (none without a bias: the global code counts are static).
- forward() is the vocab-parallel scatter: local logit shard [s, b, V_pad/T], like ColumnParallelLinear.
- loss() is the collapsed cross-entropy (layers/vq_loss.py): by default each TP rank computes it for 1/T
  of the tokens (codebook gradient all-reduced, per-token losses all-gathered), or whole on every rank
  (vq.tensor_parallel_loss: replicated).
- sample(), code_index() (layers/vq_sampling.py), log_probs() and entropy() (layers/vq_scores.py): exact,
  TP-aware, without the V logits of VQ-Logits.

With `refine_rank` r > 0 the head is two-level (ops/within_code.py): U [V_pad/T, r] is vocab-sharded like
the bias and P [r, d] is replicated like the codebook. In loss() each rank scores only the members of each
target's code that live in its vocabulary range; their partial log-sum-exps travel in the same single
all-gather as the bias terms (2N more floats), and the gradient of g = P·h is summed over TP (one N×r
all-reduce in backward). forward() returns the two-level logits z_k + B_k - L_k(g) + b_v + u_v·g of the
local shard (log-probabilities up to the per-row constant logsumexp_k(z_k + B_k); exactly VQ-Logits'
logits when U = 0), so vocab-parallel cross-entropy over them equals loss().
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.utils import VocabUtility
from torch import nn

from vq_megatron.checks import check_loss_options, check_map, check_token_ids
from vq_megatron.config import VQLogitsConfig
from vq_megatron.ops import (CodeMembers, CollapseOptions, code_counts, code_logits, reduce_loss, refine_scores,
                             refined_logits, scatter_code_logits, segment_logsumexp)
from vq_megatron.ops.map_init import build_map, low_rank_residual, nearest_code_map, normal_codebook
from vq_megatron.layers.vq_loss import replicated_loss, split_loss
from vq_megatron.parallel import (
    all_gather_rows, broadcast_from_first_rank, combine_over_tensor_parallel_region,
    copy_to_tensor_parallel_region, gather_from_sequence_parallel_region, gather_from_tensor_parallel_region,
    mark_vocab_sharded, tensor_parallel_info, vocab_parallel_cross_entropy,
)

__all__ = ["VQOutputLayer"]


class VQOutputLayer(nn.Module):
    """The VQ head: logits l_v = (h·Cᵀ)_{M(v)} (+ b_v) (VQ-Logits), plus the two-level head's within-code
    refinement when refine_rank > 0; the loss via the exact O(N·K) collapse.

    Args:
        config: VQLogitsConfig.
        padded_vocab_size: Megatron's padded vocab (multiple of T); default: V rounded up to T.
        tp_group: tensor-parallel group; default megatron-core's if initialised, else single process.
        sequence_parallel: hidden states arrive split along the sequence (Megatron SP).
        gather_output: forward() returns the full vocabulary (Megatron's gather_output).
        token_counts: [V] corpus counts for map_init='frequency'.
        embeddings: [V, d'] rows to cluster for map_init='kmeans'.
        init_from_data: False when every tensor is about to be loaded from a checkpoint: the layer is
            built with placeholder values and needs neither token_counts nor embeddings.
    """

    def __init__(self, config: VQLogitsConfig, *, padded_vocab_size: int | None = None, tp_group=None,
                 sequence_parallel: bool = False, gather_output: bool = False,
                 params_dtype: torch.dtype = torch.float32, device=None,
                 token_counts: torch.Tensor | None = None, embeddings: torch.Tensor | None = None,
                 init_from_data: bool = True):
        super().__init__()
        self.config = config
        self.tp = tensor_parallel_info(tp_group)
        self.sequence_parallel = sequence_parallel and self.tp.size > 1
        self.gather_output = gather_output
        self.vocab_size, self.num_codes = config.vocab_size, config.codebook_size
        self.padded_vocab_size = self._check_padding(padded_vocab_size)
        self.vocab_start, self.vocab_end = VocabUtility.vocab_range_from_global_vocab_size(
            self.padded_vocab_size, self.tp.rank, self.tp.size)
        device = torch.device("cpu") if device is None else torch.device(device)
        init = config if init_from_data else dataclasses.replace(
            config, map_init="random", codebook_init="normal", bias_init="zeros", refine_init="zeros")

        full_map, centroids = build_map(
            init.map_init, config.vocab_size, config.codebook_size, seed=config.seed,
            token_counts=token_counts, embeddings=embeddings, kmeans_iters=config.kmeans_iters,
            spherical=config.spherical_kmeans)
        if init.codebook_init == "kmeans":
            codebook = centroids
            if codebook.shape[1] != config.hidden_size:
                raise ValueError(f"codebook_init='kmeans' needs embeddings of width hidden_size="
                                 f"{config.hidden_size}, got {codebook.shape[1]}")
        else:
            codebook = normal_codebook(config.codebook_size, config.hidden_size,
                                       std=config.codebook_init_std, seed=config.seed + 1)
        codebook = broadcast_from_first_rank(codebook.to(device=device, dtype=params_dtype).contiguous(),
                                             self.tp.group)
        self.codebook = nn.Parameter(codebook)
        set_tensor_model_parallel_attributes(self.codebook, is_parallel=False, dim=-1, stride=1)

        self.register_buffer("token_to_code", mark_vocab_sharded(
            torch.empty(self.partition_size, dtype=torch.int64, device=device), pad_value=-1), persistent=True)
        self.register_buffer("global_token_to_code", torch.empty(0, dtype=torch.int64, device=device),
                             persistent=False)
        self.register_buffer("code_counts", torch.empty(0, dtype=torch.int64, device=device),
                             persistent=False)
        self._local_members: CodeMembers | None = None   # this shard's tokens by code, built on first use
        self.sampling_cache = None                        # layers/vq_sampling.SamplingTables, built on first use
        self.set_map(full_map.to(device))

        self.bias = None
        if config.per_token_bias:
            full_bias = self._initial_bias(token_counts if init.bias_init == "unigram" else None, init.bias_init)
            self.bias = nn.Parameter(full_bias[self.vocab_start: self.vocab_end].to(device, params_dtype))
            set_tensor_model_parallel_attributes(self.bias, is_parallel=True, dim=0, stride=1)

        self.refine_weight = self.refine_proj = None
        if config.refined:
            weight, proj = self._initial_refinement(full_map, centroids, embeddings, init.refine_init)
            self.refine_weight = nn.Parameter(weight[self.vocab_start: self.vocab_end].to(device, params_dtype))
            set_tensor_model_parallel_attributes(self.refine_weight, is_parallel=True, dim=0, stride=1)
            self.refine_proj = nn.Parameter(broadcast_from_first_rank(
                proj.to(device=device, dtype=params_dtype).contiguous(), self.tp.group))
            set_tensor_model_parallel_attributes(self.refine_proj, is_parallel=False, dim=-1, stride=1)
        # A loaded map (any TP size, any padding) must refresh the replicated copy and counts.
        self.register_load_state_dict_post_hook(lambda module, _keys: module._sync_map_from_shards())

    def _initial_bias(self, token_counts: torch.Tensor | None, how: str) -> torch.Tensor:
        """Full padded bias [V_pad]: zeros, or add-one smoothed log unigram frequencies."""
        full = torch.zeros(self.padded_vocab_size, dtype=torch.float64)
        if how == "unigram":
            if token_counts is None or token_counts.shape != (self.vocab_size,):
                raise ValueError(f"bias_init='unigram' needs token_counts of shape [{self.vocab_size}]")
            counts = token_counts.double().cpu() + 1.0
            full[: self.vocab_size] = torch.log(counts / counts.sum())
        return full

    def _initial_refinement(self, full_map, centroids, embeddings, how: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(U [V_pad, r], P [r, d]): zeros and N(0, std²) (the head starts as VQ-Logits), or the truncated
        SVD of the k-means residuals of the embedding rows (a dense head converted post hoc)."""
        r, d = self.config.refine_rank, self.config.hidden_size
        weight = torch.zeros(self.padded_vocab_size, r)
        if how == "svd":
            if embeddings is None or embeddings.shape[1] != d:
                raise ValueError(f"refine_init='svd' needs embedding rows of width hidden_size={d}")
            fit, proj = low_rank_residual(embeddings[: self.vocab_size], centroids, full_map.cpu(), r)
            weight[: self.vocab_size] = fit
            return weight, proj
        return weight, normal_codebook(r, d, std=self.config.refine_init_std, seed=self.config.seed + 2)

    def _apply(self, fn, recurse=True):
        # Module._apply replaces buffers by new tensors (e.g. .to(device)): keep the map's partition tags.
        out = super()._apply(fn, recurse)
        mark_vocab_sharded(self.token_to_code, pad_value=-1)
        return out

    # ---------------------------------------------------------------- map bookkeeping
    @property
    def partition_size(self) -> int:
        return self.padded_vocab_size // self.tp.size

    def _check_padding(self, padded: int | None) -> int:
        T, V = self.tp.size, self.vocab_size
        padded = -(-V // T) * T if padded is None else padded
        if padded < V or padded % T:
            raise ValueError(f"padded_vocab_size={padded} must be >= vocab_size={V} and a multiple of "
                             f"the tensor-parallel size {T}")
        return padded

    def _check_map(self, full_map: torch.Tensor) -> None:
        check_map(full_map, self.num_codes, vocab_size=self.vocab_size, context=f"codebook_size={self.num_codes}")

    def _agree(self, tensor: torch.Tensor, replica_group=None) -> torch.Tensor:
        """Every rank takes TP rank 0's values, then (with replica_group, e.g. data parallel) every replica
        takes the first replica's: computed once, identical everywhere, whatever the arithmetic did."""
        return broadcast_from_first_rank(broadcast_from_first_rank(tensor, self.tp.group), replica_group)

    @torch.no_grad()
    def set_map(self, full_map: torch.Tensor, *, replica_group=None) -> None:
        """Install a new global map [V]; identical on every TP rank (taken from TP rank 0) and, with
        replica_group, on every replica (taken from the first)."""
        full_map = self._agree(full_map.to(self.token_to_code.device, torch.int64).clone(), replica_group)
        self._check_map(full_map)
        padded = torch.full((self.padded_vocab_size,), -1, dtype=torch.int64, device=full_map.device)
        padded[: self.vocab_size] = full_map
        self.token_to_code.copy_(padded[self.vocab_start: self.vocab_end])
        self._set_replicated_copy(full_map)

    def _set_replicated_copy(self, full_map: torch.Tensor) -> None:
        self.global_token_to_code = full_map
        self.code_counts = code_counts(full_map, self.num_codes)
        self._local_members = None

    def _members(self) -> CodeMembers:
        if self._local_members is None or self._local_members.tokens.device != self.token_to_code.device:
            self._local_members = CodeMembers.build(self.token_to_code, self.num_codes)
        return self._local_members

    @torch.no_grad()
    def _sync_map_from_shards(self) -> None:
        # Checkpoints loaded with another padding fill the padded tail with zeros: re-mark it as padding.
        local_ids = torch.arange(self.vocab_start, self.vocab_end, device=self.token_to_code.device)
        self.token_to_code.masked_fill_(local_ids >= self.vocab_size, -1)
        full_map = all_gather_rows(self.token_to_code, self.tp.group)[: self.vocab_size]
        self._check_map(full_map)
        self._set_replicated_copy(full_map.clone())

    @torch.no_grad()
    def rebuild_map(self, embeddings: torch.Tensor, *, method: str = "kmeans",
                    reinit_codebook: bool = False, replica_group=None) -> float:
        """Re-cluster the vocabulary from embedding rows [V, d'] during training.

        method 'kmeans': k-means of the rows (the codebook is replaced by the centroids if
        reinit_codebook and the widths match); 'nearest': move each token to its nearest current code
        (needs d' == d). Counts and the replicated map stay consistent. The map and centroids are taken
        from TP rank 0 of the first replica of `replica_group` (the data-parallel group in training), so
        every rank of every group holds the same head. Returns the fraction of tokens whose code changed.
        An optimizer that keeps master copies (DeepSpeed ZeRO) must be told about the new codebook.
        """
        if embeddings.shape[0] < self.vocab_size:
            raise ValueError(f"embeddings have {embeddings.shape[0]} rows, need vocab_size={self.vocab_size}")
        rows = embeddings[: self.vocab_size].detach().float()
        if method == "kmeans":
            new_map, centroids = build_map("kmeans", self.vocab_size, self.num_codes,
                                           seed=self.config.seed, embeddings=rows,
                                           kmeans_iters=self.config.kmeans_iters,
                                           spherical=self.config.spherical_kmeans)
            if reinit_codebook:
                if centroids.shape[1] != self.codebook.shape[1]:
                    raise ValueError("reinit_codebook needs embeddings of the codebook's width")
                self.codebook.copy_(self._agree(
                    centroids.to(self.codebook.device, self.codebook.dtype).contiguous(), replica_group))
        elif method == "nearest":
            new_map = nearest_code_map(rows, self.codebook.detach().float(),
                                       spherical=self.config.spherical_kmeans)
        else:
            raise ValueError(f"rebuild_map method must be 'kmeans' or 'nearest', got {method!r}")
        old_map = self.global_token_to_code.clone()
        self.set_map(new_map, replica_group=replica_group)
        return float((old_map != self.global_token_to_code).float().mean())

    # ---------------------------------------------------------------- compute
    def forward(self, hidden: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None):
        """Vocab-parallel scatter, ColumnParallelLinear's contract: [s, b, d] -> ([s, b, V_pad/T], None)."""
        if weight is not None:
            raise ValueError("VQOutputLayer has no dense weight to tie: build the model with "
                             "share_embeddings_and_output_weights=False")
        # Every rank scatters its own vocab range, so hidden and codebook gradients are partial sums
        # over ranks: sum them in backward (Megatron's copy-to-TP-region / SP gather+reduce-scatter).
        if self.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, self.tp.group, sharded_consumer=True)
        else:
            hidden = copy_to_tensor_parallel_region(hidden, self.tp.group)
        codebook = copy_to_tensor_parallel_region(self.codebook, self.tp.group)
        z = code_logits(hidden, codebook)
        if self.refine_weight is None:
            logits = scatter_code_logits(z, self.token_to_code, self.bias)
        else:
            logits = self._refined_logits(z, hidden)
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather:
            logits = gather_from_tensor_parallel_region(logits, self.tp.group)
        return logits, None

    def _refined_logits(self, z: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """This shard's two-level logits; the per-code normalisers L_k (and B_k) are combined over TP."""
        proj = copy_to_tensor_parallel_region(self.refine_proj, self.tp.group)
        scores = refine_scores(torch.matmul(hidden, proj.t()), self.refine_weight, self.bias)
        parts = [(segment_logsumexp(scores, self.token_to_code, self.num_codes), "logsumexp")]
        if self.bias is not None:
            parts.append((segment_logsumexp(self.bias, self.token_to_code, self.num_codes), "logsumexp"))
        combined = combine_over_tensor_parallel_region(parts, self.tp.group)
        # The consumers below are vocab-sharded: sum their partial gradients before the combine's backward.
        within_lse = copy_to_tensor_parallel_region(combined[0], self.tp.group)
        log_mass = (copy_to_tensor_parallel_region(combined[1], self.tp.group) if self.bias is not None
                    else torch.log(self.code_counts.double()))
        return refined_logits(z, self.token_to_code, log_mass, within_lse, scores)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
             label_smoothing: float | None = None, z_loss: float | None = None,
             reduction: str = "none", validate: bool = True) -> torch.Tensor:
        """Collapsed cross-entropy (the training path). hidden [s(/T), b, d], labels [s, b].

        Returns per-token loss shaped like labels ('none', the Megatron convention), or 'mean'/'sum'.
        """
        eps = self.config.label_smoothing if label_smoothing is None else label_smoothing
        zeta = self.config.z_loss if z_loss is None else z_loss
        check_loss_options(eps, zeta, self.config.refine_rank)
        if labels.shape[1:] != hidden.shape[1:-1] or labels.shape[0] != hidden.shape[0] * (
                self.tp.size if self.sequence_parallel else 1):
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match hidden shape {tuple(hidden.shape)}"
                             + (" (sequence parallel: hidden holds s/TP of the sequence)" if self.sequence_parallel
                                else ""))
        flat = labels.reshape(-1)
        valid = flat != ignore_index
        if validate:
            check_token_ids(flat, self.vocab_size, ignore_index=ignore_index)
        options = CollapseOptions(self.vocab_size, eps, zeta)
        if self.tp.size > 1 and self.config.tensor_parallel_loss == "split":
            per_token = split_loss(self, hidden, flat, valid, options, ignore_index)
        else:
            per_token = replicated_loss(self, hidden, flat, valid, options)
        out = reduce_loss(per_token, valid, reduction)
        return out.view(labels.shape) if reduction == "none" else out

    def log_probs(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """log p(tokens | h) [s, b] (RL's per-token log-probabilities): exact, TP-aware, no V logits."""
        from vq_megatron.layers.vq_scores import log_probs

        return log_probs(self, hidden, tokens)

    def entropy(self, hidden: torch.Tensor) -> torch.Tensor:
        """Entropy of the full distribution over the vocabulary [s, b]: exact, TP-aware, differentiable;
        O(N·K + V) for VQ-Logits, O(N·V·r / TP) for a two-level head (layers/vq_scores.py)."""
        from vq_megatron.layers.vq_scores import entropy

        return entropy(self, hidden)

    def code_index(self):
        """The CodeIndex of the whole map and bias (collective over TP; cached, see layers/vq_sampling.py)."""
        from vq_megatron.layers.vq_sampling import sampling_tables

        return sampling_tables(self).index

    def sample(self, hidden: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               generator: torch.Generator | None = None, greedy: bool = False) -> torch.Tensor:
        """Exact sampling (or greedy decoding) of token ids [...] from final hidden states [..., d], never
        building the V logits of VQ-Logits (a two-level head builds O(V·r) scores only when tempering or
        filtering needs them). Collective over TP: every rank returns the same ids."""
        from vq_megatron.layers.vq_sampling import sample_tokens

        return sample_tokens(self, hidden, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                             greedy=greedy)

    def materialised_loss(self, hidden: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                          label_smoothing: float | None = None, z_loss: float | None = None) -> torch.Tensor:
        """Reference path: scatter to vocab-parallel logits, then vocab-parallel CE. Per-token [s, b]."""
        eps = self.config.label_smoothing if label_smoothing is None else label_smoothing
        zeta = self.config.z_loss if z_loss is None else z_loss
        logits, _ = self.forward(hidden, runtime_gather_output=False)
        return vocab_parallel_cross_entropy(logits, labels, vocab_size=self.vocab_size, group=self.tp.group,
                                            label_smoothing=eps, z_loss=zeta, ignore_index=ignore_index)

    # ---------------------------------------------------------------- checkpointing
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """megatron dist_checkpointing: codebook replicated; map and bias sharded by vocab range.

        Like VocabParallelEmbedding, vocab-sharded tensors allow a shape mismatch so a checkpoint loads
        at another TP size (another padding); the post-load hook re-marks padded slots.
        """
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
        from megatron.core.utils import make_sharded_tensor_for_checkpoint, make_tp_sharded_tensor_for_checkpoint

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        groups = dict(tp_group=self.tp.group, dp_cp_group=metadata["dp_cp_group"])
        out = {f"{prefix}codebook": make_sharded_tensor_for_checkpoint(
            self.codebook, f"{prefix}codebook", prepend_offsets=sharded_offsets, **groups)}
        if self.refine_proj is not None:
            out[f"{prefix}refine_proj"] = make_sharded_tensor_for_checkpoint(
                self.refine_proj, f"{prefix}refine_proj", prepend_offsets=sharded_offsets, **groups)
        vocab_sharded = {"token_to_code": self.token_to_code, "bias": self.bias,
                         "refine_weight": self.refine_weight}
        for name, tensor in vocab_sharded.items():
            if tensor is not None:
                out[f"{prefix}{name}"] = make_tp_sharded_tensor_for_checkpoint(
                    tensor, f"{prefix}{name}", tp_axis=0, prepend_offsets=sharded_offsets,
                    allow_shape_mismatch=True, **groups)
        return out

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size}, padded_vocab_size={self.padded_vocab_size}, "
                f"codebook_size={self.num_codes}, hidden_size={self.config.hidden_size}, "
                f"per_token_bias={self.bias is not None}, refine_rank={self.config.refine_rank}, "
                f"tp={self.tp.size}, map_init={self.config.map_init}")
