"""Residual quantization: residual chaining, per-stage scaling and losses, sharing, quantize dropout."""

import copy
import math

import pytest
import torch

import vqlab
from vqlab.codes import digits_to_index
from vqlab.schema import ConfigError

from .helpers import hooks_seen_by_parts, record_part_calls, tokens

BASES = [
    pytest.param({"name": "fsq", "levels": [8, 5]}, id="fsq"),
    pytest.param({"name": "vq"}, id="vq"),
    pytest.param({"name": "vq_ema"}, id="vq_ema"),
]
LEARNED_BASES = BASES[1:]


def build(**options):
    torch.manual_seed(0)
    return vqlab.quantizers.build("rvq", **options)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("base", BASES)
def test_stage_inputs_are_the_scaled_residuals_and_z_q_their_sum(base, shared):
    q = build(depth=3, base=base, shared=shared)
    calls = record_part_calls(q)
    z = tokens(q)
    out = q(z)
    assert len(calls) == 3
    total = torch.zeros_like(z)
    for k, (stage_in, stage_out) in enumerate(calls):
        torch.testing.assert_close(stage_in * q.scales[k], z - total)
        total = total + stage_out.z_q * q.scales[k]
        assert torch.equal(out.codes[..., k], digits_to_index(stage_out.codes, q.base_radices))
        for name, loss in stage_out.losses.items():
            assert out.losses[f"stage{k}/{name}"] is loss
    assert torch.equal(out.z_q, total)
    assert out.codes.shape == (2, 8, 3) and q.radices == (q.parts[0].codebook_size,) * 3


@pytest.mark.parametrize("base", LEARNED_BASES)
def test_each_stage_loss_is_the_base_loss_on_its_own_residual(base):
    q = build(depth=2, base=base).hooks_driven_by_caller()
    z = tokens(q)
    q(z)  # let data-dependent initialisation happen before the stages are copied
    references = [copy.deepcopy(q.part(k)) for k in range(2)]
    out = q(z)
    residual = z
    for k, reference in enumerate(references):
        expected = reference(residual)
        assert expected.losses, "a learned base should have losses"
        for name, loss in expected.losses.items():
            torch.testing.assert_close(out.losses[f"stage{k}/{name}"], loss)
        assert torch.equal(out.codes[..., k], digits_to_index(expected.codes, q.base_radices))
        # by hand: beta * mean squared distance from the stage's residual (not z) to its code
        code = q.part(k).decode(out.codes[..., k : k + 1])
        torch.testing.assert_close(out.losses[f"stage{k}/commitment"], 0.25 * (residual - code).square().mean())
        residual = residual - expected.z_q.detach()


STRAIGHT_THROUGH_BASES = [
    pytest.param({"name": "vq", "codebook_size": 16}, id="vq"),
    pytest.param({"name": "lfq", "dim": 6, "group_bits": 6}, id="lfq"),
]


@pytest.mark.parametrize(("depth", "dropout"), [(1, 0.0), (2, 0.0), (4, 0.0), (2, 1.0), (4, 1.0)])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("base", STRAIGHT_THROUGH_BASES)
def test_the_gradient_reaching_z_is_the_identity_at_any_depth(base, shared, depth, dropout):
    q = build(depth=depth, base=base, shared=shared, quantize_dropout=dropout, dropout_seed=3).hooks_driven_by_caller()
    upstream = torch.randn(2, 8, q.dim, generator=torch.Generator().manual_seed(1))
    kept = set()
    for step in range(8):
        q.set_step(step, 8)
        z = tokens(q, seed=step).requires_grad_()
        out = q(z)
        (out.z_q * upstream).sum().backward()
        torch.testing.assert_close(z.grad, upstream, rtol=0, atol=1e-6)
        kept.add(int(out.stats["active_depth"]))
    assert len(kept) > 1 if dropout else kept == {depth}


def test_only_the_first_stage_losses_reach_z_under_straight_through():
    base = {"name": "lfq", "dim": 4, "group_bits": 4, "entropy_temperature": 1.0}
    q = build(depth=3, base=base)
    z = tokens(q).requires_grad_()
    out = q(z)
    for k in range(3):
        for name in ("entropy", "commitment"):
            (grad,) = torch.autograd.grad(out.losses[f"stage{k}/{name}"], z, retain_graph=True)
            if k == 0:  # exactly what one quantizer's loss would give
                (expected,) = torch.autograd.grad(q.part(0)(z).losses[name], z)
                torch.testing.assert_close(grad, expected)
            else:
                assert grad.abs().max() < 1e-6, (k, name)


def fsq5(x: float) -> tuple[float, int]:
    """FSQ with L = 5 for one scalar (arXiv 2309.15505, Appendix A.1): (value in [-1, 1], digit)."""
    rounded = round(math.tanh(x) * 4 * (1 - 1e-3) / 2)
    return rounded / 2, rounded + 2


