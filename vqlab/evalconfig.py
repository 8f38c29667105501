"""The evaluators' names and their options (the ``eval:`` section): the light half of
``vqlab.evaluators``.

The evaluator modules (``vqlab/evaluators/``) import torch, the models and the data; a config
must be readable without them. So the names the evaluators register under and the options they
read live here, outside that package: ``vqlab.config`` composes ``EvalConfig`` into ``RunConfig``
and checks ``eval.metrics`` against ``EVALUATORS`` without importing an evaluator, and each
evaluator module registers its builder under one of these names (``tests/test_evaluators.py``
checks that the two lists are the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vqlab.schema import require

# The names in ``eval.metrics``, one per evaluator family (the list in ``vqlab.evaluators``'s docstring).
EVALUATORS = ("codebook", "fid", "lpips", "reconstruction", "swd")


@dataclass(frozen=True)
class EvalConfig:
    every: int = 250  # validation every N steps (and always at the end); 0 = only at the end
    # evaluators (vqlab.evaluators): reconstruction, codebook, swd need no weights; lpips, fid do
    metrics: tuple[str, ...] = ("reconstruction", "codebook")
    grid_images: int = 16  # validation crops shown with their reconstructions (vqlab.showcase)
    missing_weights: Literal["skip", "error"] = "skip"  # a metric whose weights are missing: warn and skip, or fail
    lpips_net: Literal["alex", "vgg", "squeeze"] = "alex"
    lpips_weights: str = ""  # the LPIPS trunk's ImageNet weights; empty = the torch hub cache
    inception_weights: str = ""  # torch-fidelity's Inception (fid); empty = the torch hub cache
    reference_cache: str = ""  # FID reference statistics; empty = $TORCH_HOME/vqlab/fid_reference

    def __post_init__(self):
        require(self.every >= 0, "every", f"must be >= 0, got {self.every}")
        require(len(self.metrics) > 0, "metrics", "name at least one evaluator")
        for i, name in enumerate(self.metrics):
            require(name in EVALUATORS, f"metrics[{i}]", f"unknown evaluator {name!r}; available: {list(EVALUATORS)}")
        require(self.grid_images >= 1, "grid_images", f"must be >= 1, got {self.grid_images}")
