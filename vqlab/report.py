"""Results tables and figures rendered from MLflow: ``python -m vqlab.report <sweep-or-experiment>``.

    python -m vqlab.report zoo                          # prints the table; writes runs/zoo/report/
    python -m vqlab.report zoo --tracking-uri http://mlflow:5000 --out results/zoo

The rows are the runs of one MLflow experiment (a sweep named S is the experiment S). When some runs
are nested under a parent (a sweep's variants) only those count, one per variant: the newest run of
that name. Only runs that FINISHED (MLflow's status) and logged ``val/l1`` are rows: a failed run
(one that diverged still logged its step-0 metrics) or an unfinished one (still running, or killed
before it could say) is listed under the table by name and status, never shown as a result; a
sweep's parent run is neither. Below the runs come the two trivial codecs measured on the same
validation crops (``baseline/*``, ``baseline_palette/*``): one row each, or one per distinct result
when the runs differ (a palette row per code budget).

Columns are the seed study's (name, levels, fid, l1, lpips, codebook usage) and then psnr, ssim,
perplexity and bits/token, all from the final ``val/*`` metrics, and train usage: the codebook
usage of the final checkpoint on training crops (``eval_train/codebook_usage``). A metric the run did not log
(``fid`` and ``lpips`` when their weights were absent; bits/token of a continuous quantizer) is
missing: ``NaN`` in the frame, ``—`` in the table, empty in the CSV; never 0. The markdown rounds
as ``FORMATS`` says; the CSV keeps every digit MLflow stored.

``notebooks/compare.ipynb`` runs the same functions with ``experiment`` / ``sweep`` parameters.
MLflow is read through ``MlflowClient`` with an explicit store (``vqlab.tracking.client``), not
``mlflow.search_runs``, whose process-global tracking URI would rewrite ``$MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from vqlab import tables
from vqlab.config import TrackingConfig
from vqlab.errors import UserError
from vqlab.notebook import execute
from vqlab.tracking import client, mlflow_uri

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
    # the final checkpoint's usage on training crops (``vqlab.evaluate --split train``, which
    # run.ipynb runs): tells a dead code from one the held-out validation photos do not need
    "train usage": "eval_train/codebook_usage",
}
COLUMNS = ("name", "levels", *METRICS)
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
    "train usage": 4,
}
MISSING = tables.MISSING
BASELINE_METRICS = {"l1": "l1", "psnr": "psnr", "ssim": "ssim"}
BLOCK_MEAN, PALETTE = "block mean colour", "palette (same code budget)"
CURVE_KEYS = ("train/l1", "train/loss")  # the first one a run logged is its training curve
FIGURES = ("l1_vs_bits.png", "usage.png", "curves.png")
FINISHED = "FINISHED"  # MLflow's status of a run that ended well; only those are results


COMPARE_NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "compare.ipynb"


class ReportError(UserError, LookupError):
    """No experiment of that name, or no run in it that validated."""


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
    runs, token = [], None
    while True:
        page = mlflow_client.search_runs(
            [found.experiment_id], query, order_by=["attributes.start_time DESC"], page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
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
        "status": run.info.status,
        **{f"metrics.{k}": v for k, v in run.data.metrics.items()},
        **{f"params.{k}": v for k, v in run.data.params.items()},
        **{f"tags.{k}": v for k, v in run.data.tags.items()},
    }


def results_and_others(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that are results if they finished, oldest first (a sweep's order), with a ``name``
    column: a sweep's variants (runs with a parent), the newest run of each name; for an experiment
    that is not a sweep, every run."""
    runs = runs.assign(name=[run_name(run) for _, run in runs.iterrows()])
    if "tags.mlflow.parentRunId" in runs and runs["tags.mlflow.parentRunId"].notna().any():
        runs = runs[runs["tags.mlflow.parentRunId"].notna()]
        runs = runs.sort_values("start_time", ascending=False, kind="stable").drop_duplicates("name")
    return runs.sort_values("start_time", kind="stable").reset_index(drop=True)


def finished(runs: pd.DataFrame) -> pd.Series:
    """Which runs FINISHED (a frame without ``status``, made by hand, holds finished runs)."""
    return runs["status"] == FINISHED if "status" in runs else pd.Series(True, index=runs.index)


