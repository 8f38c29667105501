"""Perceptual and adversarial losses with stand-in weight files under a temporary TORCH_HOME."""

import math
import re

import pytest
import torch
import torchvision

from vqlab import adversarial, checkpoint, weights
from vqlab.config import AdversarialConfig
from vqlab.lpips_network import build_lpips
from vqlab.trainer import fit

from .helpers import read_metrics


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture
def alexnet_file(torch_home):
    """Random AlexNet weights under the file name torch hub uses (values are irrelevant here)."""
    path = torch_home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet().state_dict(), path)
    return path


def test_lpips_loads_the_trunk_from_the_hub_cache(alexnet_file):
    model = build_lpips("alex")
    trunk = torch.load(alexnet_file, weights_only=True)
    state = model.net.state_dict()
    assert torch.equal(state["slice1.0.weight"], trunk["features.0.weight"])
    assert torch.equal(state["slice5.10.bias"], trunk["features.10.bias"])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert model(x, x).abs().max() < 1e-6
    distance = model(x, x.flip(-1))
    assert distance.shape == (2, 1, 1, 1) and (distance > 0).all()
    assert not any(p.requires_grad for p in model.parameters())


def test_lpips_explicit_path(tmp_path, torch_home):
    path = tmp_path / "my_alexnet.pth"
    torch.save(torchvision.models.alexnet().state_dict(), path)
    assert build_lpips("alex", str(path)) is not None


def test_missing_lpips_weights_name_the_path(torch_home):
    expected = torch_home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    with pytest.raises(weights.MissingWeightsError, match=re.escape(str(expected))):
        build_lpips("alex")


def test_missing_lpips_weights_stop_training_before_anything_is_written(torch_home, smoke_cfg, tmp_path):
    with pytest.raises(weights.MissingWeightsError, match=re.escape("alexnet-owt-7be5be79.pth")):
        fit(smoke_cfg(**{"loss.perceptual.weight": 1.0}))
    assert not (tmp_path / "runs").exists()


def test_training_with_lpips(alexnet_file, smoke_cfg):
    result = fit(smoke_cfg(**{"loss.perceptual.weight": 0.5, "train.steps": 6, "optim.warmup_steps": 0}))
    rows = [r for r in read_metrics(result.run_dir) if "train/perceptual" in r]
    assert rows and all(math.isfinite(r["train/perceptual"]) and r["train/perceptual"] > 0 for r in rows)


def test_gan_losses_by_hand():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.2, 1.5])
    assert adversarial.discriminator_loss("hinge", real, fake).item() == pytest.approx(
        0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1.2 + 2.5) / 3)
    )
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    expected = 0.5 * (sum(softplus(-r) for r in real.tolist()) / 3 + sum(softplus(f) for f in fake.tolist()) / 3)
    assert adversarial.discriminator_loss("non_saturating", real, fake).item() == pytest.approx(expected)
    assert adversarial.generator_loss("hinge", fake).item() == pytest.approx(-fake.mean().item())
    assert adversarial.generator_loss("non_saturating", fake).item() == pytest.approx(
        sum(softplus(-f) for f in fake.tolist()) / 3
    )


def test_adaptive_weight_is_the_gradient_norm_ratio():
    layer = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    y = layer(x)
    rec, gan = y.abs().mean(), -(3 * y).mean()
    g_rec = torch.autograd.grad(rec, layer.weight, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, layer.weight, retain_graph=True)[0]
    expected = g_rec.norm() / (g_gan.norm() + 1e-4)
    assert adversarial.adaptive_weight(rec, gan, layer.weight).item() == pytest.approx(expected.item(), rel=1e-6)


def test_discriminator_maps_images_to_patch_logits():
    disc = adversarial.PatchDiscriminator(width=8, layers=2)
    assert disc(torch.randn(2, 3, 32, 32)).shape[:2] == (2, 1)


def test_regularisers_add_to_the_discriminator_loss():
    torch.manual_seed(0)
    real, fake = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    plain = adversarial.Adversary(AdversarialConfig(weight=1, width=8, layers=2))
    regularised = adversarial.Adversary(AdversarialConfig(weight=1, width=8, layers=2, r1=10.0, lecam=1.0))
    regularised.load_state_dict(plain.state_dict())
    base = plain.discriminator_term(plain.discriminator, real, fake)
    more = regularised.discriminator_term(regularised.discriminator, real, fake)
    assert more > base and regularised.ema_real != 0


def test_discriminator_starts_at_its_start_step(smoke_cfg):
    cfg = smoke_cfg(
        **{
            "loss.adversarial.weight": 0.1,
            "loss.adversarial.start_step": 5,
            "loss.adversarial.width": 8,
            "loss.adversarial.layers": 2,
            "loss.adversarial.r1": 1.0,
            "loss.adversarial.lecam": 0.1,
            "train.steps": 10,
            "train.log_every": 1,
            "train.checkpoint_every": 5,
            "optim.warmup_steps": 0,
        }
    )
    result = fit(cfg)
    rows = [r for r in read_metrics(result.run_dir) if "train/loss" in r]
    assert [r["step"] for r in rows if "train/disc_loss" in r] == [6, 7, 8, 9, 10]
    assert [r["step"] for r in rows if "train/adversarial" in r] == [6, 7, 8, 9, 10]
    assert all(math.isfinite(r["train/adversarial"]) and math.isfinite(r["train/disc_loss"]) for r in rows[5:])
    at_5 = checkpoint.load(result.run_dir / "checkpoints" / "step_0000005.pt")
    at_10 = checkpoint.load(result.run_dir / "checkpoints" / "step_0000010.pt")
    assert at_5["disc_optimizer"]["state"] == {}  # no discriminator step before start_step
    assert at_10["disc_optimizer"]["state"] != {}
    assert not torch.equal(
        at_5["adversary"]["discriminator.net.0.weight"], at_10["adversary"]["discriminator.net.0.weight"]
    )
