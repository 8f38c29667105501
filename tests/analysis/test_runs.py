from analysis.runs import collect, table
from vqlab.trainer import fit


def test_collect_reads_config_and_last_metrics(smoke_cfg, tmp_path):
    result = fit(smoke_cfg(**{"train.steps": 4, "optim.warmup_steps": 1, "tracking.run_name": "a"}))
    rows = collect(tmp_path / "runs")
    assert len(rows) == 1
    row = rows[0]
    assert row["run"] == "a" and row["experiment"] == "smoke"
    assert row["train.steps"] == 4 and row["quantizer.levels"] == [8, 5, 5, 5]
    assert row["val/l1"] == result.metrics["val/l1"]
    assert collect(tmp_path / "runs", experiment="other") == []
    assert list(table(tmp_path / "runs")["run"]) == ["a"]