def rows_of(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that are rows, oldest first: of ``results_and_others``, those that FINISHED."""
    runs = results_and_others(runs)
    return runs[finished(runs)].reset_index(drop=True)


def unfinished(runs: pd.DataFrame) -> pd.DataFrame:
    """``name``, ``status`` and ``run_id`` of the runs that would be rows but did not finish
    (``FAILED``, ``KILLED``, or ``RUNNING``/``SCHEDULED`` still or forever), oldest first."""
    runs = results_and_others(runs)
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


def comparison(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run (``rows_of``) and then the trivial codecs: ``COLUMNS`` plus ``method`` (the
    quantizer, or the codec) and ``run_id`` (empty for the codecs). Missing metrics are ``NaN``."""
    runs = rows_of(runs)
    rows = []
    for _, run in runs.iterrows():
        params = {
            k.removeprefix("params."): v for k, v in run.items() if k.startswith("params.") and isinstance(v, str)
        }
        row = {"name": run["name"], "levels": describe(params)}
        row |= {column: metric(run, key) for column, key in METRICS.items()}
        rows.append(row | {"method": params.get("quantizer.name", MISSING), "run_id": run["run_id"]})
    rows += baseline_rows(runs)
    return pd.DataFrame(rows, columns=[*COLUMNS, "method", "run_id"])


def baseline_rows(runs: pd.DataFrame) -> list[dict]:
    """The block mean colour codec and the palette codec, one row per distinct result over the runs."""
    rows = []
    for prefix, label in (("baseline", BLOCK_MEAN), ("baseline_palette", PALETTE)):
        seen: list[dict] = []
        for _, run in runs.iterrows():
            values = {column: metric(run, f"{prefix}/{key}") for column, key in BASELINE_METRICS.items()}
            if math.isnan(values["l1"]):
                continue  # a run from before the baselines were logged
            if prefix == "baseline_palette":
                colors = metric(run, "baseline_palette/colors")
                values |= {"levels": f"{colors:.0f} colours", "bits/token": math.log2(colors)}
            if values not in seen:
                seen.append(values)
        seen.sort(key=lambda values: values.get("bits/token", 0.0))
        rows += [{"name": label, "levels": MISSING, **values, "method": label, "run_id": ""} for values in seen]
    return rows


def cell(column: str, value) -> str:
    """A value of ``column`` as the markdown table shows it (``FORMATS``)."""
    return tables.cell(value, f".{FORMATS[column]}f" if column in FORMATS else "")


def markdown(table: pd.DataFrame) -> str:
    """``table`` (from ``comparison``) as a markdown table of ``COLUMNS``; missing values are ``—``."""
    return tables.markdown(COLUMNS, ([cell(c, row[c]) for c in COLUMNS] for _, row in table.iterrows()))


# --- figures --------------------------------------------------------------------------------------
def curves(runs: pd.DataFrame, tracking_uri: str) -> pd.DataFrame:
    """Training curves from MLflow's metric history: ``name``, ``metric``, ``step``, ``value`` for
    each row run, its first logged key of ``CURVE_KEYS``."""
    mlflow_client = client(tracking_uri, create=False)  # reading never creates a store
    points = []
    for _, run in rows_of(runs).iterrows():
        key = next((k for k in CURVE_KEYS if f"metrics.{k}" in run and not pd.isna(run[f"metrics.{k}"])), None)
        if key is None:
            continue
        history = sorted(mlflow_client.get_metric_history(run["run_id"], key), key=lambda m: m.step)
        points += [{"name": run["name"], "metric": key, "step": m.step, "value": m.value} for m in history]
    return pd.DataFrame(points, columns=["name", "metric", "step", "value"])


def figures(table: pd.DataFrame, history: pd.DataFrame) -> dict:
    """``FIGURES`` name -> matplotlib Figure: L1 against bits per token with one line per method
    (points sorted by bits; the palette codec is a method too), codebook usage of each run coloured
    by method, and the training curves. Figures are made without pyplot, so nothing is shown."""
    import seaborn as sns
    from matplotlib.figure import Figure

    made = {name: Figure(figsize=(6, 4), layout="constrained") for name in FIGURES}
    ax = made["l1_vs_bits.png"].subplots()
    for method, points in table.dropna(subset=["bits/token", "l1"]).groupby("method", sort=False):
        points = points.sort_values("bits/token")
        codec = method in (BLOCK_MEAN, PALETTE)
        ax.plot(points["bits/token"], points["l1"], marker="o", label=method, linestyle="--" if codec else "-")
    for _, run in table[table["bits/token"].isna() & (table["run_id"] != "")].iterrows():
        ax.axhline(run["l1"], linestyle=":", color="grey", label=f"{run['name']} (continuous)")
    ax.set(xlabel="bits per token", ylabel="val L1 (lower is better)", title="L1 vs bits per token")
    ax.legend(fontsize="small")

    ax = made["usage.png"].subplots()
    runs = table[(table["run_id"] != "") & table["codebook usage"].notna()]
    sns.barplot(runs, x="name", y="codebook usage", hue="method", dodge=False, ax=ax)
    ax.set(ylim=(0, 1), xlabel="", title="codebook usage")
    ax.tick_params(axis="x", labelrotation=45)

    ax = made["curves.png"].subplots()
    for (name, key), points in history.groupby(["name", "metric"], sort=False):
        ax.plot(points["step"], points["value"], label=f"{name} ({key})")
    ax.set(xlabel="step", ylabel=", ".join(history["metric"].unique()), yscale="log", title="training curves")
    if not history.empty:
        ax.legend(fontsize="small")
    return made


# --- the report -----------------------------------------------------------------------------------
@dataclass
class Report:
    table: pd.DataFrame
    markdown: str
    figures: dict
    files: list[Path]
    parent_run_ids: list[str]
    unfinished: pd.DataFrame  # name, status, run_id of the runs that failed or did not finish


def render(
    experiment: str,
    tracking_uri: str | None = None,
    sweep: str | None = None,
    out: str | Path | None = None,
    root: str | Path = "runs",
) -> Report:
    """Read the runs, build the table and figures and, with ``out``, write ``table.md``,
    ``table.csv`` and the figures there. ``parent_run_ids``: the parents of the rows' runs."""
    uri = store(tracking_uri, root)
    runs = fetch_runs(experiment, uri, sweep)
    table = comparison(runs)
    made = figures(table, curves(runs, uri))
    parents = sorted(set(rows_of(runs).get("tags.mlflow.parentRunId", pd.Series(dtype=object)).dropna()))
    others = unfinished(runs)
    text = "\n\n".join(part for part in (markdown(table), unfinished_markdown(others)) if part)
    result = Report(table, text, made, [], parents, others)
    if out is not None:
        result.files = write(result, Path(out))
    return result


def write(result: Report, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(result.markdown + "\n")
    result.table.to_csv(out / "table.csv", index=False)
    for name, figure in result.figures.items():
        figure.savefig(out / name, dpi=120)
    return [out / "table.md", out / "table.csv", *(out / name for name in result.figures)]


def log_to_parents(result: Report, tracking_uri: str) -> None:
    """The report's files as artifacts (``report/``) of the sweep's parent run(s)."""
    mlflow_client = client(tracking_uri, create=False)  # the store the report was read from
    for run_id in result.parent_run_ids:
        for path in result.files:
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
        "--notebook", action="store_true", help="also execute notebooks/compare.ipynb into <out>/compare.ipynb"
    )
    args = parser.parse_args(argv)
    out = args.out or Path(args.root) / args.experiment / "report"
    try:
        result = render(args.experiment, args.tracking_uri, args.sweep, out, args.root)
    except UserError as err:  # bad input is one line; anything else is a bug and keeps its traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    log_to_parents(result, store(args.tracking_uri, args.root))
    print(result.markdown)
    print(f"wrote {', '.join(str(path) for path in result.files)}")
    if args.notebook:
        executed = out / "compare.ipynb"
        parameters = {"experiment": args.experiment, "sweep": args.sweep or "", "root": str(args.root)}
        parameters |= {"tracking_uri": args.tracking_uri or "", "out": str(out)}
        execute(parameters, executed, notebook=COMPARE_NOTEBOOK)
        print(f"executed {executed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
