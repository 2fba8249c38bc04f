"""Tests for vq_megatron.ops.kmeans."""

import pytest
import torch

from vq_megatron.ops.kmeans import KMeansResult, assign_to_nearest, kmeans


def planted_blobs(num_blobs=8, per_blob=50, dim=16, seed=0):
    """Well-separated Gaussian blobs: centres ~N(0, 10^2), noise std 0.1."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_blobs, dim, generator=g) * 10
    truth = torch.arange(num_blobs).repeat_interleave(per_blob)
    points = centres[truth] + 0.1 * torch.randn(len(truth), dim, generator=g)
    shuffle = torch.randperm(len(truth), generator=g)
    return points[shuffle], truth[shuffle]


def is_permutation_of(labels, truth, k):
    """Contingency matrix of a perfect recovery has exactly one non-zero per row and column."""
    contingency = torch.zeros(k, k, dtype=torch.int64)
    contingency.index_put_((truth, labels), torch.ones_like(truth), accumulate=True)
    nonzero = contingency > 0
    return bool((nonzero.sum(0) == 1).all() and (nonzero.sum(1) == 1).all())


def brute_force_inertia(x, centroids, labels):
    return float((x - centroids[labels]).pow(2).sum())


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_recovers_planted_clusters(init):
    x, truth = planted_blobs()
    result = kmeans(x, 8, init=init, seed=1)
    assert isinstance(result, KMeansResult)
    assert result.labels.dtype == torch.int64 and result.labels.shape == (400,)
    assert result.centroids.shape == (8, 16)
    if init == "kmeans++":  # random init may legitimately land in a local optimum
        assert is_permutation_of(result.labels, truth, 8)
        assert result.inertia < 400 * 16 * 0.1**2 * 1.5  # ~ n * d * noise variance
    assert result.inertia == pytest.approx(brute_force_inertia(x, result.centroids, result.labels), rel=1e-4)


def test_contingency_check_detects_a_merge():
    x, truth = planted_blobs()
    merged = truth.clone()
    merged[merged == 7] = 6
    assert not is_permutation_of(merged, truth, 8)


def test_deterministic_and_seed_sensitive():
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    a, b = kmeans(x, 10, seed=3), kmeans(x, 10, seed=3)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centroids, b.centroids)
    assert a.inertia == b.inertia and a.iterations == b.iterations
    other = kmeans(x, 10, seed=4, iters=0)
    assert not torch.equal(kmeans(x, 10, seed=3, iters=0).centroids, other.centroids)


def test_centroids_keep_input_dtype():
    x, _ = planted_blobs()
    result = kmeans(x.to(torch.bfloat16), 8)
    assert result.centroids.dtype == torch.bfloat16


def test_empty_clusters_are_reseeded_with_duplicates():
    # 3 distinct locations but 5 clusters: Lloyd alone would leave clusters empty.
    x = torch.cat([torch.zeros(20, 2), torch.ones(20, 2), torch.full((2, 2), 5.0)])
    for init in ("kmeans++", "random"):
        for seed in range(5):
            result = kmeans(x, 5, seed=seed, init=init)
            assert torch.bincount(result.labels, minlength=5).min() >= 1


def test_empty_cluster_takes_the_farthest_point():
    # Random init almost surely starts both centroids on the dense duplicates, so one
    # cluster is empty; it must be re-seeded with the outlier, the farthest point.
    x = torch.cat([torch.full((30, 3), 5.0), torch.tensor([[100.0, 0, 0]])])
    result = kmeans(x, 2, init="random", seed=0)
    counts = torch.bincount(result.labels, minlength=2)
    assert sorted(counts.tolist()) == [1, 30]
    assert result.inertia == pytest.approx(0.0, abs=1e-6)


def test_no_empty_cluster_with_many_clusters():
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    x[:40] = 0.0  # heavy duplication
    result = kmeans(x, 30, seed=0)
    assert torch.bincount(result.labels, minlength=30).min() >= 1


def test_k_equals_n_every_point_its_own_cluster():
    x = torch.zeros(6, 3)  # even fully duplicated points
    result = kmeans(x, 6)
    assert torch.equal(result.labels, torch.arange(6))
    assert result.inertia == 0.0


def test_k_equals_one_gives_the_mean():
    x = torch.randn(100, 5, generator=torch.Generator().manual_seed(0))
    result = kmeans(x, 1)
    assert torch.allclose(result.centroids[0], x.mean(0), atol=1e-5)
    assert bool((result.labels == 0).all())


def test_spherical_groups_by_direction_not_length():
    g = torch.Generator().manual_seed(0)
    directions = torch.eye(4)
    truth = torch.arange(4).repeat_interleave(30)
    # Wildly different norms: Euclidean k-means would split by length instead.
    scales = torch.rand(len(truth), 1, generator=g) * 100 + 0.01
    x = (directions[truth] + 0.05 * torch.randn(len(truth), 4, generator=g)) * scales
    result = kmeans(x, 4, spherical=True)
    assert is_permutation_of(result.labels, truth, 4)
    assert not is_permutation_of(kmeans(x, 4).labels, truth, 4)
    assert torch.allclose(result.centroids.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.equal(assign_to_nearest(x, result.centroids, spherical=True), result.labels)


def test_chunked_assignment_matches_unchunked():
    g = torch.Generator().manual_seed(0)
    x, centroids = torch.randn(1000, 12, generator=g), torch.randn(37, 12, generator=g)
    whole = assign_to_nearest(x, centroids, chunk_size=10_000)
    assert torch.equal(assign_to_nearest(x, centroids, chunk_size=7), whole)
    assert torch.equal(whole, torch.cdist(x, centroids).argmin(1))


def test_chunked_kmeans_matches_unchunked():
    x, _ = planted_blobs()
    a, b = kmeans(x, 8, chunk_size=13), kmeans(x, 8, chunk_size=8192)
    assert torch.equal(a.labels, b.labels)
    assert torch.allclose(a.centroids, b.centroids, atol=1e-5)


def test_stops_early_when_converged():
    x, _ = planted_blobs()
    assert kmeans(x, 8, iters=100).iterations < 100
    assert kmeans(x, 8, iters=0).iterations == 0


@pytest.mark.parametrize(
    ("x", "k", "match"),
    [
        (torch.zeros(5, 2), 0, "k must be >= 1"),
        (torch.zeros(5, 2), 6, "exceeds the number of points"),
        (torch.zeros(5), 1, "must be 2-D"),
        (torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), 1, "NaN or Inf"),
        (torch.tensor([[0.0, float("inf")], [1.0, 1.0]]), 1, "NaN or Inf"),
    ],
)
def test_invalid_inputs(x, k, match):
    with pytest.raises(ValueError, match=match):
        kmeans(x, k)


def test_invalid_options():
    x = torch.zeros(5, 2)
    with pytest.raises(ValueError, match="unknown init"):
        kmeans(x, 2, init="forgy")
    with pytest.raises(ValueError, match="chunk_size"):
        kmeans(x, 2, chunk_size=0)
    with pytest.raises(ValueError, match="dimension mismatch"):
        assign_to_nearest(x, torch.zeros(3, 4))
