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


def test_nearest_in_chunks_is_the_full_argmin():
    generator = torch.Generator().manual_seed(1)
    x, centroids = torch.randn(1000, 5, generator=generator), torch.randn(37, 5, generator=generator)
    expected = torch.cdist(x, centroids).argmin(-1)
    assert torch.equal(cluster.nearest(x, centroids, chunk=64), expected)
    assert torch.equal(cluster.nearest(x, centroids), expected)


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


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="non-empty"):
        cluster.kmeans(torch.empty(0, 3), 4)
    with pytest.raises(ValueError, match="k >= 1"):
        cluster.kmeans(torch.randn(5, 3), 0)
