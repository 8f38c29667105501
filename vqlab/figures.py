"""Figures of one run, drawn from its folder: loss curves (``metrics.jsonl``) and codebook usage
(its code histogram, ``CodeHistogram``). Drawn on ``matplotlib.figure.Figure`` objects, so they need no
pyplot state and work under any backend (``MPLBACKEND=Agg`` headless)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from vqlab.codes import perplexity
from vqlab.config import TrackingConfig
from vqlab.evaluators.codebook import CodeHistogram
from vqlab.runfolder import RunFolder
from vqlab.tracking import TRIVIAL_CODECS, existing_run, headline, summary_table

# The loss terms the objective (vqlab.losses) and the quantizers log under train/; the other
# train/ metrics are statistics (perplexity, distinct codes), rates and resources.
TRAIN_SCALE = "on [-1, 1] images (L1 there: 2x val L1)"
VAL_SCALE = "on [0, 1] images"
LOSS_TERMS = ("loss", "l1", "l2", "perceptual", "adversarial", "codebook", "commitment", "entropy", "kl", "disc_loss")


def series(run: RunFolder, key: str) -> tuple[list[int], list[float]]:
    """Steps and values of one metric, in logged order, non-finite values left out."""
    rows = [(row["step"], row[key]) for row in run.read_metrics() if key in row and math.isfinite(row[key])]
    return [s for s, _ in rows], [v for _, v in rows]


def loss_curves(run: RunFolder) -> Figure:
    """Training losses (left, log scale) and validation L1 (right) against the step."""
    logged = {k for row in run.read_metrics() for k in row}
    names = [f"train/{term}" for term in LOSS_TERMS if f"train/{term}" in logged]
    if not names:
        raise ValueError(f"{run.metrics_file} holds no train/ losses yet")
    figure = Figure(figsize=(10, 3.5), layout="constrained")
    train_axes, val_axes = figure.subplots(1, 2)
    for name in names:
        steps, values = series(run, name)
        train_axes.plot(steps, values, label=name.removeprefix("train/"))
    if all(v > 0 for name in names for v in series(run, name)[1]):
        train_axes.set_yscale("log")
    # the objective compares images in the model's [-1, 1] space; the metrics see [0, 1] images
    train_axes.set(xlabel="step", ylabel=f"loss terms {TRAIN_SCALE}", title="training losses")
    train_axes.legend(fontsize="small")
    for prefix in ("val", "val_ema"):
        steps, values = series(run, f"{prefix}/l1")
        if steps:
            val_axes.plot(steps, values, marker="o", label=prefix)
    val_axes.set(xlabel="step", ylabel=f"L1 {VAL_SCALE}", title="validation L1")
    if val_axes.lines:
        val_axes.legend(fontsize="small")
    figure.suptitle(run.name)
    return figure


def codebook_usage(run: RunFolder, prefix: str = "") -> Figure:
    """Code frequencies of the final validation, most used first (log scale), with the share of
    the codebook used and the perplexity; one histogram per digit beside it when codes have
    several digits."""
    path = run.histogram(prefix)
    if not path.is_file():
        raise FileNotFoundError(f"no code histogram at {path}: the run has not finished its final validation")
    histogram = CodeHistogram.read(path)
    counts = np.sort(histogram.counts)[::-1]
    size = histogram.codebook_size
    digits = histogram.digit_counts
    figure = Figure(figsize=(10 if digits else 5, 3.5), layout="constrained")
    axes = figure.subplots(1, 2 if digits else 1)
    ranked = axes[0] if digits else axes
    ranked.plot(np.arange(1, len(counts) + 1), counts / max(counts.sum(), 1))
    ranked.set(xscale="log", yscale="log", xlabel="code rank", ylabel="frequency")
    used = len(counts) / size
    ppl = perplexity(torch.from_numpy(histogram.counts)).item()
    ranked.set_title(f"{len(counts)} of {size} codes used ({used:.1%}), perplexity {ppl:.1f}")
    if digits:
        for i, values in enumerate(digits):
            axes[1].plot(np.arange(len(values)), values / max(values.sum(), 1), marker=".", label=str(i))
        axes[1].set(xlabel="digit value", ylabel="frequency", title="per digit")
        axes[1].legend(title="digit", fontsize="small")
    figure.suptitle(f"{run.name} {prefix}codebook usage".replace("  ", " "))
    return figure


# The rows of ``metrics_table``: which weights, measured by whom, on which crops.
MEASURED = {
    "val": "final validation",
    "val_ema": "final validation, model EMA",
    "eval": "vqlab.evaluate, newest checkpoint",
    "eval_ema": "vqlab.evaluate, newest checkpoint, EMA",
    "eval_train": "training crops (vqlab.evaluate)",
    "eval_train_ema": "training crops (vqlab.evaluate), EMA",
}
# an evaluation that measured what the final validation did is one row, with this note
SAME = "vqlab.evaluate on the newest checkpoint measured what the final validation did (same weights, same crops)"


def metrics_table(run: RunFolder, evaluation: dict[str, float]) -> str:
    """The headline metrics of the final validation (``val/``, ``val_ema/``), of ``vqlab.evaluate``
    on the newest checkpoint (``eval/``, ``eval_ema/``; ``eval_train/`` on training crops) and of
    the trivial codecs (named as ``TRIVIAL_CODECS``, as the report does), as one aligned table. An
    evaluation equal to the final validation (the same weights on the same crops) is not a second
    row: a line under the table says so."""
    recorded = run.last_metrics(("val/", "val_ema/", "baseline"))
    measured = {prefix: headline(recorded if prefix.startswith("val") else evaluation, prefix) for prefix in MEASURED}
    same = [
        prefix
        for prefix in ("eval", "eval_ema")
        if measured[prefix] and measured[prefix] == measured[f"val{prefix[4:]}"]
    ]
    rows = {label: measured[prefix] for prefix, label in MEASURED.items() if prefix not in same}
    rows |= {label: headline(recorded, prefix) for prefix, label in TRIVIAL_CODECS.items()}
    table = summary_table({label: values for label, values in rows.items() if values})
    return table + (f"\n{SAME}" if same else "")


def publish(figure: Figure, run: RunFolder, name: str, tracking: TrackingConfig) -> Path:
    """Save ``figure`` as ``figures/<name>`` in the run folder and log it to the run's MLflow run."""
    path = run.figure(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    mlflow_run = existing_run(tracking, run) if tracking.mlflow else None
    if mlflow_run is not None:
        mlflow_run.artifact(path, "figures")
    return path
