"""``vqlab.report`` and ``notebooks/compare.ipynb``: the comparison table of a sweep read from MLflow.

One MLflow store per module: a sweep ``S`` (a parent run, three variants of 4 smoke steps with
different codebook budgets) and one run in another experiment that is not a sweep.
"""

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

import vqlab
from vqlab import report
from vqlab.config import TrackingConfig
from vqlab.evaluate import evaluate_run
from vqlab.tracking import TRIVIAL_CODECS, create_run

from . import helpers

BLOCK_MEAN, PALETTE = TRIVIAL_CODECS["baseline"], TRIVIAL_CODECS["baseline_palette"]

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
    "measured bits": "val/measured_bits",
    "train usage": "eval_train/codebook_usage",
}
DECIMALS = {"fid": 2, "l1": 4, "lpips": 4, "codebook usage": 4, "psnr": 2, "ssim": 4, "perplexity": 1, "bits/token": 2}
DECIMALS |= {"measured bits": 2, "train usage": 4}
VARIANTS = {
    "fsq": {},
    "fsq_small": {"quantizer.levels": [8, 5, 5]},
    "lfq": {"quantizer.name": "lfq", "quantizer.dim": 6},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """``(uri, root, parent run id)`` of the module's MLflow store."""
    root = tmp_path_factory.mktemp("runs")
    uri = f"sqlite:///{root}/mlflow.db"
    # the experiment and the parent are made as a sweep makes them (vqlab.sweep.Tracker.parent)
    parent = create_run(
        TrackingConfig(root=str(root), experiment=SWEEP, mlflow_uri=uri), SWEEP, {"sweep": SWEEP}
    ).run_id
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
    # Miller-Madow adds to the plug-in entropy (log2 perplexity); a 4-step model uses a few codes
    for _, row in by_name.iterrows():
        assert math.log2(row["perplexity"]) < row["measured bits"] < row["bits/token"]
    assert by_name.loc["fsq", "train usage"] > 0 and by_name.drop(index="fsq")["train usage"].isna().all()


def test_metrics_that_were_not_logged_are_missing_not_zero(store):
    uri, _, _ = store
    result = report.render(SWEEP, uri)
    assert not any(key in run.data.metrics for run in stored(uri).values() for key in ("val/fid", "val/lpips"))
    assert result.table["fid"].isna().all() and result.table["lpips"].isna().all()
    header, _, *lines = result.markdown.split("\n\n")[0].splitlines()  # the table, not the notes under it
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
    assert cells == ["fsq", "8-5-5-5", "1", *expected, report.MISSING]  # n = 1: no interval; no floor: no gap


@pytest.mark.parametrize("prefix", ["baseline_palette", "baseline_kmeans"])
def test_baseline_rows_one_per_distinct_code_budget(store, prefix):
    uri, _, _ = store
    result = report.render(SWEEP, uri)
    table = result.table
    runs = stored(uri)
    block = table[table["name"] == TRIVIAL_CODECS["baseline"]]
    assert len(block) == 1  # the same crops and downsampling for every variant
    assert block["l1"].item() == runs["fsq"].data.metrics["baseline/l1"]
    palette = table[table["name"] == TRIVIAL_CODECS[prefix]]
    budgets = {runs[v].data.metrics[f"{prefix}/colors"]: runs[v].data.metrics for v in VARIANTS}
    assert len(palette) == len(budgets) >= 2
    for _, row in palette.iterrows():
        colors = float(row["levels"].split()[0])
        assert row["l1"] == budgets[colors][f"{prefix}/l1"]
        assert row["psnr"] == budgets[colors][f"{prefix}/psnr"]
        assert row["bits/token"] == math.log2(colors)
        assert pd.isna(row["codebook usage"]) and pd.isna(row["fid"])
    lines = {line.get_label(): line for line in result.figures["l1_vs_bits.png"].axes[0].lines}
    assert lines[TRIVIAL_CODECS[prefix]].get_linestyle() == "--"  # a codec, beside the quantizers' lines


def test_an_experiment_that_is_not_a_sweep_has_every_run_as_a_row(store):
    uri, _, _ = store
    table = report.render("single", uri).table
    assert list(table["name"]) == ["alone", *TRIVIAL_CODECS.values()]
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
    assert set(history["name"]) == set(VARIANTS) and set(history["metric"]) == {"train/l1", "val/l1"}
    expected = MlflowClient(uri).get_metric_history(stored(uri)["fsq"].info.run_id, "train/l1")
    fsq = history[(history["name"] == "fsq") & (history["metric"] == "train/l1")]
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
    assert {f"report/{name}" for name in ("table.md", "table.csv", "seeds.csv", *report.FIGURES)} <= logged


def test_l1_against_bits_puts_each_trained_run_at_its_measured_bits(store):
    uri, _, _ = store
    result = report.render(SWEEP, uri)
    runs = stored(uri)
    axes = result.figures["l1_vs_bits.png"].axes[0]
    lines = {line.get_label(): line for line in axes.lines}
    drawn = sorted(x for method in ("fsq", "lfq") for x in lines[method].get_xdata())  # a line per method
    assert drawn == sorted(runs[v].data.metrics["val/measured_bits"] for v in VARIANTS)
    assert not set(drawn) & {runs[v].data.metrics["model/bits_per_token"] for v in VARIANTS}
    # one seed: the x error bar is the run's bootstrap interval over the crops
    drawn = sorted(tuple(segment[:, 0]) for bars in axes.containers for segment in bars.lines[2][0].get_segments())
    logged = [
        (runs[v].data.metrics["val/measured_bits_low"], runs[v].data.metrics["val/measured_bits_high"])
        for v in VARIANTS
    ]
    np.testing.assert_allclose(drawn, sorted(logged))
    assert "measured bits" in axes.get_xlabel()


def test_l1_against_bits_draws_intervals_over_seeds_codecs_and_floors():
    """A hand-made table: ``a`` at 3 seeds, ``b`` at one (its bootstrap interval), ``c`` continuous,
    the palette codec (no measured rate: its log2 colours) and the block mean colour."""
    rows = []
    for name, seed, measured, low, high in (("a", 0, 7.0, 6.9, 7.1), ("a", 1, 7.2, 7.1, 7.3), ("a", 2, 7.4, 7.3, 7.5)):
        rows.append({"name": name, "seed": seed, "measured bits": measured, "measured bits low": low})
        rows[-1] |= {"measured bits high": high, "bits/token": 10.0, "l1": 0.05 + seed / 1000}
    rows.append({"name": "b", "seed": pd.NA, "measured bits": 8.0, "measured bits low": 7.9, "measured bits high": 8.2})
    rows[-1] |= {"bits/token": 12.0, "l1": 0.045}
    rows.append({"name": "c", "seed": pd.NA, "l1": 0.03})
    seeds = pd.DataFrame(rows, columns=list(report.SEED_COLUMNS)).astype({"seed": "Int64"})
    seeds = seeds.assign(run_id=[f"r{i}" for i in range(len(seeds))], method=["fsq"] * 4 + ["identity"], levels="x")
    codecs = [{"name": PALETTE, "method": PALETTE, "bits/token": 9.0, "l1": 0.06, "run_id": ""}]
    codecs.append({"name": BLOCK_MEAN, "method": BLOCK_MEAN, "l1": 0.04, "run_id": ""})
    table = pd.DataFrame([report.aggregate(group) for group in report.variants(seeds)] + codecs)
    table = table.reindex(columns=list(report.CSV_COLUMNS))
    history = pd.DataFrame(columns=["variant", "name", "metric", "step", "value"])
    axes = report.figures(table, history, seeds)["l1_vs_bits.png"].axes[0]
    lines = {line.get_label(): line for line in axes.lines}
    assert list(lines["fsq"].get_xdata()) == pytest.approx([7.2, 8.0])  # measured, not log2 K
    assert list(lines[PALETTE].get_xdata()) == [9.0]  # the codec's log2 colours
    floors = {label: line.get_ydata()[0] for label, line in lines.items() if label.endswith("quantized)")}
    floors |= {label: line.get_ydata()[0] for label, line in lines.items() if label.endswith("continuous)")}
    assert floors == {"c (continuous)": 0.03, f"{BLOCK_MEAN} (unquantized)": 0.04}
    mean, width = t_interval([7.0, 7.2, 7.4])
    y_bars, x_bars = axes.containers  # L1 over a's seeds, then the bits of a (seeds) and b (bootstrap)
    y_drawn = [segment[:, 1] for segment in y_bars.lines[2][0].get_segments()]
    np.testing.assert_allclose(y_drawn, [t_bounds([0.05, 0.051, 0.052])])
    x_drawn = [segment[:, 0] for segment in x_bars.lines[2][0].get_segments()]
    np.testing.assert_allclose(x_drawn, [(mean - width, mean + width), (7.9, 8.2)])


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


@pytest.fixture(scope="module")
def with_notebook(store, tmp_path_factory):
    """The command with ``--notebook`` (and ``--reference fsq``) run once on the module's store:
    ``(its folder, what it printed)``."""
    out = tmp_path_factory.mktemp("notebook") / "report"
    uri, _, _ = store
    command = [SWEEP, "--sweep", SWEEP, "--tracking-uri", uri, "--out", str(out), "--reference", "fsq", "--notebook"]
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as printed:
        patch.setenv("MPLBACKEND", "Agg")
        assert report.main(command) == 0
    return out, printed.getvalue()


def test_compare_notebook_executes_shows_the_table_and_is_logged_to_the_parent(store, with_notebook):
    """``--notebook`` runs compare.ipynb through the project's kernel (the one the sweeps use), with
    the command's ``--reference``, and logs it beside the report's other files."""
    import nbformat
    from mlflow import MlflowClient

    uri, _, parent = store
    out, printed = with_notebook
    executed = out / "compare.ipynb"
    assert f"executed {executed}" in printed
    outputs = [o for c in nbformat.read(executed, as_version=4).cells if c.cell_type == "code" for o in c.outputs]
    shown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert shown == [report.render(SWEEP, uri, reference="fsq").markdown]  # the table and the paired comparison
    assert "paired with reference fsq" in shown[0]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == len([*report.FIGURES, report.RECONSTRUCTIONS])
    assert "report/compare.ipynb" in {a.path for a in MlflowClient(uri).list_artifacts(parent, "report")}


def rest(base: str, endpoint: str, body: dict | None = None) -> dict:
    """GET ``endpoint`` (with ``body`` as POST JSON) of MLflow's REST API, as the UI calls it."""
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/{endpoint}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.load(answer)


@pytest.fixture
def mlflow_server(store, tmp_path):
    """``mlflow server`` on the module's store, as a user starts it; its base URL once it answers."""
    uri, root, _ = store
    with helpers.mlflow_server(uri, root / "mlartifacts", tmp_path / "server.log") as base:
        yield base


def test_mlflow_server_shows_a_model_training_experiment_its_variants_and_the_report(
    store, with_notebook, mlflow_server
):
    """What MLflow's UI reads over REST: the experiment's kind, the sweep's parent with each
    variant nested under it (``mlflow.parentRunId``) holding its metrics, and the parent's report
    files, the executed notebook among them, served as written."""
    _, _, parent = store
    out, _ = with_notebook
    experiment = rest(mlflow_server, f"experiments/get-by-name?experiment_name={SWEEP}")["experiment"]
    assert {t["key"]: t["value"] for t in experiment["tags"]}["mlflow.experimentKind"] == "custom_model_development"
    runs = rest(mlflow_server, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})
    tags = {run["info"]["run_id"]: {t["key"]: t["value"] for t in run["data"]["tags"]} for run in runs["runs"]}
    assert "mlflow.parentRunId" not in tags[parent]
    children = {
        run["info"]["run_name"]: run
        for run in runs["runs"]
        if tags[run["info"]["run_id"]].get("mlflow.parentRunId") == parent
    }
    assert sorted(children) == sorted(VARIANTS)
    for name, run in children.items():
        assert tags[run["info"]["run_id"]]["variant"] == name and run["info"]["status"] == "FINISHED"
        assert "val/l1" in {m["key"] for m in run["data"]["metrics"]}
    listed = rest(mlflow_server, f"artifacts/list?run_id={parent}&path=report")
    files = {f["path"] for f in listed["files"]}
    assert {
        f"report/{name}" for name in ("table.md", "table.csv", "seeds.csv", "compare.ipynb", *report.FIGURES)
    } <= files
    with urllib.request.urlopen(
        f"{mlflow_server}/get-artifact?run_id={parent}&path=report/compare.ipynb", timeout=60
    ) as answer:
        assert answer.read() == (out / "compare.ipynb").read_bytes()


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
    table, made, listed = result.markdown.split("\n\n")
    assert table == report.markdown(result.table)
    assert made == "runs made at commit not recorded, threads not recorded, cpu not recorded"
    assert listed.splitlines() == [
        "failed or unfinished, not results:",
        "- diverged (FAILED)",
        "- killed (RUNNING)",
        "- crashed (FAILED)",
    ]
    assert (tmp_path / "report" / "table.md").read_text() == result.markdown + "\n"
    assert set(report.curves(report.fetch_runs("F", uri), uri)["name"]) == {"ok"}


