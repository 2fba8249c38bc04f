"""Initialisation strategies for the VQ-Logits token -> code map and codebook.

A map is an int64 tensor ``token_to_code [V]`` with values in ``[0, K)``. Maps
are built on CPU unless their input tensors live on another device, and are
deterministic under ``seed``.
"""

from __future__ import annotations

import heapq

import torch

from vq_megatron.ops.kmeans import assign_to_nearest, kmeans

__all__ = [
    "MAP_INIT_STRATEGIES",
    "random_balanced_map",
    "contiguous_map",
    "frequency_balanced_map",
    "kmeans_map",
    "nearest_code_map",
    "normal_codebook",
    "low_rank_residual",
    "build_map",
]

MAP_INIT_STRATEGIES = ("random", "contiguous", "frequency", "kmeans")


def _check_sizes(vocab_size: int, num_codes: int) -> None:
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if not 1 <= num_codes <= vocab_size:
        raise ValueError(f"num_codes must be in [1, vocab_size={vocab_size}], got {num_codes}")


def _check_embeddings(embeddings: torch.Tensor, name: str = "embeddings") -> None:
    if embeddings.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, d], got shape {tuple(embeddings.shape)}")


def random_balanced_map(vocab_size: int, num_codes: int, *, seed: int = 0) -> torch.Tensor:
    """Seeded random map in which every code holds ``floor(V/K)`` or ``ceil(V/K)`` tokens.

    Tokens are shuffled by a seeded permutation and dealt round-robin to codes.
    """
    _check_sizes(vocab_size, num_codes)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(vocab_size, generator=generator)
    token_to_code = torch.empty(vocab_size, dtype=torch.int64)
    token_to_code[order] = torch.arange(vocab_size) % num_codes
    return token_to_code


def contiguous_map(vocab_size: int, num_codes: int) -> torch.Tensor:
    """Map consecutive token ids to the same code, in blocks of ``floor(V/K)`` or ``ceil(V/K)``.

    The larger blocks come first; the map is monotone non-decreasing.
    """
    _check_sizes(vocab_size, num_codes)
    base, remainder = divmod(vocab_size, num_codes)
    block_sizes = base + (torch.arange(num_codes) < remainder).to(torch.int64)
    return torch.repeat_interleave(torch.arange(num_codes), block_sizes)


def frequency_balanced_map(token_counts: torch.Tensor, num_codes: int) -> torch.Tensor:
    """Map tokens so every code holds a similar total frequency (greedy LPT).

    Tokens are taken by count, descending (ties by token id), and each goes to
    the code with the smallest running total. Ties on the total go to the code
    holding fewer tokens, then to the smallest code index: with zero-count tokens
    this still spreads them out, and it guarantees no code is empty. LPT keeps
    ``max total - min total <= max(token_counts)``.

    Args:
        token_counts: ``[V]`` non-negative, finite counts (int or float).
        num_codes: ``K`` with ``1 <= K <= V``.
    """
    if token_counts.dim() != 1:
        raise ValueError(f"token_counts must be 1-D [V], got shape {tuple(token_counts.shape)}")
    _check_sizes(token_counts.numel(), num_codes)
    if token_counts.is_floating_point() and not bool(torch.isfinite(token_counts).all()):
        raise ValueError("token_counts contains NaN or Inf values")
    if bool((token_counts < 0).any()):
        raise ValueError("token_counts must be non-negative")

    # Stable descending sort keeps ascending token id among equal counts.
    order = torch.sort(token_counts.cpu(), descending=True, stable=True).indices
    counts = token_counts.cpu()[order].tolist()
    codes = [0] * len(counts)
    heap = [(0, 0, code) for code in range(num_codes)]  # (total, num_tokens, code): already a heap
    for position, count in enumerate(counts):
        total, num_tokens, code = heap[0]
        codes[position] = code
        heapq.heapreplace(heap, (total + count, num_tokens + 1, code))
    token_to_code = torch.empty(len(counts), dtype=torch.int64)
    token_to_code[order] = torch.tensor(codes, dtype=torch.int64)
    return token_to_code.to(token_counts.device)


