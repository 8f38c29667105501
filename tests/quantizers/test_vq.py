"""Straight-through VQ and the shared codebook machinery against hand-computed values."""

import copy

import pytest
import torch

import vqlab
from vqlab.cluster import kmeans
from vqlab.quantizers.vq import VQConfig
from vqlab.schema import ConfigError

HAND_SET = {"init": "uniform", "dead_code_steps": 0}  # no k-means init or re-seeding to replace the codebook


def with_codebook(q, codebook):
    with torch.no_grad():
        q.embedding.copy_(torch.tensor(codebook))
    return q


def test_losses_and_nearest_code_by_hand():
    q = with_codebook(
        vqlab.quantizers.build("vq", codebook_size=3, dim=2, beta=0.5, **HAND_SET), [[0, 0], [2, 0], [0, 2]]
    )
    z = torch.tensor([[[0.5, 0.25], [1.5, 0.0], [0.0, 3.0]]], requires_grad=True)
    out = q(z)
    assert out.codes[0, :, 0].tolist() == [0, 1, 2]
    assert out.z_q[0].tolist() == [[0, 0], [2, 0], [0, 2]]
    # z - q = [[.5, .25], [-.5, 0], [0, 1]]: squared error 1.5625 over 6 elements
    assert out.losses["codebook"].item() == pytest.approx(1.5625 / 6)
    assert out.losses["commitment"].item() == pytest.approx(0.5 * 1.5625 / 6)
    out.losses["codebook"].backward(retain_graph=True)
    assert z.grad is None  # the codebook loss moves codes only
    expected_codebook_grad = 2 * torch.tensor([[-0.5, -0.25], [0.5, 0.0], [0.0, -1.0]]) / 6
    torch.testing.assert_close(q.embedding.grad, expected_codebook_grad)
    q.embedding.grad = None
    out.losses["commitment"].backward()
    assert q.embedding.grad is None  # the commitment loss moves latents only
    torch.testing.assert_close(z.grad[0], 0.5 * 2 * torch.tensor([[0.5, 0.25], [-0.5, 0.0], [0.0, 1.0]]) / 6)


@pytest.mark.parametrize("name", ["vq", "vq_ema"])
def test_codes_are_the_exact_nearest_far_from_the_origin_without_the_dense_distances(name, monkeypatch):
    """Forward and encode find each token's nearest code in blocks (vqlab.cluster.nearest): exact
    where ‖z‖² − 2z·e + ‖e‖² in fp32 is not, and without the (tokens, K) distance matrix."""
    import vqlab.cluster

    generator = torch.Generator().manual_seed(0)
    codebook = 3000.0 + torch.randn(512, 8, generator=generator)
    z = 3000.0 + torch.randn(4, 256, 8, generator=generator)
    q = vqlab.quantizers.build(name, codebook_size=512, dim=8, **HAND_SET)
    with torch.no_grad():
        q.embedding.copy_(codebook)
    expected = torch.cdist(z.reshape(-1, 8).double(), codebook.double()).argmin(-1).reshape(4, 256)

    def dense(*args):
        raise AssertionError("the dense (tokens, K) distances were built")

    monkeypatch.setattr(vqlab.cluster, "squared_distances", dense)
    assert torch.equal(q(z).codes[..., 0], expected)
    assert torch.equal(q.eval().encode(z)[..., 0], expected)


def test_straight_through_gradient_is_identity():
    q = vqlab.quantizers.build("vq", codebook_size=8, dim=3)
    z = torch.randn(2, 5, 3, requires_grad=True)
    weights = torch.randn(2, 5, 3)
    (q(z).z_q * weights).sum().backward()
    torch.testing.assert_close(z.grad, weights)


def test_entropy_loss_is_softmax_entropy_of_distances():
    torch.manual_seed(0)
    q = vqlab.quantizers.build("vq", codebook_size=5, dim=3, entropy_weight=0.3, entropy_temperature=0.7)
    z = torch.randn(2, 6, 3, requires_grad=True)
    out = q(z)
    out.losses["entropy"].backward()
    blocked_grads = z.grad.clone(), q.embedding.grad.clone()
    z.grad = None
    distances = (z[:, :, None, :] - q.embedding).square().sum(-1)  # (2, 6, 5)
    p = torch.softmax(-distances / 0.7, dim=-1).reshape(-1, 5)
    per_token = -(p * p.log()).sum(-1).mean()
    mean_p = p.mean(0)
    expected = 0.3 * (per_token + (mean_p * mean_p.log()).sum())
    torch.testing.assert_close(out.losses["entropy"], expected)
    q.embedding.grad = None
    expected.backward()
    assert q.embedding.grad.abs().sum() > 0  # the entropy loss reaches the codes through the distances
    torch.testing.assert_close(blocked_grads[0], z.grad)
    torch.testing.assert_close(blocked_grads[1], q.embedding.grad)


