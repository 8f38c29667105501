"""Product quantization: independent groups, shared or own codebooks, width checks."""

import pytest
import torch

import vqlab
from vqlab.codes import digits_to_index
from vqlab.schema import ConfigError

from .helpers import hooks_seen_by_parts, record_part_calls, tokens

BASES = [
    pytest.param({"name": "fsq", "levels": [8, 5]}, id="fsq"),
    pytest.param({"name": "vq", "dim": 8, "codebook_size": 64}, id="vq"),
    pytest.param({"name": "vq_ema", "dim": 8, "codebook_size": 64}, id="vq_ema"),
]


def build(**options):
    torch.manual_seed(0)
    return vqlab.quantizers.build("product", **options)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("base", BASES)
def test_each_group_is_its_slice_through_the_base(base, shared):
    q = build(groups=3, base=base, shared=shared)
    calls = record_part_calls(q)
    z = tokens(q)
    out = q(z)
    width = q.group_dim
    assert q.dim == 3 * width and out.codes.shape == (2, 8, 3)
    assert q.radices == (q.parts[0].codebook_size,) * 3
    assert len(calls) == 3
    for g, (group_in, group_out) in enumerate(calls):
        assert torch.equal(group_in, z[..., g * width : (g + 1) * width])
        assert torch.equal(out.z_q[..., g * width : (g + 1) * width], group_out.z_q)
        assert torch.equal(out.codes[..., g], digits_to_index(group_out.codes, q.base_radices))
        for name, loss in group_out.losses.items():
            assert name in q.parts[0].mean_losses  # these bases have per-element mean losses only
            torch.testing.assert_close(out.losses[f"group{g}/{name}"], loss / 3)  # mean over the full width


@pytest.mark.parametrize("base", BASES)
def test_changing_one_group_leaves_the_others_alone(base):
    q = build(groups=3, base=base).eval()
    z = tokens(q)
    width = q.group_dim
    moved = z.clone()
    moved[..., width : 2 * width] += 2.0
    before, after = q(z), q(moved)
    for g in (0, 2):
        assert torch.equal(before.codes[..., g], after.codes[..., g])
        assert torch.equal(before.z_q[..., g * width : (g + 1) * width], after.z_q[..., g * width : (g + 1) * width])
    assert not torch.equal(before.codes[..., 1], after.codes[..., 1])


@pytest.mark.parametrize("base", BASES)
def test_shared_uses_one_module(base):
    own, shared = build(groups=3, base=base), build(groups=3, base=base, shared=True)
    assert len(own.parts) == 3 and len({id(own.part(g)) for g in range(3)}) == 3
    assert len(shared.parts) == 1 and all(shared.part(g) is shared.parts[0] for g in range(3))
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(shared) == count(shared.parts[0]) and count(own) == 3 * count(own.parts[0])


@pytest.mark.parametrize("shared", [False, True])
def test_hooks_reach_every_group_module_once(shared):
    q = build(groups=3, shared=shared)
    seen = hooks_seen_by_parts(q)
    ids = [id(quantizer) for quantizer in q.parts]
    assert seen == [("set_step", i, 5, 10) for i in ids] + [("on_optimizer_step", i) for i in ids]
    assert len(ids) == (1 if shared else 3)


@pytest.mark.parametrize("base", BASES)
def test_codes_round_trip_in_eval(base):
    q = build(groups=3, base=base).eval()
    z = tokens(q, seed=1)
    out = q(z)
    assert torch.equal(q.encode(z), out.codes)
    assert torch.equal(q.decode(out.codes), out.z_q)
    assert torch.equal(q.decode(out.codes[1, :5]), out.z_q[1, :5])  # (5, groups)


def summed_over_groups(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"group0/entropy": a, "group1/entropy": b}`` -> ``{"entropy": a + b}``."""
    total = {}
    for key, value in losses.items():
        name = key.split("/", 1)[1]
        total[name] = total.get(name, 0) + value
    return total


def assert_same_losses(product_out, single_out):
    product_losses = summed_over_groups(product_out.losses)
    assert product_losses.keys() == single_out.losses.keys()
    for name, loss in single_out.losses.items():
        torch.testing.assert_close(product_losses[name], loss, rtol=1e-5, atol=1e-6, msg=name)


def test_two_lfq_groups_weigh_as_one_lfq_with_group_bits():
    options = {"entropy_weight": 0.3, "commitment_weight": 0.25, "entropy_temperature": 0.5, "group_bits": 4}
    q = build(groups=2, base={"name": "lfq", "dim": 4, **options})
    single = vqlab.quantizers.build("lfq", dim=8, **options)
    z = tokens(q)
    out, reference = q(z), single(z)
    assert torch.equal(digits_to_index(out.codes, q.radices), digits_to_index(reference.codes, single.radices))
    assert_same_losses(out, reference)


def all_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(Na, d), (Nb, d) -> (Na * Nb, 2d)``: row ``i + Na * j`` is ``[a_i, b_j]`` (a varies fastest)."""
    return torch.cat([a.repeat(len(b), 1), b.repeat_interleave(len(a), dim=0)], dim=-1)


