import numpy as np

from analysis.runs import collect, keep, kept, label, table
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


def test_collect_finds_the_seed_runs_of_a_seeded_sweeps_variant_folders(smoke_cfg, tmp_path):
    base = {"train.steps": 2, "optim.warmup_steps": 1}
    fit(smoke_cfg(**base, **{"tracking.run_name": "alone"}))
    for seed in (0, 1):
        fit(smoke_cfg(**base, **{"tracking.run_group": "fsq", "tracking.run_name": f"seed{seed}", "train.seed": seed}))
    rows = collect(tmp_path / "runs")
    assert [(r["run"], r["tracking.run_group"], r["train.seed"]) for r in rows] == [
        ("alone", "", 0),
        ("seed0", "fsq", 0),
        ("seed1", "fsq", 1),
    ]
    assert {r["experiment"] for r in rows} == {"smoke"}


def test_a_seed_runs_label_names_its_variant_so_two_variants_seed_runs_differ(smoke_cfg, tmp_path):
    base = {"train.steps": 2, "optim.warmup_steps": 1, "tracking.run_name": "seed0"}
    fsq = fit(smoke_cfg(**base, **{"tracking.run_group": "fsq"})).run_dir
    vq = fit(smoke_cfg(**base, **{"tracking.run_group": "vq", "quantizer.name": "vq"})).run_dir
    alone = fit(smoke_cfg(**{**base, "tracking.run_name": "alone"})).run_dir
    assert [label(run) for run in (fsq, vq, alone)] == ["fsq/seed0", "vq/seed0", "alone"]


def test_kept_gives_back_what_keep_wrote_only_under_the_same_settings(tmp_path):
    path = tmp_path / "fits.json"
    settings = {"bits": [6, 10], "fit": {"iterations": 20}}
    assert kept(path, settings) is None  # nothing kept yet
    keep(path, settings, {"rows": [{"l1": np.float64(0.25), "codes": np.arange(3)}]})
    assert kept(path, settings) == {"settings": settings, "rows": [{"l1": 0.25, "codes": [0, 1, 2]}]}
    assert kept(path, {**settings, "bits": [6]}) is None  # made with other settings: done again
    assert [p.name for p in tmp_path.iterdir()] == ["fits.json"]  # no temporary file left beside it