def test_rotation_trick_value_is_q_and_gradient_is_householder_form():
    torch.manual_seed(1)
    q = vqlab.quantizers.build("vq", codebook_size=4, dim=3, estimator="rotation")
    z = torch.randn(2, 5, 3, requires_grad=True)
    out = q(z)
    codes = q.embedding.detach()[out.codes[..., 0]]  # (2, 5, 3)
    assert torch.equal(out.z_q, codes)
    upstream = torch.randn(2, 5, 3)
    (out.z_q * upstream).sum().backward()
    for e, code, g, grad in zip(
        z.detach().double().reshape(-1, 3),
        codes.double().reshape(-1, 3),
        upstream.double().reshape(-1, 3),
        z.grad.reshape(-1, 3),
        strict=True,
    ):
        e_hat, q_hat = e / e.norm(), code / code.norm()
        r = (e_hat + q_hat) / (e_hat + q_hat).norm()
        rotation = torch.eye(3, dtype=torch.float64) - 2 * torch.outer(r, r) + 2 * torch.outer(q_hat, e_hat)
        scale = code.norm() / e.norm()
        torch.testing.assert_close(scale * rotation @ e, code)  # the rotation maps e onto q
        torch.testing.assert_close(grad.double(), scale * rotation.T @ g, rtol=1e-5, atol=1e-6)


def test_cosine_mode_gives_unit_norm_z_q_and_the_most_similar_code():
    torch.manual_seed(2)
    q = vqlab.quantizers.build("vq", codebook_size=16, dim=4, cosine=True)
    z = torch.randn(3, 7, 4) * 5
    out = q(z)
    torch.testing.assert_close(out.z_q.norm(dim=-1), torch.ones(3, 7))
    similarity = torch.nn.functional.normalize(z, dim=-1) @ torch.nn.functional.normalize(q.embedding, dim=-1).T
    assert torch.equal(out.codes[..., 0], similarity.argmax(-1))


def test_low_dimensional_lookup_shapes_and_round_trip():
    torch.manual_seed(3)
    q = vqlab.quantizers.build("vq", codebook_size=32, dim=16, codebook_dim=4)
    assert q.embedding.shape == (32, 4)
    z = torch.randn(2, 9, 16, requires_grad=True)
    out = q(z)
    assert out.z_q.shape == (2, 9, 16) and out.codes.shape == (2, 9, 1)
    (out.z_q.square().sum() + sum(out.losses.values())).backward()
    assert z.grad.abs().sum() > 0 and q.space.project_in.weight.grad.abs().sum() > 0
    assert q.space.project_out.weight.grad.abs().sum() > 0
    q.eval()
    out = q(z)
    assert torch.equal(q.decode(q.encode(z)), out.z_q)
    assert torch.equal(q.decode(out.codes[1, 2:5]), out.z_q[1, 2:5])


def test_dead_codes_are_reseeded_from_batch_latents():
    codebook = [[5.0, 0.0], [-5.0, 0.0]] + [[100.0 + i, 100.0] for i in range(6)]
    q = with_codebook(vqlab.quantizers.build("vq", codebook_size=8, dim=2, init="uniform", dead_code_steps=2), codebook)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 8, 2, generator=generator) + torch.tensor([5.0, 0.0]) * s for s in (1, -1)]
    q(batches[0])
    q.on_optimizer_step()
    assert q.embedding.tolist() == codebook  # unused for one step only
    q(batches[1])
    q.on_optimizer_step()
    assert q.embedding[:2].tolist() == codebook[:2]
    reseeded = q.embedding[2:].detach()
    assert (reseeded < 50).all()
    latents = batches[1].reshape(-1, 2)
    assert all((latents == row).all(-1).any() for row in reseeded)  # each is one of the latest latents
    assert len({tuple(row) for row in reseeded.tolist()}) == 6  # drawn without replacement
    assert q.usage.steps_unused.tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    assert q(batches[1]).stats["codes_replaced"] == 6


