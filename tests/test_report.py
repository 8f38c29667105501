"""``vqlab.report`` and ``notebooks/compare.ipynb``: the comparison table of a sweep read from MLflow.

One MLflow store per module: a sweep ``S`` (a parent run, three variants of 4 smoke steps with
different codebook budgets) and one run in another experiment that is not a sweep.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import vqlab
from vqlab import report
from vqlab.evaluate import evaluate_run

ROOT = Path(__file__).resolve().parents[1]
SWEEP = "S"
# the table's columns and the MLflow metrics they show, written out independently of vqlab.report
SHOWN = {
    "fid": "val/fid",
    "l1": "val/l1",
    "lpips": "val/lpips",
    "codebook usage": "val/codebook_usage",
    "psnr": "val/psnr",
    "ssim": "val/ssim",
    "perplexity": "val/perplexity",
    "bits/token": "model/bits_per_token",
    "train usage": "eval_train/codebook_usage",
}
DECIMALS = {"fid": 2, "l1": 4, "lpips": 4, "codebook usage": 4, "psnr": 2, "ssim": 4, "perplexity": 1, "bits/token": 2}
DECIMALS["train usage"] = 4
VARIANTS = {
    "fsq": {},
    "fsq_small": {"quantizer.levels": [8, 5, 5]},
    "lfq": {"quantizer.name": "lfq", "quantizer.dim": 6},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """``(uri, root, parent run id)`` of the module's MLflow store."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("runs")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(SWEEP, artifact_location=(root / "mlartifacts").as_uri())
    parent = client.create_run(experiment_id, run_name=SWEEP).info.run_id
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors on a shared CPU: a second thread mostly waits
    for variant, overrides in VARIANTS.items():
        tracking = {"tracking.experiment": SWEEP, "tracking.parent_run_id": parent}
        tracking |= {"tracking.tags": {"sweep": SWEEP, "variant": variant}}
        result = vqlab.fit(smoke(root, uri, variant, **tracking, **overrides))
        if variant == "fsq":  # one row measured on training crops too, as run.ipynb does; the others miss it
            evaluate_run(result.run_dir, metrics=["codebook"], split="train")
    vqlab.fit(smoke(root, uri, "alone", **{"tracking.experiment": "single"}))
    torch.set_num_threads(threads)
    return uri, root, parent


def smoke(root, uri, name, **overrides):
    base = {"tracking.root": str(root), "tracking.mlflow": True, "tracking.mlflow_uri": uri}
    base |= {"tracking.run_name": name, "train.steps": 4, "train.log_every": 2, "optim.warmup_steps": 0}
    return vqlab.config.load("smoke", base | overrides)


