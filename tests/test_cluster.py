"""vqlab.cluster against scikit-learn's k-means objective and brute-force nearest search."""

import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

from vqlab import cluster


@pytest.mark.parametrize(("centers", "k"), [(5, 16), (10, 32)])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_inertia_is_within_a_few_percent_of_scikit_learn(centers, k, seed):
    points, _ = make_blobs(n_samples=1500, centers=centers, n_features=3, cluster_std=1.5, random_state=seed)
    x = torch.tensor(points, dtype=torch.float32)
    centroids = cluster.kmeans(x, k, iters=20, seed=seed)
    assert centroids.shape == (k, 3)
    reference = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(points).inertia_
    assert cluster.inertia(x, centroids).item() <= 1.05 * reference


def test_inertia_is_the_sum_of_squared_distances_to_the_nearest_centroid():
    generator = torch.Generator().manual_seed(0)
    x, centroids = torch.randn(50, 4, generator=generator), torch.randn(6, 4, generator=generator)
    brute = torch.cdist(x.double(), centroids.double()).square()  # (50, 6)
    assert cluster.inertia(x, centroids).item() == pytest.approx(brute.min(-1).values.sum().item(), rel=1e-5)
    torch.testing.assert_close(cluster.squared_distances(x, centroids).double(), brute, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("elements", [64, 1000, cluster.CPU_CHUNK_ELEMENTS, cluster.CHUNK_ELEMENTS])
def test_nearest_in_blocks_of_points_and_codes_is_the_exact_argmin(elements):
    generator = torch.Generator().manual_seed(1)
    x, centroids = torch.randn(1000, 5, generator=generator), torch.randn(37, 5, generator=generator)
    expected = torch.cdist(x.double(), centroids.double()).argmin(-1)
    index, distances = cluster.nearest_with_distances(x, centroids, elements)
    assert torch.equal(index, expected)
    exact = torch.cdist(x.double(), centroids.double()).min(-1).values.square()
    torch.testing.assert_close(distances.double(), exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("m", "k"), [(1, 1), (7, 3), (1000, 37), (8192, 65536), (10**6, 2**20)])
@pytest.mark.parametrize("elements", [64, 4096, cluster.CHUNK_ELEMENTS])
def test_a_block_never_holds_more_than_its_budget_of_distances(m, k, elements):
    rows, codes = cluster.blocks(m, k, elements)
    assert rows >= 1 and 1 <= codes <= k
    assert rows * codes <= elements or (rows == 1 and codes == 1)


def test_the_default_block_is_the_devices(monkeypatch):
    """A CPU walks blocks that stay in cache; a GPU takes the whole budget."""
    budgets = []
    real = cluster.blocks
    monkeypatch.setattr(cluster, "blocks", lambda m, k, elements: budgets.append(elements) or real(m, k, elements))
    cluster.nearest(torch.randn(10, 3), torch.randn(4, 3))
    cluster.nearest(torch.randn(10, 3), torch.randn(4, 3), elements=64)
    assert budgets == [cluster.CPU_CHUNK_ELEMENTS, 64]
    assert cluster.block_elements(torch.device("cuda", 0)) == cluster.CHUNK_ELEMENTS > cluster.CPU_CHUNK_ELEMENTS


def test_nearest_is_exact_far_from_the_origin_where_the_expanded_distance_is_not():
    generator = torch.Generator().manual_seed(4)
    offset = torch.full((8,), 3000.0)
    centroids = offset + torch.randn(512, 8, generator=generator)
    x = offset + torch.randn(2048, 8, generator=generator)
    expected = torch.cdist(x.double(), centroids.double()).argmin(-1)
    # the data must defeat ‖x‖² − 2x·c + ‖c‖² in fp32, or this test would prove nothing
    assert not torch.equal(cluster.squared_distances(x, centroids).argmin(-1), expected)
    assert torch.equal(cluster.nearest(x, centroids, elements=4096), expected)


def test_ties_go_to_the_lowest_index_across_code_blocks():
    centroids = torch.tensor([[5.0, 5.0], [1.0, 0.0], [9.0, 9.0], [1.0, 0.0], [1.0, 0.0]])
    x = torch.tensor([[1.0, 0.0], [1.2, 0.1]])
    for elements in (2, 3, 5, 100):
        assert cluster.nearest(x, centroids, elements).tolist() == [1, 1]


def test_same_seed_same_centroids_and_k_distinct_points_give_k_distinct_centroids():
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(2))
    a, b = cluster.kmeans(x, 40, iters=3, seed=5), cluster.kmeans(x, 40, iters=3, seed=5)
    assert torch.equal(a, b)
    assert torch.unique(a, dim=0).shape[0] == 40


def test_spherical_centroids_are_unit_directions_of_the_clusters():
    directions = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, -1.0]]), dim=-1)
    generator = torch.Generator().manual_seed(3)
    lengths = torch.rand(300, 1, generator=generator) * 5 + 0.5  # spherical k-means ignores the norm
    x = (directions.repeat(100, 1) + 0.05 * torch.randn(300, 3, generator=generator)) * lengths
    centroids = cluster.kmeans(x, 3, iters=10, spherical=True)
    torch.testing.assert_close(centroids.norm(dim=-1), torch.ones(3))
    assert (centroids @ directions.T).max(0).values.min() > 0.99


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parallel_seeding_then_lloyd_is_within_a_few_percent_of_scikit_learn(seed):
    """k-means|| serves above GREEDY_SEEDING_MAX centroids; measured here at k = 256 on 50 blobs."""
    points, _ = make_blobs(n_samples=20000, centers=50, n_features=4, random_state=seed)
    x = torch.tensor(points, dtype=torch.float32)
    centroids = cluster.kmeans_parallel(x, 256, torch.Generator().manual_seed(seed))
    assert torch.unique(centroids, dim=0).shape[0] == 256
    for _ in range(20):
        centroids = cluster.lloyd_step(x, centroids, spherical=False)
    reference = KMeans(n_clusters=256, n_init=1, random_state=seed).fit(points).inertia_
    assert cluster.inertia(x, centroids).item() <= 1.08 * reference


@pytest.mark.parametrize("seed", [0, 1])
def test_minibatch_passes_reach_scikit_learn_objective_within_a_few_percent(seed):
    points, _ = make_blobs(n_samples=8000, centers=50, n_features=4, random_state=seed)
    x = torch.tensor(points, dtype=torch.float32)
    seeds = cluster.kmeans(x, 128, iters=0, seed=seed)
    centroids = cluster.kmeans(x, 128, iters=3, seed=seed, batch_size=512)
    reference = KMeans(n_clusters=128, n_init=1, random_state=seed).fit(points).inertia_
    assert cluster.inertia(x, centroids).item() <= 1.05 * reference
    assert cluster.inertia(x, centroids) < 0.95 * cluster.inertia(x, seeds)


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="non-empty"):
        cluster.kmeans(torch.empty(0, 3), 4)
    with pytest.raises(ValueError, match="k >= 1"):
        cluster.kmeans(torch.randn(5, 3), 0)
    with pytest.raises(ValueError, match="batch_size"):
        cluster.kmeans(torch.randn(5, 3), 2, batch_size=0)
