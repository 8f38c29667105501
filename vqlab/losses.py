"""What the autoencoder is trained against: reconstruction, perceptual and adversarial terms (the
quantizer adds its own). Every weight is a config field; a zero weight builds nothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqlab.adversarial import Adversary
from vqlab.config import LossConfig
from vqlab.lpips_network import build_lpips


def reconstruction_losses(
    reconstruction: torch.Tensor, images: torch.Tensor, cfg: LossConfig
) -> dict[str, torch.Tensor]:
    """Weighted pixel losses in the model's [-1, 1] image space, computed in fp32."""
    reconstruction, images = reconstruction.float(), images.float()
    losses = {}
    if cfg.l1 > 0:
        losses["l1"] = cfg.l1 * F.l1_loss(reconstruction, images)
    if cfg.l2 > 0:
        losses["l2"] = cfg.l2 * F.mse_loss(reconstruction, images)
    return losses


class Objective(nn.Module):
    """The generator's losses. Holds the frozen LPIPS network and the adversary (discriminator),
    each only when its weight is positive; building it fails fast on missing LPIPS weights."""

    def __init__(self, cfg: LossConfig, in_channels: int = 3):
        super().__init__()
        self.cfg = cfg
        self.lpips = build_lpips(cfg.perceptual.net, cfg.perceptual.weights_path) if cfg.perceptual.weight > 0 else None
        self.adversary = Adversary(cfg.adversarial, in_channels) if cfg.adversarial.weight > 0 else None

    def adversarial_active(self, step: int) -> bool:
        return self.adversary is not None and self.adversary.active(step)

    def forward(
        self, reconstruction: torch.Tensor, images: torch.Tensor, step: int, last_layer: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Weighted losses and detached statistics for one micro-batch at optimizer step ``step``."""
        losses = reconstruction_losses(reconstruction, images, self.cfg)
        stats: dict[str, torch.Tensor] = {}
        if self.lpips is not None:
            # LPIPS takes [-1, 1] inputs; the target branch carries no gradient since images need none
            losses["perceptual"] = self.cfg.perceptual.weight * self.lpips(reconstruction, images).mean()
        if self.adversarial_active(step):
            nll = sum(losses.values())
            losses["adversarial"], stats["adaptive_weight"] = self.adversary.generator_term(
                reconstruction, nll, last_layer
            )
        return losses, stats