def stored(uri):
    """Every run's metrics as MLflow holds them, by run name, read without vqlab.report."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = {}
    for name in (SWEEP, "single"):
        experiment = client.get_experiment_by_name(name)
        runs |= {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    return runs


def test_table_numbers_are_the_metrics_mlflow_stored(store):
    uri, _, _ = store
    table = report.render(SWEEP, uri).table
    runs = stored(uri)
    model_rows = table[table["run_id"] != ""]
    assert list(model_rows["name"]) == list(VARIANTS)  # the sweep's order; the parent is no row
    for _, row in model_rows.iterrows():
        metrics = runs[row["name"]].data.metrics
        assert row["run_id"] == runs[row["name"]].info.run_id
        assert [c for c in table.columns if c in SHOWN] == list(SHOWN)
        for column, key in SHOWN.items():
            if key in metrics:
                assert row[column] == metrics[key], (row["name"], column)
            else:
                assert pd.isna(row[column]), (row["name"], column)
    by_name = model_rows.set_index("name")
    assert by_name.loc["fsq", "levels"] == "8-5-5-5" and by_name.loc["fsq_small", "levels"] == "8-5-5"
    assert by_name.loc["lfq", "levels"] == "6 bits" and by_name.loc["lfq", "method"] == "lfq"
    assert by_name.loc["fsq", "bits/token"] == pytest.approx(math.log2(1000))
    assert by_name.loc["fsq", "train usage"] > 0 and by_name.drop(index="fsq")["train usage"].isna().all()


def test_metrics_that_were_not_logged_are_missing_not_zero(store):
    uri, _, _ = store
    result = report.render(SWEEP, uri)
    assert not any(key in run.data.metrics for run in stored(uri).values() for key in ("val/fid", "val/lpips"))
    assert result.table["fid"].isna().all() and result.table["lpips"].isna().all()
    header, _, *lines = result.markdown.splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    for line in lines:
        cells = dict(zip(columns, (c.strip() for c in line.strip("|").split("|")), strict=True))
        assert cells["fid"] == report.MISSING and cells["lpips"] == report.MISSING
    assert report.cell("l1", 0.0) == "0.0000" and report.cell("l1", math.nan) == report.MISSING


def test_every_markdown_table_is_one_renderers():
    """Floats rounded as the column says, counts and text as they are, missing values a dash."""
    from vqlab import tables

    cells = [tables.cell(v, ".4g") for v in (0.0123456, float("nan"), None, 65536, np.float32(0.5), "fsq")]
    assert cells == ["0.01235", "—", "—", "65536", "0.5", "fsq"]
    assert tables.cell(math.nan, ".2f", missing="-") == "-"
    assert tables.markdown(["a", "b"], [["1", "—"]]) == "| a | b |\n|---|---|\n| 1 | — |"


def test_markdown_shows_the_stored_numbers_in_the_documented_format(store):
    uri, _, _ = store
    result = report.render(SWEEP, uri)
    fsq = stored(uri)["fsq"].data.metrics
    line = next(line for line in result.markdown.splitlines() if line.startswith("| fsq |"))
    expected = [f"{fsq[key]:.{DECIMALS[column]}f}" if key in fsq else report.MISSING for column, key in SHOWN.items()]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells == ["fsq", "8-5-5-5", *expected]


def test_baseline_rows_one_per_distinct_code_budget(store):
    uri, _, _ = store
    table = report.render(SWEEP, uri).table
    runs = stored(uri)
    block = table[table["name"] == report.BLOCK_MEAN]
    assert len(block) == 1  # the same crops and downsampling for every variant
    assert block["l1"].item() == runs["fsq"].data.metrics["baseline/l1"]
    palette = table[table["name"] == report.PALETTE]
    budgets = {runs[v].data.metrics["baseline_palette/colors"]: runs[v].data.metrics for v in VARIANTS}
    assert len(palette) == len(budgets) >= 2
    for _, row in palette.iterrows():
        colors = float(row["levels"].split()[0])
        assert row["l1"] == budgets[colors]["baseline_palette/l1"]
        assert row["psnr"] == budgets[colors]["baseline_palette/psnr"]
        assert row["bits/token"] == math.log2(colors)
        assert pd.isna(row["codebook usage"]) and pd.isna(row["fid"])


def test_an_experiment_that_is_not_a_sweep_has_every_run_as_a_row(store):
    uri, _, _ = store
    table = report.render("single", uri).table
    assert list(table["name"]) == ["alone", report.BLOCK_MEAN, report.PALETTE]
    assert table["l1"].iloc[0] == stored(uri)["alone"].data.metrics["val/l1"]


def test_a_rerun_variant_is_one_row_its_newest_run():
    runs = pd.DataFrame(
        {
            "run_id": ["p", "a1", "b", "a2", "solo"],
            "start_time": [0, 1, 2, 3, 4],
            "tags.variant": [None, "a", "b", "a", None],
            "tags.mlflow.runName": ["S", "a", "b", "a", "solo"],
            "tags.mlflow.parentRunId": [None, "p", "p", "p", None],
        }
    )
    assert list(report.rows_of(runs)["run_id"]) == ["b", "a2"]
    alone = runs[runs["tags.mlflow.parentRunId"].isna()]
    assert list(report.rows_of(alone)["name"]) == ["S", "solo"]


def test_curves_are_mlflow_metric_history(store):
    from mlflow import MlflowClient

    uri, _, _ = store
    history = report.curves(report.fetch_runs(SWEEP, uri), uri)
    assert set(history["name"]) == set(VARIANTS) and set(history["metric"]) == {"train/l1"}
    expected = MlflowClient(uri).get_metric_history(stored(uri)["fsq"].info.run_id, "train/l1")
    fsq = history[history["name"] == "fsq"]
    assert list(fsq["step"]) == [2, 4] and list(fsq["value"]) == [
        m.value for m in sorted(expected, key=lambda m: m.step)
    ]


def test_cli_prints_the_table_writes_files_and_logs_them_to_the_parent(store, tmp_path, capsys):
    from mlflow import MlflowClient

    uri, _, parent = store
    out = tmp_path / "report"
    assert report.main([SWEEP, "--tracking-uri", uri, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert report.render(SWEEP, uri).markdown in printed
    assert (out / "table.md").read_text().strip() == report.render(SWEEP, uri).markdown
    csv = pd.read_csv(out / "table.csv", keep_default_na=False, na_values=[""])
    assert csv["fid"].isna().all() and list(csv["name"])[:3] == list(VARIANTS)
    for name in report.FIGURES:
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    logged = {a.path for a in MlflowClient(uri).list_artifacts(parent, "report")}
    assert {f"report/{name}" for name in ("table.md", "table.csv", *report.FIGURES)} <= logged


def test_cli_names_an_unknown_experiment_in_one_line(store):
    uri, root, _ = store
    command = [sys.executable, "-m", "vqlab.report", "nope", "--tracking-uri", uri]
    done = subprocess.run(command, capture_output=True, text=True, cwd=root, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [f"error: no MLflow experiment named 'nope' in {uri}"]


def test_a_sweep_tag_that_matches_no_run_is_a_user_error(store):
    uri, _, _ = store
    with pytest.raises(report.ReportError, match="tagged sweep='other'"):
        report.render(SWEEP, uri, sweep="other")
    with pytest.raises(report.ReportError, match="quote"):
        report.render(SWEEP, uri, sweep="it's")


def test_compare_notebook_executes_and_shows_the_table(store, tmp_path, monkeypatch, capsys):
    """``--notebook`` runs compare.ipynb through the project's kernel (the one the sweeps use)."""
    import nbformat

    monkeypatch.setenv("MPLBACKEND", "Agg")
    uri, _, _ = store
    out = tmp_path / "report"
    assert report.main([SWEEP, "--sweep", SWEEP, "--tracking-uri", uri, "--out", str(out), "--notebook"]) == 0
    executed = out / "compare.ipynb"
    assert f"executed {executed}" in capsys.readouterr().out
    outputs = [o for c in nbformat.read(executed, as_version=4).cells if c.cell_type == "code" for o in c.outputs]
    shown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert shown == [report.render(SWEEP, uri).markdown]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == len(report.FIGURES)


