"""Reconstruction losses, weighted by ``LossConfig``; zero weights compute nothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vqlab.config import LossConfig


def reconstruction_losses(
    reconstruction: torch.Tensor, images: torch.Tensor, cfg: LossConfig
) -> dict[str, torch.Tensor]:
    """Weighted losses in the model's [-1, 1] image space, computed in fp32."""
    reconstruction, images = reconstruction.float(), images.float()
    losses = {}
    if cfg.l1 > 0:
        losses["l1"] = cfg.l1 * F.l1_loss(reconstruction, images)
    if cfg.l2 > 0:
        losses["l2"] = cfg.l2 * F.mse_loss(reconstruction, images)
    return losses
