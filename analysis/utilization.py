"""Codebook utilization: ``python -m analysis.utilization <experiment>``.

The runs of one MLflow experiment (a sweep's variants, ``vqlab.report.rows_of``) are read through
their run folders: the code histogram of the final validation (``CodeHistogram``, read once per
run) and the metrics logged over training (``RunFolder.read_metrics``). For each run:

- ``usage``: codes seen / K, ``dead_codes``: K minus codes seen, ``perplexity``: 2^H;
- ``effective_bits``: H = the entropy of the code histogram in bits, against ``log2_size`` = log2 K
  (``bits_efficiency`` is their ratio: 1 for a codebook used uniformly);
- ``zipf_exponent``: a in frequency ∝ rank^-a, the least-squares slope of log frequency against log
  rank over the codes seen (0 for uniform use; about 1 for Zipf's law);
- ``digit_usage``: for codes of several digits (FSQ levels, LFQ bits, RVQ stages), the share of
  each digit's values seen.

Figures: rank-frequency (Zipf) curves, usage and effective bits against log2 K per method (the
``codebook_size`` sweep), usage and perplexity over training steps, and per-digit usage. Nothing
is re-derived: the numbers are the histograms' and the logged metrics'. Logged to the MLflow
experiment ``codebook`` as one run per studied experiment, with the table and figures.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from vqlab import tables
from vqlab.codes import perplexity
from vqlab.evaluators.codebook import CodeHistogram
from vqlab.runfolder import RunFolder

OVER_STEPS = ("val/codebook_usage", "val/perplexity", "train/perplexity", "train/distinct_codes")
FIGURES = ("zipf.png", "usage_vs_size.png", "usage_over_steps.png", "digit_usage.png")


@dataclass
class CodebookRun:
    name: str
    method: str
    folder: RunFolder

    @cached_property
    def histogram(self) -> CodeHistogram | None:
        """The code histogram of the run's final validation, read once; ``None`` when the run has
        none (a continuous quantizer has no codes; or the run did not finish)."""
        path = self.folder.histogram()
        return CodeHistogram.read(path) if path.is_file() else None


def zipf_exponent(counts: np.ndarray) -> float:
    """``a`` of frequency ∝ rank^-a fitted by least squares on log-log over the codes seen; NaN with
    fewer than two codes seen."""
    seen = np.sort(counts[counts > 0])[::-1].astype(np.float64)
    if len(seen) < 2:
        return math.nan
    slope = np.polyfit(np.log(np.arange(1, len(seen) + 1)), np.log(seen / seen.sum()), 1)[0]
    return float(-slope)


def utilization(counts: np.ndarray, size: int) -> dict[str, float]:
    """The usage statistics of one code histogram over a codebook of ``size`` codes."""
    seen = counts[counts > 0]
    entropy = math.log2(perplexity(torch.from_numpy(seen)).item())
    return {
        "codebook_size": size,
        "log2_size": math.log2(size),
        "used": len(seen),
        "usage": len(seen) / size,
        "dead_codes": size - len(seen),
        "perplexity": 2**entropy,
        "effective_bits": entropy,
        "bits_efficiency": entropy / math.log2(size) if size > 1 else math.nan,
        "zipf_exponent": zipf_exponent(counts),
    }


def table(runs: list[CodebookRun]) -> pd.DataFrame:
    """One row per run with codes: name, method and ``utilization``, plus ``digit_usage`` (a list)."""
    rows = []
    for run in runs:
        histogram = run.histogram
        if histogram is None:
            continue  # a continuous (identity) run has no codes
        row = {"name": run.name, "method": run.method, **utilization(histogram.counts, histogram.codebook_size)}
        row["digit_usage"] = [float((d > 0).mean()) for d in histogram.digit_counts]
        rows.append(row)
    return pd.DataFrame(rows)


def over_steps(runs: list[CodebookRun]) -> pd.DataFrame:
    """``name``, ``metric``, ``step``, ``value`` of ``OVER_STEPS`` as each run logged them."""
    points = [
        {"name": run.name, "metric": key, "step": row["step"], "value": row[key]}
        for run in runs
        for row in run.folder.read_metrics()
        for key in OVER_STEPS
        if key in row
    ]
    return pd.DataFrame(points, columns=["name", "metric", "step", "value"])


def figures(runs: list[CodebookRun], summary: pd.DataFrame, history: pd.DataFrame) -> dict:
    """``FIGURES`` name -> matplotlib Figure (no pyplot state)."""
    from matplotlib.figure import Figure

    made = {name: Figure(figsize=(6.5, 4.2), layout="constrained") for name in FIGURES}
    ax = made["zipf.png"].subplots()
    for run in runs:
        if run.histogram is not None:
            counts = np.sort(run.histogram.counts)[::-1]
            ax.plot(np.arange(1, len(counts) + 1), counts / counts.sum(), label=run.name)
    ax.set(xscale="log", yscale="log", xlabel="code rank", ylabel="frequency", title="rank-frequency of the codes")
    ax.legend(fontsize="x-small", ncol=2)

    usage_axes, bits_axes = made["usage_vs_size.png"].subplots(1, 2)
    made["usage_vs_size.png"].set_size_inches(11, 4.2)
    for method, points in summary.sort_values("log2_size").groupby("method", sort=False):
        usage_axes.plot(points["log2_size"], points["usage"], marker="o", label=method)
        bits_axes.plot(points["log2_size"], points["effective_bits"], marker="o", label=method)
    if not summary.empty:
        span = [summary["log2_size"].min(), summary["log2_size"].max()]
        bits_axes.plot(span, span, linestyle=":", color="grey", label="all codes equally used")
    usage_axes.set(xlabel="log2 K", ylabel="codes seen / K", ylim=(0, 1.02), title="codebook usage")
    bits_axes.set(xlabel="log2 K", ylabel="log2 perplexity (bits)", title="effective bits")
    usage_axes.legend(fontsize="small")
    bits_axes.legend(fontsize="small")

    left, right = made["usage_over_steps.png"].subplots(1, 2)
    made["usage_over_steps.png"].set_size_inches(11, 4.2)
    for (name, metric), points in history.groupby(["name", "metric"], sort=False):
        if metric == "train/perplexity":
            left.plot(points["step"], points["value"], label=name)
        elif metric == "val/codebook_usage":
            right.plot(points["step"], points["value"], marker="o", label=name)
    left.set(xlabel="step", ylabel="perplexity of the batch's codes", yscale="log", title="training batches")
    right.set(xlabel="step", ylabel="codes seen / K", title="validation usage")
    for ax in (left, right):
        if ax.lines:
            ax.legend(fontsize="x-small")

    ax = made["digit_usage.png"].subplots()
    several = summary[summary["digit_usage"].map(len) > 1]
    for offset, (_, row) in enumerate(several.iterrows()):
        width = 0.8 / max(len(several), 1)
        positions = np.arange(len(row["digit_usage"])) + offset * width
        ax.bar(positions, row["digit_usage"], width=width, label=row["name"])
    ax.set(xlabel="digit", ylabel="share of the digit's values seen", ylim=(0, 1.02), title="per-digit usage")
    if len(several):
        ax.legend(fontsize="x-small")
    return made


# --- finding the runs: MLflow, then their folders --------------------------------------------------
def tracked_runs(experiment: str, tracking_uri: str, sweep: str | None = None) -> list[CodebookRun]:
    """The rows of ``vqlab.report`` for ``experiment`` (a sweep's variants, newest run of each) with
    the run folder each MLflow run recorded (tag ``vqlab.run_dir``)."""
    from vqlab.report import fetch_runs, rows_of

    rows = rows_of(fetch_runs(experiment, tracking_uri, sweep))
    found = []
    for _, row in rows.iterrows():
        folder = row.get("tags.vqlab.run_dir")
        if isinstance(folder, str) and Path(folder).is_dir():
            found.append(CodebookRun(row["name"], row.get("params.quantizer.name", "—"), RunFolder(Path(folder))))
    return found


def markdown(summary: pd.DataFrame) -> str:
    """The ``table`` as markdown: numbers to 4 significant digits, counts whole, ``—`` where missing."""
    columns = ["name", "method", "codebook_size", "usage", "dead_codes", "perplexity", "effective_bits"]
    columns += ["log2_size", "zipf_exponent"]
    return tables.markdown(columns, ([tables.cell(row[c], ".4g") for c in columns] for _, row in summary.iterrows()))


def analyse(runs: list[CodebookRun], out: Path) -> tuple[pd.DataFrame, list[Path]]:
    """The table and figures of ``runs``, written to ``out`` (``table.csv``, ``table.md``, figures)."""
    summary = table(runs)
    out.mkdir(parents=True, exist_ok=True)
    summary.to_csv(out / "table.csv", index=False)
    (out / "table.md").write_text(markdown(summary) + "\n")
    files = [out / "table.csv", out / "table.md"]
    for name, made in figures(runs, summary, over_steps(runs)).items():
        made.savefig(out / name, dpi=120)
        files.append(out / name)
    return summary, files


def log_to_mlflow(summary: pd.DataFrame, files: list[Path], root: Path, experiment: str, uri: str = "") -> str:
    """One run of the MLflow experiment ``codebook`` named after the studied experiment, in the
    store ``uri`` (default: ``$MLFLOW_TRACKING_URI``, else ``<root>/mlflow.db``)."""
    from analysis.runs import log_study

    keys = ("usage", "effective_bits", "perplexity", "dead_codes", "zipf_exponent")
    metrics = [{"step": 0, **{f"{k}/{row['name']}": row[k] for k in keys}} for _, row in summary.iterrows()]
    params = {"experiment": experiment, "runs": len(summary)}
    return log_study("utilization", experiment, params, metrics, files, root, uri)


def main(argv: list[str] | None = None) -> int:
    from vqlab.errors import UserError
    from vqlab.report import store

    parser = argparse.ArgumentParser(prog="python -m analysis.utilization", description=__doc__.splitlines()[0])
    parser.add_argument("experiment", help="the MLflow experiment: a sweep's name (e.g. codebook_size-photos)")
    parser.add_argument("--sweep", help="only runs tagged sweep=SWEEP")
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///<root>/mlflow.db")
    parser.add_argument("--root", type=Path, default=Path("runs"))
    parser.add_argument("--out", type=Path, help="default: <root>/utilization/<experiment>")
    parser.add_argument("--no-mlflow", action="store_true", help="write the files only")
    args = parser.parse_args(argv)
    uri = store(args.tracking_uri, args.root)
    try:
        runs = tracked_runs(args.experiment, uri, args.sweep)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary, files = analyse(runs, args.out or args.root / "utilization" / args.experiment)
    print(markdown(summary))
    if not args.no_mlflow:
        print(f"MLflow run {log_to_mlflow(summary, files, args.root, args.experiment, uri)} (experiment utilization)")
    print(f"wrote {', '.join(str(p) for p in files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