@pytest.mark.parametrize(
    ("params", "shape"),
    [
        ({"quantizer.name": "learned_grid", "quantizer.levels": "[8, 5, 5, 5]"}, "8-5-5-5"),
        ({"quantizer.name": "simvq", "quantizer.codebook_size": "16384"}, "K=16384"),
        ({"quantizer.name": "ibq", "quantizer.codebook_size": "1024"}, "K=1024"),
        ({"quantizer.name": "bsq", "quantizer.dim": "14"}, "14 bits"),
        ({"quantizer.name": "something_new"}, report.MISSING),
    ],
)
def test_each_quantizer_family_names_its_codebook_shape(params, shape):
    assert report.describe(params) == shape


def test_failed_and_unfinished_runs_are_listed_under_the_table_not_as_rows(tmp_path):
    """A diverged variant logged its step-0 metrics and then FAILED; another is still RUNNING (or
    was killed); one crashed before validating: none of them is a result."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("F", artifact_location=(tmp_path / "mlartifacts").as_uri())
    parent = client.create_run(experiment, run_name="F").info.run_id
    statuses = {"ok": "FINISHED", "diverged": "FAILED", "killed": "RUNNING", "crashed": "FAILED"}
    for i, (name, status) in enumerate(statuses.items()):
        tags = {"mlflow.parentRunId": parent, "variant": name, "sweep": "F"}
        run = client.create_run(experiment, run_name=name, tags=tags, start_time=1000 + i).info.run_id
        if name != "crashed":
            metrics = {"val/l1": 0.1 + i, "baseline/l1": 0.2, "model/bits_per_token": 10.0, "train/l1": 0.3}
            now = 0
            client.log_batch(
                run,
                metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                params=[Param("quantizer.name", "fsq"), Param("quantizer.levels", "[8, 5, 5, 5]")],
            )
        if status != "RUNNING":
            client.set_terminated(run, status)
    client.set_terminated(parent, "FINISHED")

    result = report.render("F", uri, out=tmp_path / "report")
    runs = result.table[result.table["run_id"] != ""]
    assert list(runs["name"]) == ["ok"]
    assert list(result.unfinished["name"]) == ["diverged", "killed", "crashed"]
    assert list(result.unfinished["status"]) == ["FAILED", "RUNNING", "FAILED"]
    table, _, listed = result.markdown.partition("\n\n")
    assert table == report.markdown(result.table)
    assert listed.splitlines() == [
        "failed or unfinished, not results:",
        "- diverged (FAILED)",
        "- killed (RUNNING)",
        "- crashed (FAILED)",
    ]
    assert (tmp_path / "report" / "table.md").read_text() == result.markdown + "\n"
    assert set(report.curves(report.fetch_runs("F", uri), uri)["name"]) == {"ok"}
