import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

import vqlab
from vqlab import checkpoint
from vqlab.config import from_yaml
from vqlab.tracking import TRIVIAL_CODECS
from vqlab.trainer import fit
from vqlab.trainer import main as trainer_main

from .helpers import assert_states_equal, final_state, metric_at, read_metrics


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return fit(vqlab.config.load("smoke", {"tracking.root": str(root)}))


def test_smoke_run_learns(smoke_run):
    first = metric_at(smoke_run.run_dir, "val/l1", 0)
    last = smoke_run.metrics["val/l1"]
    assert last < 0.75 * first
    assert metric_at(smoke_run.run_dir, "val/psnr", 60) > metric_at(smoke_run.run_dir, "val/psnr", 0)
    assert 0 < smoke_run.metrics["val/codebook_usage"] <= 1


def test_smoke_run_writes_every_output(smoke_run):
    run_dir = smoke_run.run_dir
    assert run_dir.parent.name == "smoke"
    cfg = from_yaml((run_dir / "config.yaml").read_text())
    assert cfg.train.steps == 60
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if "train/loss" in r] == [10, 20, 30, 40, 50, 60]
    assert {"train/l1", "train/lr", "train/grad_norm", "train/perplexity", "train/images_per_s"} <= set(rows[-3])
    assert {"baseline/l1", "baseline/psnr", "model/params"} <= set(rows[0])
    assert rows[0]["model/tokens"] == 16  # 32x32 crops, f8
    assert rows[0]["model/bits_per_token"] == pytest.approx(math.log2(1000))  # FSQ 8-5-5-5
    png = run_dir / "figures" / "reconstructions.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "checkpoints" / "last").read_text().strip() == "step_0000060.pt"
    state = checkpoint.load(run_dir / "checkpoints" / "step_0000060.pt")
    assert state["step"] == 60 and state["world_size"] == 1 and len(state["rng"]) == 1
    model = vqlab.models.build_autoencoder(cfg.model, vqlab.quantizers.build(cfg.quantizer))
    model.load_state_dict(state["model"])
    assert not list(run_dir.glob("checkpoints/.*tmp*"))


def test_the_end_phase_keeps_the_shown_crops_reconstructions_from_several_photos(smoke_run):
    """``reconstructions.npz``: the shown validation crops (from every validation photo), what the
    final weights and the trivial codecs make of them, and the figure that shows them, labelled."""
    from PIL import Image

    from vqlab import data, showcase
    from vqlab.evaluators.baselines import block_mean
    from vqlab.runfolder import RunFolder

    run = RunFolder(smoke_run.run_dir)
    shown = showcase.Showcase.read(run.reconstructions)
    cfg = run.read_config()
    val = data.build_datasets(cfg.data, cfg.train.seed).val
    assert len(shown.indices) == cfg.eval.grid_images and shown.step == cfg.train.steps
    assert len({val.crops[i][0] for i in shown.indices}) == len(data.VAL_PHOTOS)  # every photo, not one
    crops = torch.stack([val[int(i)] for i in shown.indices])
    np.testing.assert_array_equal(shown.originals, showcase.to_uint8(crops))
    model = vqlab.models.build_autoencoder(cfg.model, vqlab.quantizers.build(cfg.quantizer)).eval()
    model.load_state_dict(checkpoint.load(run.checkpoints / "step_0000060.pt")["model"])
    with torch.no_grad():
        np.testing.assert_array_equal(shown.rows["model"], showcase.to_uint8(model(crops).reconstruction))
    np.testing.assert_array_equal(shown.rows["baseline"], showcase.to_uint8(block_mean(crops, model.downsample)))
    assert set(shown.rows) == {"model", *TRIVIAL_CODECS} and shown.colors["baseline_palette"] == 1000
    width, height = Image.open(run.figure("reconstructions.png")).size
    assert width >= cfg.eval.grid_images * showcase.CROP_PX and height >= 5 * showcase.CROP_PX  # 5 rows of 96 px
    figure = showcase.run_figure(shown, "t")
    labels = [axes.get_ylabel() for axes in figure.axes]
    assert labels[:2] == ["original", "this model"] and labels[2].startswith(TRIVIAL_CODECS["baseline"])


