"""LPIPS between originals and reconstructions (the network itself: ``vqlab.lpips_network``)."""

from __future__ import annotations

import torch

from vqlab import weights
from vqlab.distributed import all_reduce_sum
from vqlab.evalconfig import EvalConfig
from vqlab.evaluators.base import Evaluator, PairEvaluator, registry


class PerceptualDistance(PairEvaluator):
    """LPIPS (Zhang et al. 2018) through the ``lpips`` package, per image on [-1, 1] inputs,
    averaged over the evaluation set: 0 for identical images, higher is more different
    (typically below 1). Reported as ``lpips`` for the AlexNet trunk, ``lpips_<net>`` otherwise,
    so numbers from different trunks never share a name."""

    def __init__(self, network: torch.nn.Module, net: str, device: torch.device):
        self.network = network.to(device)
        self.key = "lpips" if net == "alex" else f"lpips_{net}"
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # distance, images

    @torch.no_grad()
    def update_pairs(self, images: torch.Tensor, reconstructions: torch.Tensor) -> None:
        distance = self.network(images.float().clamp(-1, 1), reconstructions.float().clamp(-1, 1)).flatten()
        self.sums += torch.stack([distance.double().sum(), distance.new_tensor(len(distance), dtype=torch.float64)])

    def compute(self) -> dict[str, float]:
        total, count = all_reduce_sum(self.sums).tolist()
        if count == 0:
            raise RuntimeError("PerceptualDistance.compute() before any update()")
        return {self.key: total / count}


@registry.register("lpips")
def _lpips(radices: tuple[int, ...], device: torch.device, options: EvalConfig) -> Evaluator:
    from vqlab.lpips_network import TRUNKS, build_lpips

    weights.resolve(TRUNKS[options.lpips_net], options.lpips_weights, setting="eval.lpips_weights")
    return PerceptualDistance(build_lpips(options.lpips_net, options.lpips_weights), options.lpips_net, device)