# --- seeds: a store made with MlflowClient, no training ---------------------------------------------
SEEDED = "Z"
REF_L1 = {0: 0.0610, 1: 0.0600, 2: 0.0620}
# variant -> seed (None: no seed tag) -> val/l1; built so that ``better`` is resolved against ``ref``
# at 3 seeds and ``noisy`` is not; ``shifted`` shares no seed with ``ref`` (unpaired); ``partial``
# shares seeds 1 and 2; ``single`` ran once without a seed tag
SEEDED_L1 = {
    "ref": REF_L1,
    "better": {0: 0.0580, 1: 0.0575, 2: 0.0585},
    "noisy": {0: 0.0630, 1: 0.0570, 2: 0.0635},
    "shifted": {3: 0.0700, 4: 0.0710},
    "partial": {1: 0.0590, 2: 0.0615, 5: 0.0650},
    "single": {None: 0.0650},
}
CROPS = 40


def crop_l1(variant: str, seed) -> np.ndarray:
    """The per-image L1 a run of ``variant`` saved: its val/l1 plus noise of mean 0 over the crops,
    the same crop pattern for every run (crops are shared) and a little per run."""
    generator = np.random.default_rng([len(variant), -1 if seed is None else seed])
    pattern = np.random.default_rng(7).normal(0, 0.02, CROPS)
    noise = generator.normal(0, 0.002, CROPS)
    values = pattern + noise
    return SEEDED_L1[variant][seed] + values - values.mean()


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """``(uri, root)`` of a sweep ``Z`` of ``SEEDED_L1``'s runs, each nested under one parent and
    tagged as a sweep with seeds tags them; ``ref`` and ``better`` logged their per-image L1 as an
    MLflow artifact, ``partial`` has it in its run folder only (seeds 1 and 2), ``noisy`` has none.
    ``shifted`` ran from another commit, ``single`` with 2 threads."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from vqlab.runfolder import RunFolder

    root = tmp_path_factory.mktemp("seeded")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment(SEEDED, artifact_location=(root / "mlartifacts").as_uri())
    parent = client.create_run(experiment, run_name=SEEDED).info.run_id
    start = 1000
    for variant, by_seed in SEEDED_L1.items():
        for seed, l1 in by_seed.items():
            folder = RunFolder(root / SEEDED / variant / ("run" if seed is None else f"seed{seed}"))
            folder.path.mkdir(parents=True)
            tags = {
                "mlflow.parentRunId": parent,
                "sweep": SEEDED,
                "variant": variant,
                "vqlab.run_dir": str(folder.path),
            }
            # the sweep's commit, and the run's own (what the report reads; "single" predates that tag)
            tags |= {"git_commit": "aaaa111"}
            tags |= {} if variant == "single" else {"vqlab.commit": "bbbb222" if variant == "shifted" else "aaaa111"}
            tags |= {"vqlab.threads": "2" if variant == "single" else "1", "vqlab.torch": "2.9", "vqlab.device": "cpu"}
            tags |= {"vqlab.cpu": "B (AVX2)" if variant == "shifted" else "A (AVX512)"}
            if seed is not None:
                tags["seed"] = str(seed)
            name = variant if seed is None else f"{variant}/seed{seed}"
            start += 1
            run = client.create_run(experiment, run_name=name, tags=tags, start_time=start).info.run_id
            usage = 0.5 + 0.01 * (seed or 0)  # the same for every variant: differences exactly 0
            metrics = {"val/l1": l1, "val/psnr": 30 - 100 * l1, "val/ssim": 0.7 - l1, "val/codebook_usage": usage}
            metrics |= {"model/bits_per_token": 10.0, "baseline/l1": 0.04, "train/l1": 0.1}
            client.log_batch(
                run,
                metrics=[Metric(k, v, 0, 4) for k, v in metrics.items()],
                params=[Param("quantizer.name", "fsq"), Param("quantizer.levels", "[8, 5, 5, 5]")],
            )
            if variant in ("ref", "better", "partial") and not (variant == "partial" and seed == 5):
                np.save(folder.per_image_l1(), crop_l1(variant, seed))
                if variant != "partial":
                    client.log_artifact(run, str(folder.per_image_l1()))
                    folder.per_image_l1().unlink()  # only in MLflow
            client.set_terminated(run, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    return uri, root


def t_interval(values) -> tuple[float, float]:
    """Mean and 95% half-width, computed here with numpy and scipy.stats.t."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return values.mean(), math.nan
    return values.mean(), stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))


