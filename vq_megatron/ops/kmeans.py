"""Batched, seeded k-means (Lloyd's algorithm) in torch.

Used to initialise the VQ-Logits codebook from the output-embedding rows and to
re-cluster tokens during training. All math runs in fp32 on ``x``'s device;
rows are converted chunk by chunk, so neither an fp32 copy of ``x`` nor an
``n x k`` distance matrix is ever materialised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["KMeansResult", "kmeans", "assign_to_nearest"]

# k-means++ is O(k * m * d); seeding on a subsample keeps it cheap for large n.
_KMEANSPP_MAX_SAMPLE = 20_000
_INIT_METHODS = ("kmeans++", "random")


@dataclass(frozen=True)
class KMeansResult:
    """Outcome of :func:`kmeans`.

    Attributes:
        centroids: ``[k, d]`` cluster centres, in ``x``'s dtype (unit-norm when spherical).
        labels: ``[n]`` int64 cluster index of every row.
        inertia: sum of squared distances of rows to their assigned centroid
            (for spherical k-means, between unit-normalised rows and centroids).
        iterations: number of Lloyd updates performed.
    """

    centroids: torch.Tensor
    labels: torch.Tensor
    inertia: float
    iterations: int


def _check_points(x: torch.Tensor, name: str = "x") -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [n, d], got shape {tuple(x.shape)}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def _prepare(rows: torch.Tensor, spherical: bool) -> torch.Tensor:
    """fp32 copy of ``rows``, unit-normalised for cosine k-means (zero rows stay zero)."""
    rows = rows.float()
    return torch.nn.functional.normalize(rows, dim=1) if spherical else rows


def _assign(
    x: torch.Tensor, centroids: torch.Tensor, chunk_size: int, spherical: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid (int64 ``[n]``) and squared distance to it (fp32 ``[n]``), chunked.

    ``centroids`` must already be fp32 (and unit-norm when ``spherical``).
    """
    n = x.shape[0]
    labels = torch.empty(n, dtype=torch.int64, device=x.device)
    sq_dist = torch.empty(n, dtype=torch.float32, device=x.device)
    centroid_sq = centroids.pow(2).sum(1)
    for start in range(0, n, chunk_size):
        chunk = _prepare(x[start : start + chunk_size], spherical)
        dots = chunk @ centroids.T  # [chunk, k]: the only k-wide buffer
        if spherical:
            # For unit vectors ||a - b||^2 = 2 - 2 a.b, so max dot == min distance.
            idx = dots.argmax(dim=1)
        else:
            idx = dots.mul_(-2.0).add_(centroid_sq).argmin(dim=1)  # ||x||^2 does not change argmin
        labels[start : start + chunk_size] = idx
        # Exact distance to the winner: the expanded form loses precision to cancellation
        # when points sit far from the origin, which would skew inertia and tol checks.
        sq_dist[start : start + chunk_size] = (chunk - centroids[idx]).pow(2).sum(1)
    return labels, sq_dist


def _fill_empty_clusters(
    x: torch.Tensor,
    centroids: torch.Tensor,
    labels: torch.Tensor,
    sq_dist: torch.Tensor,
    spherical: bool,
) -> None:
    """Move the farthest points into empty clusters, in place.

    Each empty cluster gets a distinct point, chosen in order of decreasing
    distance to its current centroid (ties by index, so deterministic). A point
    is only taken if its cluster keeps at least one other member, so filling one
    hole never opens another; k <= n guarantees enough such points exist.
    """
    k = centroids.shape[0]
    counts = torch.bincount(labels, minlength=k)
    empty = (counts == 0).nonzero().flatten()
    if empty.numel() == 0:
        return
    by_distance = torch.sort(sq_dist, descending=True, stable=True).indices
    cluster_of = labels[by_distance]
    # Rank of each point within its own cluster, in order of decreasing distance.
    grouped = torch.sort(cluster_of, stable=True).indices
    cluster_start = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(grouped)
    rank[grouped] = torch.arange(grouped.numel(), device=x.device) - cluster_start[cluster_of[grouped]]
    movable = rank < counts[cluster_of] - 1
    donors = by_distance[movable][: empty.numel()]
    labels[donors] = empty
    sq_dist[donors] = 0.0
    centroids[empty] = _prepare(x[donors], spherical)


