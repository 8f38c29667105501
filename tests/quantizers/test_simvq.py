"""SimVQ: codes are a frozen random codebook times one learned map, which every code moves with."""

import pytest
import torch

import vqlab


def test_tokens_take_the_nearest_row_of_the_frozen_codebook_times_w():
    q = vqlab.quantizers.build("simvq", codebook_size=64, dim=8)
    assert "embedding" not in dict(q.named_parameters()) and "embedding" in dict(q.named_buffers())
    codes = q.embedding @ q.projection[0].weight.T  # C Wᵀ: nn.Linear's x Wᵀ
    torch.testing.assert_close(q.codebook(), codes)
    z = torch.randn(2, 50, 8, generator=torch.Generator().manual_seed(0))
    expected = torch.cdist(z.reshape(-1, 8).double(), codes.double()).argmin(-1).reshape(2, 50)
    out = q(z)
    assert torch.equal(out.codes[..., 0], expected)
    torch.testing.assert_close(out.z_q, codes[expected])


def test_the_codebook_loss_moves_every_code_through_w_and_never_c():
    """One step of the codebook loss on tokens that pick a few codes moves all 64 codes."""
    q = vqlab.quantizers.build("simvq", codebook_size=64, dim=8).hooks_driven_by_caller()
    frozen = q.embedding.clone()
    before = q.codebook().detach().clone()
    optimizer = torch.optim.SGD(q.parameters(), lr=0.1)
    z = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(1))
    out = q(z)
    assert out.codes.unique().numel() <= 4
    out.losses["codebook"].backward()
    optimizer.step()
    q.on_optimizer_step()
    assert torch.equal(q.embedding, frozen)
    assert ((q.codebook().detach() - before).norm(dim=-1) > 0).all()


def test_the_mlp_projection_and_the_rotation_trick_are_options():
    q = vqlab.quantizers.build("simvq", codebook_size=32, dim=4, projection="mlp", estimator="rotation")
    assert len(q.projection) == 3
    z = torch.randn(1, 16, 4, requires_grad=True)
    out = q(z)
    (out.z_q.sum() + sum(out.losses.values())).backward()
    assert z.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("key", "value"), [("init", "kmeans"), ("dead_code_steps", 10), ("projection", "conv"), ("codebook_size", 1)]
)
def test_options_that_would_move_the_frozen_codebook_are_config_errors(key, value):
    from vqlab.schema import ConfigError

    with pytest.raises(ConfigError, match=key):
        vqlab.quantizers.build("simvq", **{key: value})
