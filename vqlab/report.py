"""Results tables and figures rendered from MLflow: ``python -m vqlab.report <sweep-or-experiment>``.

    python -m vqlab.report zoo                          # prints the table; writes runs/zoo/report/
    python -m vqlab.report zoo --reference fsq          # and each variant's difference to fsq's, paired by seed
    python -m vqlab.report zoo --tracking-uri http://mlflow:5000 --out results/zoo

The rows are the runs of one MLflow experiment (a sweep named S is the experiment S). When some runs
are nested under a parent (a sweep's variants) only those count: the newest run of each variant
and seed (tags ``variant`` and ``seed``; a sweep without seeds has no ``seed`` tag, one run per
variant). Only runs that FINISHED (MLflow's status) and logged ``val/l1`` are results: a failed run
(one that diverged still logged its step-0 metrics) or an unfinished one (still running, or killed
before it could say) is listed under the table by name (``<variant>/seed<k>`` with seeds) and
status, never shown as a result; a sweep's parent run is neither. For an experiment that is not a
sweep, every run is one.

Each row of the table is a variant: its seeds aggregated (runs without a ``seed`` tag are a row
each, ``n = 1``). For every metric column: the mean over the seeds, the half-width of its 95%
confidence interval (Student t over seeds: ``t_{0.975, n-1} * s / sqrt(n)``, ``s`` the sample
standard deviation, ``scipy.stats.t``) and ``n``, the seeds that logged it. The markdown shows
``0.0606 ± 0.0012`` (the half-width with the column's decimals, or as many as make it non-zero) and
an ``n`` column (seeds of the variant; a metric logged by fewer says ``(n=k)``); with one seed there
is no interval, never a made-up one. Below the variants come the three trivial codecs measured on the
same validation crops (``baseline/*``, ``baseline_palette/*``, ``baseline_kmeans/*``; named as
``vqlab.tracking.TRIVIAL_CODECS`` says): one row each, or one per distinct result when the runs
differ (a palette row per code budget), with no ``n``.

Columns are the seed study's (name, levels, fid, l1, lpips, codebook usage) and then psnr, ssim,
perplexity, bits/token (log2 K, what the codebook could carry) and measured bits (what the codes
carry: ``val/measured_bits``, the Miller-Madow entropy of the validation codes in bits per token),
all from the final ``val/*`` metrics, and train usage: the codebook usage of the final checkpoint on
training crops (``eval_train/codebook_usage``). Codebook usage, perplexity and measured bits are
bounded by the validation set's tokens (the photos' 8192: at most 13 bits of plug-in entropy). A
metric the run did not log (``fid`` and ``lpips`` when their weights were absent; bits/token and
measured bits of a continuous quantizer) is missing: ``NaN`` in the frame, ``—`` in the table,
empty in the CSV; never 0. The markdown rounds as ``FORMATS`` says; the CSVs keep every digit
MLflow stored. Under the table: what ``±`` means (when some row has seeds), a line when the rows
come from different code versions (each run's ``vqlab.commit`` tag, else its sweep's
``git_commit``) and one each when they come from different thread counts (``vqlab.threads``) or
CPUs (``vqlab.cpu``: its model and the vector instructions torch used), naming the values (or when
one value is recorded and some runs recorded none), and one per experiment that runs were copied
from (``vqlab.sweep --reuse``: the ``vqlab.reused_from`` tag, ``seeds.csv``'s ``reused_from``).

Files (``<out>``, default ``<root>/<experiment>/report/``; also logged to the sweep's parent run, under ``report/``):

    table.md     what the command prints: the table, the notes, the runs that are no results, the
                 paired comparison
    table.csv    one line per row of the table: ``name``, ``levels``, ``n`` (seeds), ``seeds``
                 (space-separated, empty without seed tags), then per metric ``<m>`` (mean),
                 ``<m>_ci`` (half-width of the 95% interval; empty for n < 2) and ``<m>_n``; then
                 ``method`` and ``run_id`` (space-separated in seed order; empty for the codecs)
    seeds.csv    the per-seed values: one line per run that is a result, ``SEED_COLUMNS``: ``name``,
                 ``seed`` (empty without a seed tag), ``levels``, ``method``, ``run_id``,
                 ``git_commit``, ``threads``, ``cpu``, ``run_dir``, ``floor``, ``reused_from``
                 (tags; empty where not recorded), ``steps`` (train.steps), ``wall_s`` (the MLflow run's start to end),
                 every metric column, as MLflow stored it, the quantization gap, and
                 ``RATE_INTERVAL``: the run's 95% bootstrap interval of its measured bits over the
                 validation crops
    paired.csv   with ``--reference``: ``PAIRED_COLUMNS``, one line per reference, variant and headline
                 metric (``--reference`` repeated: each reference against every other variant)
    l1_vs_bits.png, usage.png, curves.png   error bars are the 95% t intervals, where n > 1 (and
                 a single run's bootstrap interval of its measured bits)
    convergence.png                     where a method ran at several train.steps: val L1 against
                                        the budget and the wall time, with the trivial codecs
    reconstructions.png                 the same validation crops through each variant (its first
                                        seed's ``reconstructions.npz``, else made from its newest
                                        checkpoint) and the trivial codecs, upscaled, labelled
    compare.ipynb  with ``--notebook``: ``notebooks/compare.ipynb`` executed with the command's
                 parameters (logged once it ran to its end)

l1_vs_bits.png is L1 against measured bits; when every variant has one code budget (within
``BUDGET_TOLERANCE``) it is a dot plot per variant and codec instead: L1, and measured bits beside
log2 K. curves.png: training and validation L1 per variant over steps. ``--readme-figures DIR``
also saves ``README_FIGURES`` there (the README's ``docs/figures``).

``--reference R`` compares every other variant with variant ``R`` on the ``HEADLINE`` metrics both
logged (repeated, with each ``R`` in turn: a table each, and one ``paired.csv`` with a
``reference`` column): the difference ``variant - R`` per seed, over the seeds both ran (paired by
seed), its mean and 95% t interval, ``n`` the pairs, and the verdict ``resolved`` only where that
interval excludes 0, else ``not resolved at n seeds``. Different seed sets are paired on the common seeds, and the
``seeds`` column says so; with no common seed the interval is Welch's (unpaired) and says
``unpaired``. The seeds measure training noise; the ``crops`` column measures measurement noise:
the per-image validation L1 of both (``RunFolder.per_image_l1``, read from each run's MLflow
artifacts, else from its run folder), crops paired by index, each crop's difference averaged over
the seeds used (pooled), and a 95% percentile bootstrap of its mean over the crops
(``scipy.stats.bootstrap``). A run without that file says so in the column.

``notebooks/compare.ipynb`` runs the same functions with ``experiment`` / ``sweep`` / ``reference``
parameters. MLflow is read through ``MlflowClient`` with an explicit store
(``vqlab.tracking.client``), not ``mlflow.search_runs``, whose process-global tracking URI would
rewrite ``$MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from vqlab import checkpoint, tables
from vqlab.config import TrackingConfig
from vqlab.errors import UserError
from vqlab.notebook import execute
from vqlab.runfolder import RECONSTRUCTIONS_FILE, RunFolder
from vqlab.showcase import DPI, MODEL, Showcase, codec_label, crop_labels, of_checkpoint, strip
from vqlab.tracking import TRIVIAL_CODECS, client, mlflow_uri, search_all

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# table column -> the MLflow metric it shows
METRICS = {
    "fid": "val/fid",
    "l1": "val/l1",
    "lpips": "val/lpips",
    "codebook usage": "val/codebook_usage",
    "psnr": "val/psnr",
    "ssim": "val/ssim",
    "perplexity": "val/perplexity",
    "bits/token": "model/bits_per_token",
    # the rate the codes carry: the Miller-Madow entropy of the validation codes (CodebookMetrics),
    # bounded by the validation set's tokens however large the codebook
    "measured bits": "val/measured_bits",
    # the final checkpoint's usage on training crops (``vqlab.evaluate --split train``, which
    # run.ipynb runs): tells a dead code from one the held-out validation photos do not need
    "train usage": "eval_train/codebook_usage",
}
# l1 minus the l1 of the variant's continuous floor (its ``floor`` tag: the identity run of the same
# recipe at the same latent width), paired by seed: what quantizing costs beyond the bottleneck
GAP = "quantization gap"
VALUES = (*METRICS, GAP)  # every column aggregated over seeds
# seeds.csv's: each run's 95% bootstrap interval of its measured bits over the validation crops
RATE_INTERVAL = {"measured bits low": "val/measured_bits_low", "measured bits high": "val/measured_bits_high"}
COLUMNS = ("name", "levels", "n", *VALUES)  # the markdown table's
# table.csv's: per metric its mean, the half-width of its 95% interval and its number of seeds
CSV_COLUMNS = ("name", "levels", "n", "seeds", *(f"{m}{s}" for m in VALUES for s in ("", "_ci", "_n")))
CSV_COLUMNS += ("method", "run_id")
SEED_COLUMNS = ("name", "seed", "levels", "method", "run_id", "git_commit", "threads", "cpu", "run_dir", "floor")
SEED_COLUMNS += ("reused_from",)  # ``<experiment>/<run>`` a sweep's --reuse copied the run from
SEED_COLUMNS += ("steps", "wall_s", *VALUES, *RATE_INTERVAL)  # train.steps; the MLflow run's start to end (s)
# decimals shown in the markdown table
FORMATS = {
    "fid": 2,
    "l1": 4,
    "lpips": 4,
    "codebook usage": 4,
    "psnr": 2,
    "ssim": 4,
    "perplexity": 1,
    "bits/token": 2,
    "measured bits": 2,
    "train usage": 4,
    GAP: 4,
}
MISSING = tables.MISSING
# columns that a config sets rather than a measurement: the same over seeds, shown without "± 0"
SETTINGS = ("bits/token",)
BASELINE_METRICS = {"l1": "l1", "psnr": "psnr", "ssim": "ssim"}
CURVE_KEYS = ("train/l1", "train/loss")  # the first one a run logged is its training curve
VAL_CURVE = "val/l1"  # the validation curve beside it
FIGURES = ("l1_vs_bits.png", "usage.png", "curves.png")  # every report's
CONVERGENCE = "convergence.png"  # a report's whose methods ran at several step budgets
RECONSTRUCTIONS = "reconstructions.png"  # a report's whose runs' shown crops could be read or made
README_FIGURES = ("l1_vs_bits.png", RECONSTRUCTIONS)  # what the README shows of the demo's report
# Code budgets closer than this are one (1000 and 1024 codes: 9.97 and 10 bits): L1 against bits
# would spread the rows over a few hundredths of a bit, so the figure is a dot plot per variant.
BUDGET_TOLERANCE = 0.5
FINISHED = "FINISHED"  # MLflow's status of a run that ended well; only those are results
CONFIDENCE = 0.95  # of every interval the report shows
# the metrics ``--reference`` compares (those both variants logged)
HEADLINE = ("l1", "psnr", "ssim", "codebook usage", "lpips", "fid")
BOOTSTRAP_RESAMPLES = 9999
PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # MLflow's switch for its download progress bars
PAIRED_COLUMNS = (
    "reference",  # the variant the others are compared with
    "variant",
    "metric",
    "difference",  # mean of variant - reference over the pairs (unpaired: difference of the means)
    "ci",  # half-width of its 95% t interval (Welch's when unpaired); NaN when it has none
    "n",  # pairs of seeds (unpaired: the variant's seeds)
    "n_reference",  # the reference's seeds it was compared with
    "pairing",  # "paired", "paired on common seeds" or "unpaired"
    "seeds",  # which seeds, in words
    "verdict",  # "resolved" or "not resolved at n seeds"
    "crop_difference",  # l1 only: mean over the crops of the per-crop L1 difference (seeds pooled)
    "crop_low",  # its 95% bootstrap interval over the crops
    "crop_high",
    "crops",  # the number of crops
    "crop_note",  # what the crops column shows: the interval, or why there is none
)

COMPARE_NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "compare.ipynb"


class ReportError(UserError, LookupError):
    """No experiment of that name, or no run in it that validated, or no variant to compare with."""


# --- reading MLflow -------------------------------------------------------------------------------
def store(tracking_uri: str | None = None, root: str | Path = "runs") -> str:
    """The MLflow store: ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<root>/mlflow.db``
    (the store training writes to, ``vqlab.tracking.mlflow_uri``)."""
    return mlflow_uri(TrackingConfig(root=str(root), mlflow_uri=tracking_uri or ""))


def fetch_runs(experiment: str, tracking_uri: str, sweep: str | None = None) -> pd.DataFrame:
    """The active runs of ``experiment`` that logged ``val/l1`` or did not finish (with ``sweep``:
    those tagged ``sweep=<sweep>``), newest first, as columns ``run_id``, ``start_time``,
    ``status``, ``metrics.<name>``, ``params.<key>`` and ``tags.<key>`` (the layout of
    ``mlflow.search_runs``); ``ReportError`` when there is no such experiment or no finished run
    that logged ``val/l1``."""
    if sweep and "'" in sweep:
        raise ReportError(f"sweep name {sweep!r} contains a quote, which an MLflow filter cannot hold")
    mlflow_client = client(tracking_uri, create=False)  # reading never creates a store
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        raise ReportError(f"no MLflow experiment named {experiment!r} in {tracking_uri}")
    query = f"tags.sweep = '{sweep}'" if sweep else ""
    runs = search_all(mlflow_client, found.experiment_id, query, ["attributes.start_time DESC"])
    frame = pd.DataFrame([flat_run(run) for run in runs])
    validated = frame["metrics.val/l1"].notna() if "metrics.val/l1" in frame else pd.Series(False, index=frame.index)
    done = frame["status"] == FINISHED if "status" in frame else validated
    if frame.empty or not (validated & done).any():
        which = f"tagged sweep={sweep!r} " if sweep else ""
        raise ReportError(
            f"MLflow experiment {experiment!r} in {tracking_uri} has no finished runs {which}that logged val/l1"
        )
    return frame[validated | ~done].reset_index(drop=True)


def flat_run(run) -> dict:
    return {
        "run_id": run.info.run_id,
        "start_time": run.info.start_time,
        "end_time": run.info.end_time,
        "status": run.info.status,
        **{f"metrics.{k}": v for k, v in run.data.metrics.items()},
        **{f"params.{k}": v for k, v in run.data.params.items()},
        **{f"tags.{k}": v for k, v in run.data.tags.items()},
    }


def results_and_others(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that are results if they finished, oldest first (a sweep's order), with a ``name``
    column and a ``seed`` column (the ``seed`` tag as an integer; ``<NA>`` without one): a sweep's
    variants (runs with a parent), the newest run of each name and seed; for an experiment that is
    not a sweep, every run."""
    runs = runs.assign(name=[run_name(run) for _, run in runs.iterrows()], seed=seeds_of(runs))
    if "tags.mlflow.parentRunId" in runs and runs["tags.mlflow.parentRunId"].notna().any():
        runs = runs[runs["tags.mlflow.parentRunId"].notna()]
        runs = runs.sort_values("start_time", ascending=False, kind="stable").drop_duplicates(["name", "seed"])
    return runs.sort_values("start_time", kind="stable").reset_index(drop=True)