def _update_centroids(
    x: torch.Tensor, labels: torch.Tensor, k: int, chunk_size: int, spherical: bool
) -> torch.Tensor:
    """Mean of each cluster (every cluster must be non-empty), renormalised when spherical."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        chunk = _prepare(x[start : start + chunk_size], spherical)
        sums.index_add_(0, labels[start : start + chunk_size], chunk)
    counts = torch.bincount(labels, minlength=k).clamp_min_(1).to(torch.float32)
    means = sums / counts[:, None]
    return torch.nn.functional.normalize(means, dim=1) if spherical else means


def _kmeanspp_init(
    x: torch.Tensor, k: int, generator: torch.Generator, spherical: bool
) -> torch.Tensor:
    """k-means++ (D^2 sampling) on a seeded subsample of at most ~20k rows; k distinct rows."""
    n, device = x.shape[0], x.device
    sample_size = min(n, max(_KMEANSPP_MAX_SAMPLE, k))
    if sample_size < n:
        rows = torch.randperm(n, generator=generator, device=device)[:sample_size]
        sample = _prepare(x[rows], spherical)
    else:
        sample = _prepare(x, spherical)
    sample_sq = sample.pow(2).sum(1)

    chosen = torch.empty(k, dtype=torch.int64, device=device)
    unchosen = torch.ones(sample_size, dtype=torch.float32, device=device)
    min_sq_dist = torch.full((sample_size,), float("inf"), device=device)
    nxt = torch.randint(sample_size, (1,), generator=generator, device=device)
    for i in range(k):
        if i > 0:
            # D^2 weights; if every unchosen row duplicates a chosen one, fall back
            # to uniform over unchosen rows (decided on device, no host sync).
            weights = torch.where(min_sq_dist.sum() > 0, min_sq_dist, unchosen)
            nxt = torch.multinomial(weights, 1, generator=generator)
        chosen[i : i + 1] = nxt
        centre = sample[nxt]  # [1, d]
        sq_dist = (sample_sq - 2.0 * (sample @ centre.T).squeeze(1) + sample_sq[nxt]).clamp_min_(0.0)
        min_sq_dist = torch.minimum(min_sq_dist, sq_dist)
        # Exact zeros for chosen rows: rounding must never let a row be picked twice.
        min_sq_dist[nxt] = 0.0
        unchosen[nxt] = 0.0
    return sample[chosen]


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    iters: int = 50,
    seed: int = 0,
    tol: float = 1e-4,
    init: str = "kmeans++",
    chunk_size: int = 8192,
    spherical: bool = False,
) -> KMeansResult:
    """Cluster the rows of ``x`` into ``k`` groups with Lloyd's algorithm.

    Args:
        x: ``[n, d]`` points (any float dtype; math is fp32 on ``x.device``).
        k: number of clusters, ``1 <= k <= n``.
        iters: maximum number of Lloyd updates.
        seed: seed of the device-local ``torch.Generator``; same seed, same result.
        tol: stop once the relative inertia change falls below this.
        init: ``"kmeans++"`` (D^2 sampling) or ``"random"`` (k distinct rows).
        chunk_size: rows per distance block; peak extra memory is O(chunk_size * k).
        spherical: cosine k-means (unit-normalised rows and centroids, max dot product).

    Returns:
        :class:`KMeansResult`. Every cluster is non-empty: empty clusters are
        re-seeded with the points farthest from their centroids.

    Raises:
        ValueError: for non-2-D or non-finite ``x``, ``k`` outside ``[1, n]``,
            unknown ``init``, ``iters < 0`` or ``chunk_size < 1``.
    """
    _check_points(x)
    n = x.shape[0]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n:
        raise ValueError(f"k={k} exceeds the number of points n={n}")
    if init not in _INIT_METHODS:
        raise ValueError(f"unknown init {init!r}; expected one of {_INIT_METHODS}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    _check_chunk_size(chunk_size)
    out_dtype = x.dtype if x.is_floating_point() else torch.float32

    if k == n:  # every point is its own cluster, even duplicates
        return KMeansResult(
            centroids=_prepare(x, spherical).to(out_dtype),
            labels=torch.arange(n, device=x.device),
            inertia=0.0,
            iterations=0,
        )

    generator = torch.Generator(device=x.device).manual_seed(seed)
    if init == "kmeans++":
        centroids = _kmeanspp_init(x, k, generator, spherical)
    else:
        centroids = _prepare(x[torch.randperm(n, generator=generator, device=x.device)[:k]], spherical)

    labels, sq_dist = _assign(x, centroids, chunk_size, spherical)
    inertia = float(sq_dist.sum())
    iterations = 0
    for iterations in range(1, iters + 1):
        _fill_empty_clusters(x, centroids, labels, sq_dist, spherical)
        centroids = _update_centroids(x, labels, k, chunk_size, spherical)
        labels, sq_dist = _assign(x, centroids, chunk_size, spherical)
        new_inertia = float(sq_dist.sum())
        converged = abs(inertia - new_inertia) <= tol * inertia
        inertia = new_inertia
        if converged:
            break
    # The last assignment may have emptied a cluster; repair labels and centroids together.
    _fill_empty_clusters(x, centroids, labels, sq_dist, spherical)
    return KMeansResult(
        centroids=centroids.to(out_dtype),
        labels=labels,
        inertia=float(sq_dist.sum()),
        iterations=iterations,
    )


def assign_to_nearest(
    x: torch.Tensor,
    centroids: torch.Tensor,
    *,
    chunk_size: int = 8192,
    spherical: bool = False,
) -> torch.Tensor:
    """Index (int64 ``[n]``) of the nearest centroid for every row of ``x``.

    Euclidean by default; with ``spherical`` the centroid of highest cosine
    similarity. Computed in fp32 chunks of ``chunk_size`` rows. Ties go to the
    lowest centroid index.
    """
    _check_points(x)
    _check_points(centroids, "centroids")
    if centroids.shape[0] < 1:
        raise ValueError("centroids must contain at least one row")
    if centroids.shape[1] != x.shape[1]:
        raise ValueError(
            f"dimension mismatch: x has d={x.shape[1]}, centroids have d={centroids.shape[1]}"
        )
    _check_chunk_size(chunk_size)
    prepared = _prepare(centroids.to(x.device), spherical)
    return _assign(x, prepared, chunk_size, spherical)[0]
