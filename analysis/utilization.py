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
  each digit's values seen;
- ``measured_bits``: the Miller–Madow entropy of the histogram (the plug-in ``effective_bits`` is
  biased low by about (seen − 1) / (2N ln 2) bits: ~0.7 bits at 2^14–2^16 codes on 8192 tokens);
  ``l1``: the run's validation L1 (``val/l1``), beside which the rate is read.

A seeded sweep's runs are rows of their own (``<variant>/seed<k>``); ``by_size`` gives each variant's
mean over its seeds with the 95% Student-t half-width (``vqlab.report.half_width``), and ``trends``
each method's change of L1 and of measured bits per doubling of K: the least-squares slope over all
its runs against log2 K with its 95% t interval (``scipy.stats.linregress``, n − 2 degrees of
freedom), a summary of a curve the figure shows, not a claim that it is straight.

Figures: rank-frequency (Zipf) curves, usage and effective bits against log2 K per method (the
``codebook_size`` sweep), usage and perplexity over training steps, and per-digit usage. Nothing
is re-derived: the numbers are the histograms' and the logged metrics'. Logged to the MLflow
experiment ``codebook`` as one run per studied experiment, with the table and figures.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from vqlab import tables
from vqlab.codes import perplexity
from vqlab.evaluators.codebook import CodeHistogram, miller_madow_bits
from vqlab.report import half_width, t_quantile
from vqlab.runfolder import RunFolder

OVER_STEPS = ("val/codebook_usage", "val/perplexity", "train/perplexity", "train/distinct_codes")
FIGURES = ("zipf.png", "usage_vs_size.png", "usage_over_steps.png", "digit_usage.png")
OVER_SEEDS = ("usage", "effective_bits", "measured_bits", "l1", "zipf_exponent")  # by_size's columns


@dataclass
class CodebookRun:
    name: str  # the variant
    method: str
    folder: RunFolder
    seed: int | None = None  # the sweep's seed tag; None: the run has none
    l1: float = math.nan  # its validation L1 (val/l1)

    @property
    def label(self) -> str:
        """``<variant>/seed<k>``, or the variant's name for a run without a seed."""
        return self.name if self.seed is None else f"{self.name}/seed{self.seed}"

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
    measured = float(miller_madow_bits(np.asarray(counts, dtype=np.float64)))
    return {
        "codebook_size": size,
        "log2_size": math.log2(size),
        "used": len(seen),
        "usage": len(seen) / size,
        "dead_codes": size - len(seen),
        "perplexity": 2**entropy,
        "effective_bits": entropy,
        "measured_bits": measured,
        "bits_efficiency": entropy / math.log2(size) if size > 1 else math.nan,
        "zipf_exponent": zipf_exponent(counts),
    }


def table(runs: list[CodebookRun]) -> pd.DataFrame:
    """One row per run with codes: ``name`` (its label), ``variant``, ``seed``, ``method``, ``l1`` and
    ``utilization``, plus ``digit_usage`` (a list)."""
    rows = []
    for run in runs:
        histogram = run.histogram
        if histogram is None:
            continue  # a continuous (identity) run has no codes
        row = {"name": run.label, "variant": run.name, "seed": run.seed, "method": run.method, "l1": run.l1}
        row |= utilization(histogram.counts, histogram.codebook_size)
        row["digit_usage"] = [float((d > 0).mean()) for d in histogram.digit_counts]
        rows.append(row)
    return pd.DataFrame(rows).astype({"seed": "Int64"}) if rows else pd.DataFrame(rows)


