"""The learned scalar grid: FSQ exactly before it learns, a nearest-value lookup per dimension after."""

import pytest
import torch

import vqlab


def test_an_untrained_learned_grid_is_fsq_on_every_token():
    levels = [8, 5, 5, 4]
    fsq, grid = vqlab.quantizers.build("fsq", levels=levels), vqlab.quantizers.build("learned_grid", levels=levels)
    z = torch.randn(4, 500, 4, generator=torch.Generator().manual_seed(0)) * 2
    ours, theirs = grid(z), fsq(z)
    assert torch.equal(ours.codes, theirs.codes)
    torch.testing.assert_close(ours.z_q, theirs.z_q)
    assert torch.equal(grid.encode(z), fsq.encode(z))


def test_each_dimension_snaps_to_the_nearest_of_its_own_values():
    grid = vqlab.quantizers.build("learned_grid", levels=[3, 2], codebook_weight=0, commitment_weight=0)
    with torch.no_grad():
        grid.values[0].copy_(torch.tensor([-0.9, 0.0, 0.2]))
        grid.values[1].copy_(torch.tensor([-0.8, -0.1]))
    b = torch.tensor([[[-0.5, -0.3], [0.15, -0.6], [0.05, -0.05]]])  # an even level's bound is (-1, 0)
    z = torch.atanh((b * grid.fsq.half_width + grid.fsq.offset) / grid.fsq.half_l) - grid.fsq.shift  # bound(z) = b · w
    torch.testing.assert_close(grid.relaxed(z), b)
    out = grid(z)
    assert out.codes[0].tolist() == [[0, 1], [2, 0], [1, 1]]
    torch.testing.assert_close(out.z_q[0], torch.tensor([[-0.9, -0.1], [0.2, -0.8], [0.0, -0.1]]))
    torch.testing.assert_close(grid.decode(out.codes), out.z_q)


def test_values_learn_from_the_codebook_loss_and_latents_from_the_commitment():
    grid = vqlab.quantizers.build("learned_grid", levels=[5, 5], codebook_weight=1.0, commitment_weight=0.5)
    z = torch.randn(2, 64, 2, generator=torch.Generator().manual_seed(1)).requires_grad_()
    out = grid(z)
    out.losses["codebook"].backward(retain_graph=True)
    assert z.grad is None and all(v.grad.abs().sum() > 0 for v in grid.values)
    grid.zero_grad()
    out.losses["commitment"].backward()
    assert z.grad.abs().sum() > 0 and all(v.grad is None or v.grad.abs().sum() == 0 for v in grid.values)


def test_a_step_of_the_codebook_loss_moves_values_towards_their_latents():
    grid = vqlab.quantizers.build("learned_grid", levels=[5], commitment_weight=0)
    z = torch.full((1, 32, 1), 0.3)  # bound(0.3) / 2 lies between the grid's 0 and 0.5
    optimizer = torch.optim.SGD(grid.parameters(), lr=1.0)
    before = grid.values[0].detach().clone()
    target = grid.relaxed(z)[0, 0, 0]
    grid(z).losses["codebook"].backward()
    optimizer.step()
    moved = (grid.values[0].detach() - before).nonzero().flatten().tolist()
    assert len(moved) == 1 and abs(grid.values[0][moved[0]] - target) < abs(before[moved[0]] - target)


@pytest.mark.parametrize(("key", "value"), [("levels", [1, 4]), ("codebook_weight", -1.0), ("eps", 0.9)])
def test_bad_options_are_config_errors_naming_the_key(key, value):
    from vqlab.schema import ConfigError

    with pytest.raises(ConfigError, match=key):
        vqlab.quantizers.build("learned_grid", **{key: value})
