"""analysis.utilization: utilization statistics with known answers, and the study over tracked runs."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis import utilization
from vqlab.codes import index_to_digits
from vqlab.evaluators import CodeHistogram
from vqlab.runfolder import RunFolder

from ..helpers import tracked_smoke_runs


def test_a_uniformly_used_codebook_has_log2_k_effective_bits_and_zipf_exponent_zero():
    stats = utilization.utilization(np.full(64, 10), 64)
    assert stats["effective_bits"] == pytest.approx(6) and stats["perplexity"] == pytest.approx(64)
    assert stats["usage"] == 1.0 and stats["dead_codes"] == 0 and stats["bits_efficiency"] == pytest.approx(1)
    assert stats["zipf_exponent"] == pytest.approx(0, abs=1e-9)


def test_half_the_codes_dead_and_zipf_counts_give_their_exponent():
    counts = np.zeros(1024)
    counts[:512] = 1e6 / np.arange(1, 513) ** 1.5
    stats = utilization.utilization(counts, 1024)
    assert stats["usage"] == 0.5 and stats["dead_codes"] == 512 and stats["used"] == 512
    assert stats["zipf_exponent"] == pytest.approx(1.5, abs=1e-6)
    assert stats["effective_bits"] < 9  # skewed use of 512 codes is worth fewer than log2 512 bits
    assert math.isnan(utilization.zipf_exponent(np.array([0, 5, 0])))


def fake_run(root: Path, name: str, counts: list[int], radices: list[int], digit_counts: list[list[int]]) -> RunFolder:
    run = RunFolder(root / "exp" / name)
    run.path.mkdir(parents=True)
    run.metrics_file.write_text(
        "".join(
            json.dumps(r) + "\n" for r in [{"step": 0, "val/codebook_usage": 0.1}, {"step": 5, "train/perplexity": 3.0}]
        )
    )
    digits = index_to_digits(torch.arange(len(counts)), radices).numpy()  # codes 0, 1, ...
    per_digit = tuple(np.array(c) for c in digit_counts)
    CodeHistogram(digits, np.array(counts), tuple(radices), per_digit).write(run.histogram())
    return run


def test_the_table_reads_each_runs_histogram_and_per_digit_usage(tmp_path):
    runs = [
        utilization.CodebookRun(
            "fsq", "fsq", fake_run(tmp_path, "fsq", [5, 1, 2], [4, 4], [[5, 2, 1, 0], [0, 6, 0, 2]])
        ),
        utilization.CodebookRun("vq", "vq", fake_run(tmp_path, "vq", [3, 3], [8], [])),
        utilization.CodebookRun("identity", "identity", RunFolder(tmp_path / "exp" / "identity")),
    ]
    summary = utilization.table(runs).set_index("name")
    assert list(summary.index) == ["fsq", "vq"]  # no histogram: a continuous run has no row
    assert summary.loc["fsq", "usage"] == 3 / 16 and summary.loc["fsq", "digit_usage"] == [0.75, 0.5]
    assert summary.loc["vq", "effective_bits"] == pytest.approx(1) and summary.loc["vq", "digit_usage"] == []
    history = utilization.over_steps(runs)
    assert set(history["metric"]) == {"val/codebook_usage", "train/perplexity"}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """Two smoke runs (FSQ and a 64-code VQ) in one MLflow experiment."""
    root = tmp_path_factory.mktemp("runs")
    return root, tracked_smoke_runs(root, {"fsq": {}, "vq": {"quantizer.name": "vq", "quantizer.codebook_size": 64}})


def test_tracked_runs_are_found_in_mlflow_and_read_from_their_folders(tracked):
    _, uri = tracked
    runs = utilization.tracked_runs("E", uri)
    assert [(r.name, r.method) for r in runs] == [("fsq", "fsq"), ("vq", "vq")]
    summary = utilization.table(runs).set_index("name")
    for run in runs:  # the same numbers the run's own validation logged
        logged = run.folder.last_metrics("val/")
        assert summary.loc[run.name, "usage"] == pytest.approx(logged["val/codebook_usage"])
        assert summary.loc[run.name, "perplexity"] == pytest.approx(logged["val/perplexity"], rel=1e-6)
    assert summary.loc["vq", "codebook_size"] == 64 and summary.loc["fsq", "codebook_size"] == 1000


def test_cli_writes_the_table_and_figures_and_logs_them(tracked, capsys):
    from mlflow import MlflowClient

    root, uri = tracked
    assert utilization.main(["E", "--tracking-uri", uri, "--root", str(root)]) == 0
    out = root / "utilization" / "E"
    assert {p.name for p in out.iterdir()} == {"table.csv", "table.md", *utilization.FIGURES}
    assert "| fsq | fsq | 1000 |" in capsys.readouterr().out
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("utilization").experiment_id])
    assert run.info.run_name == "E" and "usage/vq" in run.data.metrics


def test_cli_names_an_unknown_experiment_in_one_line(tracked, capsys):
    root, uri = tracked
    assert utilization.main(["nothing", "--tracking-uri", uri, "--root", str(root), "--no-mlflow"]) == 2
    assert "nothing" in capsys.readouterr().err


def test_the_notebook_executes_headless(tracked, run_notebook):
    root, uri = tracked
    outputs = run_notebook("utilization", {"experiment": "E", "tracking_uri": uri, "root": str(root), "mlflow": False})
    assert sum("image/png" in o.get("data", {}) for o in outputs) == len(utilization.FIGURES)
