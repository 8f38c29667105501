"""LPIPS perceptual distance (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric", arXiv 1801.03924) through the ``lpips`` package.

The package ships its calibrated linear layers; the ImageNet trunk comes from the torch hub cache
(or an explicit file) via ``vqlab.weights``, so a missing file fails with its path instead of a
download attempt.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from vqlab import weights

TRUNKS = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}


def build_lpips(net: str = "alex", weights_path: str = "") -> nn.Module:
    """A frozen LPIPS module taking images in [-1, 1]; returns per-image distances (B, 1, 1, 1)."""
    trunk_file = weights.resolve(TRUNKS[net], weights_path)
    import lpips

    with warnings.catch_warnings():
        # lpips builds its trunk with torchvision's deprecated ``pretrained=False``; we load it below
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    features = torch.load(trunk_file, map_location="cpu", weights_only=True)
    # lpips splits torchvision's ``features`` into slices that keep the original layer indices
    trunk_state = {key: features[f"features.{key.split('.', 1)[1]}"] for key in model.net.state_dict()}
    model.net.load_state_dict(trunk_state)
    return model.eval().requires_grad_(False)