def test_two_vq_groups_weigh_as_one_vq_over_the_product_codebook():
    # codebooks set by hand below: no k-means init or re-seeding to replace them
    options = {"codebook_size": 4, "dim": 2, "entropy_weight": 0.2, "entropy_temperature": 0.7, "beta": 0.3}
    options |= {"init": "uniform", "dead_code_steps": 0}
    q = build(groups=2, base={"name": "vq", **options})
    single = vqlab.quantizers.build("vq", **{**options, "codebook_size": 16, "dim": 4})
    first, second = q.part(0).embedding.detach(), q.part(1).embedding.detach()
    with torch.no_grad():  # code k1 + 4 k2 is (code k1 of group 0, code k2 of group 1)
        single.embedding.copy_(all_pairs(first, second))
    # every pair of two groups' tokens: the batch-mean assignment factorises as it does per token
    generator = torch.Generator().manual_seed(0)
    z = all_pairs(torch.randn(5, 2, generator=generator), torch.randn(6, 2, generator=generator))[None]
    out, reference = q(z), single(z)
    assert torch.equal(digits_to_index(out.codes, q.radices), reference.codes[..., 0])
    assert_same_losses(out, reference)


def test_two_gumbel_groups_weigh_as_one_gumbel_with_factorised_logits():
    q = build(groups=2, base={"name": "gumbel", "codebook_size": 4, "dim": 3, "kl_weight": 0.5}).eval()
    single = vqlab.quantizers.build("gumbel", codebook_size=16, dim=6, kl_weight=0.5).eval()
    first, second = q.part(0).to_logits, q.part(1).to_logits
    with torch.no_grad():  # logit of code k1 + 4 k2 = group 0's logit k1 + group 1's logit k2
        single.to_logits.weight.copy_(all_pairs(first.weight, second.weight))
        single.to_logits.bias.copy_((first.bias[None, :] + second.bias[:, None]).reshape(-1))
    z = tokens(q)
    out, reference = q(z), single(z)
    assert torch.equal(digits_to_index(out.codes, q.radices), reference.codes[..., 0])
    assert_same_losses(out, reference)


def test_nested_composites_keep_the_distinction():
    lfq = {"name": "lfq", "dim": 3, "group_bits": 3}
    q = build(groups=2, base={"name": "rvq", "depth": 2, "base": lfq})
    assert q.mean_losses == {f"group{g}/stage{k}/commitment" for g in range(2) for k in range(2)}
    calls = record_part_calls(q)
    out = q(tokens(q))
    for g, (_, group_out) in enumerate(calls):
        for k in range(2):
            entropy, commitment = (group_out.losses[f"stage{k}/{name}"] for name in ("entropy", "commitment"))
            torch.testing.assert_close(out.losses[f"group{g}/stage{k}/entropy"], entropy)
            torch.testing.assert_close(out.losses[f"group{g}/stage{k}/commitment"], commitment / 2)


def test_bad_options_are_config_errors():
    for options, key in [
        ({"groups": 0}, "groups"),
        ({"groups": 2, "dim": 5}, "dim"),  # not divisible
        ({"groups": 2, "dim": 6}, "dim"),  # divisible, but 2 x fsq 8-4 is 4 wide
        ({"dim": -2}, "dim"),
        ({"base": {"name": "identity"}}, "base"),
        ({"base": {"name": "fsq", "levels": [2] * 64}}, "base"),  # a group index beyond int64
        ({"base": {"name": "fsq", "levels": [8, 1]}}, "base.levels"),
    ]:
        with pytest.raises(ConfigError) as err:
            build(**options)
        assert err.value.key == key, options
    assert build(groups=2, dim=4).dim == 4


def test_preset_loads_and_overrides_the_nested_base():
    cfg = vqlab.config.load("product")
    q = vqlab.quantizers.build(cfg.quantizer)
    assert q.radices == (32, 32) and q.dim == 4
    assert vqlab.config.from_yaml(vqlab.config.to_yaml(cfg)) == cfg
    cfg = vqlab.config.load("product", ["quantizer.base.levels=[5,5,5]", "quantizer.groups=3"])
    q = vqlab.quantizers.build(cfg.quantizer)
    assert q.radices == (125, 125, 125) and q.dim == 9
