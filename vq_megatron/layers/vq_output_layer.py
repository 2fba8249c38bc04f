"""VQOutputLayer: a drop-in for megatron-core's ColumnParallelLinear output layer.

Tensor parallelism (size T, optional):
- codebook [K, d]: replicated on every TP rank (marked tensor_model_parallel=False, as Megatron marks
  layernorm weights), initialised identically (broadcast from TP rank 0);
- token_to_code: this rank's vocabulary range [V_pad/T] of the map, padded slots = -1; bias likewise.
  A non-persistent replicated copy of the whole map (V ints) serves the collapsed loss, so the loss
  needs no communication without a bias (global code counts are static) and one packed all-gather
  with it.
- forward() is the vocab-parallel scatter: local logit shard [s, b, V_pad/T], like ColumnParallelLinear.
- loss() is the collapsed cross-entropy: computed identically on every TP rank (N·K work is small), so
  its gradients are complete on every rank and no TP reduction of them is needed or done.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.utils import VocabUtility
from torch import nn

from vq_megatron.config import VQLogitsConfig
from vq_megatron.functional import reduce_loss
from vq_megatron.ops import code_counts, code_logits, collapsed_cross_entropy, scatter_code_logits
from vq_megatron.ops import segment_logsumexp
from vq_megatron.ops.map_init import build_map, nearest_code_map, normal_codebook
from vq_megatron.parallel import (
    all_gather_rows, broadcast_from_first_rank, copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region, gather_from_tensor_parallel_region, tensor_parallel_info,
    vocab_parallel_cross_entropy,
)

__all__ = ["VQOutputLayer"]


class VQOutputLayer(nn.Module):
    """VQ-Logits head: logits l_v = (h·Cᵀ)_{M(v)} (+ b_v); loss via the exact O(N·K) collapse.

    Args:
        config: VQLogitsConfig.
        padded_vocab_size: Megatron's padded vocab (multiple of T); default: V rounded up to T.
        tp_group: tensor-parallel group; default megatron-core's if initialised, else single process.
        sequence_parallel: hidden states arrive split along the sequence (Megatron SP).
        gather_output: forward() returns the full vocabulary (Megatron's gather_output).
        token_counts: [V] corpus counts for map_init='frequency'.
        embeddings: [V, d'] rows to cluster for map_init='kmeans'.
    """

    def __init__(self, config: VQLogitsConfig, *, padded_vocab_size: int | None = None, tp_group=None,
                 sequence_parallel: bool = False, gather_output: bool = False,
                 params_dtype: torch.dtype = torch.float32, device=None,
                 token_counts: torch.Tensor | None = None, embeddings: torch.Tensor | None = None):
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

        full_map, centroids = build_map(
            config.map_init, config.vocab_size, config.codebook_size, seed=config.seed,
            token_counts=token_counts, embeddings=embeddings, kmeans_iters=config.kmeans_iters,
            spherical=config.spherical_kmeans)
        if config.codebook_init == "kmeans":
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

        self.register_buffer("token_to_code", torch.empty(self.partition_size, dtype=torch.int64,
                                                          device=device), persistent=True)
        self.register_buffer("global_token_to_code", torch.empty(0, dtype=torch.int64, device=device),
                             persistent=False)
        self.register_buffer("code_counts", torch.empty(0, dtype=torch.int64, device=device),
                             persistent=False)
        self.set_map(full_map.to(device))

        self.bias = None
        if config.per_token_bias:
            full_bias = self._initial_bias(token_counts)
            self.bias = nn.Parameter(full_bias[self.vocab_start: self.vocab_end].to(device, params_dtype))
            set_tensor_model_parallel_attributes(self.bias, is_parallel=True, dim=0, stride=1)
        # A loaded map (any TP size, any padding) must refresh the replicated copy and counts.
        self.register_load_state_dict_post_hook(lambda module, _keys: module._sync_map_from_shards())

    def _initial_bias(self, token_counts: torch.Tensor | None) -> torch.Tensor:
        """Full padded bias [V_pad]: zeros, or add-one smoothed log unigram frequencies."""
        full = torch.zeros(self.padded_vocab_size, dtype=torch.float64)
        if self.config.bias_init == "unigram":
            if token_counts is None or token_counts.shape != (self.vocab_size,):
                raise ValueError(f"bias_init='unigram' needs token_counts of shape [{self.vocab_size}]")
            counts = token_counts.double().cpu() + 1.0
            full[: self.vocab_size] = torch.log(counts / counts.sum())
        return full

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
        if full_map.dim() != 1 or full_map.shape[0] != self.vocab_size:
            raise ValueError(f"token_to_code must have shape [{self.vocab_size}] (vocab_size), "
                             f"got {tuple(full_map.shape)}")
        lo, hi = int(full_map.min()), int(full_map.max())
        if lo < 0 or hi >= self.num_codes:
            raise ValueError(f"token_to_code has codes in [{lo}, {hi}], outside [0, {self.num_codes}) "
                             f"(codebook_size={self.num_codes})")

    @torch.no_grad()
    def set_map(self, full_map: torch.Tensor) -> None:
        """Install a new global map [V]; identical on every TP rank (taken from TP rank 0)."""
        full_map = broadcast_from_first_rank(full_map.to(self.token_to_code.device, torch.int64).clone(),
                                             self.tp.group)
        self._check_map(full_map)
        padded = torch.full((self.padded_vocab_size,), -1, dtype=torch.int64, device=full_map.device)
        padded[: self.vocab_size] = full_map
        self.token_to_code.copy_(padded[self.vocab_start: self.vocab_end])
        self._set_replicated_copy(full_map)

    def _set_replicated_copy(self, full_map: torch.Tensor) -> None:
        self.global_token_to_code = full_map
        self.code_counts = code_counts(full_map, self.num_codes)

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
                    reinit_codebook: bool = False) -> float:
        """Re-cluster the vocabulary from embedding rows [V, d'] during training.

        method 'kmeans': k-means of the rows (the codebook is replaced by the centroids if
        reinit_codebook and the widths match); 'nearest': move each token to its nearest current code
        (needs d' == d). Counts and the replicated map stay consistent. Returns the fraction of tokens
        whose code changed.
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
                self.codebook.copy_(broadcast_from_first_rank(
                    centroids.to(self.codebook.device, self.codebook.dtype).contiguous(), self.tp.group))
        elif method == "nearest":
            new_map = nearest_code_map(rows, self.codebook.detach().float(),
                                       spherical=self.config.spherical_kmeans)
        else:
            raise ValueError(f"rebuild_map method must be 'kmeans' or 'nearest', got {method!r}")
        old_map = self.global_token_to_code.clone()
        self.set_map(new_map)
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
        logits = scatter_code_logits(code_logits(hidden, codebook), self.token_to_code, self.bias)
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather:
            logits = gather_from_tensor_parallel_region(logits, self.tp.group)
        return logits, None

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
             label_smoothing: float | None = None, z_loss: float | None = None,
             reduction: str = "none", validate: bool = True) -> torch.Tensor:
        """Collapsed cross-entropy (the training path). hidden [s(/T), b, d], labels [s, b].

        Returns per-token loss shaped like labels ('none', the Megatron convention), or 'mean'/'sum'.
        """
        eps = self.config.label_smoothing if label_smoothing is None else label_smoothing
        zeta = self.config.z_loss if z_loss is None else z_loss
        if self.sequence_parallel:  # the loss is computed whole on every rank: backward just splits
            hidden = gather_from_sequence_parallel_region(hidden, self.tp.group, sharded_consumer=False)
        if labels.shape != hidden.shape[:-1]:
            raise ValueError(f"labels shape {tuple(labels.shape)} != hidden leading shape "
                             f"{tuple(hidden.shape[:-1])}")
        flat = labels.reshape(-1)
        valid = flat != ignore_index
        if validate:
            self._check_labels(flat[valid])
        safe = torch.where(valid, flat, torch.zeros_like(flat))
        target_code = self.global_token_to_code[safe]
        if self.bias is None:
            log_mass, target_bias, bias_sum = torch.log(self.code_counts.double()), None, None
        else:
            log_mass, target_bias, bias_sum = self._bias_terms(safe, valid)
        per_token = collapsed_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), self.codebook, log_mass, self.code_counts, target_code,
            valid, self.vocab_size, target_bias=target_bias, bias_sum=bias_sum,
            label_smoothing=eps, z_loss=zeta)
        out = reduce_loss(per_token, valid, reduction)
        return out.view(labels.shape) if reduction == "none" else out

    def materialized_loss(self, hidden: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                          label_smoothing: float | None = None, z_loss: float | None = None) -> torch.Tensor:
        """Reference path: scatter to vocab-parallel logits, then vocab-parallel CE. Per-token [s, b]."""
        eps = self.config.label_smoothing if label_smoothing is None else label_smoothing
        zeta = self.config.z_loss if z_loss is None else z_loss
        logits, _ = self.forward(hidden, runtime_gather_output=False)
        return vocab_parallel_cross_entropy(logits, labels, vocab_size=self.vocab_size, group=self.tp.group,
                                            label_smoothing=eps, z_loss=zeta, ignore_index=ignore_index)

    def _check_labels(self, real_labels: torch.Tensor) -> None:
        if real_labels.numel() and (int(real_labels.min()) < 0 or int(real_labels.max()) >= self.vocab_size):
            raise ValueError(f"labels must be token ids in [0, {self.vocab_size}) or ignore_index; got "
                             f"[{int(real_labels.min())}, {int(real_labels.max())}]")

    def _bias_terms(self, safe_labels: torch.Tensor, valid: torch.Tensor):
        """B_k, the target tokens' bias and Σ_v b_v from the vocab-sharded bias in ONE all-gather."""
        bias = self.bias
        local_log_mass = segment_logsumexp(bias, self.token_to_code, self.num_codes)
        in_range = valid & (safe_labels >= self.vocab_start) & (safe_labels < self.vocab_end)
        local_index = torch.where(in_range, safe_labels - self.vocab_start, torch.zeros_like(safe_labels))
        local_target = torch.where(in_range, bias[local_index].to(local_log_mass.dtype),
                                   torch.zeros((), dtype=local_log_mass.dtype, device=bias.device))
        local_sum = torch.where(self.token_to_code >= 0, bias, torch.zeros_like(bias)).sum(
            dtype=local_log_mass.dtype)
        if self.tp.size == 1:
            return local_log_mass, local_target, local_sum
        # A code with no tokens on a rank has B = -inf there; clamp so the logsumexp over ranks keeps a
        # finite gradient (exp(min) is still exactly 0 next to any real term).
        floor = torch.finfo(local_log_mass.dtype).min / 4
        packed = torch.cat([local_log_mass.clamp(min=floor), local_target, local_sum.view(1)])
        gathered = gather_from_tensor_parallel_region(packed.unsqueeze(-1), self.tp.group)  # [K+N+1, T]
        K, N = self.num_codes, local_target.shape[0]
        return (torch.logsumexp(gathered[:K], dim=-1), gathered[K:K + N].sum(-1), gathered[K + N].sum())

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
        vocab_sharded = {"token_to_code": self.token_to_code, "bias": self.bias}
        for name, tensor in vocab_sharded.items():
            if tensor is not None:
                out[f"{prefix}{name}"] = make_tp_sharded_tensor_for_checkpoint(
                    tensor, f"{prefix}{name}", tp_axis=0, prepend_offsets=sharded_offsets,
                    allow_shape_mismatch=True, **groups)
        return out

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size}, padded_vocab_size={self.padded_vocab_size}, "
                f"codebook_size={self.num_codes}, hidden_size={self.config.hidden_size}, "
                f"per_token_bias={self.bias is not None}, tp={self.tp.size}, map_init={self.config.map_init}")