def t_bounds(values) -> tuple[float, float]:
    mean, width = t_interval(values)
    return mean - width, mean + width


def markdown_rows(text: str) -> dict[str, dict[str, str]]:
    """The first markdown table of ``text``: first cell -> column -> cell."""
    header, _, *lines = text.split("\n\n")[0].splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows = [dict(zip(columns, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines]
    return {row[columns[0]]: row for row in rows}


def test_seeds_aggregate_to_mean_interval_and_n(seeded, tmp_path):
    uri, _ = seeded
    result = report.render(SEEDED, uri, out=tmp_path / "report")
    rows = result.table.set_index("name")
    shown = markdown_rows(result.markdown)
    assert list(result.table["name"])[: len(SEEDED_L1)] == list(SEEDED_L1)  # in the order they started
    for variant, by_seed in SEEDED_L1.items():
        mean, width = t_interval(list(by_seed.values()))
        row = rows.loc[variant]
        assert row["n"] == len(by_seed) and row["l1_n"] == len(by_seed)
        assert row["l1"] == pytest.approx(mean, rel=1e-12)
        assert shown[variant]["n"] == str(len(by_seed))
        if len(by_seed) > 1:
            assert row["l1_ci"] == pytest.approx(width, rel=1e-12)
            assert shown[variant]["l1"] == f"{mean:.4f} ± {width:.4f}"
            assert row["seeds"] == " ".join(map(str, by_seed))
        else:  # one seed: no interval, never a made-up one
            assert pd.isna(row["l1_ci"]) and shown[variant]["l1"] == f"{mean:.4f}" and "±" not in shown[variant]["psnr"]
    assert rows.loc["ref", "codebook usage_ci"] == pytest.approx(t_interval([0.5, 0.51, 0.52])[1])
    # the trivial codec rows stay as they are: one row, no n
    block = TRIVIAL_CODECS["baseline"]
    assert shown[block]["l1"] == "0.0400" and shown[block]["n"] == report.MISSING
    # the CSVs: mean, half-width and n per metric; the per-seed values in seeds.csv
    csv = pd.read_csv(tmp_path / "report" / "table.csv").set_index("name")
    assert csv.loc["better", "l1"] == pytest.approx(t_interval(list(SEEDED_L1["better"].values()))[0], rel=1e-12)
    assert csv.loc["better", "l1_ci"] == pytest.approx(t_interval(list(SEEDED_L1["better"].values()))[1], rel=1e-12)
    assert csv.loc["better", "l1_n"] == 3 and pd.isna(csv.loc["single", "l1_ci"])
    per_seed = pd.read_csv(tmp_path / "report" / "seeds.csv")
    partial = per_seed[per_seed["name"] == "partial"]
    assert dict(zip(partial["seed"], partial["l1"], strict=True)) == SEEDED_L1["partial"]
    assert per_seed.loc[per_seed["name"] == "single", "seed"].isna().all()


def test_a_half_width_below_the_columns_decimals_keeps_a_significant_digit():
    assert report.width_cell("l1", 0.0012) == "0.0012"
    assert report.width_cell("l1", 0.00004) == "0.00004" and report.width_cell("psnr", 0.004) == "0.004"
    assert report.width_cell("l1", 0.0) == "0.0000"
    assert report.estimate("l1", 0.0606, 0.00123, 3, 3) == "0.0606 ± 0.0012"
    assert report.estimate("train usage", 0.5, math.nan, 1, 3) == "0.5000 (n=1)"  # one seed of three logged it


def test_a_setting_equal_over_seeds_has_no_interval_even_with_round_off():
    assert report.estimate("bits/token", math.log2(240), 3e-15, 3, 3) == "7.91"
    assert report.estimate("bits/token", 7.91, 0.02, 3, 3) == "7.91 ± 0.02"  # a setting that did differ


def test_notes_name_mixed_code_versions_thread_counts_and_cpus(seeded):
    uri, _ = seeded
    text = report.render(SEEDED, uri).markdown
    below = text.split("\n\n")[1]
    lines = below.splitlines()
    assert lines[0].startswith("± is the 95% confidence interval of the mean over the n seeds")
    assert "note: the rows come from different code versions: git_commit aaaa111 (13 runs), bbbb222 (2 runs)" in lines
    assert "note: the rows come from different thread counts: vqlab.threads 1 (14 runs), 2 (1 run)" in lines
    assert "note: the rows come from different CPUs: vqlab.cpu A (AVX512) (13 runs), B (AVX2) (2 runs)" in lines
    same = report.per_seed(report.fetch_runs(SEEDED, uri)).assign(git_commit="aaaa111", threads="1", cpu="A (AVX512)")
    assert lines[-1] == "runs made at commit aaaa111, bbbb222, threads 1, 2, cpu A (AVX512), B (AVX2)"
    made = "runs made at commit aaaa111, threads 1, cpu A (AVX512)"
    assert report.notes(report.comparison(report.fetch_runs(SEEDED, uri), same), same) == [lines[0], made]
    assert not any("copies" in line or "copy" in line for line in lines)
    older = same.assign(cpu=["A (AVX512)"] * 13 + [None] * 2)  # two runs from before the CPU was recorded
    assert "note: not every row recorded its CPU: vqlab.cpu A (AVX512) (13 runs), not recorded (2 runs)" in (
        report.notes(report.comparison(report.fetch_runs(SEEDED, uri), older), older)
    )
    copied = same.assign(reused_from=["other-photos/a/seed0", "other-photos/b/seed0", "third/a"] + [None] * 12)
    assert report.notes(report.comparison(report.fetch_runs(SEEDED, uri), copied), copied)[1:3] == [
        "note: 2 runs are copies of other-photos's runs of the same recipe (vqlab.sweep --reuse; seeds.csv "
        "reused_from names each)",
        "note: 1 run is a copy of third's runs of the same recipe (vqlab.sweep --reuse; seeds.csv reused_from "
        "names each)",
    ]


def test_a_rerun_seed_is_one_run_its_newest_and_seeds_of_a_variant_are_one_row():
    runs = pd.DataFrame(
        {
            "run_id": ["p", "a0", "a1", "a0again", "b"],
            "start_time": [0, 1, 2, 3, 4],
            "status": ["FINISHED", "FINISHED", "FAILED", "FINISHED", "FINISHED"],
            "tags.variant": [None, "a", "a", "a", "b"],
            "tags.seed": [None, "0", "1", "0", None],
            "tags.mlflow.parentRunId": [None, "p", "p", "p", "p"],
            "metrics.val/l1": [None, 0.1, 0.2, 0.3, 0.4],
        }
    )
    assert list(report.rows_of(runs)["run_id"]) == ["a0again", "b"]
    assert list(report.unfinished(runs)["name"]) == ["a/seed1"]
    table = report.comparison(runs)
    assert list(table["name"]) == ["a", "b"] and list(table["n"]) == [1, 1] and list(table["seeds"]) == ["0", ""]


def test_reference_pairs_differences_by_seed_and_gives_a_verdict(seeded, tmp_path):
    from scipy import stats

    uri, _ = seeded
    result = report.render(SEEDED, uri, reference="ref", out=tmp_path / "report")
    paired = result.paired.set_index(["variant", "metric"])
    assert set(paired.index.get_level_values("variant")) == set(SEEDED_L1) - {"ref"}
    assert set(paired.index.get_level_values("metric")) == {"l1", "psnr", "ssim", "codebook usage"}  # the logged ones

    def differences(variant, seeds):
        return [SEEDED_L1[variant][s] - REF_L1[s] for s in seeds]

    better = paired.loc[("better", "l1")]  # built to be resolved
    mean, width = t_interval(differences("better", [0, 1, 2]))
    assert better["difference"] == pytest.approx(mean) and better["ci"] == pytest.approx(width)
    assert abs(mean) > width and better["verdict"] == "resolved"
    assert (better["n"], better["pairing"], better["seeds"]) == (3, "paired", "paired: 0, 1, 2")
    noisy = paired.loc[("noisy", "l1")]  # built not to be
    mean, width = t_interval(differences("noisy", [0, 1, 2]))
    assert noisy["difference"] == pytest.approx(mean) and noisy["ci"] == pytest.approx(width)
    assert abs(mean) < width and noisy["verdict"] == "not resolved at 3 seeds"
    usage = paired.loc[("better", "codebook usage")]  # equal on every seed: an interval of 0 excludes nothing
    assert usage["difference"] == 0 and usage["ci"] == 0 and usage["verdict"] == "not resolved at 3 seeds"

    partial = paired.loc[("partial", "l1")]  # seeds 1, 2, 5 against 0, 1, 2: paired on 1 and 2
    mean, width = t_interval(differences("partial", [1, 2]))
    assert partial["difference"] == pytest.approx(mean) and partial["ci"] == pytest.approx(width)
    assert (partial["n"], partial["pairing"]) == (2, "paired on common seeds")
    assert partial["seeds"] == "paired on the common 1, 2 (of 1, 2, 5 / 0, 1, 2)"

    shifted = paired.loc[("shifted", "l1")]  # no common seed: Welch's interval, unpaired
    welch = stats.ttest_ind(list(SEEDED_L1["shifted"].values()), list(REF_L1.values()), equal_var=False)
    low, high = welch.confidence_interval(0.95)
    assert shifted["difference"] == pytest.approx((low + high) / 2) and shifted["ci"] == pytest.approx((high - low) / 2)
    assert shifted["pairing"] == "unpaired" and shifted["seeds"].startswith("unpaired (Welch): 3, 4 / 0, 1, 2")
    single = paired.loc[("single", "l1")]  # one run: no interval, so nothing is resolved
    assert pd.isna(single["ci"]) and single["verdict"] == "not resolved at 1 and 3 seeds"

    section = result.markdown.split("paired with reference ref:")[1]
    assert "| better | l1 | -0.0030 ± 0.0012 | 3 | paired: 0, 1, 2 | resolved |" in section
    assert "| noisy | l1 | +0.0002 ± 0.0068 | 3 | paired: 0, 1, 2 | not resolved at 3 seeds |" in section
    assert "| shifted | l1 | +0.0095 ± 0.0025 | 2 / 3 | unpaired (Welch): 3, 4 / 0, 1, 2 | resolved |" in section
    assert (tmp_path / "report" / "table.md").read_text() == result.markdown + "\n"
    csv = pd.read_csv(tmp_path / "report" / "paired.csv")
    assert list(csv.columns) == list(report.PAIRED_COLUMNS) and len(csv) == len(result.paired)


def test_reference_bootstraps_the_per_image_l1_over_crops(seeded):
    from scipy import stats

    uri, _ = seeded
    paired = report.render(SEEDED, uri, reference="ref").paired.set_index(["variant", "metric"])
    for variant, seeds in (("better", [0, 1, 2]), ("partial", [1, 2])):  # partial's files are in its run folders only
        crops = np.mean([crop_l1(variant, s) for s in seeds], axis=0) - np.mean(
            [crop_l1("ref", s) for s in seeds], axis=0
        )
        expected = stats.bootstrap(
            (crops,), np.mean, n_resamples=9999, method="percentile", rng=np.random.default_rng(0)
        ).confidence_interval
        row = paired.loc[(variant, "l1")]
        assert row["crops"] == CROPS and row["crop_difference"] == pytest.approx(crops.mean())
        assert (row["crop_low"], row["crop_high"]) == pytest.approx((expected.low, expected.high))
        assert row["crop_note"].endswith(f"over {CROPS} crops, pooled over {len(seeds)} seeds")
    noisy = paired.loc[("noisy", "l1")]
    assert (
        pd.isna(noisy["crop_difference"])
        and noisy["crop_note"] == "no per-image L1 for noisy/seed0, noisy/seed1, noisy/seed2"
    )
    assert pd.isna(paired.loc[("better", "psnr"), "crop_note"])  # the crops are L1's


def test_crop_bootstrap_on_a_known_example():
    differences = np.random.default_rng(3).normal(0.01, 0.02, 4000)
    mean, low, high = report.crop_bootstrap(differences)
    normal = 1.959964 * differences.std(ddof=1) / np.sqrt(len(differences))  # the normal-theory half-width
    assert mean == pytest.approx(differences.mean()) and low < mean < high
    assert (high - low) / 2 == pytest.approx(normal, rel=0.05) and (low + high) / 2 == pytest.approx(
        mean, abs=normal / 10
    )
    assert report.crop_bootstrap(np.full(10, 0.25)) == (0.25, 0.25, 0.25)  # no spread, no interval to draw


def test_repeated_references_give_each_its_own_comparison_with_every_other_variant(seeded, tmp_path, capsys):
    uri, _ = seeded
    out = tmp_path / "report"
    assert (
        report.main([SEEDED, "--tracking-uri", uri, "--out", str(out), "--reference", "ref", "--reference", "better"])
        == 0
    )
    csv = pd.read_csv(out / "paired.csv")
    alone = {name: report.render(SEEDED, uri, reference=name).paired for name in ("ref", "better")}
    for name, expected in alone.items():  # each reference's rows are what it gives alone
        mine = csv[csv["reference"] == name].reset_index(drop=True)
        assert set(mine["variant"]) == set(SEEDED_L1) - {name}
        pd.testing.assert_frame_equal(mine[["variant", "metric", "n"]], expected[["variant", "metric", "n"]])
        assert mine["difference"].to_numpy() == pytest.approx(expected["difference"].to_numpy())
    l1 = csv[csv["metric"] == "l1"].set_index(["reference", "variant"])["difference"]
    assert l1[("better", "ref")] == pytest.approx(-l1[("ref", "better")])  # the same pairs, the other way
    printed = capsys.readouterr().out
    assert printed.index("paired with reference ref:") < printed.index("paired with reference better:")


def test_a_reference_that_is_no_variant_is_a_one_line_error(seeded, tmp_path, capsys):
    uri, _ = seeded
    out = tmp_path / "report"
    assert report.main([SEEDED, "--tracking-uri", uri, "--out", str(out), "--reference", "nope"]) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and not out.exists()
    variants = ", ".join(SEEDED_L1)
    assert printed.err.splitlines() == [f"error: --reference 'nope' names no variant of 'Z'; its variants: {variants}"]


def test_figures_draw_the_95_percent_intervals_where_n_is_above_one(seeded):
    uri, _ = seeded
    result = report.render(SEEDED, uri)
    with_seeds = {v: by_seed for v, by_seed in SEEDED_L1.items() if len(by_seed) > 1}
    l1_axes = result.figures["l1_vs_bits.png"].axes[0]  # every run at 10 bits: the dot plot
    (bars,) = l1_axes.containers  # error bars on the variants with seeds only
    drawn = sorted((low[0], high[0]) for low, high in bars.lines[2][0].get_segments())
    intervals = [t_interval(list(by_seed.values())) for by_seed in with_seeds.values()]
    np.testing.assert_allclose(drawn, sorted((m - w, m + w) for m, w in intervals))
    usage_axes = result.figures["usage.png"].axes[0]  # seaborn's bars over the seeds, the same t interval
    drawn = [line.get_ydata() for line in usage_axes.lines if not np.isnan(line.get_ydata()).all()]
    usage = [t_interval([0.5 + 0.01 * seed for seed in by_seed]) for by_seed in with_seeds.values()]
    np.testing.assert_allclose(sorted(max(y) for y in drawn), sorted(m + w for m, w in usage))
    np.testing.assert_allclose(sorted(min(y) for y in drawn), sorted(m - w for m, w in usage))


def test_reference_on_trained_runs_bootstraps_their_logged_per_image_l1(store):
    uri, _, _ = store
    runs = stored(uri)
    paired = report.render(SWEEP, uri, reference="fsq").paired.set_index(["variant", "metric"])
    row = paired.loc[("fsq_small", "l1")]
    logged = runs["fsq_small"].data.metrics["val/l1"] - runs["fsq"].data.metrics["val/l1"]
    assert row["difference"] == pytest.approx(logged) and row["crop_difference"] == pytest.approx(logged, abs=1e-12)
    assert row["crops"] == 64 and row["crop_low"] <= row["crop_difference"] <= row["crop_high"]
    assert (row["n"], row["seeds"], row["verdict"]) == (1, "paired: no seed tag", "not resolved at 1 seed")


def test_readme_numbers_renders_the_demo_block_from_the_store(seeded, tmp_path):
    from vqlab import readme_numbers

    uri, root = seeded
    readme = tmp_path / "README.md"
    readme.write_text("a <!-- numbers:demo -->old<!-- /numbers:demo --> b\n")
    args = ["--readme", str(readme), "--blocks", "demo", "--experiment", SEEDED, "--tracking-uri", uri]
    assert readme_numbers.main([*args, "--root", str(root)]) == 0
    text = readme.read_text()
    rows = markdown_rows(text.split("<!-- numbers:demo -->")[1].strip())
    assert rows["ref"]["n"] == "3" and "±" in rows["ref"]["l1"]
    assert f"`python -m vqlab.report {SEEDED}` at commit" in text and text.endswith("<!-- /numbers:demo --> b\n")
    figures = tmp_path / "docs" / "figures"  # the same report's pictures, beside the README
    assert (figures / "l1_vs_bits.png").is_file()


def test_the_quantization_gap_is_the_l1_above_the_floor_paired_by_seed():
    l1 = {("q", 0): 0.30, ("q", 1): 0.34, ("q", 2): 0.29, ("f", 0): 0.20, ("f", 1): 0.21, ("f", 2): 0.22}
    names = ["q", "f"]
    runs = pd.DataFrame(
        {
            "run_id": ["p", *(f"{n}{s}" for s in range(3) for n in names)],
            "start_time": range(7),
            "status": "FINISHED",
            "tags.variant": [None, *(n for s in range(3) for n in names)],
            "tags.seed": [None, *(str(s) for s in range(3) for n in names)],
            "tags.floor": [None, *("f" if n == "q" else None for s in range(3) for n in names)],
            "tags.mlflow.parentRunId": [None, *("p" for s in range(3) for n in names)],
            "metrics.val/l1": [None, *(l1[n, s] for s in range(3) for n in names)],
        }
    )
    table = report.comparison(runs).set_index("name")
    gaps = [l1["q", s] - l1["f", s] for s in range(3)]
    assert table.loc["q", report.GAP] == pytest.approx(np.mean(gaps))
    assert table.loc["q", f"{report.GAP}_ci"] == pytest.approx(
        stats.t.ppf(0.975, 2) * np.std(gaps, ddof=1) / np.sqrt(3)
    )
    assert table.loc["q", f"{report.GAP}_n"] == 3 and pd.isna(table.loc["f", report.GAP])
    assert any("q → f" in line for line in report.notes(report.comparison(runs), report.per_seed(runs)))
    # a seed whose floor run is missing has no gap: the interval is over the pairs that exist
    partial = runs[runs["run_id"] != "f2"]
    assert report.comparison(partial).set_index("name").loc["q", f"{report.GAP}_n"] == 2


def test_a_ladder_of_step_budgets_draws_the_convergence_figure_with_the_codecs():
    rows = []
    for method in ("fsq", "identity"):
        for steps in (100, 200, 400):
            for seed in (0, 1):
                rows.append(
                    {
                        "run_id": f"{method}{steps}{seed}",
                        "start_time": len(rows) * 1000,
                        "end_time": len(rows) * 1000 + steps * 100,
                        "status": "FINISHED",
                        "tags.variant": f"{method},steps={steps}",
                        "tags.seed": str(seed),
                        "tags.mlflow.parentRunId": "p",
                        "params.quantizer.name": method,
                        "params.train.steps": str(steps),
                        "metrics.val/l1": 0.1 / steps**0.5 + 0.001 * seed,
                        "metrics.baseline/l1": 0.004,
                    }
                )
    runs = pd.DataFrame(rows)
    seeds = report.per_seed(runs)
    assert list(seeds["wall_s"][:2]) == [10.0, 10.0] and set(seeds["steps"]) == {100, 200, 400}
    made = report.figures(
        report.comparison(runs, seeds), pd.DataFrame(columns=["variant", "name", "metric", "step", "value"]), seeds
    )
    by_steps, by_time = made[report.CONVERGENCE].axes
    lines = {line.get_label(): line for line in by_steps.get_lines()}
    fsq = lines["fsq"]
    assert list(fsq.get_xdata()) == [100, 200, 400]
    assert list(fsq.get_ydata()) == pytest.approx([0.1 / s**0.5 + 0.0005 for s in (100, 200, 400)])
    assert any(label.startswith(BLOCK_MEAN) for label in lines)
    assert list(by_time.get_lines()[0].get_xdata()) == pytest.approx([s * 100 / 1000 / 60 for s in (100, 200, 400)])
    made[report.CONVERGENCE].canvas.draw()  # the budgets are the step axis's labels, as plain numbers
    assert [t.get_text() for t in by_steps.get_xticklabels()] == ["100", "200", "400"]
    assert not [t.get_text() for t in by_steps.get_xticklabels(minor=True) if t.get_text()]
    # one budget per method: no ladder, no figure
    single = runs[runs["params.train.steps"] == "100"]
    assert report.CONVERGENCE not in report.figures(
        report.comparison(single),
        pd.DataFrame(columns=["variant", "name", "metric", "step", "value"]),
        report.per_seed(single),
    )


def test_a_codec_measured_differently_by_seeded_runs_is_one_row_with_its_interval():
    runs = pd.DataFrame(
        {
            "run_id": ["a", "b", "c"],
            "metrics.baseline_kmeans/l1": [0.050, 0.054, 0.050],  # two distinct palettes of 1000 colours
            "metrics.baseline_kmeans/colors": [1000.0, 1000.0, 1000.0],
            "metrics.baseline/l1": [0.04, 0.04, 0.04],
        }
    )
    rows = {row["name"]: row for row in report.baseline_rows(runs)}
    kmeans = rows[TRIVIAL_CODECS["baseline_kmeans"]]
    assert kmeans["l1"] == pytest.approx(0.052) and kmeans["n"] == 2 and kmeans["l1_n"] == 2
    assert kmeans["l1_ci"] == pytest.approx(stats.t.ppf(0.975, 1) * np.std([0.050, 0.054], ddof=1) / np.sqrt(2))
    assert "n" not in rows[BLOCK_MEAN] and rows[BLOCK_MEAN]["l1"] == 0.04


def test_one_code_budget_draws_a_dot_per_variant_and_codec_with_its_interval():
    """1000 and 1024 codes are one budget: a dot per row (L1, and measured bits from 0 beside log2 K),
    not L1 against a few hundredths of a bit; the codecs at that budget and the block mean with them."""
    rows = [
        {"name": "a", "seed": s, "measured bits": 7.0 + s / 10, "bits/token": 10.0, "l1": 0.05 + s / 1000}
        for s in range(3)
    ]
    rows.append({"name": "b", "seed": pd.NA, "measured bits": 8.0, "bits/token": math.log2(1000), "l1": 0.045})
    seeds = pd.DataFrame(rows, columns=list(report.SEED_COLUMNS)).astype({"seed": "Int64"})
    seeds = seeds.assign(run_id=[f"r{i}" for i in range(len(seeds))], method="fsq", levels="x")
    codecs = [{"name": PALETTE, "levels": "1000 colours", "bits/token": math.log2(1000), "l1": 0.06, "run_id": ""}]
    codecs.append({"name": PALETTE, "levels": "16777216 colours", "bits/token": 24.0, "l1": 0.04, "run_id": ""})
    codecs.append({"name": BLOCK_MEAN, "levels": report.MISSING, "l1": 0.04, "run_id": ""})
    table = pd.DataFrame([report.aggregate(group) for group in report.variants(seeds)] + codecs)
    table = table.reindex(columns=list(report.CSV_COLUMNS))
    assert report.one_budget(table) == pytest.approx((10 + math.log2(1000)) / 2)
    history = pd.DataFrame(columns=["variant", "name", "metric", "step", "value"])
    l1_axes, bits_axes = report.figures(table, history, seeds)["l1_vs_bits.png"].axes
    labels = [tick.get_text() for tick in l1_axes.get_yticklabels()]  # top to bottom
    assert labels == ["a", "b", f"{PALETTE}, 1000 colours", BLOCK_MEAN]  # not the 2^24-colour palette
    (bars,) = l1_axes.containers
    np.testing.assert_allclose(
        [segment[:, 0] for segment in bars.lines[2][0].get_segments()], [t_bounds([0.05, 0.051, 0.052])]
    )
    assert bits_axes.get_xlim()[0] == 0 and "measured bits" in bits_axes.get_xlabel()
    # budgets a bit apart are L1 against bits again
    apart = table.assign(**{"bits/token": [10.0, 12.0, math.log2(1000), 24.0, math.nan]})
    assert report.one_budget(apart) is None
    assert len(report.figures(apart, history, seeds)["l1_vs_bits.png"].axes) == 1


def test_curves_show_training_and_validation_l1_per_variant_with_the_scale(store):
    uri, _, _ = store
    train_axes, val_axes = report.render(SWEEP, uri).figures["curves.png"].axes
    assert [line.get_label() for line in val_axes.lines] == list(VARIANTS)
    runs = stored(uri)
    assert [line.get_ydata()[-1] for line in val_axes.lines] == [runs[v].data.metrics["val/l1"] for v in VARIANTS]
    assert "[-1, 1]" in train_axes.get_ylabel() and "2x val L1" in train_axes.get_ylabel()
    assert "[0, 1]" in val_axes.get_ylabel()


def test_the_report_shows_each_variants_reconstructions_of_the_same_crops_beside_the_codecs(store, tmp_path):
    from vqlab.runfolder import RunFolder
    from vqlab.showcase import Showcase

    uri, _, _ = store
    result = report.render(SWEEP, uri)
    figure = result.figures[report.RECONSTRUCTIONS]
    labels = [axes.get_ylabel().split("\n")[0] for axes in figure.axes]
    assert labels[: 1 + len(VARIANTS)] == ["original", *VARIANTS]
    assert labels[-3].startswith(BLOCK_MEAN) and "64 colours" in figure.axes[-2].get_ylabel().replace("\n", " ")
    fsq = Showcase.read(RunFolder(stored(uri)["fsq"].data.tags["vqlab.run_dir"]).reconstructions)
    shown = figure.axes[1].images[0].get_array()
    height = fsq.originals.shape[1]
    scale = shown.shape[0] // height
    np.testing.assert_array_equal(shown[::scale, : height * scale : scale], fsq.rows["model"][0])
    saved = report.readme_figures(result, tmp_path / "figures")
    assert [path.name for path in saved] == list(report.README_FIGURES)
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in saved)


def test_a_run_from_before_the_reconstructions_file_gets_them_from_its_checkpoint(store, tmp_path):
    import shutil

    from vqlab.runfolder import RunFolder
    from vqlab.showcase import Showcase

    class NoArtifacts:
        def list_artifacts(self, run_id):
            return []

    uri, _, _ = store
    original = RunFolder(stored(uri)["fsq"].data.tags["vqlab.run_dir"])
    old = RunFolder(shutil.copytree(original.path, tmp_path / "old"))
    old.reconstructions.unlink()
    made, kept = report.read_showcase(NoArtifacts(), "x", str(old.path)), Showcase.read(original.reconstructions)
    for key in ("model", *TRIVIAL_CODECS):
        np.testing.assert_array_equal(made.rows[key], kept.rows[key])
    assert not old.reconstructions.exists()  # a report writes nothing into a run
    assert report.read_showcase(NoArtifacts(), "x", str(tmp_path / "nothing")) is None