def by_size(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per variant (methods in the table's order, each by codebook size): ``variant``,
    ``method``, ``codebook_size``, ``log2_size``, ``n`` (its runs) and, for each of ``OVER_SEEDS``,
    the mean over its runs and ``<column>_ci``, the half-width of its 95% t interval (``NaN`` for one
    run)."""
    rows = []
    for variant, runs in summary.groupby("variant", sort=False):
        row = {"variant": variant, "method": runs["method"].iloc[0], "codebook_size": runs["codebook_size"].iloc[0]}
        row |= {"log2_size": runs["log2_size"].iloc[0], "n": len(runs)}
        for column in OVER_SEEDS:
            values = runs[column].dropna()
            row |= {column: values.mean() if len(values) else math.nan, f"{column}_ci": half_width(values)}
        rows.append(row)
    sizes = pd.DataFrame(rows)
    if sizes.empty:
        return sizes
    rank = {method: i for i, method in enumerate(dict.fromkeys(sizes["method"]))}  # methods as they come
    return sizes.sort_values("log2_size", kind="stable").sort_values("method", key=lambda m: m.map(rank), kind="stable")


def slope(x: pd.Series, y: pd.Series) -> tuple[float, float]:
    """The least-squares slope of ``y`` on ``x`` and the half-width of its 95% t interval (n − 2
    degrees of freedom); ``NaN`` without two distinct ``x`` or, for the interval, three points."""
    keep = y.notna()
    x, y = x[keep].to_numpy(float), y[keep].to_numpy(float)
    if len(np.unique(x)) < 2:
        return math.nan, math.nan
    from scipy import stats

    fit = stats.linregress(x, y)
    return float(fit.slope), t_quantile(len(x) - 2) * float(fit.stderr) if len(x) > 2 else math.nan


def trends(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per method with runs at two or more codebook sizes: ``runs``, the sizes' span in
    bits (``from_bits``, ``to_bits``), and the change per doubling of K (per bit of log2 K) of
    ``l1`` and of ``measured_bits``, each with ``_ci`` (``slope``)."""
    rows = []
    for method, runs in summary.groupby("method", sort=False):
        if runs["log2_size"].nunique() < 2:
            continue
        row = {"method": method, "runs": len(runs), "from_bits": runs["log2_size"].min()}
        row["to_bits"] = runs["log2_size"].max()
        for column in ("l1", "measured_bits"):
            row[f"{column}_per_doubling"], row[f"{column}_per_doubling_ci"] = slope(runs["log2_size"], runs[column])
        rows.append(row)
    columns = ["method", "runs", "from_bits", "to_bits", "l1_per_doubling", "l1_per_doubling_ci"]
    return pd.DataFrame(rows, columns=[*columns, "measured_bits_per_doubling", "measured_bits_per_doubling_ci"])


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


def figures(runs: list[CodebookRun], summary: pd.DataFrame, history: pd.DataFrame, sizes: pd.DataFrame) -> dict:
    """``FIGURES`` name -> matplotlib Figure (no pyplot state); against log2 K, each variant's mean
    over its seeds with its 95% t interval as error bars (``sizes``: ``by_size``, by codebook size)."""
    from matplotlib.figure import Figure

    made = {name: Figure(figsize=(6.5, 4.2), layout="constrained") for name in FIGURES}
    ax = made["zipf.png"].subplots()
    for run in runs:
        if run.histogram is not None:
            counts = np.sort(run.histogram.counts)[::-1]
            ax.plot(np.arange(1, len(counts) + 1), counts / counts.sum(), label=run.label)
    ax.set(xscale="log", yscale="log", xlabel="code rank", ylabel="frequency", title="rank-frequency of the codes")
    ax.legend(fontsize="x-small", ncol=2)

    usage_axes, bits_axes = made["usage_vs_size.png"].subplots(1, 2)
    made["usage_vs_size.png"].set_size_inches(11, 4.2)
    for method, points in sizes.groupby("method", sort=False) if len(sizes) else []:
        x = points["log2_size"]
        usage_axes.errorbar(x, points["usage"], points["usage_ci"].fillna(0), marker="o", capsize=3, label=method)
        line = bits_axes.errorbar(
            x, points["measured_bits"], points["measured_bits_ci"].fillna(0), marker="o", capsize=3, label=method
        )
        colour = line.lines[0].get_color()
        bits_axes.plot(x, points["effective_bits"], linestyle="--", color=colour, label=f"{method}, plug-in")
    if not summary.empty:
        span = [summary["log2_size"].min(), summary["log2_size"].max()]
        bits_axes.plot(span, span, linestyle=":", color="grey", label="all codes equally used")
    usage_axes.set(xlabel="log2 K", ylabel="codes seen / K", ylim=(0, 1.02), title="codebook usage")
    bits_axes.set(xlabel="log2 K", ylabel="bits per token", title="measured bits (Miller–Madow); plug-in dashed")
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
            seed = None if pd.isna(row["seed"]) else int(row["seed"])
            l1 = row.get("metrics.val/l1", math.nan)
            run = CodebookRun(row["name"], row.get("params.quantizer.name", "—"), RunFolder(Path(folder)), seed)
            found.append(replace(run, l1=math.nan if pd.isna(l1) else float(l1)))
    return found


def markdown(summary: pd.DataFrame) -> str:
    """The ``table`` as markdown: numbers to 4 significant digits, counts whole, ``—`` where missing."""
    columns = ["name", "method", "codebook_size", "usage", "dead_codes", "perplexity", "effective_bits"]
    columns += ["measured_bits", "log2_size", "zipf_exponent", "l1"]
    return tables.markdown(columns, ([tables.cell(row[c], ".4g") for c in columns] for _, row in summary.iterrows()))


def estimate(mean: float, width: float) -> str:
    return tables.cell(mean, ".4g") + ("" if math.isnan(width) else f" ± {width:.2g}")


def sizes_markdown(sizes: pd.DataFrame) -> str:
    """``by_size`` as markdown: each mean ± its 95% t half-width over the variant's n runs."""
    columns = ["variant", "method", "log2_size", "n", *OVER_SEEDS]
    lines = (
        [row["variant"], row["method"], tables.cell(row["log2_size"], ".4g"), str(row["n"])]
        + [estimate(row[c], row[f"{c}_ci"]) for c in OVER_SEEDS]
        for _, row in sizes.iterrows()
    )
    return tables.markdown(columns, lines)


def trends_markdown(found: pd.DataFrame) -> str:
    """``trends`` as markdown: the change per doubling of K ± its 95% t half-width."""
    columns = ["method", "runs", "log2 K", "l1 per doubling of K", "measured bits per doubling of K"]
    lines = (
        [row["method"], str(row["runs"]), f"{row['from_bits']:.4g} to {row['to_bits']:.4g}"]
        + [estimate(row[f"{c}_per_doubling"], row[f"{c}_per_doubling_ci"]) for c in ("l1", "measured_bits")]
        for _, row in found.iterrows()
    )
    return tables.markdown(columns, lines)


def analyse(runs: list[CodebookRun], out: Path) -> tuple[pd.DataFrame, list[Path]]:
    """The tables and figures of ``runs``, written to ``out``: ``table`` (``table.csv``, ``table.md``),
    ``by_size`` (``sizes.csv``, ``sizes.md``), ``trends`` (``trends.csv``, ``trends.md``), figures."""
    summary = table(runs)
    out.mkdir(parents=True, exist_ok=True)
    summary.to_csv(out / "table.csv", index=False)
    (out / "table.md").write_text(markdown(summary) + "\n")
    files = [out / "table.csv", out / "table.md"]
    sizes = pd.DataFrame()
    if not summary.empty:
        sizes, found = by_size(summary), trends(summary)
        sizes.to_csv(out / "sizes.csv", index=False)
        (out / "sizes.md").write_text(sizes_markdown(sizes) + "\n")
        found.to_csv(out / "trends.csv", index=False)
        (out / "trends.md").write_text(trends_markdown(found) + "\n")
        files += [out / "sizes.csv", out / "sizes.md", out / "trends.csv", out / "trends.md"]
    for name, made in figures(runs, summary, over_steps(runs), sizes).items():
        made.savefig(out / name, dpi=120)
        files.append(out / name)
    return summary, files


def log_to_mlflow(summary: pd.DataFrame, files: list[Path], root: Path, experiment: str, uri: str = "") -> str:
    """One run of the MLflow experiment ``codebook`` named after the studied experiment, in the
    store ``uri`` (default: ``$MLFLOW_TRACKING_URI``, else ``<root>/mlflow.db``)."""
    from analysis.runs import log_study

    keys = ("usage", "effective_bits", "measured_bits", "perplexity", "dead_codes", "zipf_exponent")
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
    for written in (f for f in files if f.name in ("sizes.md", "trends.md")):
        print("\n" + written.read_text().rstrip())
    if not args.no_mlflow:
        print(f"MLflow run {log_to_mlflow(summary, files, args.root, args.experiment, uri)} (experiment utilization)")
    print(f"wrote {', '.join(str(p) for p in files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