def seeds_of(runs: pd.DataFrame) -> pd.Series:
    """The ``seed`` tag of each run as an integer, ``<NA>`` where there is none."""
    tags = runs["tags.seed"] if "tags.seed" in runs else pd.Series(None, index=runs.index, dtype=object)
    seeds = [int(tag) if isinstance(tag, str) and tag.strip() else pd.NA for tag in tags]
    return pd.Series(seeds, index=runs.index, dtype="Int64")


def label(name: str, seed) -> str:
    """A run of a variant in words: ``<variant>/seed<k>``, or the variant's name without a seed."""
    return name if pd.isna(seed) else f"{name}/seed{seed}"


def finished(runs: pd.DataFrame) -> pd.Series:
    """Which runs FINISHED (a frame without ``status``, made by hand, holds finished runs)."""
    return runs["status"] == FINISHED if "status" in runs else pd.Series(True, index=runs.index)


def rows_of(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that are rows, oldest first: of ``results_and_others``, those that FINISHED."""
    runs = results_and_others(runs)
    return runs[finished(runs)].reset_index(drop=True)


def unfinished(runs: pd.DataFrame) -> pd.DataFrame:
    """``name`` (``<variant>/seed<k>`` with seeds), ``status`` and ``run_id`` of the runs that would
    be results but did not finish (``FAILED``, ``KILLED``, or ``RUNNING``/``SCHEDULED`` still or
    forever), oldest first."""
    runs = results_and_others(runs)
    runs = runs.assign(name=[label(r.name, r.seed) for r in runs.itertuples()])
    return runs.loc[~finished(runs), ["name", "status", "run_id"]].reset_index(drop=True)


def unfinished_markdown(runs: pd.DataFrame) -> str:
    """The list under the table of ``unfinished`` runs; empty when every run finished."""
    if runs.empty:
        return ""
    return "\n".join(["failed or unfinished, not results:", *(f"- {r.name} ({r.status})" for r in runs.itertuples())])


def run_name(run: pd.Series) -> str:
    for key in ("tags.variant", "tags.mlflow.runName"):
        if isinstance(run.get(key), str) and run[key]:
            return run[key]
    return run["run_id"]


# --- the table ------------------------------------------------------------------------------------
def describe(params: dict[str, str], prefix: str = "quantizer.") -> str:
    """A quantizer's codebook shape from its logged params: FSQ ``8-5-5-5``, VQ ``K=1024``, LFQ
    ``10 bits``, RVQ ``2 x fsq 8-4``, product ``2 groups x fsq 8-4``; ``—`` when unknown."""
    q = {key.removeprefix(prefix): value for key, value in params.items() if key.startswith(prefix)}
    name = q.get("name")
    if name in ("fsq", "sfsq", "learned_grid", "radix") and (q.get("levels") or q.get("radices")):
        return "-".join(str(level) for level in json.loads(q.get("levels") or q["radices"]))
    if name in ("vq", "vq_ema", "gumbel", "simvq", "ibq") and "codebook_size" in q:
        return f"K={q['codebook_size']}"
    if name in ("lfq", "bsq") and "dim" in q:
        return f"{q['dim']} bits"
    if name == "identity":
        return f"continuous, dim {q.get('dim')}"
    if name == "rvq" and "depth" in q:
        return f"{q['depth']} x {q.get('base.name')} {describe(params, f'{prefix}base.')}"
    if name == "product" and "groups" in q:
        return f"{q['groups']} groups x {q.get('base.name')} {describe(params, f'{prefix}base.')}"
    return MISSING


def metric(run: pd.Series, key: str) -> float:
    value = run.get(f"metrics.{key}")
    return float(value) if value is not None and not pd.isna(value) else math.nan


def per_seed(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run that is a result (``rows_of``), oldest first: ``SEED_COLUMNS`` (``seed``
    ``<NA>`` without a seed tag; ``git_commit``, ``threads``, ``cpu`` and ``run_dir`` from the tags, ``None``
    when not recorded: the commit is the run's own ``vqlab.commit``, as a sweep that runs for hours
    may start runs of code committed after it began). Missing metrics are ``NaN``."""
    rows = []
    for _, run in rows_of(runs).iterrows():
        params = {
            k.removeprefix("params."): v for k, v in run.items() if k.startswith("params.") and isinstance(v, str)
        }
        row = {"name": run["name"], "seed": run["seed"], "levels": describe(params)}
        row |= {"method": params.get("quantizer.name", MISSING), "run_id": run["run_id"]}
        # the commit the run itself imported at its start; the sweep's, for runs from before that tag
        commit = tag(run, "vqlab.commit") or tag(run, "git_commit")
        row |= {"git_commit": commit, "threads": tag(run, "vqlab.threads"), "cpu": tag(run, "vqlab.cpu")}
        row |= {"run_dir": tag(run, "vqlab.run_dir"), "floor": tag(run, "floor")}
        row |= {"reused_from": tag(run, "vqlab.reused_from")}
        row |= {"steps": float(params.get("train.steps", math.nan)), "wall_s": wall_seconds(run)}
        rows.append(row | {column: metric(run, key) for column, key in (METRICS | RATE_INTERVAL).items()})
    frame = pd.DataFrame(rows, columns=list(SEED_COLUMNS)).astype({"seed": "Int64"})
    return frame.assign(**{GAP: quantization_gaps(frame)})


def quantization_gaps(seeds: pd.DataFrame) -> list[float]:
    """Each run's l1 minus its floor's at the same seed (``NaN`` without a floor run of that seed)."""
    floor_l1 = {(run.name, seed_key(run.seed)): run.l1 for run in seeds.itertuples()}
    return [
        run.l1 - floor_l1.get((run.floor, seed_key(run.seed)), math.nan) if run.floor else math.nan
        for run in seeds.itertuples()
    ]


def wall_seconds(run: pd.Series) -> float:
    start, end = run.get("start_time"), run.get("end_time")
    return (end - start) / 1000 if start is not None and end is not None and not pd.isna(end) else math.nan


def tag(run: pd.Series, key: str) -> str | None:
    value = run.get(f"tags.{key}")
    return value if isinstance(value, str) and value else None


def variants(seeds: pd.DataFrame) -> list[pd.DataFrame]:
    """``seeds`` (from ``per_seed``) split into the table's rows, in the order they first started:
    the seeded runs of one name together, in seed order; a run without a seed tag on its own."""
    groups: dict[str, list[int]] = {}
    for i, run in seeds.iterrows():
        groups.setdefault(run["name"] if not pd.isna(run["seed"]) else f"run {run['run_id']}", []).append(i)
    return [seeds.loc[rows].sort_values("seed", kind="stable") for rows in groups.values()]


def comparison(runs: pd.DataFrame, seeds: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per variant (its seeds aggregated, ``aggregate``) and then the trivial codecs,
    as ``CSV_COLUMNS``: ``method`` is the quantizer or the codec, ``run_id`` empty for the codecs.
    ``seeds``: ``per_seed(runs)``, when the caller has it. Missing metrics are ``NaN``."""
    seeds = per_seed(runs) if seeds is None else seeds
    rows = [aggregate(group) for group in variants(seeds)]
    rows += baseline_rows(rows_of(runs))
    counts = ["n", *(f"{column}_n" for column in VALUES)]
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS)).astype(dict.fromkeys(counts, "Int64"))


def aggregate(group: pd.DataFrame) -> dict:
    """One variant's row from its runs: per metric the mean over the seeds that logged it, the
    half-width of its 95% t interval (``half_width``) and their number."""
    first = group.iloc[0]
    seeds = " ".join(str(seed) for seed in group["seed"] if not pd.isna(seed))
    row = {"name": first["name"], "levels": first["levels"], "n": len(group), "seeds": seeds}
    for column in VALUES:
        values = group[column].dropna().to_numpy(dtype=float)
        row[column] = float(values.mean()) if len(values) else math.nan
        row[f"{column}_ci"] = half_width(values)
        row[f"{column}_n"] = len(values)
    return row | {"method": first["method"], "run_id": " ".join(group["run_id"])}


def baseline_rows(runs: pd.DataFrame) -> list[dict]:
    """The trivial codecs (block mean colour, the uniform and the k-means palette), one row per
    code budget. Where the runs measured different results at one budget (the k-means palette is
    fitted with each run's seed), the row is their mean with its 95% t interval and ``n`` the
    distinct results; otherwise the one result, without ``n``."""
    rows = []
    for prefix, label_ in TRIVIAL_CODECS.items():
        budgets: dict[float, list[dict]] = {}
        for _, run in runs.iterrows():
            values = {column: metric(run, f"{prefix}/{key}") for column, key in BASELINE_METRICS.items()}
            if math.isnan(values["l1"]):
                continue  # a run from before this codec was logged
            colors = metric(run, f"{prefix}/colors")
            seen = budgets.setdefault(0.0 if math.isnan(colors) else colors, [])
            if values not in seen:
                seen.append(values)
        for colors, seen in sorted(budgets.items()):
            row = {"name": label_, "levels": MISSING, "method": label_, "run_id": ""}
            if colors:  # a palette: one code per block
                row |= {"levels": f"{colors:.0f} colours", "bits/token": math.log2(colors)}
            for column in BASELINE_METRICS:
                values = [v[column] for v in seen]
                row[column] = float(np.mean(values))
                if len(seen) > 1:
                    row |= {f"{column}_ci": half_width(values), f"{column}_n": len(values)}
            rows.append(row | ({"n": len(seen)} if len(seen) > 1 else {}))
    return rows


# --- intervals ------------------------------------------------------------------------------------
def t_quantile(dof: float) -> float:
    """The two-sided ``CONFIDENCE`` quantile of Student's t with ``dof`` degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, dof))


def half_width(values: Sequence[float]) -> float:
    """The half-width of the 95% confidence interval of the mean of ``values`` (Student t over the
    seeds: ``t_{0.975, n-1} * s / sqrt(n)``, ``s`` with ``n - 1``); ``NaN`` for fewer than 2."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return math.nan
    return t_quantile(len(values) - 1) * float(values.std(ddof=1)) / math.sqrt(len(values))


def t_bounds(values: Sequence[float]) -> tuple[float, float]:
    """``(mean - half_width, mean + half_width)``: seaborn's ``errorbar`` for the 95% t interval."""
    mean, width = float(np.mean(values)), half_width(values)
    return mean - width, mean + width


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """``mean(a) - mean(b)`` and the half-width of its 95% Welch interval (unequal variances,
    Welch-Satterthwaite degrees of freedom); ``NaN`` half-width when either has fewer than 2."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    difference = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return difference, math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return difference, 0.0
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return difference, t_quantile(dof) * math.sqrt(va + vb)


def resolved(difference: float, width: float) -> bool:
    """Whether the interval ``difference ± width`` excludes 0 (never without an interval)."""
    return not math.isnan(width) and abs(difference) > width


def crop_bootstrap(differences: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0):
    """The mean of per-crop ``differences`` and its 95% percentile bootstrap interval over the
    crops (``scipy.stats.bootstrap``, resampling crops; a fixed generator, so a report renders the
    same twice): ``(mean, low, high)``. Equal differences have the interval of their value."""
    from scipy import stats

    differences = np.asarray(differences, dtype=float)
    mean = float(differences.mean())
    if np.ptp(differences) == 0:
        return mean, mean, mean
    found = stats.bootstrap(
        (differences,),
        np.mean,
        n_resamples=resamples,
        confidence_level=CONFIDENCE,
        method="percentile",
        batch=max(1, 2**21 // len(differences)),  # about 16 MB of resampled crops at a time
        rng=np.random.default_rng(seed),
    )
    return mean, float(found.confidence_interval.low), float(found.confidence_interval.high)


# --- markdown -------------------------------------------------------------------------------------
def cell(column: str, value) -> str:
    """A value of ``column`` as the markdown table shows it (``FORMATS``)."""
    return tables.cell(value, f".{FORMATS[column]}f" if column in FORMATS else "")


def width_cell(column: str, width: float) -> str:
    """A half-width with ``column``'s decimals, or with as many as make it non-zero."""
    decimals = FORMATS.get(column, 4)
    if 0 < width < 0.5 * 10**-decimals:
        decimals = -math.floor(math.log10(width))
    return f"{width:.{decimals}f}"


def estimate(column: str, mean: float, width: float, count: float = 1, n: float = 1, sign: str = "") -> str:
    """``mean ± width`` as the markdown shows it (no ``±`` without an interval), and ``(n=k)``
    when ``count`` seeds of the row's ``n`` logged it; ``sign="+"`` writes a difference's sign."""
    if pd.isna(mean):
        return MISSING
    text = tables.cell(mean, f"{sign}.{FORMATS[column]}f" if column in FORMATS else "")
    # a setting's mean of equal values can carry float round-off (log2 240 three times: ± 3e-15)
    if not pd.isna(width) and not (column in SETTINGS and width <= 1e-9 * max(1.0, abs(mean))):
        text += f" ± {width_cell(column, width)}"
    if not pd.isna(count) and not pd.isna(n) and count < n:
        text += f" (n={int(count)})"
    return text


def markdown(table: pd.DataFrame) -> str:
    """``table`` (from ``comparison``) as a markdown table of ``COLUMNS``: each metric as ``mean ±
    half-width`` (``estimate``), ``n`` the seeds of the row; missing values are ``—``."""
    lines = []
    for _, row in table.iterrows():
        cells = [row["name"], row["levels"], tables.cell(None if pd.isna(row["n"]) else int(row["n"]))]
        cells += [estimate(c, row[c], row[f"{c}_ci"], row[f"{c}_n"], row["n"]) for c in VALUES]
        lines.append(cells)
    return tables.markdown(COLUMNS, lines)


def notes(table: pd.DataFrame, seeds: pd.DataFrame) -> list[str]:
    """The lines under the table: what ``±`` means (when a row has more than one seed), and one
    line each when the runs come from different code versions (``git_commit``), thread counts
    (``vqlab.threads``) or CPUs (``vqlab.cpu``), naming the values and how many runs have each, and
    how many runs are copies of each other experiment's (``reused_from``)."""
    lines = []
    if (table["n"] > 1).any():
        lines.append(
            "± is the 95% confidence interval of the mean over the n seeds (Student t); n = 1 has no interval."
        )
    floors = seeds.dropna(subset=["floor"]).drop_duplicates("name")
    if len(floors):
        named = ", ".join(f"{run.name} → {run.floor}" for run in floors.itertuples())
        lines.append(
            f"{GAP}: l1 minus the l1 of the variant's continuous floor at the same seed, the mean of the "
            f"paired differences ({named})."
        )
    for column, what, key in (
        ("git_commit", "code versions", "git_commit"),
        ("threads", "thread counts", "vqlab.threads"),
        ("cpu", "CPUs", "vqlab.cpu"),
    ):
        counts = seeds[column].dropna().value_counts(sort=False)
        unknown = int(seeds[column].isna().sum())
        values = ", ".join(f"{value} ({count} run{'s' * (count > 1)})" for value, count in counts.items())
        values += f", not recorded ({unknown} run{'s' * (unknown > 1)})" if unknown else ""
        if len(counts) > 1:
            lines.append(f"note: the rows come from different {what}: {key} {values}")
        elif len(counts) == 1 and unknown:  # the runs that did not record it may differ
            lines.append(f"note: not every row recorded its {what[:-1]}: {key} {values}")
    copies = seeds["reused_from"].dropna().str.split("/").str[0].value_counts(sort=False)
    for experiment, count in copies.items():
        lines.append(
            f"note: {count} run{'s are copies' if count > 1 else ' is a copy'} of {experiment}'s runs of the same "
            "recipe (vqlab.sweep --reuse; seeds.csv reused_from names each)"
        )
    lines.append(made_by(seeds))
    return lines


def made_by(seeds: pd.DataFrame) -> str:
    """Which code, thread count and CPU made the rows: a number is rerun only at the same ones."""

    def shown(column: str, width: int | None = None) -> str:
        values = sorted({str(v)[:width] for v in seeds[column].dropna()})
        return ", ".join(values) if values else "not recorded"

    return f"runs made at commit {shown('git_commit', 10)}, threads {shown('threads')}, cpu {shown('cpu')}"


# --- paired comparisons --------------------------------------------------------------------------
def reference_check(reference: str, seeds: pd.DataFrame, experiment: str) -> None:
    """``ReportError`` naming ``--reference`` and the variants when ``reference`` is none of them."""
    names = list(dict.fromkeys(seeds["name"]))
    if reference not in names:
        raise ReportError(
            f"--reference {reference!r} names no variant of {experiment!r}; its variants: {', '.join(names)}"
        )


def seed_list(seeds: Sequence) -> str:
    return ", ".join("no seed tag" if pd.isna(seed) else str(seed) for seed in seeds)


def compare(variant: pd.DataFrame, reference: pd.DataFrame, column: str) -> dict | None:
    """``variant - reference`` on ``column`` (each the ``per_seed`` rows of one variant): paired
    by seed over the seeds both ran and logged it, else unpaired (Welch); ``PAIRED_COLUMNS``'
    ``difference`` to ``verdict``, and ``used``: the variant's and the reference's seeds it used.
    ``None`` when either logged no value."""
    ours, theirs = values_by_seed(variant, column), values_by_seed(reference, column)
    if not ours or not theirs:
        return None
    common = [seed for seed in ours if seed in theirs]
    if common:
        differences = [ours[seed] - theirs[seed] for seed in common]
        mean, width, n, n_reference = float(np.mean(differences)), half_width(differences), len(common), len(common)
        if set(ours) == set(theirs):
            pairing, words = "paired", f"paired: {seed_list(common)}"
        else:
            pairing = "paired on common seeds"
            words = f"paired on the common {seed_list(common)} (of {seed_list(ours)} / {seed_list(theirs)})"
        used, counted = (common, common), f"{n} seed{'s' * (n != 1)}"
    else:
        mean, width = welch(list(ours.values()), list(theirs.values()))
        n, n_reference = len(ours), len(theirs)
        pairing, words = "unpaired", f"unpaired (Welch): {seed_list(ours)} / {seed_list(theirs)}"
        used, counted = (list(ours), list(theirs)), f"{n} and {n_reference} seeds"
    verdict = "resolved" if resolved(mean, width) else f"not resolved at {counted}"
    found = {"difference": mean, "ci": width, "n": n, "n_reference": n_reference, "pairing": pairing}
    return found | {"seeds": words, "verdict": verdict, "used": used}


def values_by_seed(runs: pd.DataFrame, column: str) -> dict:
    """``seed -> value`` of the runs that logged ``column`` (no seed tag: ``None``)."""
    return {seed_key(seed): value for seed, value in zip(runs["seed"], runs[column], strict=True) if not pd.isna(value)}


def seed_key(seed):
    """A seed as a dict key (``<NA>``, no seed tag, is ``None``)."""
    return None if pd.isna(seed) else int(seed)


def paired(seeds: pd.DataFrame, reference: str, per_image: Callable[[str], np.ndarray | None]) -> pd.DataFrame:
    """Every other variant against ``reference`` on the ``HEADLINE`` metrics both logged, as
    ``PAIRED_COLUMNS`` (see the module docstring); ``per_image(run_id)``: a run's per-image
    validation L1, ``None`` when it has none. ``seeds``: ``per_seed``'s rows."""
    groups: dict[str, pd.DataFrame] = {}
    for group in variants(seeds):  # of an experiment's runs without seeds that share a name, the first
        groups.setdefault(group.iloc[0]["name"], group)
    base = groups[reference]
    rows = []
    for name, group in groups.items():
        if name == reference:
            continue
        for column in HEADLINE:
            found = compare(group, base, column)
            if found is None:
                continue
            used = found.pop("used")
            row = {"reference": reference, "variant": name, "metric": column, **found}
            if column == "l1":
                row |= crop_comparison(group, base, *used, per_image)
            rows.append(row)
    return pd.DataFrame(rows, columns=list(PAIRED_COLUMNS))


def crop_comparison(variant, reference, variant_seeds, reference_seeds, per_image) -> dict:
    """The ``crop_*`` columns of a variant against the reference: the per-image L1 of the seeds
    used, crops paired by index, each crop's difference averaged over those seeds (pooled), and
    ``crop_bootstrap`` of its mean; ``crop_note`` says why there is none where a file is missing
    or the runs were validated on different crops."""
    arrays, missing = {}, []
    for group, used in ((variant, variant_seeds), (reference, reference_seeds)):
        name = group.iloc[0]["name"]
        for _, run in group.iterrows():
            if seed_key(run["seed"]) not in used:
                continue
            values = per_image(run["run_id"])
            if values is None:
                missing.append(label(name, run["seed"]))
            else:
                arrays.setdefault(name, []).append(values)
    if missing:
        return {"crop_note": f"no per-image L1 for {', '.join(missing)}"}
    ours, theirs = arrays[variant.iloc[0]["name"]], arrays[reference.iloc[0]["name"]]
    sizes = sorted({len(values) for values in ours + theirs})
    if len(sizes) > 1:
        return {"crop_note": f"different crops ({' vs '.join(map(str, sizes))} images)"}
    differences = np.mean(ours, axis=0) - np.mean(theirs, axis=0)
    mean, low, high = crop_bootstrap(differences)
    pooled = "pooled over " + (
        f"{len(ours)} seeds" if len(ours) == len(theirs) else f"{len(ours)} / {len(theirs)} seeds"
    )
    note = f"{mean:+.{FORMATS['l1']}f} [{low:+.{FORMATS['l1']}f}, {high:+.{FORMATS['l1']}f}] over {sizes[0]} crops"
    note += f", {pooled}" if len(ours) + len(theirs) > 2 else ""
    return {"crop_difference": mean, "crop_low": low, "crop_high": high, "crops": sizes[0], "crop_note": note}


def paired_markdown(table: pd.DataFrame, reference: str) -> str:
    """The paired comparison under the report's table: a heading line, the table, and what the
    crops column measures."""
    heading = (
        f"paired with reference {reference}: difference = variant - {reference}, mean ± 95% t interval over the "
        "seeds (paired by seed); resolved where that interval excludes 0"
    )
    if table.empty:
        return f"{heading}\n\nno other variant logged a headline metric"
    header = ("variant", "metric", "difference", "n", "seeds", "verdict", "crops (l1, bootstrap)")
    lines = []
    for _, row in table.iterrows():
        n = str(row["n"]) if row["pairing"] != "unpaired" else f"{row['n']} / {row['n_reference']}"
        crops = row["crop_note"] if isinstance(row["crop_note"], str) else MISSING
        difference = estimate(row["metric"], row["difference"], row["ci"], sign="+")
        lines.append([row["variant"], row["metric"], difference, n, row["seeds"], row["verdict"], crops])
    footer = (
        "crops: the per-crop val L1 difference, averaged over the seeds used (pooled), and the 95% percentile "
        f"bootstrap interval of its mean over the shared validation crops (scipy.stats.bootstrap, "
        f"{BOOTSTRAP_RESAMPLES} resamples): measurement noise, where the t interval over seeds is training noise"
    )
    return "\n\n".join([heading, tables.markdown(header, lines), footer])


def per_image_reader(tracking_uri: str, seeds: pd.DataFrame) -> Callable[[str], np.ndarray | None]:
    """``run_id -> per-image validation L1`` (``RunFolder.per_image_l1``): the run's MLflow
    artifact of that name, else the file in the run folder its ``vqlab.run_dir`` tag names;
    ``None`` where neither is there. Each run is read once."""
    mlflow_client = client(tracking_uri, create=False)
    name = RunFolder.per_image_l1_name()
    folders = dict(zip(seeds["run_id"], seeds["run_dir"], strict=True))

    @functools.cache
    def read(run_id: str) -> np.ndarray | None:
        if name in {artifact.path for artifact in mlflow_client.list_artifacts(run_id)}:
            with tempfile.TemporaryDirectory() as scratch, quiet_downloads():
                return np.load(mlflow_client.download_artifacts(run_id, name, scratch))
        folder = folders.get(run_id)
        if isinstance(folder, str) and RunFolder(folder).per_image_l1().is_file():
            return np.load(RunFolder(folder).per_image_l1())
        return None

    return read


@contextlib.contextmanager
def quiet_downloads():
    """No MLflow progress bar (one per file, on stderr) while the report downloads."""
    saved = os.environ.get(PROGRESS_BAR)
    os.environ[PROGRESS_BAR] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(PROGRESS_BAR, None)
        else:
            os.environ[PROGRESS_BAR] = saved


# --- figures --------------------------------------------------------------------------------------
def curves(runs: pd.DataFrame, tracking_uri: str) -> pd.DataFrame:
    """Training and validation curves from MLflow's metric history: ``variant``, ``name``
    (``<variant>/seed<k>`` with seeds), ``metric``, ``step``, ``value`` for each run that is a
    result: its first logged key of ``CURVE_KEYS``, and ``VAL_CURVE``."""
    mlflow_client = client(tracking_uri, create=False)  # reading never creates a store
    points = []
    for _, run in rows_of(runs).iterrows():
        logged = [k for k in (*CURVE_KEYS, VAL_CURVE) if f"metrics.{k}" in run and not pd.isna(run[f"metrics.{k}"])]
        keys = [k for k in logged if k in CURVE_KEYS][:1] + [k for k in logged if k == VAL_CURVE]
        for key in keys:
            history = sorted(mlflow_client.get_metric_history(run["run_id"], key), key=lambda m: m.step)
            where = {"variant": run["name"], "name": label(run["name"], run["seed"]), "metric": key}
            points += [where | {"step": m.step, "value": m.value} for m in history]
    return pd.DataFrame(points, columns=["variant", "name", "metric", "step", "value"])


def curve_panel(ax, history: pd.DataFrame, ylabel: str, title: str) -> None:
    """One line per variant: the mean over its seeds at each step, and where it has several the
    95% t interval as a band."""
    for variant, points in history.groupby("variant", sort=False):
        at = points.groupby("step")["value"].agg(["mean", half_width]).reset_index()
        seeds = points["name"].nunique()
        (line,) = ax.plot(
            at["step"], at["mean"], marker=".", label=variant + (f" ({seeds} seeds)" if seeds > 1 else "")
        )
        band = at.dropna(subset=["half_width"])
        if not band.empty:
            low, high = band["mean"] - band["half_width"], band["mean"] + band["half_width"]
            ax.fill_between(band["step"], low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    if ax.lines:
        ax.legend(fontsize="small")


def figures(table: pd.DataFrame, history: pd.DataFrame, seeds: pd.DataFrame | None = None) -> dict:
    """``FIGURES`` name -> matplotlib Figure: L1 and the code rate (``l1_against_bits``, or
    ``l1_dots`` when every variant has one code budget), codebook usage of each variant coloured
    by method, and the training and validation curves (each variant the mean over its seeds, the
    95% t interval as a band). Where a variant has more than one seed, its L1 and usage are the
    mean over the seeds with the 95% t interval as an error bar (``seeds``: ``per_seed``'s rows,
    from which seaborn draws the usage bars; without it, the table's means). Figures are made
    without pyplot, so nothing is shown."""
    import seaborn as sns
    from matplotlib.figure import Figure

    from vqlab.figures import TRAIN_SCALE, VAL_SCALE

    made = {name: Figure(figsize=(6, 4), layout="constrained") for name in FIGURES}
    if (budget := one_budget(table)) is not None:
        l1_dots(made["l1_vs_bits.png"], table, seeds, budget)
    else:
        l1_against_bits(made["l1_vs_bits.png"].subplots(), table, seeds)

    ax = made["usage.png"].subplots()
    if seeds is None:
        seeds = table[table["run_id"] != ""]
    runs = seeds[seeds["codebook usage"].notna()]
    sns.barplot(runs, x="name", y="codebook usage", hue="method", dodge=False, errorbar=t_bounds, capsize=0.2, ax=ax)
    ax.set(
        ylim=(0, 1),
        xlabel="",
        title="codebook usage" + (" (95% CI over seeds)" if runs["name"].duplicated().any() else ""),
    )
    ax.tick_params(axis="x", labelrotation=45)

    made["curves.png"].set_size_inches(11, 4)
    train_ax, val_ax = made["curves.png"].subplots(1, 2)
    training = history[history["metric"] != VAL_CURVE]
    keys = ", ".join(training["metric"].unique())
    # the objective sees the model's [-1, 1] images, the metrics [0, 1] ones (vqlab.figures)
    curve_panel(train_ax, training, f"{keys or 'training loss'} {TRAIN_SCALE}", "training (mean over seeds)")
    if not training.empty and (training["value"] > 0).all():
        train_ax.set_yscale("log")
    validation = history[history["metric"] == VAL_CURVE]
    curve_panel(val_ax, validation, f"val L1 {VAL_SCALE}", "validation")
    if not validation.empty and (validation["value"] > 0).all():  # step 0's L1 would flatten the rest
        val_ax.set_yscale("log")
    if (ladder := convergence(table, seeds)) is not None:
        made[CONVERGENCE] = ladder
    return made


def l1_against_bits(ax, table: pd.DataFrame, seeds: pd.DataFrame | None) -> None:
    """L1 against bits per token, one line per method (points sorted by bits; the palette codec is
    a method too). The bits are the measured bits where a row has them, else bits/token (the
    palette codec's log2 colours, a run from before the rate was measured); their error bar is the
    t interval over the seeds, or a single run's bootstrap interval over the crops (from
    ``seeds``). Unquantized rows (continuous quantizers, the block mean colour) are horizontal
    lines: floors at no finite rate."""
    bits = table.assign(bits=table["measured bits"].fillna(table["bits/token"]), **rate_errors(table, seeds))
    for method, points in bits.dropna(subset=["bits", "l1"]).groupby("method", sort=False):
        points = points.sort_values("bits")
        codec = method in TRIVIAL_CODECS.values()
        (line,) = ax.plot(points["bits"], points["l1"], marker="o", label=method, linestyle="--" if codec else "-")
        bars = points[points["l1_ci"].notna()]
        if not bars.empty:
            ax.errorbar(bars["bits"], bars["l1"], yerr=bars["l1_ci"], fmt="none", capsize=3, color=line.get_color())
        bars = points[points["bits_below"].notna()]
        if not bars.empty:
            spread = [bars["bits_below"], bars["bits_above"]]
            ax.errorbar(bars["bits"], bars["l1"], xerr=spread, fmt="none", capsize=3, color=line.get_color())
    for _, row in bits[bits["bits"].isna() & bits["l1"].notna()].iterrows():
        model = row["run_id"] != ""
        style = {"linestyle": ":" if model else "--", "color": "grey" if model else "black"}
        ax.axhline(row["l1"], label=f"{row['name']} ({'continuous' if model else 'unquantized'})", **style)
        if not pd.isna(row["l1_ci"]):
            ax.axhspan(row["l1"] - row["l1_ci"], row["l1"] + row["l1_ci"], color="grey", alpha=0.15, linewidth=0)
    title = "L1 vs measured bits per token" + (" (95% CI over seeds)" if table["l1_ci"].notna().any() else "")
    ax.set(xlabel="measured bits per token (log2 K where not measured)", ylabel="val L1 (lower is better)")
    ax.set(title=title)
    ax.legend(fontsize="small")


def one_budget(table: pd.DataFrame) -> float | None:
    """The code budget (bits/token, log2 K) every quantized variant shares, within
    ``BUDGET_TOLERANCE``; ``None`` when they differ or none is quantized."""
    budgets = table.loc[table["run_id"] != "", "bits/token"].dropna()
    if budgets.empty or budgets.max() - budgets.min() > BUDGET_TOLERANCE:
        return None
    return float(budgets.mean())


def l1_dots(figure: Figure, table: pd.DataFrame, seeds: pd.DataFrame | None, budget: float) -> None:
    """At one code budget: a dot per variant (the continuous floor too) and per trivial codec at
    that budget or without one, L1 on the left, measured bits on the right beside log2 K (``|``),
    each with its interval (``rate_errors``; the t interval over seeds for L1)."""
    near = (table["bits/token"] - budget).abs() <= BUDGET_TOLERANCE
    rows = table[(table["run_id"] != "") | table["bits/token"].isna() | near].dropna(subset=["l1"])
    rows = rows.assign(**rate_errors(rows, seeds)).reset_index(drop=True)
    names = [row["name"] if row["run_id"] else f"{row['name']}, {row['levels']}" for _, row in rows.iterrows()]
    names = [name.removesuffix(f", {MISSING}") for name in names]
    codec = (rows["run_id"] == "").to_numpy()
    at = np.arange(len(rows))[::-1]  # the first row on top
    figure.set_size_inches(10, 1.2 + 0.45 * len(rows))
    l1_ax, bits_ax = figure.subplots(1, 2, sharey=True)
    for ax, column, below, above in (
        (l1_ax, "l1", rows["l1_ci"], rows["l1_ci"]),
        (bits_ax, "measured bits", rows["bits_below"], rows["bits_above"]),
    ):
        for mask, colour in ((~codec, "C0"), (codec, "grey")):
            ax.plot(rows.loc[mask, column], at[mask], "o", color=colour, label="codec" if colour == "grey" else column)
        bars = rows[column].notna() & below.notna()
        if bars.any():
            ax.errorbar(rows.loc[bars, column], at[bars], xerr=[below[bars], above[bars]], fmt="none", capsize=3)
    bits_ax.plot(rows["bits/token"], at, "|", color="black", markersize=12, label="log2 K (budget)")
    l1_ax.set(yticks=at, yticklabels=names, xlabel="val L1 (lower is better)")
    # from 0: the rate a code carries is between 0 and log2 K, and the budgets differ by hundredths
    top = np.nanmax([rows["bits/token"].max(), rows["measured bits"].max() + rows["bits_above"].fillna(0).max()])
    bits_ax.set(xlabel="measured bits per token (| : log2 K)", xlim=(0, 1.05 * top))
    bits_ax.legend(fontsize="small", loc="lower left")
    intervals = " (95% CI over seeds)" if table["l1_ci"].notna().any() else ""
    figure.suptitle(f"one code budget, about {budget:.1f} bits per token: L1 and measured rate{intervals}")


def convergence(table: pd.DataFrame, seeds: pd.DataFrame) -> Figure | None:
    """Where a method ran at several step budgets (a ladder such as the ``convergence`` sweep's):
    final val L1 against the budget and against the run's wall time, the mean over seeds with its
    95% t interval, and the trivial codecs as horizontal lines; ``None`` without a ladder."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    runs = seeds.dropna(subset=["l1", "steps"])
    if "steps" not in runs or not (runs.groupby("method")["steps"].nunique() > 1).any():
        return None
    points = (
        runs.groupby(["method", "steps"], sort=True)
        .agg(l1=("l1", "mean"), ci=("l1", half_width), wall=("wall_s", "mean"))
        .reset_index()
    )
    figure = Figure(figsize=(10, 4), layout="constrained")
    by_steps, by_time = figure.subplots(1, 2, sharey=True)
    for method, line in points.groupby("method", sort=False):
        for ax, x in ((by_steps, line["steps"]), (by_time, line["wall"] / 60)):
            (drawn,) = ax.plot(x, line["l1"], marker="o", label=method)
            ax.errorbar(x, line["l1"], yerr=line["ci"].fillna(0), fmt="none", capsize=3, color=drawn.get_color())
    # each codec once, at its smallest budget (the quantizers'; the continuous runs' nominal 2^24
    # colours would draw a second palette line at the block mean's height)
    codecs = table[table["run_id"] == ""].sort_values("bits/token", na_position="first").drop_duplicates("name")
    for i, (_, codec) in enumerate(codecs.iterrows()):
        for ax in (by_steps, by_time):
            ax.axhline(codec["l1"], linestyle="--", color=f"C{7 + i % 3}", label=f"{codec['name']} ({codec['levels']})")
    by_steps.set(xscale="log", xlabel="training steps (each point a run of that budget)", ylabel="val L1")
    by_time.set(xscale="log", xlabel="wall time of the run (minutes)")
    # the budgets themselves as plain numbers: a log axis's own labels read "3x10^3" and collide
    budgets = sorted(points["steps"].unique())
    by_steps.set_xticks(budgets, labels=[f"{int(b)}" for b in budgets], minor=False)
    by_steps.xaxis.set_minor_formatter(NullFormatter())
    by_time.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    by_time.xaxis.set_major_formatter(ScalarFormatter())
    by_time.xaxis.set_minor_formatter(NullFormatter())
    n = int(runs.groupby(["method", "steps"]).size().max())
    figure.suptitle("convergence: val L1 against budget" + (f" (95% CI over {n} seeds)" if n > 1 else ""))
    by_time.legend(fontsize="small")
    return figure


def rate_errors(table: pd.DataFrame, seeds: pd.DataFrame | None) -> dict[str, list[float]]:
    """``bits_below`` and ``bits_above``: how far each row's error bar on its measured bits reaches
    either side, the t interval over its seeds where it has one, else its single run's bootstrap
    interval over the crops (in ``seeds``, found by run id); ``NaN`` where it has neither."""
    runs = seeds.set_index("run_id") if seeds is not None and "measured bits low" in seeds else None
    below, above = [], []
    for _, row in table.iterrows():
        reach = (math.nan, math.nan)
        if not pd.isna(row["measured bits_ci"]):
            reach = (row["measured bits_ci"], row["measured bits_ci"])
        elif runs is not None and row["run_id"] in runs.index:
            run = runs.loc[row["run_id"]]
            reach = (row["measured bits"] - run["measured bits low"], run["measured bits high"] - row["measured bits"])
        below.append(reach[0])
        above.append(reach[1])
    return {"bits_below": below, "bits_above": above}


def read_showcase(mlflow_client, run_id: str, run_dir: str | None) -> Showcase | None:
    """A run's shown crops (``vqlab.showcase``): its MLflow artifact ``reconstructions.npz``, else
    that file in its run folder, else made from the folder's newest checkpoint (a run from before
    the file existed: ``of_checkpoint``, which writes nothing); ``None`` when none is there."""
    if RECONSTRUCTIONS_FILE in {artifact.path for artifact in mlflow_client.list_artifacts(run_id)}:
        with tempfile.TemporaryDirectory() as scratch, quiet_downloads():
            return Showcase.read(Path(mlflow_client.download_artifacts(run_id, RECONSTRUCTIONS_FILE, scratch)))
    folder = RunFolder(run_dir) if isinstance(run_dir, str) else None
    if folder is None or not folder.has_config():
        return None
    if folder.reconstructions.is_file():
        return Showcase.read(folder.reconstructions)
    return of_checkpoint(folder) if checkpoint.step_files(folder.checkpoints) else None


def shown_crops(seeds: pd.DataFrame, tracking_uri: str) -> dict[str, Showcase]:
    """``<variant>/seed<k>`` -> the shown crops of each variant's first seed (``read_showcase``);
    variants with none are left out."""
    mlflow_client = client(tracking_uri, create=False)
    found = {}
    for group in variants(seeds):
        run = group.iloc[0]
        shown = read_showcase(mlflow_client, run["run_id"], run["run_dir"])
        if shown is not None:
            found[label(run["name"], run["seed"])] = shown
    return found


def reconstruction_figure(shown: dict[str, Showcase]) -> Figure:
    """The same validation crops: the originals, each variant's reconstructions (its first seed),
    then the trivial codecs' at the smallest code budget of those runs (a continuous run's palette
    has 2^24 colours), rows labelled. A run shown other crops (other validation data) is left out."""
    first = next(iter(shown.values()))
    same = {
        name: crops
        for name, crops in shown.items()
        if np.array_equal(crops.indices, first.indices) and np.array_equal(crops.originals, first.originals)
    }
    codecs = min(same.values(), key=lambda crops: crops.colors.get("baseline_palette", 0))
    rows = [("original", first.originals), *((name, crops.rows[MODEL]) for name, crops in same.items())]
    rows += [(codec_label(codecs, prefix), codecs.rows[prefix]) for prefix in TRIVIAL_CODECS if prefix in codecs.rows]
    return strip(rows, "the same validation crops through each variant and the trivial codecs", crop_labels(first))


def readme_figures(result: Report, folder: Path) -> list[Path]:
    """``README_FIGURES`` of ``result`` saved into ``folder`` (the README's ``docs/figures``): those
    the report has (``reconstructions.png`` needs runs whose crops could be read or made)."""
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    for name in README_FIGURES:
        if name in result.figures:
            result.figures[name].savefig(folder / name, dpi=DPI)
            saved.append(folder / name)
    return saved


# --- the report -----------------------------------------------------------------------------------
@dataclass
class Report:
    table: pd.DataFrame  # ``comparison``: one row per variant, then the codecs (table.csv)
    markdown: str
    figures: dict
    files: list[Path]
    parent_run_ids: list[str]
    unfinished: pd.DataFrame  # name, status, run_id of the runs that failed or did not finish
    seeds: pd.DataFrame = field(default_factory=pd.DataFrame)  # ``per_seed``: one row per run (seeds.csv)
    paired: pd.DataFrame | None = None  # ``paired`` with ``--reference`` (paired.csv)
    notes: list[str] = field(default_factory=list)  # the lines under the table


def render(
    experiment: str,
    tracking_uri: str | None = None,
    sweep: str | None = None,
    out: str | Path | None = None,
    root: str | Path = "runs",
    reference: str | Sequence[str] | None = None,
) -> Report:
    """Read the runs, build the table, its notes, the paired comparison with ``reference`` (a
    variant's name, or several: each compared with every other variant in turn; ``ReportError``
    when one is none) and the figures and, with ``out``, write them there (the module docstring
    lists the files). ``parent_run_ids``: the parents of the rows' runs."""
    uri = store(tracking_uri, root)
    runs = fetch_runs(experiment, uri, sweep)
    seeds = per_seed(runs)
    names = [reference] if isinstance(reference, str) else reference or ()
    references = list(dict.fromkeys(name for name in names if name))  # "" is none, as it always was
    for name in references:
        reference_check(name, seeds, experiment)
    table = comparison(runs, seeds)
    reader = per_image_reader(uri, seeds)
    sections = {name: paired(seeds, name, reader) for name in references}
    compared = pd.concat(sections.values(), ignore_index=True) if sections else None
    made = figures(table, curves(runs, uri), seeds)
    if shown := shown_crops(seeds, uri):
        made[RECONSTRUCTIONS] = reconstruction_figure(shown)
    parents = sorted(set(rows_of(runs).get("tags.mlflow.parentRunId", pd.Series(dtype=object)).dropna()))
    others = unfinished(runs)
    below = notes(table, seeds)
    parts = [markdown(table), "\n".join(below), unfinished_markdown(others)]
    parts += [paired_markdown(section, name) for name, section in sections.items()]
    result = Report(
        table, "\n\n".join(part for part in parts if part), made, [], parents, others, seeds, compared, below
    )
    if out is not None:
        result.files = write(result, Path(out))
    return result


def write(result: Report, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "table.md", out / "table.csv", out / "seeds.csv"]
    (out / "table.md").write_text(result.markdown + "\n")
    result.table.to_csv(out / "table.csv", index=False)
    result.seeds.to_csv(out / "seeds.csv", index=False)
    if result.paired is not None:
        result.paired.to_csv(out / "paired.csv", index=False)
        files.append(out / "paired.csv")
    for name, figure in result.figures.items():
        figure.savefig(out / name, dpi=DPI)
    return [*files, *(out / name for name in result.figures)]


def log_to_parents(result: Report, tracking_uri: str, files: Sequence[Path]) -> None:
    """``files`` (the report's, the executed notebook) as artifacts (``report/``) of the sweep's parent run(s)."""
    mlflow_client = client(tracking_uri, create=False)  # the store the report was read from
    for run_id in result.parent_run_ids:
        for path in files:
            mlflow_client.log_artifact(run_id, str(path), artifact_path="report")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vqlab.report",
        description="Render a sweep's (or any experiment's) comparison table and figures from MLflow.",
    )
    parser.add_argument("experiment", help="the MLflow experiment: a sweep's name, or tracking.experiment of the runs")
    parser.add_argument("--sweep", help="only runs tagged sweep=SWEEP (default: every run of the experiment)")
    parser.add_argument(
        "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<root>/mlflow.db)"
    )
    parser.add_argument("--root", default="runs", help="the runs root (default: runs)")
    parser.add_argument("--out", type=Path, help="where the files go (default: <root>/<experiment>/report)")
    parser.add_argument(
        "--reference",
        metavar="VARIANT",
        action="append",
        help="compare every other variant with this one: differences paired by seed, their 95%% intervals, "
        "and a bootstrap over the validation crops (repeat it for several references, each a table)",
    )
    parser.add_argument(
        "--notebook", action="store_true", help="also execute notebooks/compare.ipynb into <out>/compare.ipynb"
    )
    parser.add_argument(
        "--readme-figures",
        type=Path,
        metavar="DIR",
        help=f"also save {' and '.join(README_FIGURES)} into DIR (the README's: docs/figures)",
    )
    args = parser.parse_args(argv)
    out = args.out or Path(args.root) / args.experiment / "report"
    try:
        result = render(args.experiment, args.tracking_uri, args.sweep, out, args.root, args.reference)
    except UserError as err:  # bad input is one line; anything else is a bug and keeps its traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    uri = store(args.tracking_uri, args.root)
    log_to_parents(result, uri, result.files)
    print(result.markdown)
    print(f"wrote {', '.join(str(path) for path in result.files)}")
    if args.readme_figures:
        print(f"saved {', '.join(str(path) for path in readme_figures(result, args.readme_figures))}")
    if args.notebook:
        executed = out / "compare.ipynb"
        parameters = {"experiment": args.experiment, "sweep": args.sweep or "", "root": str(args.root)}
        parameters |= {
            "tracking_uri": args.tracking_uri or "",
            "out": str(out),
            "reference": ",".join(args.reference or []),
        }
        execute(parameters, executed, notebook=COMPARE_NOTEBOOK)
        log_to_parents(result, uri, [executed])  # once it ran: a notebook that failed is not the report's
        print(f"executed {executed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