def test_the_shown_crops_are_the_same_whatever_the_run():
    from vqlab import data
    from vqlab.showcase import showcase_indices

    val = data.build_datasets(vqlab.config.load("smoke").data, seed=0).val
    other = data.build_datasets(vqlab.config.load("smoke").data, seed=5).val
    assert showcase_indices(val, 8) == showcase_indices(other, 8)
    assert len(set(showcase_indices(val, 8))) == 8 and len(showcase_indices(val, 1000)) == len(val)


def test_same_seed_same_metrics(smoke_run, smoke_cfg):
    again = fit(smoke_cfg(**{"tracking.run_name": "again"}))
    assert again.metrics == smoke_run.metrics
    assert again.run_dir != smoke_run.run_dir


def test_other_seed_other_metrics(smoke_run, smoke_cfg):
    other = fit(smoke_cfg(**{"train.seed": 1, "train.steps": 60}))
    assert other.metrics["val/l1"] != smoke_run.metrics["val/l1"]


def test_batches_made_on_the_device_train_the_same_weights(smoke_run, smoke_cfg):
    """``data.on_device`` changes where the photos' crops are cut, not which: the run is the same bit
    for bit, checkpoint and metrics."""
    on_device = fit(smoke_cfg(**{"data.on_device": True, "tracking.run_name": "on_device"}))
    assert on_device.metrics == smoke_run.metrics
    assert_states_equal(final_state(on_device.run_dir), final_state(smoke_run.run_dir))


def test_bf16_autocast_run(smoke_cfg):
    result = fit(smoke_cfg(**{"train.dtype": "bf16", "train.steps": 20, "train.log_every": 5}))
    rows = read_metrics(result.run_dir)
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in rows if "train/loss" in r)
    assert result.metrics["val/l1"] < metric_at(result.run_dir, "val/l1", 0)


def test_a_named_run_is_never_overwritten_nor_silently_renamed(smoke_cfg):
    cfg = smoke_cfg(**{"tracking.run_name": "fixed", "train.steps": 2, "optim.warmup_steps": 0})
    first = fit(cfg)
    before = (first.run_dir / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match="--resume auto"):
        fit(cfg)
    assert (first.run_dir / "metrics.jsonl").read_text() == before
    assert sorted(p.name for p in first.run_dir.parent.iterdir()) == ["fixed"]


def test_unnamed_runs_get_new_folders(smoke_cfg):
    cfg = smoke_cfg(**{"train.steps": 2, "optim.warmup_steps": 0})
    assert fit(cfg).run_dir != fit(cfg).run_dir