def kmeans_map(
    embeddings: torch.Tensor,
    num_codes: int,
    *,
    seed: int = 0,
    iters: int = 50,
    spherical: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the embedding rows ``[V, d]`` into ``num_codes`` codes.

    Returns:
        ``(token_to_code [V] int64, centroids [K, d])``; centroids have the
        embeddings' dtype and device, and no code is empty.
    """
    _check_embeddings(embeddings)
    _check_sizes(embeddings.shape[0], num_codes)
    result = kmeans(embeddings.detach(), num_codes, iters=iters, seed=seed, spherical=spherical)
    return result.labels, result.centroids


def nearest_code_map(
    embeddings: torch.Tensor, codebook: torch.Tensor, *, spherical: bool = False
) -> torch.Tensor:
    """Reassign every token to its nearest code (Euclidean, or cosine when ``spherical``).

    Used to re-cluster tokens during training; codes may end up empty.
    """
    _check_embeddings(embeddings)
    _check_embeddings(codebook, "codebook")
    return assign_to_nearest(embeddings.detach(), codebook.detach(), spherical=spherical)


def normal_codebook(
    num_codes: int,
    dim: int,
    *,
    std: float = 0.02,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``[num_codes, dim]`` codebook drawn from N(0, std^2).

    Sampled on CPU in fp32 so the values do not depend on ``device`` or ``dtype``.
    """
    if num_codes < 1 or dim < 1:
        raise ValueError(f"num_codes and dim must be >= 1, got {num_codes} and {dim}")
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    generator = torch.Generator().manual_seed(seed)
    codebook = torch.randn(num_codes, dim, generator=generator) * std
    return codebook.to(dtype=dtype, device=device)


@torch.no_grad()
def low_rank_residual(
    rows: torch.Tensor, centroids: torch.Tensor, token_to_code: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-r fit U·P of the residuals R = rows - centroids[M] (truncated SVD, Eckart–Young).

    Returns U = U_r·S_r ``[V, r]`` and P = V_rᵀ ``[r, d]`` in fp32 so that u_v·(P·h) = (R_v projected)·h:
    a dense head W = rows becomes codebook + per-token low-rank refinement.
    """
    _check_embeddings(rows, "rows")
    if centroids.shape[1] != rows.shape[1]:
        raise ValueError(f"centroids have width {centroids.shape[1]}, rows {rows.shape[1]}")
    if not 1 <= rank <= min(rows.shape):
        raise ValueError(f"rank must be in [1, {min(rows.shape)}], got {rank}")
    residual = rows.float() - centroids.float()[token_to_code]
    left, singular, right_t = torch.linalg.svd(residual, full_matrices=False)
    return (left[:, :rank] * singular[:rank]).contiguous(), right_t[:rank].contiguous()


def build_map(
    strategy: str,
    vocab_size: int,
    num_codes: int,
    *,
    seed: int = 0,
    token_counts: torch.Tensor | None = None,
    embeddings: torch.Tensor | None = None,
    kmeans_iters: int = 50,
    spherical: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Build a token -> code map with one of :data:`MAP_INIT_STRATEGIES`.

    Returns:
        ``(token_to_code [V] int64, centroids)``; centroids are the k-means
        centres for ``"kmeans"`` and ``None`` otherwise.

    Raises:
        ValueError: unknown strategy, sizes out of range, or a missing or
            mis-shaped ``token_counts`` / ``embeddings``.
    """
    if strategy not in MAP_INIT_STRATEGIES:
        raise ValueError(
            f"unknown map init strategy {strategy!r}; valid strategies: {', '.join(MAP_INIT_STRATEGIES)}"
        )
    _check_sizes(vocab_size, num_codes)
    if strategy == "random":
        return random_balanced_map(vocab_size, num_codes, seed=seed), None
    if strategy == "contiguous":
        return contiguous_map(vocab_size, num_codes), None
    if strategy == "frequency":
        if token_counts is None:
            raise ValueError("strategy 'frequency' requires token_counts")
        if token_counts.dim() != 1 or token_counts.shape[0] != vocab_size:
            raise ValueError(
                f"token_counts must have shape [{vocab_size}], got {tuple(token_counts.shape)}"
            )
        return frequency_balanced_map(token_counts, num_codes), None
    if embeddings is None:
        raise ValueError("strategy 'kmeans' requires embeddings")
    if embeddings.dim() != 2 or embeddings.shape[0] != vocab_size:
        raise ValueError(
            f"embeddings must have shape [{vocab_size}, d], got {tuple(embeddings.shape)}"
        )
    return kmeans_map(embeddings, num_codes, seed=seed, iters=kmeans_iters, spherical=spherical)
