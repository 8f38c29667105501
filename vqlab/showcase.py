"""The validation crops a person looks at: which ones, their reconstructions, the file that keeps
them and the figure that shows them.

- ``showcase_indices``: a fixed choice of validation crops, the same in every run of the same data
  (so a report lines up the runs of a sweep), spread over the whole validation set: the photos'
  grid lists its crops photo by photo, so the crops come from every validation photo.
- ``ShowcaseCrops.reconstruct``: those crops through a model and through the trivial codecs of
  ``vqlab/evaluators/baselines.py`` at the run's code budget, as a ``Showcase``.
- ``Showcase.write`` / ``Showcase.read``: ``RunFolder.reconstructions`` (``reconstructions.npz``),
  written by the run's end phase, read by ``vqlab.report``; ``of_checkpoint`` makes the same from a
  run's checkpoint for a run from before the file existed.
- ``strip``: labelled rows of crops, upscaled with nearest neighbour (the run's
  ``figures/reconstructions.png``, the report's ``reconstructions.png``).
"""

from __future__ import annotations

import itertools
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from vqlab.evaluators.baselines import block_mean, block_mean_from_palette, palette_levels
from vqlab.runtime import autocast
from vqlab.tracking import TRIVIAL_CODECS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from vqlab.models import VQAutoencoder
    from vqlab.runfolder import RunFolder

# Candidates read in each slice of the validation set; the most detailed one is shown, since a flat
# crop (sky, a black background) is reconstructed well by anything and shows no difference.
CANDIDATES = 8
MODEL = "model"  # the file's key of the run's own reconstructions, beside the codecs' prefixes
CROP_PX = 96  # crops are upscaled (nearest neighbour, a whole factor) to at least this many pixels
GAP_PX = 4  # white pixels between crops
LABEL_PX = 230  # the column of row labels
LABEL_CHARS = 26  # a label's line is wrapped at this many characters, so it fits LABEL_PX
DPI = 120  # what ``figures.publish`` and ``vqlab.report`` save at: a crop pixel stays whole pixels


