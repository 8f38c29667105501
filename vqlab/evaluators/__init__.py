"""Evaluators: ``update(images, out)`` / ``compute() -> dict`` / ``reset()``, ``out`` the model's
``AutoencoderOutput`` (reconstruction, quantizer output with codes, pre-quantization latents).

The same evaluators serve training-time validation and ``python -m vqlab.evaluate``, both through
``measure`` (``loop``). One module per family, each registered by the name used in
``eval.metrics``:

    reconstruction  l1, mse, psnr, ssim          pixel metrics on [0, 1] images
    codebook        codebook_usage, perplexity, dead_codes (+ per digit); measured_bits (+ _low,
                    _high: its bootstrap interval over crops)
    lpips           lpips (alex) | lpips_vgg | lpips_squeeze, on [-1, 1] images (``perceptual``)
    fid             fid, isc, isc_std, kid, kid_std (torch-fidelity's Inception; ``fidelity``)
    swd             swd_<size> per pyramid level and swd, their mean (no weights needed)

``base`` holds the contract, ``Suite`` and ``build``; ``baselines`` the trivial block-mean codecs
the trainer reports beside the model. The names above and the options the evaluators read
(``EvalConfig``, the ``eval:`` section) live in ``vqlab.evalconfig``, outside this package, so that
reading a config imports no evaluator.

States are sums and counts (or histograms) all-reduced across ranks, or feature sets gathered
from every rank, inside ``compute``: a metric is always the whole evaluation set's, never an
average of per-rank values. ``reset`` starts a new evaluation.

Conventions: images arrive in [-1, 1]; reconstructions are clamped to [-1, 1] (what saving them
as an image would do). Pixel metrics map both to [0, 1]; LPIPS takes [-1, 1]; Inception and SWD
take the uint8 [0, 255] images a PNG would hold.
"""

from vqlab.evaluators.base import Evaluator, PairEvaluator, Suite, build, image_digests, registry, to_uint8, to_unit
from vqlab.evaluators.baselines import (
    block_mean,
    block_mean_baseline,
    block_mean_from_palette,
    code_budget,
    kmeans_palette,
    palette_levels,
    training_palette,
)
from vqlab.evaluators.codebook import DENSE_HISTOGRAM_LIMIT, CodebookMetrics, CodeHistogram
from vqlab.evaluators.fidelity import FidelityMetrics
from vqlab.evaluators.loop import measure, measure_with_ema
from vqlab.evaluators.perceptual import PerceptualDistance
from vqlab.evaluators.reconstruction import ReconstructionMetrics, ssim_per_image
from vqlab.evaluators.swd import SlicedWasserstein

__all__ = [
    "DENSE_HISTOGRAM_LIMIT",
    "CodeHistogram",
    "CodebookMetrics",
    "Evaluator",
    "FidelityMetrics",
    "PairEvaluator",
    "PerceptualDistance",
    "ReconstructionMetrics",
    "SlicedWasserstein",
    "Suite",
    "block_mean",
    "block_mean_baseline",
    "block_mean_from_palette",
    "build",
    "code_budget",
    "image_digests",
    "kmeans_palette",
    "measure",
    "measure_with_ema",
    "palette_levels",
    "registry",
    "ssim_per_image",
    "to_uint8",
    "to_unit",
    "training_palette",
]
