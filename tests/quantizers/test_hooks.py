"""The optimizer-step hook contract outside vqlab's trainer: a quantizer in a plain training loop
that never calls ``on_optimizer_step()`` still learns, warns once, and a driver can take charge."""

import warnings

import pytest
import torch

import vqlab


def mixture(n, generator, centers):
    """``(1, n, F)`` tokens from a Gaussian mixture around ``centers``."""
    index = torch.randint(len(centers), (n,), generator=generator)
    return (centers[index] + 0.1 * torch.randn(n, centers.shape[1], generator=generator))[None]


def plain_loop_usage(freeze_codebook: bool, steps: int = 100) -> float:
    """Train a linear encoder / vq_ema / linear decoder with a plain loop that never calls the
    hook; return the fraction of codes used on held-out data. The encoder starts with small
    weights, so its latents spread out during training and a frozen k-means codebook falls behind."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(128, 16, generator=generator)
    encoder, decoder = torch.nn.Linear(16, 4), torch.nn.Linear(4, 16)
    with torch.no_grad():
        encoder.weight.mul_(0.01)
    q = vqlab.quantizers.build("vq_ema", codebook_size=64, dim=4, init="kmeans", dead_code_steps=20)
    if freeze_codebook:
        q.on_optimizer_step = lambda: None  # what the codebook did before: k-means init, then nothing
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            x = mixture(256, generator, centers)
            out = q(encoder(x))
            loss = (decoder(out.z_q) - x).square().mean() + sum(out.losses.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        codes = q.eval().encode(encoder(mixture(4096, torch.Generator().manual_seed(1), centers)))
    return codes.unique().numel() / q.codebook_size


def test_vq_ema_in_a_plain_loop_without_the_hook_learns():
    frozen, learning = plain_loop_usage(freeze_codebook=True), plain_loop_usage(freeze_codebook=False)
    assert frozen < 0.5  # the setting does starve a frozen codebook
    assert learning > 0.9 and learning > 2 * frozen


def test_self_driven_quantizer_applies_each_forward_once_and_warns_once():
    q = vqlab.quantizers.build("vq_ema", codebook_size=8, dim=2)
    z = torch.randn(2, 16, 2, generator=torch.Generator().manual_seed(0))
    q(z)
    assert int(q.usage.steps) == 0  # the first forward only gathers
    with pytest.warns(UserWarning, match=r"VQEMA: on_optimizer_step\(\).*auto mode.*gradient accumulation"):
        q(z)
    assert int(q.usage.steps) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q(z)
        q.eval()(z)  # eval gathers and applies nothing
        q.train()(z)
    assert int(q.usage.steps) == 3


def test_a_loop_that_calls_the_hook_is_never_warned_nor_doubly_updated():
    q = vqlab.quantizers.build("vq_ema", codebook_size=8, dim=2)
    z = torch.randn(2, 16, 2, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            q(z)
            q.on_optimizer_step()
    assert int(q.usage.steps) == 3


def test_a_driver_that_takes_charge_gets_one_update_per_optimizer_step():
    q = vqlab.quantizers.build("vq_ema", codebook_size=8, dim=2, init="uniform")  # k-means would replace it at once
    assert q.hooks_driven_by_caller() is q
    z = torch.randn(2, 16, 2, generator=torch.Generator().manual_seed(0))
    before = q.embedding.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):  # gradient accumulation: three forwards, one optimizer step
            q(z)
        assert torch.equal(q.embedding, before) and q.usage.window.sum() == 3 * 32
        q.on_optimizer_step()
    assert int(q.usage.steps) == 1 and not torch.equal(q.embedding, before)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("name", ["rvq", "product"])
def test_a_composite_drives_itself_once_per_forward_not_once_per_part_call(name, shared):
    base = {"name": "vq_ema", "codebook_size": 8, "dim": 2}
    count = {"rvq": {"depth": 3}, "product": {"groups": 3}}[name]
    q = vqlab.quantizers.build(name, base=base, shared=shared, **count)
    z = torch.randn(2, 16, q.dim, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="on_optimizer_step"):
        for _ in range(3):
            q(z)
    assert [int(part.usage.steps) for part in q.parts] == [2] * len(q.parts)
    driven = vqlab.quantizers.build(name, base=base, shared=shared, **count).hooks_driven_by_caller()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            driven(z)
    assert [int(part.usage.steps) for part in driven.parts] == [0] * len(driven.parts)


def test_the_trainer_takes_charge_of_the_hook(smoke_cfg):
    # with gradient accumulation a self-driven quantizer would apply (and warn) between micro-batches
    overrides = {
        "quantizer.codebook_size": 64,
        "quantizer.dim": 8,
        "train.grad_accum": 2,
        "train.steps": 2,
        "optim.warmup_steps": 0,
    }
    cfg = smoke_cfg(**{"quantizer.name": "vq_ema", **overrides})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vqlab.fit(cfg)
    assert not [w for w in caught if "on_optimizer_step" in str(w.message)]