def test_fsq_stages_scale_by_levels_by_hand():
    q = build(depth=3, base={"name": "fsq", "levels": [5]})
    assert q.scales[:, 0].tolist() == [1.0, 1 / 4, 1 / 16]  # s_k = (L - 1) ** -k
    values = [-2.7, -0.83, -0.31, -0.04, 0.0, 0.12, 0.38, 0.61, 1.2, 4.0]
    out = q(torch.tensor(values)[None, :, None])  # (1, 10, 1)
    for n, x in enumerate(values):
        residual, total = x, 0.0
        for k in range(3):
            scale = 4.0**-k
            value, digit = fsq5(residual / scale)
            assert out.codes[0, n, k].item() == digit, (x, k)
            total += value * scale
            residual -= value * scale
        assert out.z_q[0, n, 0].item() == pytest.approx(total, abs=1e-6), x


def test_per_channel_level_scaling_and_none():
    q = build(depth=3, base={"name": "fsq", "levels": [8, 5]})
    assert q.scales.tolist() == [[1.0, 1.0], [pytest.approx(1 / 7), 0.25], [pytest.approx(1 / 49), 1 / 16]]
    assert build(depth=3, base={"name": "fsq", "levels": [8, 5]}, scaling="none").scales.eq(1).all()
    assert build(depth=3, base={"name": "sfsq", "levels": [8, 5]}).scales.eq(1).all()  # auto: fsq only


@pytest.mark.parametrize("base", BASES)
def test_shared_uses_one_module(base):
    own, shared = build(depth=3, base=base), build(depth=3, base=base, shared=True)
    assert len(own.parts) == 3 and len({id(own.part(k)) for k in range(3)}) == 3
    assert len(shared.parts) == 1 and all(shared.part(k) is shared.parts[0] for k in range(3))
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(shared) == count(shared.parts[0]) and count(own) == 3 * count(own.parts[0])
    calls = record_part_calls(shared)
    shared(tokens(shared))
    assert len(calls) == 3


@pytest.mark.parametrize("shared", [False, True])
def test_hooks_reach_every_stage_module_once(shared):
    q = build(depth=3, shared=shared)
    seen = hooks_seen_by_parts(q)
    ids = [id(stage) for stage in q.parts]
    assert seen == [("set_step", i, 5, 10) for i in ids] + [("on_optimizer_step", i) for i in ids]
    assert len(ids) == (1 if shared else 3)


def test_quantize_dropout_depends_only_on_seed_and_step():
    def make():
        return build(depth=4, base={"name": "fsq", "levels": [5, 5]}, quantize_dropout=1.0, dropout_seed=7)

    a, b = make(), make()
    calls = record_part_calls(a)
    z = tokens(a)
    full_codes = a.encode(z)
    depths = []
    for step in range(12):
        a.set_step(step, 12)
        b.set_step(step, 12)
        torch.manual_seed(step)  # the global RNG differs between the two modules' draws
        calls.clear()
        out = a(z)
        torch.manual_seed(1000 + step)
        depth = int(out.stats["active_depth"])
        assert depth == int(b(z).stats["active_depth"]) == a.active_depth()
        truncated = torch.zeros_like(z)
        for k in range(depth):
            truncated = truncated + calls[k][1].z_q * a.scales[k]
        assert torch.equal(out.z_q, truncated)
        assert torch.equal(out.codes, full_codes)  # every stage still reports its code
        depths.append(depth)
    assert len(set(depths)) > 1 and set(depths) <= {1, 2, 3, 4}
    a.eval()
    for step in range(12):
        a.set_step(step, 12)
        assert int(a(z).stats["active_depth"]) == 4


@pytest.mark.parametrize("base", BASES)
def test_codes_round_trip_in_eval(base):
    q = build(depth=3, base=base).eval()
    z = tokens(q, seed=1)
    out = q(z)
    assert torch.equal(q.encode(z), out.codes)
    assert torch.equal(q.decode(out.codes), out.z_q)
    assert torch.equal(q.decode(out.codes[1]), out.z_q[1])  # (N, depth)
    assert torch.equal(q.decode(out.codes[None, :, :3]), out.z_q[None, :, :3])  # (1, B, 3, depth)


def test_bad_options_are_config_errors():
    for options, key in [
        ({"depth": 0}, "depth"),
        ({"quantize_dropout": 1.5}, "quantize_dropout"),
        ({"depth": 1, "quantize_dropout": 0.5}, "quantize_dropout"),
        ({"dropout_seed": -1}, "dropout_seed"),
        ({"scaling": "levels", "base": {"name": "sfsq"}}, "scaling"),
        ({"base": {"name": "identity"}}, "base"),
        ({"base": {"name": "fsq", "levels": [2] * 64}}, "base"),  # a stage index beyond int64
        ({"base": {"name": "nope"}}, "base.name"),
        ({"base": {"name": "fsq", "levels": [8, 1]}}, "base.levels"),
    ]:
        with pytest.raises(ConfigError) as err:
            build(**options)
        assert err.value.key == key, options
    assert build(depth=3).radices == (32, 32, 32)


def test_preset_loads_and_overrides_the_nested_base():
    cfg = vqlab.config.load("rvq")
    assert vqlab.quantizers.build(cfg.quantizer).radices == (32, 32)
    assert vqlab.config.from_yaml(vqlab.config.to_yaml(cfg)) == cfg
    cfg = vqlab.config.load("rvq", ["quantizer.base.levels=[5,5]", "quantizer.depth=3"])
    assert vqlab.quantizers.build(cfg.quantizer).radices == (25, 25, 25)
