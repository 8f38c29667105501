"""python -m vqlab.sweep: sweep files, validation, shards, MLflow records, failures and reruns."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from vqlab import notebook, quantizers, sweep, tracking
from vqlab.config import load
from vqlab.runfolder import RunFolder
from vqlab.tracking import client, create_run

from .helpers import mlflow_server


def write_sweep(tmp_path, **content):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "base": "smoke", **content}, sort_keys=False))
    return str(path)


def root_override(tmp_path):
    return {"tracking.root": str(tmp_path / "runs")}


def test_variants_are_crossed_with_the_grid_in_file_order(tmp_path):
    source = write_sweep(
        tmp_path,
        variants={"a": {"quantizer.levels": [8, 8]}, "b": {"optim.lr": 1e-3}},
        grid={"train.dtype": ["fp32", "bf16"], "train.seed": [0, 1]},
    )
    loaded = sweep.load(source, extra=root_override(tmp_path))
    names = [v.name for v in loaded.variants]
    assert names[:4] == ["a,dtype=fp32,seed=0", "a,dtype=fp32,seed=1", "a,dtype=bf16,seed=0", "a,dtype=bf16,seed=1"]
    assert len(names) == 8
    variant = loaded.variants[3]
    assert (variant.cfg.quantizer.levels, variant.cfg.train.dtype, variant.cfg.train.seed) == ((8, 8), "bf16", 1)
    assert variant.run.path == tmp_path / "runs" / "tiny" / variant.name
    assert variant.cfg.tracking.mlflow  # every variant records in MLflow


def test_a_scale_chooses_the_base_and_its_own_variant_overrides(tmp_path):
    source = write_sweep(
        tmp_path,
        variants={"a": {"quantizer.levels": [8, 8], "big": {"optim.lr": 5e-4}}},
        scales={"small": {"train.steps": 7}, "big": {"base": "default"}},
    )
    small = sweep.load(source, extra=root_override(tmp_path)).variants[0].cfg
    big_sweep = sweep.load(source, "big", extra=root_override(tmp_path))
    big = big_sweep.variants[0].cfg
    assert (small.train.steps, small.optim.lr, small.model.width) == (7, 2e-3, 32)
    default = load("default")
    assert (big.optim.lr, big.model.width, big_sweep.name) == (5e-4, default.model.width, "tiny-big")
    with pytest.raises(sweep.SweepError, match="no scale 'huge'"):
        sweep.load(source, "huge")


def test_smoke_keeps_its_budget_against_the_scales_and_variants_but_not_the_command_lines(tmp_path):
    source = write_sweep(
        tmp_path,
        variants={"a": {"quantizer.levels": [8, 8]}, "b": {"train.steps": 3000, "data.batch_size": 64}},
        scales={"photos": {"train.steps": 400, "eval.every": 200}},
    )
    a, b = (v.cfg for v in sweep.load(source, extra=root_override(tmp_path), smoke=True).variants)
    smoke = [notebook.SMOKE[key] for key in ("train.steps", "eval.every", "data.batch_size")]
    assert [a.train.steps, a.eval.every, a.data.batch_size] == smoke == [b.train.steps, b.eval.every, b.data.batch_size]
    assert a.quantizer.levels == (8, 8)  # what a variant is stays
    full = sweep.load(source, extra=root_override(tmp_path)).variants[1].cfg
    assert (full.train.steps, full.data.batch_size) == (3000, 64)
    chosen = sweep.load(source, extra={**root_override(tmp_path), "train.steps": 9}, smoke=True).variants[0].cfg
    assert chosen.train.steps == 9


def test_a_scale_may_replace_the_grid(tmp_path):
    source = write_sweep(
        tmp_path,
        variants={"a": {}},
        grid={"train.dtype": ["fp32", "bf16"]},
        scales={"cpu": {"grid": {"train.dtype": ["fp32"]}}, "gpu": {}},
    )
    cpu = [v.name for v in sweep.load(source, "cpu", extra=root_override(tmp_path)).variants]
    gpu = [v.name for v in sweep.load(source, "gpu", extra=root_override(tmp_path)).variants]
    assert (cpu, gpu) == (["a,dtype=fp32"], ["a,dtype=fp32", "a,dtype=bf16"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"variants": {"ok": {}, "typo": {"optim.lrr": 1}}}, "variant typo: optim.lrr"),
        ({"variants": {"neg": {"train.steps": -1}}}, "variant neg: train.steps"),
        ({"variants": {"a": {"train.steps": 3}}, "grid": {"train.steps": [1, 2]}}, "both the variant and the grid"),
        ({"variants": {"a": {"steps": 3}}}, "neither a dotted config key nor a scale"),
        ({"variants": {"a": {}}, "sedes": [0]}, "unknown key 'sedes'"),
        ({"grid": {"train.seed": []}}, "non-empty list"),
        ({"variants": {"a": {}}, "scales": {"s": {"grid": [1]}}}, "grid must be a mapping"),
        ({}, "variants or a grid"),
    ],
)
def test_an_invalid_sweep_stops_before_anything_runs_naming_variant_and_key(tmp_path, capsys, content, message):
    source = write_sweep(tmp_path, **content)
    assert sweep.main([source, f"tracking.root={tmp_path / 'runs'}"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_the_invalid_key_is_on_the_error(tmp_path):
    with pytest.raises(sweep.SweepError) as raised:
        sweep.load(write_sweep(tmp_path, variants={"typo": {"quantizer.levels": "x"}}))
    assert raised.value.key == "quantizer.levels"


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_shards_partition_the_variants_exactly(tmp_path, n):
    loaded = sweep.load(write_sweep(tmp_path, grid={"train.seed": list(range(7))}), extra=root_override(tmp_path))
    shards = [sweep.shard(loaded.variants, f"{k}/{n}") for k in range(1, n + 1)]
    names = [v.name for part in shards for v in part]
    assert sorted(names) == sorted(v.name for v in loaded.variants)
    assert len(names) == len(set(names))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("spec", ["0/2", "3/2", "1-2", "a/b"])
def test_a_bad_shard_is_an_error(spec):
    with pytest.raises(sweep.SweepError, match="--shard"):
        sweep.shard([], spec)


def test_dry_run_lists_variants_and_folders_and_writes_nothing(tmp_path, capsys):
    source = write_sweep(tmp_path, variants={"a": {}, "b": {"optim.lr": 1e-3}})
    assert sweep.main([source, "--dry-run", "--shard", "2/2", f"tracking.root={tmp_path / 'runs'}"]) == 0
    out = capsys.readouterr().out
    assert "1 of 2 variants of tiny" in out
    assert str(tmp_path / "runs" / "tiny" / "b") in out and "optim.lr=0.001" in out
    assert "/tiny/a" not in out
    assert not (tmp_path / "runs").exists()


def test_variants_picks_runs_by_pattern_with_their_floors_before_the_shard(tmp_path, capsys):
    variants = {
        "fsq_10bit": {"quantizer.levels": [8, 5, 5, 5]},
        "lfq_10bit": {"quantizer.name": "lfq", "quantizer.dim": 10},
        "lfq_14bit": {"quantizer.name": "lfq", "quantizer.dim": 14},
    }
    source = write_sweep(tmp_path, variants=variants, controls="identity", seeds=[0, 1])
    root = f"tracking.root={tmp_path / 'runs'}"
    assert sweep.main([source, "--dry-run", "--variants", "*_10bit", root]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    # each run with its floor (width 4 for FSQ 8-5-5-5, 10 for LFQ 10 bit), seed by seed; no 14-bit run or floor
    expected = ["fsq_10bit", "lfq_10bit", "identity-d4", "identity-d10"]
    assert listed == [f"{name}/seed{seed}" for seed in (0, 1) for name in expected]
    # the shard splits the chosen runs (LFQ's two and their floors at widths 10 and 14, per seed)
    assert sweep.main([source, "--dry-run", "--variants", "lfq_1?bit", "--shard", "2/2", root]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("4 of 12 runs")
    assert [line.split()[0] for line in out[1:]] == [
        f"{name}/seed{seed}" for seed in (0, 1) for name in ("lfq_14bit", "identity-d14")
    ]
    assert sweep.main([source, "--dry-run", "--variants", "vq*", root]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: --variants 'vq*' matches no variant; variants: fsq_10bit, lfq_10bit, lfq_14bit, "
        "identity-d4, identity-d10, identity-d14"
    ]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("preset", sweep.sweep_presets())
def test_every_variant_of_every_sweep_preset_is_valid_at_every_scale(preset, tmp_path):
    data, _ = sweep.read_file(preset)
    assert set(data["scales"]) == {"photos", "imagenet"}
    for scale in data["scales"]:
        loaded = sweep.load(preset, scale, extra=root_override(tmp_path))
        assert len({v.run.path for v in loaded.variants}) == len(loaded.variants) > 1
        if scale == "imagenet":  # the upstream recipe
            for variant in loaded.variants:
                cfg = variant.cfg
                assert (cfg.data.image_size, cfg.data.batch_size, cfg.optim.name) == (128, 32, "adam")
                assert cfg.optim.lr == pytest.approx(1e-4 * cfg.train.grad_accum)
                assert cfg.optim.warmup_steps == cfg.train.steps // 100
                assert cfg.optim.schedule == "linear" and cfg.loss.l1 > 0


def test_the_quantizer_sweep_has_every_registered_quantizer_at_about_1k_codes(tmp_path):
    loaded = sweep.load("quantizers", extra=root_override(tmp_path))
    listed = [v for v in loaded.variants if not v.name.startswith("identity-d")]  # not the added floors
    assert sorted(v.cfg.quantizer.name for v in listed) == quantizers.available()
    assert all(v.floor or v.cfg.quantizer.name == "identity" for v in listed)
    for variant in listed:
        q = quantizers.build(variant.cfg.quantizer)
        assert not q.discrete or 1000 <= q.codebook_size <= 1024, variant.name


def test_the_demo_runs_fsq_and_vq_ema_beside_their_floor_at_three_seeds(tmp_path):
    loaded = sweep.load("demo", extra=root_override(tmp_path))
    assert loaded.seeds == [0, 1, 2] and len(loaded.variants) == 9
    assert list(dict.fromkeys(v.name for v in loaded.variants)) == ["fsq", "vq_ema", "identity-d4"]
    assert {v.name: v.floor for v in loaded.variants} == {
        "fsq": "identity-d4",
        "vq_ema": "identity-d4",
        "identity-d4": "",
    }
    for variant in loaded.variants:
        assert variant.cfg.train.steps % variant.cfg.eval.every == 0


def test_the_seed_table_has_every_row_in_fp32_and_bf16_at_gpu_scale(tmp_path):
    gpu = sweep.load("seed_table", "imagenet", extra=root_override(tmp_path))
    rows = [v for v in gpu.variants if not v.control]
    assert len(rows) == 16 and all(v.floor for v in rows)
    assert {v.cfg.train.dtype for v in gpu.variants} == {"fp32", "bf16"}
    cpu = sweep.load("seed_table", "photos", extra=root_override(tmp_path))
    assert [v.name.removesuffix(",dtype=fp32") for v in cpu.variants] == [
        v.name.removesuffix(",dtype=fp32") for v in gpu.variants if v.cfg.train.dtype == "fp32"
    ]


# --- seeds ---------------------------------------------------------------------------------------
def test_seeds_run_every_variant_once_per_seed_each_in_its_own_folder(tmp_path):
    source = write_sweep(tmp_path, variants={"a": {}, "b": {"optim.lr": 1e-3}}, seeds=[0, 1, 2])
    loaded = sweep.load(source, extra=root_override(tmp_path))
    assert loaded.seeds == [0, 1, 2]
    assert [(v.name, v.seed) for v in loaded.variants] == [(n, k) for k in (0, 1, 2) for n in ("a", "b")]
    for variant in loaded.variants:
        assert variant.label == f"{variant.name}/seed{variant.seed}"
        assert variant.cfg.train.seed == variant.seed
        assert variant.run.path == tmp_path / "runs" / "tiny" / variant.name / f"seed{variant.seed}"
        assert (variant.cfg.tracking.run_group, variant.cfg.tracking.run_name) == (variant.name, f"seed{variant.seed}")
        assert variant.key == (variant.name, str(variant.seed))
        assert variant.overrides["train.seed"] == variant.seed  # what the notebook receives
    assert {v.cfg.optim.lr for v in loaded.variants if v.name == "b"} == {1e-3}


def test_without_seeds_a_variant_is_one_run_with_the_bases_seed(tmp_path):
    loaded = sweep.load(write_sweep(tmp_path, variants={"a": {}}), extra=root_override(tmp_path))
    (variant,) = loaded.variants
    assert (loaded.seeds, variant.seed, variant.label, variant.key) == (None, None, "a", ("a", None))
    assert variant.run.path == tmp_path / "runs" / "tiny" / "a"
    assert variant.cfg.train.seed == load("smoke").train.seed
    assert "train.seed" not in variant.overrides and not variant.cfg.tracking.run_group


def test_a_scales_seeds_replace_the_files_and_seeds_given_to_load_replace_both(tmp_path):
    source = write_sweep(
        tmp_path, variants={"a": {}}, seeds=[0, 1, 2], scales={"one": {"seeds": [7]}, "all": {"train.steps": 7}}
    )
    seeds = {
        scale: [v.seed for v in sweep.load(source, scale, extra=root_override(tmp_path)).variants]
        for scale in ("one", "all")
    }
    assert seeds == {"one": [7], "all": [0, 1, 2]}
    given = sweep.load(source, "one", extra=root_override(tmp_path), seeds=[4, 5])
    assert [(v.label, v.cfg.train.seed) for v in given.variants] == [("a/seed4", 4), ("a/seed5", 5)]
    assert given.name == "tiny-one" and given.variants[0].run.path == tmp_path / "runs" / "tiny-one" / "a" / "seed4"


def test_seeds_on_the_command_line_replace_the_files_in_the_dry_run_listing(tmp_path, capsys):
    source = write_sweep(tmp_path, variants={"a": {}, "b": {}}, seeds=[0, 1, 2])
    assert sweep.main([source, "--dry-run", "--seeds", "5,7", f"tracking.root={tmp_path / 'runs'}"]) == 0
    out = capsys.readouterr().out
    assert "4 of 4 runs (2 variants x seeds 5,7) of tiny" in out
    assert "seed0" not in out and "train.seed=5" in out
    for label in ("a/seed5", "b/seed5", "a/seed7", "b/seed7"):
        assert str(tmp_path / "runs" / "tiny" / label) in out


def test_dry_run_lists_every_variant_and_seed_with_its_folder_and_writes_nothing(tmp_path, capsys):
    source = write_sweep(tmp_path, variants={"a": {}, "b": {"optim.lr": 1e-3}}, seeds=[0, 1])
    assert sweep.main([source, "--dry-run", f"tracking.root={tmp_path / 'runs'}"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == "4 of 4 runs (2 variants x seeds 0,1) of tiny (base smoke):"
    listed = [row.split()[:2] for row in rows[1:]]
    assert listed == [
        [label, str(tmp_path / "runs" / "tiny" / label)] for label in ("a/seed0", "b/seed0", "a/seed1", "b/seed1")
    ]
    assert rows[2].endswith("optim.lr=0.001 train.seed=0")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_shards_partition_the_variant_seed_runs_exactly(tmp_path, n):
    source = write_sweep(tmp_path, variants={"a": {}, "b": {}, "c": {}}, seeds=[0, 1])
    loaded = sweep.load(source, extra=root_override(tmp_path))
    shards = [sweep.shard(loaded.variants, f"{k}/{n}") for k in range(1, n + 1)]
    keys = [v.key for part in shards for v in part]
    assert sorted(keys) == sorted((name, seed) for name in "abc" for seed in "01")
    assert len(keys) == len(set(keys)) == 6
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"seeds": []}, "seeds must be a non-empty list"),
        ({"seeds": None}, "seeds must be a non-empty list"),
        ({"seeds": 3}, "seeds must be a non-empty list"),
        ({"seeds": "0,1"}, "seeds must be a non-empty list"),
        ({"seeds": {"a": 0}}, "seeds must be a non-empty list"),
        ({"seeds": [0, -1]}, "seeds must be a non-empty list"),
        ({"seeds": [0, True]}, "seeds must be a non-empty list"),
        ({"seeds": [0, 1.0]}, "seeds must be a non-empty list"),
        ({"seeds": [0, "1"]}, "seeds must be a non-empty list"),
        ({"seeds": [0, 1, 0]}, "seeds repeats seed 0"),
        ({"seeds": [0], "scales": {"s": {"seeds": []}}}, "scales.s.seeds must be a non-empty list"),
        ({"seeds": [0], "scales": {"s": {"seeds": [2, 2]}}}, "scales.s.seeds repeats seed 2"),
        ({"seeds": [0, 1], "variants": {"a": {}, "pinned": {"train.seed": 3}}}, "variant pinned: train.seed"),
        ({"seeds": [0, 1], "grid": {"train.seed": [3, 4]}}, "variant a,seed=3: train.seed"),
        ({"seeds": [0, 1], "overrides": {"train.seed": 3}}, "variant a: train.seed"),
    ],
)
def test_bad_seeds_in_a_sweep_file_are_one_line_errors_that_write_nothing(tmp_path, capsys, content, message):
    source = write_sweep(tmp_path, **{"variants": {"a": {}}, **content})
    assert sweep.main([source, f"tracking.root={tmp_path / 'runs'}"]) == 2
    printed = capsys.readouterr()
    assert printed.err.startswith(f"error: {message}")
    assert printed.err.count("\n") == 1 and not printed.out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (["--seeds", "a,b"], "--seeds 'a,b': give distinct non-negative integers"),
        (["--seeds", ""], "--seeds '': give distinct non-negative integers"),
        (["--seeds", "-1"], "--seeds '-1': give distinct non-negative integers"),
        (["--seeds=-1"], "--seeds '-1': give distinct non-negative integers"),
        (["--seeds", "0,,1"], "--seeds '0,,1': give distinct non-negative integers"),
        (["--seeds", "1.5"], "--seeds '1.5': give distinct non-negative integers"),
        (["--seeds", "1,1"], "--seeds 1,1: repeats seed 1"),
        (["--seeds", "0,1", "train.seed=3"], "variant a: train.seed is set by the command line and by --seeds (0,1)"),
    ],
)
def test_bad_seeds_on_the_command_line_are_one_line_errors_that_write_nothing(tmp_path, capsys, given, message):
    source = write_sweep(tmp_path, variants={"a": {}})
    assert sweep.main([source, *given, f"tracking.root={tmp_path / 'runs'}"]) == 2
    printed = capsys.readouterr()
    assert printed.err.startswith(f"error: {message}")
    assert printed.err.count("\n") == 1 and not printed.out
    assert not (tmp_path / "runs").exists()


# --- sweeps that run -----------------------------------------------------------------------------
def runs_by_variant(mlflow_client, name):
    experiment = mlflow_client.get_experiment_by_name(name)
    found = mlflow_client.search_runs([experiment.experiment_id])
    return {r.data.tags["variant"]: r for r in found if "variant" in r.data.tags}, [
        r for r in found if r.data.tags.get("sweep_parent") == "true"
    ]


@pytest.mark.slow
def test_a_failing_variant_is_a_failed_run_the_others_finish_and_a_rerun_retries_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    source = write_sweep(tmp_path, variants={"bad": {"optim.lr": 1e30}, "c": {"quantizer.levels": [8, 8]}})
    args = [source, "--smoke", f"tracking.root={tmp_path / 'runs'}"]
    assert sweep.main(args) == 1
    printed = capsys.readouterr()
    assert "failed: bad:" in printed.err
    executed = [line.strip() for line in printed.out.splitlines() if line.startswith("  ")]
    assert executed == [f"c: {tmp_path / 'runs' / 'tiny' / 'c' / 'run.ipynb'}"]  # the variant after the failed one ran
    loaded = sweep.load(source, extra=root_override(tmp_path), smoke=True)
    mlflow_client = client(loaded.variants[0].cfg.tracking)
    runs, parents = runs_by_variant(mlflow_client, "tiny")
    assert {v: r.info.status for v, r in runs.items()} == {"bad": "FAILED", "c": "FINISHED"}
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    for variant, run in runs.items():
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["sweep"] == "tiny" and run.data.tags["variant"] == variant
        assert run.data.tags["git_commit"]
        assert "run.ipynb" in [a.path for a in mlflow_client.list_artifacts(run.info.run_id)]
        assert RunFolder(tmp_path / "runs" / "tiny" / variant).notebook.is_file()
    bad = runs["bad"]
    assert "NaN or inf" in bad.data.tags["error"] or "non-finite" in bad.data.tags["error"]
    error = mlflow_client.download_artifacts(bad.info.run_id, "error.txt", str(tmp_path))
    text = Path(error).read_text()
    assert text.startswith("cell ") and bad.data.tags["error"] in text  # the cell, the error, the traceback's tail

    notebooks = {v: (tmp_path / "runs" / "tiny" / v / "run.ipynb").stat().st_mtime_ns for v in runs}
    assert sweep.main(args) == 1
    assert "skipping 1 finished variant of tiny" in capsys.readouterr().err
    again, parents_again = runs_by_variant(mlflow_client, "tiny")
    assert [p.info.run_id for p in parents_again] == [parents[0].info.run_id]  # the same parent run
    assert again["c"].info.run_id == runs["c"].info.run_id  # untouched
    assert (tmp_path / "runs" / "tiny" / "c" / "run.ipynb").stat().st_mtime_ns == notebooks["c"]
    assert again["bad"].info.status == "FAILED"
    assert (tmp_path / "runs" / "tiny" / "bad" / "run.ipynb").stat().st_mtime_ns > notebooks["bad"]


@pytest.mark.slow
def test_a_rerun_finishes_a_variant_killed_after_its_final_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    source = write_sweep(tmp_path, variants={"a": {}})
    args = [source, "--smoke", f"tracking.root={tmp_path / 'runs'}"]
    assert sweep.main(args) == 0
    loaded = sweep.load(source, extra=root_override(tmp_path), smoke=True)
    mlflow_client = client(loaded.variants[0].cfg.tracking)
    run = loaded.variants[0].run
    # what a kill -9 between the final checkpoint and the end of the run leaves
    run.figure("reconstructions.png").unlink()
    run.finished_file.unlink()
    mlflow_client.update_run(run.mlflow_run_id(), status="RUNNING")
    assert sweep.main(args) == 0
    runs, _ = runs_by_variant(mlflow_client, "tiny")
    assert runs["a"].info.status == "FINISHED"
    assert run.figure("reconstructions.png").is_file() and run.is_finished()


@pytest.mark.slow
def test_submitit_local_jobs_log_to_an_mlflow_server(tmp_path, monkeypatch):
    """A variant as a submitit job, recording through MLFLOW_TRACKING_URI on a tracking server."""
    store, artifacts = f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "server-artifacts"
    with mlflow_server(store, artifacts, tmp_path / "server.log") as uri:
        from mlflow import MlflowClient

        server_client = MlflowClient(tracking_uri=uri)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("MPLBACKEND", "Agg")
        source = write_sweep(tmp_path, variants={"b": {"quantizer.levels": [8, 8]}})
        args = [source, "--smoke", "--launcher", "submitit", "--cluster", "local", f"tracking.root={tmp_path / 'runs'}"]
        assert sweep.main(args) == 0
        runs, parents = runs_by_variant(server_client, "tiny")
        assert {v: r.info.status for v, r in runs.items()} == {"b": "FINISHED"}
        assert [p.info.status for p in parents] == ["FINISHED"]
        assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in runs.values())
        assert runs["b"].data.params["quantizer.levels"] == "[8, 8]"
        assert list((tmp_path / "runs" / "tiny" / "submitit").glob("*_result.pkl"))  # submitit ran them


def streams(notebook: Path) -> list[str]:
    """The training's progress lines among an executed notebook's stream outputs (up to the time),
    and ``refresh`` for each output a progress bar left (a refresh, tqdm's missing-widget warning)."""
    cells = json.loads(notebook.read_text())["cells"]
    texts = [
        "".join(out["text"]) for cell in cells for out in cell.get("outputs", []) if out["output_type"] == "stream"
    ]
    return [
        line.split(" steps in")[0] + " steps in" for text in texts for line in text.splitlines() if "steps in" in line
    ] + ["refresh" for text in texts if "\r" in text or "it/s]" in text or "IProgress" in text]


@pytest.mark.slow
def test_a_seeded_sweep_nests_one_tagged_run_per_variant_and_seed_and_a_rerun_skips_them(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    source = write_sweep(tmp_path, variants={"a": {}, "b": {"quantizer.levels": [8, 8]}}, seeds=[0, 1])
    args = [source, "--smoke", f"tracking.root={tmp_path / 'runs'}"]
    assert sweep.main(args) == 0
    labels = ["a/seed0", "b/seed0", "a/seed1", "b/seed1"]
    printed = capfd.readouterr()
    executed = [line.strip() for line in printed.out.splitlines() if line.startswith("  ")]
    assert executed == [f"{label}: {tmp_path / 'runs' / 'tiny' / label / 'run.ipynb'}" for label in labels]
    loaded = sweep.load(source, extra=root_override(tmp_path), smoke=True)
    mlflow_client = client(loaded.variants[0].cfg.tracking)
    experiment = mlflow_client.get_experiment_by_name("tiny")
    found = mlflow_client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in found if r.data.tags.get("sweep_parent") == "true"]
    runs = {(r.data.tags["variant"], r.data.tags["seed"]): r for r in found if "variant" in r.data.tags}
    assert sorted(runs) == [("a", "0"), ("a", "1"), ("b", "0"), ("b", "1")] and len(found) == 5
    assert parent.info.status == "FINISHED"
    for (variant, seed), run in runs.items():
        assert run.info.status == "FINISHED" and run.info.run_name == f"{variant}/seed{seed}"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.data.tags["sweep"] == "tiny"
        assert run.data.params["train.seed"] == seed
        folder = RunFolder(tmp_path / "runs" / "tiny" / variant / f"seed{seed}")
        assert run.data.tags["vqlab.run_dir"] == str(folder.path.resolve())
        assert folder.read_config().train.seed == int(seed) and folder.is_finished()
        assert folder.root == (tmp_path / "runs").resolve()  # the tracking root, two levels above the group
    assert runs[("a", "0")].data.metrics["train/loss"] != runs[("a", "1")].data.metrics["train/loss"]
    for label in labels:  # each run's own bar in the terminal, below the sweep's
        assert f"{label}:   0%|" in printed.err
        assert streams(tmp_path / "runs" / "tiny" / label / "run.ipynb") == [f"{label.split('/')[1]}: 4/4 steps in"]
    assert not {"WARNING", "ERROR", "IProgress"} & set(re.findall(r"[A-Za-z]+", printed.err)), printed.err

    notebooks = {label: (tmp_path / "runs" / "tiny" / label / "run.ipynb").stat().st_mtime_ns for label in labels}
    assert sweep.main(args) == 0
    assert "skipping 4 finished runs (variant, seed) of tiny" in capfd.readouterr().err
    again = mlflow_client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_id for r in again) == sorted(r.info.run_id for r in found)  # nothing new ran
    for label in labels:
        assert (tmp_path / "runs" / "tiny" / label / "run.ipynb").stat().st_mtime_ns == notebooks[label]