@pytest.mark.parametrize("name", ["vq", "vq_ema"])
def test_kmeans_init_finds_the_clusters_once(name):
    generator = torch.Generator().manual_seed(0)
    centers = torch.tensor([[3.0, 3.0], [3.0, -3.0], [-3.0, 3.0], [-3.0, -3.0]])
    z = (centers.repeat(16, 1) + 0.1 * torch.randn(64, 2, generator=generator)).reshape(4, 16, 2)
    q = vqlab.quantizers.build(name, codebook_size=4, dim=2, init="kmeans").hooks_driven_by_caller()
    before = q.embedding.detach().clone()
    q.eval()
    q(z)
    assert torch.equal(q.embedding, before) and not q.initialized  # eval never initialises
    q.train()
    q(z)
    assert torch.cdist(centers, q.embedding.detach()).min(-1).values.max() < 0.1
    assert q.initialized
    after = q.embedding.detach().clone()
    q(z + 10)
    assert torch.equal(q.embedding, after)  # once only


@pytest.mark.parametrize("name", ["vq", "vq_ema"])
def test_kmeans_init_waits_for_as_many_latents_as_codes(name):
    q = vqlab.quantizers.build(name, codebook_size=64, dim=3, init="kmeans").hooks_driven_by_caller()
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 10, 3, generator=generator) for _ in range(4)]  # 20 tokens each
    for batch in batches[:3]:
        q(batch)
        q.on_optimizer_step()
        assert not q.initialized  # 20, 40, 60 latents: fewer than 64 codes
    assert not torch.equal(q.usage.ema, torch.ones(64))  # the initial codebook served meanwhile
    q(batches[3])
    assert q.initialized
    codes = q.embedding.detach()
    assert torch.unique(codes, dim=0).shape[0] == 64  # no duplicate, dead codes
    assert torch.equal(codes, kmeans(torch.cat(batches).reshape(-1, 3), 64, q.cfg.kmeans_iters))  # on all 80
    # what the initial codebook gathered is dropped: only this forward's 20 tokens are in the window
    assert torch.equal(q.usage.ema, torch.ones(64)) and q.usage.window.sum() == 20


@pytest.mark.parametrize("name", ["vq", "vq_ema"])
def test_accumulated_forwards_equal_one_forward_on_the_whole_window(name):
    torch.manual_seed(4)
    options = {"codebook_size": 16, "dim": 4, "init": "normal"}
    split = vqlab.quantizers.build(name, **options).hooks_driven_by_caller()
    whole = copy.deepcopy(split)
    for step in range(2):
        # dyadic values: every sum is exact, so the two orders of summation agree bit for bit
        z = torch.randint(-8, 8, (4, 6, 4), generator=torch.Generator().manual_seed(step)) / 4
        split(z[:2])
        split(z[2:])
        split.on_optimizer_step()
        whole(z)
        whole.on_optimizer_step()
    for key, value in whole.state_dict().items():
        assert torch.equal(split.state_dict()[key], value), key


@pytest.mark.parametrize(
    ("name", "key", "value"),
    [
        ("vq", "codebook_size", 1),
        ("vq", "init", "zeros"),
        ("vq", "estimator", "straight"),
        ("vq", "dim", 0),
        ("vq", "codebook_dim", -1),
        ("vq", "beta", -0.1),
        ("vq", "kmeans_iters", 0),
        ("vq", "dead_code_steps", -1),
        ("vq", "dead_code_threshold", -1.0),
        ("vq", "entropy_temperature", 0.0),
        ("vq", "usage_decay", 1.0),
        ("vq_ema", "codebook_size", 0),
        ("vq_ema", "init", "zeros"),
        ("vq_ema", "decay", 1.0),
        ("vq_ema", "eps", 0.0),
    ],
)
def test_bad_options_are_config_errors_naming_the_key(name, key, value):
    with pytest.raises(ConfigError) as error:
        vqlab.quantizers.build(name, **{key: value})
    assert error.value.key == key


def test_direct_construction_checks_literals_too():
    with pytest.raises(ConfigError, match="init"):
        VQConfig(init="zeros")
