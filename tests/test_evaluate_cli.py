"""``python -m vqlab.evaluate`` on a smoke run trained without LPIPS/Inception weights: the same
numbers as training-time validation, missing metrics reported as missing, MLflow. Under two
ranks: tests/test_evaluators_ddp.py."""

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import vqlab
from vqlab.evaluate import main
from vqlab.models import build_autoencoder
from vqlab.runfolder import RunFolder
from vqlab.trainer import fit

ALL_METRICS = ["reconstruction", "codebook", "swd", "lpips", "fid"]
MISSING_KEYS = ("lpips", "fid", "isc", "kid")


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory):
    """An empty torch hub cache: no LPIPS trunk, no Inception."""
    return tmp_path_factory.mktemp("torch_home")


@pytest.fixture(autouse=True)
def empty_hub(torch_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors on a shared CPU: a second OpenMP thread mostly waits for the first."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, torch_home, one_thread):
    """4 steps of the smoke preset asking for every metric; returns the result and the warnings."""
    overrides = {
        "tracking.root": str(tmp_path_factory.mktemp("runs")),
        "train.steps": 4,
        "train.log_every": 2,
        "optim.warmup_steps": 0,
        "eval.metrics": ALL_METRICS,
    }
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch.setenv("TORCH_HOME", str(torch_home))
        result = fit(vqlab.config.load("smoke", overrides))
    return result, [str(w.message) for w in caught]


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_training_skips_metrics_whose_weights_are_missing(smoke_run, torch_home):
    result, caught = smoke_run
    hub = torch_home / "hub" / "checkpoints"
    assert any(str(hub / "alexnet-owt-7be5be79.pth") in w and "'lpips' skipped" in w for w in caught)
    assert any(str(hub / "weights-inception-2015-12-05-6726825d.pth") in w and "'fid' skipped" in w for w in caught)
    assert {"val/l1", "val/psnr", "val/ssim", "val/swd", "val/swd_32", "val/codebook_usage"} <= set(result.metrics)
    assert not [k for k in result.metrics if k.split("/")[1].startswith(MISSING_KEYS)]


def test_training_saves_the_code_histogram(smoke_run):
    result, _ = smoke_run
    with np.load(result.run_dir / "codebook_histogram.npz") as saved:
        assert saved["counts"].sum() == 64 * 4 * 4  # val_count images x (32 / 8)^2 tokens
        assert saved["radices"].tolist() == [8, 5, 5, 5]
        assert len(saved["indices"]) / 1000 == pytest.approx(result.metrics["val/codebook_usage"])


def test_training_saves_the_per_image_l1_whose_mean_is_val_l1(smoke_run):
    result, _ = smoke_run
    per_image = np.load(RunFolder(result.run_dir).per_image_l1())
    assert per_image.shape == (64,)  # val_count images, in dataset order
    assert per_image.mean() == pytest.approx(result.metrics["val/l1"], rel=1e-12)


def test_evaluate_reproduces_training_validation(smoke_run, capsys):
    result, _ = smoke_run
    with pytest.warns(UserWarning) as caught:
        assert main(["--run", str(result.run_dir)]) == 0
    assert sorted(str(w.message).split("'")[1] for w in caught) == ["fid", "lpips"]
    record = read(result.run_dir / "eval.json")
    assert record["step"] == 4 and record["world_size"] == 1
    assert record["checkpoint"].endswith("step_0000004.pt")
    assert record["metrics"] == pytest.approx({f"eval/{k[4:]}": v for k, v in result.metrics.items()}, rel=1e-9)
    assert set(record["missing"]) == {"lpips", "fid"}
    assert "weights-inception-2015-12-05-6726825d.pth" in record["missing"]["fid"]
    out = capsys.readouterr().out
    assert "missing fid: FID / IS / KID" in out and "eval/psnr" in out
    with (
        np.load(result.run_dir / "codebook_histogram.npz") as trained,
        np.load(result.run_dir / "eval_codebook_histogram.npz") as evaluated,
    ):
        assert np.array_equal(trained["counts"], evaluated["counts"])


def test_metrics_checkpoint_data_and_output_options(smoke_run, tmp_path):
    result, _ = smoke_run
    out = tmp_path / "small.json"
    checkpoint = result.run_dir / "checkpoints" / "step_0000004.pt"
    args = ["--run", str(result.run_dir), "--checkpoint", str(checkpoint), "--metrics", "reconstruction"]
    assert main([*args, "--out", str(out), "data.val_count=16"]) == 0
    record = read(out)
    assert set(record["metrics"]) == {"eval/l1", "eval/mse", "eval/psnr", "eval/ssim"}
    assert record["data"]["val_count"] == 16 and record["missing"] == {}
    assert record["metrics"]["eval/l1"] != pytest.approx(result.metrics["val/l1"])


def test_the_train_split_counts_the_codes_of_the_first_training_crops(smoke_run):
    result, _ = smoke_run
    assert main(["--run", str(result.run_dir), "--split", "train", "--metrics", "reconstruction,codebook"]) == 0
    record = read(result.run_dir / "eval_train.json")
    assert {"eval_train/l1", "eval_train/codebook_usage"} <= set(record["metrics"])
    run = vqlab.RunFolder(result.run_dir)
    cfg = run.read_config()
    quantizer = vqlab.quantizers.build(cfg.quantizer)
    model = build_autoencoder(cfg.model, quantizer).eval()
    model.load_state_dict(vqlab.checkpoint.latest_valid(run.checkpoints)[1]["model"])
    train = vqlab.data.build_datasets(cfg.data, cfg.train.seed).train
    images = torch.stack([train[i] for i in range(cfg.data.val_count)])
    with torch.no_grad():
        codes = model(images).quant.codes  # (B, N, G)
    distinct = torch.unique(codes.reshape(-1, codes.shape[-1]), dim=0).shape[0]
    assert record["metrics"]["eval_train/codebook_usage"] == pytest.approx(distinct / quantizer.codebook_size)
    assert record["metrics"]["eval_train/l1"] != pytest.approx(result.metrics["val/l1"])


def test_bad_requests_fail_with_a_message(smoke_run, tmp_path, capsys, torch_home):
    result, _ = smoke_run
    assert main(["--run", str(tmp_path)]) == 2
    assert "no run folder" in capsys.readouterr().err
    assert main(["--run", str(result.run_dir), "model.width=8"]) == 2
    assert "cannot change model.width" in capsys.readouterr().err
    strict = ["--run", str(result.run_dir), "--metrics", "lpips", "--out", str(tmp_path / "e.json")]
    assert main([*strict, "eval.missing_weights=error"]) == 2
    assert str(torch_home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth") in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["data.val_count=8", "data.val_count=16"], "data.val_count"),
        (["data.name=imagefolder", "data.root={T}", "data.val_count=2"], "cannot read image {T}/"),
        (["train.device=cuda"], "train.device=cuda"),
        (["--checkpoint", "{T}/none.pt"], "no checkpoint at {T}/none.pt"),
    ],
)
def test_bad_requests_are_one_line_naming_the_input(smoke_run, tmp_path, capsys, arguments, named):
    if "train.device=cuda" in arguments and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(b"junk")
    result, _ = smoke_run
    out = tmp_path / "e.json"
    args = [text.replace("{T}", str(tmp_path)) for text in arguments]
    assert main(["--run", str(result.run_dir), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert named.replace("{T}", str(tmp_path)) in err
    assert not out.exists()


@pytest.mark.parametrize("kind", ["garbage", "truncated", "another model", "not a checkpoint"])
def test_a_checkpoint_that_cannot_be_loaded_is_one_line_naming_it(smoke_run, tmp_path, capsys, kind):
    result, _ = smoke_run
    source = sorted((result.run_dir / "checkpoints").glob("step_*.pt"))[-1]
    bad = tmp_path / "bad.pt"
    if kind == "garbage":
        bad.write_bytes(b"not a checkpoint at all")
    elif kind == "truncated":
        bad.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    elif kind == "another model":
        other = vqlab.config.load("smoke", {"model.width": 8})
        model = build_autoencoder(other.model, vqlab.quantizers.build(other.quantizer))
        torch.save({"model": model.state_dict(), "step": 4}, bad)
    else:
        torch.save({"weights": torch.zeros(3)}, bad)
    out = tmp_path / "e.json"
    assert main(["--run", str(result.run_dir), "--checkpoint", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}") and err.count("\n") == 1
    assert not out.exists()


def test_a_corrupt_run_config_names_its_file(smoke_run, tmp_path, capsys):
    result, _ = smoke_run
    run_dir = tmp_path / "run"
    shutil.copytree(result.run_dir, run_dir)
    (run_dir / "config.yaml").write_text("train: [\n")
    assert main(["--run", str(run_dir)]) == 2
    assert f"error: {run_dir / 'config.yaml'} is not valid YAML: line 2" in capsys.readouterr().err


def test_evaluate_logs_to_the_runs_mlflow_run(smoke_run, tmp_path, capsys):
    from mlflow import MlflowClient

    result, _ = smoke_run
    run_dir = tmp_path / "smoke" / result.run_dir.name
    shutil.copytree(result.run_dir, run_dir)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(
        client.create_experiment("smoke", artifact_location=(tmp_path / "art").as_uri())
    ).info.run_id
    (run_dir / "mlflow_run_id").write_text(run_id + "\n")
    args = ["--run", str(run_dir), "--metrics", "reconstruction,codebook"]
    assert main([*args, "tracking.mlflow=true", f"tracking.mlflow_uri={uri}"]) == 0
    evaluated = read(run_dir / "eval.json")["metrics"]
    logged = client.get_run(run_id).data.metrics
    assert {k: logged[k] for k in evaluated} == pytest.approx(evaluated)
    assert {m.step for m in client.get_metric_history(run_id, "eval/l1")} == {4}
    files = {Path(a.path).name for a in client.list_artifacts(run_id, "eval")}
    assert files == {"eval.json", "eval_codebook_histogram.npz", "eval_per_image_l1.npy"}
    assert np.load(run_dir / "eval_per_image_l1.npy").mean() == pytest.approx(evaluated["eval/l1"], rel=1e-12)
    (run_dir / "mlflow_run_id").unlink()
    capsys.readouterr()
    assert main([*args, "tracking.mlflow=true", f"tracking.mlflow_uri={uri}"]) == 0  # eval.json only
    assert "no MLflow run recorded" in capsys.readouterr().err


def test_the_model_ema_code_histogram_is_saved_beside_the_models(tmp_path):
    overrides = {"tracking.root": str(tmp_path), "train.steps": 2, "optim.warmup_steps": 0, "train.ema_decay": 0.5}
    result = fit(vqlab.config.load("smoke", overrides))
    assert main(["--run", str(result.run_dir)]) == 0
    evaluated = read(result.run_dir / "eval.json")["metrics"]
    for name, metrics, key in (
        ("codebook_histogram.npz", result.metrics, "val/"),
        ("ema_codebook_histogram.npz", result.metrics, "val_ema/"),
        ("eval_codebook_histogram.npz", evaluated, "eval/"),
        ("eval_ema_codebook_histogram.npz", evaluated, "eval_ema/"),
    ):
        with np.load(result.run_dir / name) as saved:
            assert saved["counts"].sum() == 64 * 4 * 4, name
            assert len(saved["indices"]) / 1000 == pytest.approx(metrics[f"{key}codebook_usage"]), name
    assert result.metrics["val_ema/codebook_usage"] != result.metrics["val/codebook_usage"]  # another histogram
