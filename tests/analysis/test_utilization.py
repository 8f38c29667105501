"""analysis.utilization: utilization statistics with known answers, and the study over tracked runs."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

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


def test_measured_bits_are_the_plug_in_entropy_plus_miller_madows_correction():
    counts = np.array([640, 320, 160, 80, 0, 0])
    stats = utilization.utilization(counts, 6)
    p = counts[:4] / counts.sum()
    plugin = float(-(p * np.log2(p)).sum())
    assert stats["effective_bits"] == pytest.approx(plugin)
    assert stats["measured_bits"] == pytest.approx(plugin + (4 - 1) / (2 * counts.sum() * math.log(2)))


def sized_runs(slope: float = -0.005, spread: float = 0.002) -> pd.DataFrame:
    """A hand-made table: method ``m`` at 2^6, 2^8 and 2^10 codes, seeds 0 and 1 an equal ``spread``
    either side of a straight line in log2 K; method ``one`` at one size."""
    rows = []
    for bits in (6, 8, 10):
        for seed, sign in ((0, -1), (1, 1)):
            line = 0.1 + slope * bits
            rows.append({"variant": f"m_{bits}", "seed": seed, "method": "m", "codebook_size": 2**bits})
            rows[-1] |= {"log2_size": bits, "l1": line + sign * spread, "measured_bits": 0.5 * bits + sign * 0.1}
            rows[-1] |= {"usage": 0.5 + sign * 0.1, "effective_bits": 0.4 * bits, "zipf_exponent": 1.0}
    rows.append({"variant": "one", "seed": 0, "method": "one", "codebook_size": 64, "log2_size": 6, "l1": 0.2})
    rows[-1] |= {"measured_bits": 3.0, "usage": 1.0, "effective_bits": 2.9, "zipf_exponent": 0.5}
    return pd.DataFrame(rows)


def test_by_size_gives_each_variants_mean_and_t_interval_over_its_seeds():
    sizes = utilization.by_size(sized_runs().iloc[::-1]).set_index("variant")  # sizes come largest first
    assert list(sizes.index) == ["one", "m_6", "m_8", "m_10"] and list(sizes["n"]) == [1, 2, 2, 2]
    _, high = stats.t.interval(0.95, 1, loc=0.5, scale=np.std([0.4, 0.6], ddof=1) / math.sqrt(2))
    assert sizes.loc["m_8", "usage"] == pytest.approx(0.5) and sizes.loc["m_8", "usage_ci"] == pytest.approx(high - 0.5)
    assert sizes.loc["m_8", "l1"] == pytest.approx(0.1 - 0.04) and math.isnan(sizes.loc["one", "l1_ci"])
    assert "0.5 ± 1.3" in utilization.sizes_markdown(sizes.reset_index())  # 12.7 x 0.1


def test_trends_are_each_methods_least_squares_slope_per_doubling_with_its_t_interval():
    found = utilization.trends(sized_runs(slope=-0.005, spread=0.002)).set_index("method")
    assert list(found.index) == ["m"]  # one size: no trend
    assert found.loc["m", "runs"] == 6 and (found.loc["m", "from_bits"], found.loc["m", "to_bits"]) == (6, 10)
    assert found.loc["m", "l1_per_doubling"] == pytest.approx(-0.005)
    assert found.loc["m", "measured_bits_per_doubling"] == pytest.approx(0.5)
    x = np.repeat([6.0, 8.0, 10.0], 2)
    residuals = np.tile([-0.002, 0.002], 3)  # about the line: the slope's standard error from them
    stderr = math.sqrt((residuals**2).sum() / (len(x) - 2) / ((x - x.mean()) ** 2).sum())
    assert found.loc["m", "l1_per_doubling_ci"] == pytest.approx(stats.t.ppf(0.975, 4) * stderr)
    exact = utilization.trends(sized_runs(spread=0.0)).set_index("method")
    assert exact.loc["m", "l1_per_doubling_ci"] == pytest.approx(0, abs=1e-12)


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
    for run in runs:  # the L1 the rate is read beside: the run's own validation's
        assert run.l1 == pytest.approx(run.folder.last_metrics("val/")["val/l1"]) and run.seed is None


def test_a_seeded_runs_row_is_named_by_its_variant_and_seed(tmp_path):
    folder = fake_run(tmp_path, "fsq_seed1", [5, 1, 2], [4, 4], [[5, 2, 1, 0], [0, 6, 0, 2]])
    runs = [utilization.CodebookRun("fsq", "fsq", folder, seed=1, l1=0.05)]
    (row,) = utilization.table(runs).to_dict("records")
    assert (row["name"], row["variant"], row["seed"], row["l1"]) == ("fsq/seed1", "fsq", 1, 0.05)


def test_cli_writes_the_table_and_figures_and_logs_them(tracked, capsys):
    from mlflow import MlflowClient

    root, uri = tracked
    assert utilization.main(["E", "--tracking-uri", uri, "--root", str(root)]) == 0
    out = root / "utilization" / "E"
    tables = {"table.csv", "table.md", "sizes.csv", "sizes.md", "trends.csv", "trends.md"}
    assert {p.name for p in out.iterdir()} == tables | set(utilization.FIGURES)
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