def test_a_recipe_is_the_config_but_where_the_run_is_kept(tmp_path):
    source = write_sweep(tmp_path, variants={"a": {}, "b": {}, "c": {"optim.lr": 1e-3}}, seeds=[0, 1])
    runs = {v.label: v.cfg for v in sweep.load(source, extra=root_override(tmp_path)).variants}
    assert runs["a/seed0"].tracking != runs["b/seed0"].tracking
    assert sweep.recipe(runs["a/seed0"]) == sweep.recipe(runs["b/seed0"])
    assert sweep.recipe(runs["a/seed0"]) != sweep.recipe(runs["a/seed1"])  # another seed
    assert sweep.recipe(runs["a/seed0"]) != sweep.recipe(runs["c/seed0"])


def metric_histories(mlflow_client, run):
    return {
        key: [(m.step, m.value, m.timestamp) for m in mlflow_client.get_metric_history(run.info.run_id, key)]
        for key in run.data.metrics
    }


def artifact_files(mlflow_client, run_id: str, path: str = "") -> list[str]:
    """Every artifact file of a run, folders walked."""
    files = []
    for item in mlflow_client.list_artifacts(run_id, path or None):
        files += artifact_files(mlflow_client, run_id, item.path) if item.is_dir else [item.path]
    return files


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_the_sweep_reads_every_page_of_its_runs(tmp_path, monkeypatch):
    loaded = sweep.load(write_sweep(tmp_path, variants={"a": {}}, seeds=[0, 1, 2]), extra=root_override(tmp_path))
    tracker = sweep.Tracker(loaded)
    for variant in loaded.variants:
        create_run(variant.cfg.tracking, variant.name, tracker.tags(variant)).end("FINISHED")
    search_runs = tracker.client.search_runs
    pages = []

    def one_per_page(*args, **kwargs):  # as a store of more than a page of runs answers
        pages.append(search_runs(*args, **kwargs, max_results=1))
        return pages[-1]

    monkeypatch.setattr(tracker.client, "search_runs", one_per_page)
    assert tracker.finished() == {("a", "0"), ("a", "1"), ("a", "2")} and len(pages) >= 3
    assert len(tracker.attempts(loaded.variants[1])) == 1