def test_mlflow_records_params_metrics_and_artifacts(smoke_cfg, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = fit(smoke_cfg(**{"tracking.mlflow": True, "tracking.mlflow_uri": uri, "train.steps": 10}))
    # a client of its own: mlflow.set_tracking_uri would set $MLFLOW_TRACKING_URI for every later test
    client = mlflow.tracking.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert run.info.run_name == result.run_dir.name
    assert run.data.params["quantizer.name"] == "fsq" and run.data.params["quantizer.levels"] == "[8, 5, 5, 5]"
    assert run.data.metrics["val/l1"] == pytest.approx(result.metrics["val/l1"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "figures"} <= artifacts
    assert (tmp_path / "runs" / "mlartifacts").is_dir()


def test_a_run_nests_under_a_parent_mlflow_run_with_its_tags(smoke_cfg, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    parent = client.create_run(
        client.create_experiment("smoke", artifact_location=(tmp_path / "art").as_uri()), run_name="sweep"
    ).info.run_id
    tracking = {"tracking.mlflow": True, "tracking.mlflow_uri": uri, "tracking.parent_run_id": parent}
    cfg = smoke_cfg(
        **tracking, **{"tracking.tags": {"sweep": "s", "variant": "v"}, "train.steps": 2, "optim.warmup_steps": 0}
    )
    result = fit(cfg)
    child = client.get_run((result.run_dir / "mlflow_run_id").read_text().strip())
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert child.data.tags["sweep"] == "s" and child.data.tags["variant"] == "v"
    assert child.info.status == "FINISHED" and client.get_run(parent).info.status == "RUNNING"
    assert vqlab.config.load("smoke", ["tracking.tags.variant=w"]).tracking.tags == {"variant": "w"}


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "vqlab.train", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_help(tmp_path):
    out = run_cli("--help", cwd=tmp_path)
    assert out.returncode == 0 and "key=value" in out.stdout


@pytest.mark.parametrize("override", ["quantizer.levels=[8,1]", "train.stepz=5", "data.batch_size=0"])
def test_cli_bad_override_fails_naming_the_key_and_writes_nothing(tmp_path, override):
    out = run_cli("--config", "smoke", override, f"tracking.root={tmp_path / 'runs'}", cwd=tmp_path)
    assert out.returncode == 2
    assert override.split("=")[0] in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_runs_a_yaml_file(tmp_path):
    cfg = yaml.safe_load(vqlab.config.to_yaml(vqlab.config.load("smoke")))
    cfg["train"]["steps"] = 3
    cfg["optim"]["warmup_steps"] = 1
    cfg["tracking"]["root"] = str(tmp_path / "runs")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = run_cli("--config", str(path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "run folder:" in out.stdout
    assert len(list((tmp_path / "runs" / "smoke").iterdir())) == 1


def test_block_mean_baselines_by_hand():
    from vqlab.evaluators import block_mean, palette_levels

    images = torch.tensor([[[[0.1, 0.3], [0.5, -0.9]]]])  # (1, 1, 2, 2), mean 0.0
    assert torch.equal(block_mean(images, 2), torch.zeros(1, 1, 2, 2))
    shifted = images + 0.5  # mean 0.5, halfway between levels 0 and 1 of {-1, 0, 1}: rounds (half to even) to 1
    assert torch.allclose(block_mean(shifted, 2, levels=3), torch.ones(1, 1, 2, 2))
    assert [palette_levels(k) for k in (1000, 1024, 64, 63, 2)] == [10, 10, 4, 3, 2]


def test_smoke_run_reports_the_three_trivial_codecs(smoke_run):
    for palette in ("baseline_palette", "baseline_kmeans"):
        assert smoke_run.baseline[f"{palette}/colors"] == 1000
        assert smoke_run.baseline[f"{palette}/l1"] > smoke_run.baseline["baseline/l1"]


def test_the_terminal_shows_headline_metrics_and_a_final_table(tmp_path, capsys):
    from vqlab.trainer import main

    args = ["--config", "smoke", f"tracking.root={tmp_path}", "train.steps=4", "optim.warmup_steps=0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    step0 = next(line for line in out.splitlines() if line.startswith("step 0 "))
    assert "l1" in step0 and "psnr" in step0 and "codebook_usage" in step0
    assert "digit" not in out  # per-digit detail stays in the files and MLflow
    header, *rows = out.split("run folder:")[1].splitlines()[1:]
    assert header.split() == ["l1", "mse", "psnr", "ssim", "codebook_usage", "perplexity"]
    labels = [re.split(r"\s{2,}", row)[0] for row in rows]
    assert labels == ["model", *TRIVIAL_CODECS.values()]
    assert rows[1].split()[-2:] == ["-", "-"]  # the baselines have no codes to count
    assert max(len(line) for line in out.splitlines()) < 140


def test_the_progress_bar_shows_what_a_person_watches(tmp_path):
    from vqlab.config import TrackingConfig
    from vqlab.runfolder import RunFolder
    from vqlab.tracking import RunLogger

    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    logger = RunLogger(TrackingConfig(root=str(tmp_path), mlflow=False), run, 10, {})
    logger.log({"val/l1": 0.2, "val/usage_digit0": 0.5, "val/perplexity_digit0": 3.0}, step=0)
    assert logger.bar.postfix is None
    logger.log({"train/loss": 0.5, "train/lr": 1e-3, "train/images_per_s": 99.0, "train/perplexity": 7.0}, step=1)
    assert logger.bar.postfix.replace(" ", "") == "loss=0.5,lr=0.001,img/s=99"
    logger.close()
    assert [row["step"] for row in run.read_metrics()] == [0, 1]


def test_validation_measures_codebooks_beyond_int64(smoke_cfg):
    """RVQ, 7 stages over a 1024-code FSQ: 2^70 codes, more than an int64 flat index can hold."""
    rvq = {"quantizer.name": "rvq", "quantizer.depth": 7, "quantizer.base": {"name": "fsq", "levels": [8, 8, 4, 4]}}
    result = fit(smoke_cfg(**rvq, **{"train.steps": 2, "optim.warmup_steps": 0}))
    assert 0 < metric_at(result.run_dir, "val/codebook_usage", 0) <= 64 * 16 / 2**70  # at most one code per token
    with np.load(result.run_dir / "codebook_histogram.npz") as saved:
        assert saved["radices"].tolist() == [1024] * 7 and saved["digits"].shape[1] == 7
        assert saved["counts"].sum() == 64 * 16  # 64 images x 16 tokens


def corrupt_image_folder(root):
    """Eight PNGs that are not PNGs: whatever the loaders read first does not decode."""
    root.mkdir()
    for i in range(8):
        (root / f"{i}.png").write_bytes(b"junk")
    return root


# The arguments, and what the one-line error must name; {T} is the test's temporary folder. Each
# of these was a traceback, or a silent run, before bad input became a UserError.
BAD_INPUTS = {
    "batch larger than the data": ("data.batch_size=5000", "data.batch_size=5000"),
    "too many validation crops": ("data.val_count=100000", "data.val_count=100000"),
    "missing image folder": ("data.name=imagefolder data.root={T}/nope", "{T}/nope"),
    "missing cifar": ("data.name=cifar10 data.root={T}", "{T}/cifar-10-batches-py"),
    "corrupt image folder": (
        "data.name=imagefolder data.root={T}/images data.val_count=2 data.batch_size=4",
        "{T}/images/",
    ),
    "key given twice": ("train.steps=5 train.steps=7", "train.steps"),
    "yaml syntax error": ("--config {T}/syntax.yaml", "{T}/syntax.yaml is not valid YAML: line 3"),
    "yaml key given twice": ("--config {T}/twice.yaml", "{T}/twice.yaml"),
    "config is a directory": ("--config {T}/images", "{T}/images is a directory"),
    "resume a missing run": ("--resume {T}/nope", "{T}/nope"),
    "resume auto without a run name": ("--resume auto", "tracking.run_name"),
    "lpips without weights": ("loss.perceptual.weight=1", "{T}/hub/checkpoints/alexnet"),
    "strict fid without weights": (
        "eval.metrics=[fid] eval.missing_weights=error",
        "{T}/hub/checkpoints/weights-incep",
    ),
    "no cuda here": ("train.device=cuda", "train.device=cuda"),
    "runs root is a file": ("tracking.root={T}/syntax.yaml", "tracking.root {T}/syntax.yaml is a file"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_cli_bad_input_is_one_line_naming_it(tmp_path, capsys, monkeypatch, case):
    if case == "no cuda here" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no weights in its hub cache
    (tmp_path / "syntax.yaml").write_text("train:\n  steps: [3\noptim:\n  lr: 1\n")
    (tmp_path / "twice.yaml").write_text("train:\n  steps: 5\n  steps: 7\n")
    corrupt_image_folder(tmp_path / "images")
    arguments, named = (text.replace("{T}", str(tmp_path)).split() for text in BAD_INPUTS[case])
    config = [] if "--config" in arguments else ["--config", "smoke"]
    root = tmp_path / "runs"
    overrides = [f"tracking.root={root}", "tracking.mlflow=false"]
    overrides = [o for o in overrides if o.split("=")[0] not in {a.split("=")[0] for a in arguments}]
    argv = [*config, *overrides, *arguments] if arguments[0] != "--resume" else [*config, *arguments, *overrides]
    assert trainer_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert " ".join(named) in err
    assert not root.exists()


def test_unreadable_data_leaves_no_run_folder(tmp_path, capsys):
    root = tmp_path / "runs"
    images = corrupt_image_folder(tmp_path / "images")
    argv = [
        "--config",
        "smoke",
        "data.name=imagefolder",
        f"data.root={images}",
        "data.val_count=2",
        "data.batch_size=4",
    ]
    assert trainer_main([*argv, f"tracking.root={root}", "tracking.mlflow=false"]) == 2
    assert str(images) in capsys.readouterr().err
    assert not root.exists()


def test_an_experiment_created_by_another_process_meanwhile_is_found_not_an_error(tmp_path, monkeypatch):
    """Two runs starting at once in a new experiment: the second one's creation fails, and it
    takes the experiment the first one created."""
    from vqlab.config import TrackingConfig
    from vqlab.tracking import client, experiment_id

    cfg = TrackingConfig(root=str(tmp_path), experiment="E", mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow_client = client(cfg)
    created = mlflow_client.create_experiment("E")
    real = mlflow_client.get_experiment_by_name
    calls = []

    def not_there_yet(name):  # the first look happens before the other process's creation
        calls.append(name)
        return None if len(calls) == 1 else real(name)

    monkeypatch.setattr(mlflow_client, "get_experiment_by_name", not_there_yet)
    assert experiment_id(mlflow_client, cfg) == created
    assert len(calls) == 2
    assert real("E").tags["mlflow.experimentKind"] == "custom_model_development"  # the other's lacked it


def test_experiments_are_marked_model_training_new_ones_and_ones_made_before(tmp_path, monkeypatch):
    """MLflow's UI opens an experiment on its runs table only when the tag ``mlflow.experimentKind``
    says ``custom_model_development`` (written here as MLflow's UI spells it, not read from vqlab)."""
    from vqlab.config import TrackingConfig
    from vqlab.tracking import client, create_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_client = client(uri)
    made_before = mlflow_client.create_experiment("old")
    mlflow_client.create_experiment("inferred", tags={"mlflow.experimentKind": "genai_development"})
    for name in ("new", "old", "inferred"):
        create_run(TrackingConfig(root=str(tmp_path), experiment=name, mlflow_uri=uri), "run")
        tags = mlflow_client.get_experiment_by_name(name).tags
        assert tags["mlflow.experimentKind"] == "custom_model_development", name
    assert mlflow_client.get_experiment(made_before).tags["mlflow.experimentKind"] == "custom_model_development"
    written = []
    monkeypatch.setattr(type(mlflow_client), "set_experiment_tag", lambda *args: written.append(args))
    create_run(TrackingConfig(root=str(tmp_path), experiment="old", mlflow_uri=uri), "again")
    assert written == []  # marked once: later runs do not write the tag again


def test_one_factory_makes_mlflow_runs_tagged_with_their_resolved_folder_and_parent(tmp_path):
    from vqlab.config import TrackingConfig
    from vqlab.runfolder import RunFolder
    from vqlab.tracking import client, create_run

    cfg = TrackingConfig(root=str(tmp_path), experiment="E", mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = create_run(cfg, "parent", {"sweep": "s"})
    folder = RunFolder(tmp_path / "E" / ".." / "E" / "child")
    folder.path.mkdir(parents=True)
    child = create_run(cfg, "child", {"variant": "v"}, folder, parent.run_id)
    assert folder.mlflow_run_id() == child.run_id
    tags = client(cfg.mlflow_uri).get_run(child.run_id).data.tags
    assert tags["vqlab.run_dir"] == str((tmp_path / "E" / "child").resolve())
    assert tags["mlflow.parentRunId"] == parent.run_id and tags["variant"] == "v"
    made = client(cfg).get_run(parent.run_id)
    assert made.info.run_name == "parent" and made.data.tags["sweep"] == "s" and "vqlab.run_dir" not in made.data.tags
