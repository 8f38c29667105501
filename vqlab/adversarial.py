"""Adversarial loss: a PatchGAN discriminator (Isola et al., "Image-to-Image Translation with
Conditional Adversarial Networks", arXiv 1611.07004) trained with a hinge or non-saturating loss,
the VQGAN adaptive weight (Esser et al., "Taming Transformers for High-Resolution Image
Synthesis", arXiv 2012.09841, eq. 7), and optional LeCAM (Tseng et al., arXiv 2104.03310) and R1
(Mescheder et al., arXiv 1801.04406) regularisers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqlab import distributed
from vqlab.config import AdversarialConfig


class PatchDiscriminator(nn.Module):
    """Strided 4x4 convolutions down to a map of real/fake logits, one per receptive-field patch.
    GroupNorm instead of pix2pix's BatchNorm: no running statistics that could differ across ranks."""

    def __init__(self, in_channels: int = 3, width: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        channels = width
        for i in range(1, layers + 1):
            out = width * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [
                nn.Conv2d(channels, out, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(min(32, out // 4), out),
            ]
            blocks.append(nn.LeakyReLU(0.2))
            channels = out
        blocks.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)  # (B, 1, h, w) logits


def generator_loss(kind: str, fake_logits: torch.Tensor) -> torch.Tensor:
    if kind == "hinge":
        return -fake_logits.mean()
    return F.softplus(-fake_logits).mean()


def discriminator_loss(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    if kind == "hinge":
        return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())
    return 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())


def adaptive_weight(
    reconstruction_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor
) -> torch.Tensor:
    """``||grad rec|| / (||grad gan|| + 1e-4)`` at the decoder's last layer, clamped and detached,
    so the adversarial gradient is scaled to the reconstruction gradient's size."""
    rec_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


class Adversary(nn.Module):
    """The discriminator and its regularisers' state; the trainer owns its optimizer."""

    def __init__(self, cfg: AdversarialConfig, in_channels: int = 3):
        super().__init__()
        self.cfg = cfg
        self.discriminator = PatchDiscriminator(in_channels, cfg.width, cfg.layers)
        # LeCAM anchors: EMAs of the discriminator's mean outputs on real and fake images
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def active(self, step: int) -> bool:
        return step >= self.cfg.start_step

    def generator_term(self, fake: torch.Tensor, reconstruction_loss: torch.Tensor, last_layer: torch.Tensor):
        """The weighted generator loss and the adaptive factor used (1 when adaptive is off)."""
        self.discriminator.requires_grad_(False)
        loss = generator_loss(self.cfg.loss, self.discriminator(fake))
        self.discriminator.requires_grad_(True)
        factor = adaptive_weight(reconstruction_loss, loss, last_layer) if self.cfg.adaptive else torch.ones(())
        return self.cfg.weight * factor * loss, factor

    def discriminator_term(self, discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """The discriminator's loss; ``discriminator`` is its (possibly DDP-wrapped) callable."""
        real = real.detach().requires_grad_(self.cfg.r1 > 0)
        real_logits, fake_logits = discriminator(real), discriminator(fake.detach())
        loss = discriminator_loss(self.cfg.loss, real_logits, fake_logits)
        if self.cfg.lecam > 0:
            with torch.no_grad():
                # the anchors use every rank's outputs so the buffers stay identical across ranks
                means = torch.stack([real_logits.float().mean(), fake_logits.float().mean()])
                means = distributed.all_reduce_sum(means) / distributed.world_size()
                self.ema_real.lerp_(means[0], 1 - self.cfg.lecam_decay)
                self.ema_fake.lerp_(means[1], 1 - self.cfg.lecam_decay)
            lecam = (
                F.relu(real_logits - self.ema_fake).pow(2).mean() + F.relu(self.ema_real - fake_logits).pow(2).mean()
            )
            loss = loss + self.cfg.lecam * lecam
        if self.cfg.r1 > 0:
            (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
            loss = loss + 0.5 * self.cfg.r1 * grad.pow(2).flatten(1).sum(1).mean()
        return loss