def showcase_indices(dataset, count: int) -> list[int]:
    """``count`` validation crops (all of them when there are fewer): the set cut into ``count``
    equal slices, and from each the crop with the largest pixel standard deviation among
    ``CANDIDATES`` evenly spread in it. Deterministic: only the dataset decides."""
    size = len(dataset)
    edges = np.linspace(0, size, min(count, size) + 1).round().astype(int)
    picks = []
    for low, high in itertools.pairwise(edges):
        options = np.unique(np.linspace(low, high - 1, min(CANDIDATES, high - low)).round().astype(int))
        picks.append(int(max(options, key=lambda i: float(dataset[int(i)].float().std()))))
    return picks


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` in [-1, 1] -> ``(N, H, W, C)`` uint8, what the file keeps and a figure shows."""
    unit = images.detach().float().clamp(-1, 1).add(1).div(2)
    return unit.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@dataclass
class Showcase:
    """The shown crops of one run: ``indices`` into its validation set, the ``originals`` and one
    array per row (``MODEL``, then each trivial codec's prefix), all ``(N, H, W, C)`` uint8; the
    palettes' sizes (``colors``, by prefix) and the training step of the model."""

    indices: np.ndarray
    originals: np.ndarray
    rows: dict[str, np.ndarray]
    colors: dict[str, int]
    step: int

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a float: a uniform palette at a composite's code budget (RVQ's 2^70) has more colours than an int64 holds
        colors = {f"{prefix}_colors": np.float64(n) for prefix, n in self.colors.items()}
        with open(path, "wb") as file:  # np.savez_compressed would append .npz to a str path
            np.savez_compressed(
                file, indices=self.indices, originals=self.originals, step=np.int64(self.step), **self.rows, **colors
            )

    @classmethod
    def read(cls, path: Path) -> Showcase:
        with np.load(path) as saved:
            rows = {key: saved[key] for key in (MODEL, *TRIVIAL_CODECS) if key in saved}
            colors = {
                prefix: int(saved[f"{prefix}_colors"]) for prefix in TRIVIAL_CODECS if f"{prefix}_colors" in saved
            }
            return cls(saved["indices"], saved["originals"], rows, colors, int(saved["step"]))


@dataclass
class ShowcaseCrops:
    """What a run shows: its ``showcase_indices`` crops (``images``, in [-1, 1] on the device), and
    what its trivial codecs need: the block (the model's downsampling), the code budget and the
    k-means palette (``kmeans_palette``) the run measured them with."""

    indices: list[int]
    images: torch.Tensor
    block: int
    budget: int
    palette: torch.Tensor

    @classmethod
    def of(cls, dataset, count: int, block: int, budget: int, palette: torch.Tensor, device) -> ShowcaseCrops:
        indices = showcase_indices(dataset, count)
        return cls(indices, torch.stack([dataset[i] for i in indices]).to(device), block, budget, palette)

    @torch.no_grad()
    def reconstruct(self, model: VQAutoencoder, dtype: str, step: int) -> Showcase:
        was_training = model.training
        model.eval()
        with autocast(self.images.device, dtype):
            reconstruction = model(self.images).reconstruction
        model.train(was_training)
        levels = palette_levels(self.budget)
        codecs = {
            "baseline": block_mean(self.images, self.block),
            "baseline_palette": block_mean(self.images, self.block, levels),
            "baseline_kmeans": block_mean_from_palette(self.images, self.block, self.palette.to(self.images.device)),
        }
        rows = {MODEL: to_uint8(reconstruction)} | {prefix: to_uint8(codec) for prefix, codec in codecs.items()}
        colors = {"baseline_palette": levels**3, "baseline_kmeans": len(self.palette)}
        return Showcase(np.asarray(self.indices, dtype=np.int64), to_uint8(self.images), rows, colors, step)


def of_checkpoint(run: RunFolder, device: str = "cpu") -> Showcase:
    """The ``Showcase`` the run's end phase writes, made from its newest checkpoint and its config:
    for a run from before ``reconstructions.npz`` existed. The codecs are measured as the run
    measured them (its data, code budget and seed)."""
    from vqlab import data
    from vqlab.evaluate import trained_model
    from vqlab.evaluators.baselines import code_budget, training_palette

    cfg = run.read_config()
    model, saved = trained_model(run, cfg, torch.device(device))
    splits = data.build_datasets(cfg.data, cfg.train.seed)
    budget = code_budget(model.quantizer)
    palette = training_palette(cfg.data, cfg.train.seed, splits.train, model.downsample, budget)
    crops = ShowcaseCrops.of(splits.val, cfg.eval.grid_images, model.downsample, budget, palette, device)
    return crops.reconstruct(model, "fp32", saved.step)


def codec_label(showcase: Showcase, prefix: str) -> str:
    """A codec's row label: its ``TRIVIAL_CODECS`` name, with its palette's size where it has one."""
    colors = showcase.colors.get(prefix)
    return TRIVIAL_CODECS[prefix] + (f"\n{colors} colours" if colors else "")


def strip(rows: list[tuple[str, np.ndarray]], title: str, columns: list[str] | None = None) -> Figure:
    """One labelled row per ``(label, crops)`` (``(N, H, W, C)`` uint8, the same N and size in
    every row), each crop upscaled by the whole factor that brings it to ``CROP_PX`` (nearest
    neighbour: the pixels a metric saw, not a smoothed guess); ``columns`` labels the crops. Each
    row's axes is placed at exactly its pixel size, so a saved crop pixel is a block of pixels."""
    from matplotlib.figure import Figure

    count, height, width = rows[0][1].shape[:3]
    scale = max(1, math.ceil(CROP_PX / height))
    row_px = height * scale
    mosaic_px = count * (width * scale + GAP_PX) - GAP_PX
    top_px = 40 + (18 if columns else 0)
    size_px = (LABEL_PX + mosaic_px + GAP_PX, top_px + len(rows) * (row_px + GAP_PX))
    figure = Figure(figsize=(size_px[0] / DPI, size_px[1] / DPI), dpi=DPI, facecolor="white")
    for r, (label, crops) in enumerate(rows):
        mosaic = np.full((row_px, mosaic_px, crops.shape[3]), 255, dtype=np.uint8)
        for c, crop in enumerate(crops):
            left = c * (width * scale + GAP_PX)
            mosaic[:, left : left + width * scale] = crop.repeat(scale, axis=0).repeat(scale, axis=1)
        bottom = size_px[1] - top_px - (r + 1) * (row_px + GAP_PX) + GAP_PX
        axes = figure.add_axes(
            (LABEL_PX / size_px[0], bottom / size_px[1], mosaic_px / size_px[0], row_px / size_px[1])
        )
        axes.imshow(mosaic, interpolation="nearest", aspect="auto")
        axes.set_xticks([])
        axes.set_yticks([])
        axes.spines[:].set_visible(False)
        wrapped = "\n".join(textwrap.fill(line, LABEL_CHARS) for line in label.splitlines())
        axes.set_ylabel(wrapped, rotation=0, ha="right", va="center", fontsize=9)
        if r == 0 and columns:
            for c, text in enumerate(columns):
                axes.text(
                    c * (width * scale + GAP_PX) + width * scale / 2, -4, text, ha="center", va="bottom", fontsize=8
                )
    figure.suptitle(title, fontsize=10, y=1 - 6 / size_px[1], va="top")
    return figure


def run_figure(showcase: Showcase, title: str) -> Figure:
    """One run's reconstructions: the originals, the model's, and the trivial codecs' at its budget."""
    rows = [("original", showcase.originals), ("this model", showcase.rows[MODEL])]
    rows += [
        (codec_label(showcase, prefix), showcase.rows[prefix]) for prefix in TRIVIAL_CODECS if prefix in showcase.rows
    ]
    return strip(rows, title, crop_labels(showcase))


def crop_labels(showcase: Showcase) -> list[str]:
    return [f"crop {i}" for i in showcase.indices]