@pytest.mark.slow
def test_reuse_copies_the_runs_another_experiment_trained_and_trains_the_others(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    root = f"tracking.root={tmp_path / 'runs'}"
    assert sweep.main([write_sweep(tmp_path, variants={"a": {}}, seeds=[0]), "--smoke", root]) == 0
    mlflow_client = client(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (source,) = mlflow_client.search_runs(
        [mlflow_client.get_experiment_by_name("tiny").experiment_id], "tags.seed = '0'"
    )
    source_folder = Path(source.data.tags["vqlab.run_dir"])
    before = snapshot(source_folder)
    second = tmp_path / "second.yaml"
    variants = {"b": {}, "c": {"quantizer.levels": [8, 8]}}  # b at seed 0 is tiny's a at seed 0
    second.write_text(yaml.safe_dump({"name": "other", "base": "smoke", "variants": variants, "seeds": [0, 1]}))
    loaded = sweep.load(str(second), extra=root_override(tmp_path), smoke=True)
    tracker = sweep.Tracker(loaded)
    # an earlier attempt the run folder does not record (and which started after the source)
    stray = create_run(loaded.variants[0].cfg.tracking, "b/seed0", {"sweep": "other", "variant": "b", "seed": "0"})
    stray.end("FAILED")
    capfd.readouterr()
    assert sweep.main([str(second), "--smoke", root, "--reuse", "tiny"]) == 0
    printed = capfd.readouterr()
    assert "reused b/seed0: tiny/a/seed0" in printed.err and "1 reused" in printed.out
    assert mlflow_client.get_run(stray.run_id).info.lifecycle_stage == "deleted"
    found = mlflow_client.search_runs([mlflow_client.get_experiment_by_name("other").experiment_id])
    (parent,) = [r for r in found if r.data.tags.get("sweep_parent") == "true"]
    runs = {r.info.run_name: r for r in found if "variant" in r.data.tags}
    assert sorted(runs) == ["b/seed0", "b/seed1", "c/seed0", "c/seed1"]
    copy = runs["b/seed0"]
    assert copy.info.status == "FINISHED" and copy.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert (copy.data.tags["sweep"], copy.data.tags["variant"], copy.data.tags["seed"]) == ("other", "b", "0")
    assert copy.data.tags["vqlab.reused_from"] == "tiny/a/seed0"
    assert copy.data.tags["vqlab.reused_run_id"] == source.info.run_id
    for key in ("git_commit", "vqlab.threads", "vqlab.cpu"):  # what made the numbers: the source's
        assert copy.data.tags[key] == source.data.tags[key]
    recipe = {k: v for k, v in copy.data.params.items() if not k.startswith("tracking.")}
    assert recipe == {k: v for k, v in source.data.params.items() if not k.startswith("tracking.")}
    assert (copy.data.params["tracking.experiment"], copy.data.params["tracking.run_group"]) == ("other", "b")
    assert copy.data.metrics == source.data.metrics
    assert metric_histories(mlflow_client, copy) == metric_histories(mlflow_client, source)
    assert (copy.info.start_time, copy.info.end_time) == (source.info.start_time, source.info.end_time)
    artifacts = artifact_files(mlflow_client, copy.info.run_id)
    assert artifacts == artifact_files(mlflow_client, source.info.run_id) and "run.ipynb" in artifacts
    assert any("/" in path for path in artifacts)  # folders of artifacts came along
    folder = RunFolder(tmp_path / "runs" / "other" / "b" / "seed0")
    assert copy.data.tags["vqlab.run_dir"] == str(folder.path.resolve()) and folder.mlflow_run_id() == copy.info.run_id
    config = folder.read_config().tracking
    assert folder.is_finished() and (config.experiment, config.run_group, config.run_name) == ("other", "b", "seed0")
    assert snapshot(source_folder) == before  # the source is read, never written
    assert not list(folder.path.parent.glob(".reusing-*"))
    for label in ("b/seed1", "c/seed0", "c/seed1"):  # trained here
        assert "vqlab.reused_from" not in runs[label].data.tags and runs[label].info.status == "FINISHED"
        assert streams(tmp_path / "runs" / "other" / label / "run.ipynb") == [f"{label.split('/')[1]}: 4/4 steps in"]
    assert sweep.main([str(second), "--smoke", root, "--reuse", "tiny"]) == 0
    assert "skipping 4 finished runs (variant, seed) of other" in capfd.readouterr().err

    # killed while copying, before the copy's MLflow run: the run's folder and run stay as they were
    job = sweep.Job(loaded.variants[0], "smoke", Path("run.ipynb"), parent.info.run_id, {}, 1, True, tmp_path)
    with monkeypatch.context() as patched:
        patched.setattr(sweep, "create_run", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            sweep.reuse(tracker, job, sweep.Reusable("tiny", source, RunFolder(source_folder)))
    assert folder.is_finished() and folder.mlflow_run_id() == copy.info.run_id
    assert not list(folder.path.parent.glob(".reusing-*")) and snapshot(source_folder) == before

    # a copy that fails is removed and the run trains instead
    third = write_sweep(tmp_path, name="third", variants={"d": {}}, seeds=[0])
    with monkeypatch.context() as patched:
        patched.setattr(tracking.MlflowRun, "copy_from", lambda *args, **kw: (_ for _ in ()).throw(RuntimeError("x")))
        assert sweep.main([third, "--smoke", root, "--reuse", "tiny"]) == 0
    assert "could not reuse d/seed0 (RuntimeError: x); training it" in capfd.readouterr().err
    made = mlflow_client.search_runs(
        [mlflow_client.get_experiment_by_name("third").experiment_id], "tags.variant = 'd'"
    )
    assert [(r.info.status, "vqlab.reused_from" in r.data.tags) for r in made] == [("FINISHED", False)]
    assert streams(tmp_path / "runs" / "third" / "d" / "seed0" / "run.ipynb") == ["seed0: 4/4 steps in"]


def test_reusing_an_experiment_the_store_lacks_is_a_one_line_error_before_any_run(tmp_path, capsys):
    source = write_sweep(tmp_path, variants={"a": {}})
    assert sweep.main([source, "--smoke", f"tracking.root={tmp_path / 'runs'}", "--reuse", "nosuch"]) == 2
    printed = capsys.readouterr()
    assert printed.err.startswith("error: --reuse nosuch: no MLflow experiment") and printed.err.count("\n") == 1
    assert not (tmp_path / "runs" / "tiny").exists()


def test_controls_add_one_floor_per_latent_width_and_recipe_at_every_seed(tmp_path):
    variants = {
        "fsq": {"quantizer.name": "fsq", "quantizer.levels": [8, 5, 5, 5]},
        "fsq_lr": {"quantizer.name": "fsq", "quantizer.levels": [8, 5, 5, 5], "optim.lr": 1e-3},
        "vq": {"quantizer.name": "vq_ema", "quantizer.codebook_size": 16, "quantizer.dim": 8},
        "own_floor": {"quantizer.name": "identity", "quantizer.dim": 8},
    }
    source = write_sweep(tmp_path, variants=variants, seeds=[0, 1], controls="identity")
    loaded = sweep.load(source, extra=root_override(tmp_path))
    runs = {(v.name, v.seed): v for v in loaded.variants}
    names = list(dict.fromkeys(v.name for v in loaded.variants))
    # fsq_lr's recipe differs from fsq's, so its floor at width 4 is a run of its own
    assert names == ["fsq", "fsq_lr", "vq", "own_floor", "identity-d4", "identity-d4-fsq_lr"]
    assert {name: runs[name, 0].floor for name in names} == {
        "fsq": "identity-d4",
        "fsq_lr": "identity-d4-fsq_lr",
        "vq": "own_floor",  # the sweep's own identity run at width 8 with the same recipe serves
        "own_floor": "",
        "identity-d4": "",
        "identity-d4-fsq_lr": "",
    }
    floor = runs["identity-d4-fsq_lr", 1].cfg
    assert (floor.quantizer.name, floor.quantizer.dim, floor.optim.lr, floor.train.seed) == ("identity", 4, 1e-3, 1)
    assert [v.control for v in loaded.variants[:6]] == [False, False, False, True, True, True]
    tags = sweep.Tracker.tags(SimpleNamespace(sweep="s", commit="c"), runs["fsq", 1])
    assert tags["floor"] == "identity-d4" and "control" not in tags
    assert sweep.Tracker.tags(SimpleNamespace(sweep="s", commit="c"), runs["identity-d4", 1])["control"] == "true"


@pytest.mark.parametrize("controls", ["fsq", [], 3, ["identity", "vq"]])
def test_controls_naming_no_continuous_control_are_a_one_line_error(tmp_path, capsys, controls):
    source = write_sweep(tmp_path, variants={"a": {}}, controls=controls)
    assert sweep.main([source, "--dry-run", f"tracking.root={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: controls must name a continuous control") and err.count("\n") == 1


@pytest.mark.parametrize(("given", "limit"), [({}, sweep.SUBMITIT_TIMEOUT_MIN), ({"timeout_min": 30}, 30)])
def test_submitit_jobs_get_a_day_unless_a_time_limit_is_given(tmp_path, monkeypatch, given, limit):
    """submitit's own limits (2 minutes on its local executor) would kill a default-recipe run."""
    import submitit

    parameters = []

    class Executor:
        def __init__(self, folder, cluster):
            pass

        def update_parameters(self, **options):
            parameters.append(options)

        def submit(self, fn, job):
            return SimpleNamespace(done=lambda: True, result=lambda: sweep.Outcome(job.variant.label))

    monkeypatch.setattr(submitit, "AutoExecutor", Executor)
    loaded = sweep.load(write_sweep(tmp_path, variants={"a": {}, "b": {}}), extra=root_override(tmp_path))
    jobs = [sweep.Job(v, loaded.base, loaded.notebook, "p", {}, 1, True, tmp_path) for v in loaded.variants]
    outcomes = sweep.run_submitit(jobs, "tiny", tmp_path / "submitit", "local", given)
    assert [o.ok for o in outcomes] == [True, True]
    assert [p["timeout_min"] for p in parameters] == [limit, limit]


def progress_of(tmp_path, rows: str):
    variant = sweep.load(write_sweep(tmp_path, variants={"a": {}}), extra=root_override(tmp_path)).variants[0]
    variant.run.path.mkdir(parents=True)
    variant.run.metrics_file.write_text(rows)
    return sweep.RunProgress(variant)


def test_a_runs_bar_shows_its_newest_complete_training_row(tmp_path):
    row = {"step": 2, "train/loss": 0.25, "train/images_per_s": 123.0}
    half_written = '{"step": 3, "train/lo'
    progress = progress_of(
        tmp_path, json.dumps(row) + "\n" + json.dumps({"step": 2, "val/l1": 0.1}) + "\n" + half_written
    )
    progress.poll()
    assert (progress.bar.n, progress.bar.initial) == (2, 2) and progress.bar.total == load("smoke").train.steps
    assert progress.bar.postfix == "loss=0.25, img/s=123"
    with progress.run.metrics_file.open("a") as file:
        file.write('ss": 0.5}\n')
    progress.poll()
    assert (progress.bar.n, progress.bar.initial, progress.bar.postfix) == (3, 2, "loss=0.5")
    progress.run.metrics_file.write_text(json.dumps({"step": 1, "train/loss": 0.7}) + "\n")  # resumed earlier
    progress.poll()
    assert (progress.bar.n, progress.bar.initial) == (1, 1) and "-" not in str(progress.bar)
    progress.bar.close()


def test_a_runs_bar_waits_for_its_first_training_row(tmp_path):
    progress = progress_of(tmp_path, "")
    progress.poll()
    assert (progress.bar.n, progress.bar.postfix) == (0, None)
    progress.bar.close()
