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
