"""Resuming runs: whatever the folder holds, the run named is the run continued, exactly."""

import os
import shutil
import subprocess
import sys
import warnings
from collections import Counter

import pytest
import torch

import vqlab
from vqlab import checkpoint, losses
from vqlab.config import read_source
from vqlab.errors import ResumeError
from vqlab.runfolder import RunFolder
from vqlab.trainer import NonFiniteLossError, fit, main

from .helpers import assert_states_equal, final_state

SHORT = {"train.steps": 6, "train.checkpoint_every": 2, "train.log_every": 1, "optim.warmup_steps": 0}


def forget_after(run: RunFolder, step: int) -> None:
    """What a SIGKILL after the checkpoint of ``step`` leaves: later checkpoints gone, the pointer
    at ``step``, and the records the killed process wrote after it still in place."""
    for path in checkpoint.step_files(run.checkpoints):
        if int(path.stem[5:]) > step:
            path.unlink()
    (run.checkpoints / "last").write_text(checkpoint.step_path(run.checkpoints, step).name + "\n")


def logged_pairs(run: RunFolder) -> Counter:
    return Counter((row["step"], key) for row in run.read_metrics() for key in row if key != "step")


def preset_quantizer_cfg(name: str, root, **overrides):
    raw = read_source("smoke")
    raw["quantizer"] = read_source(name)["quantizer"]
    return vqlab.config.load(raw, {"tracking.root": str(root), **SHORT, **overrides})


@pytest.mark.parametrize("name", vqlab.quantizers.available())
def test_every_quantizer_resumes_bit_for_bit(name, tmp_path):
    cfg = preset_quantizer_cfg(name, tmp_path, **{"tracking.run_name": "r", "eval.every": 2})
    whole = fit(cfg)
    reference = final_state(whole.run_dir)
    run = RunFolder(whole.run_dir)
    forget_after(run, 2)
    resumed = fit(cfg, resume="auto")
    assert resumed.resumed_from == checkpoint.step_path(run.checkpoints, 2)
    assert_states_equal(reference, final_state(run.path))
    assert resumed.metrics == whole.metrics


def test_a_run_killed_before_its_first_checkpoint_continues_in_its_own_folder(smoke_cfg):
    cfg = smoke_cfg(**SHORT, **{"tracking.run_name": "early"})
    first = fit(cfg)
    run = RunFolder(first.run_dir)
    shutil.rmtree(run.checkpoints)  # killed before step 2's checkpoint: config and metrics only
    again = fit(cfg, resume="auto")
    assert again.run_dir == run.path and again.resumed_from is None
    assert sorted(p.name for p in run.path.parent.iterdir()) == ["early"]
    assert max(logged_pairs(run).values()) == 1  # step 0 and every later step logged once
    assert again.metrics == first.metrics  # the same run, from step 0


def test_a_folder_made_beforehand_is_used(smoke_cfg):
    cfg = smoke_cfg(**SHORT, **{"tracking.run_name": "prepared"})
    run = RunFolder.of(cfg)
    run.path.mkdir(parents=True)
    (run.path / "notes.txt").write_text("made by a driver\n")
    result = fit(cfg)
    assert result.run_dir == run.path and run.has_config()
    assert (run.path / "notes.txt").is_file()


def test_when_no_checkpoint_loads_the_run_stops_naming_them_unless_restarted(smoke_cfg):
    cfg = smoke_cfg(**SHORT, **{"tracking.run_name": "torn"})
    run = RunFolder(fit(cfg).run_dir)
    files = checkpoint.step_files(run.checkpoints)
    for path in files:
        path.write_bytes(b"torn")
    before = run.metrics_file.read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ResumeError, match=r"step_0000006\.pt") as caught:
            fit(cfg, resume="auto")
    assert "--restart" in str(caught.value)
    assert run.metrics_file.read_text() == before
    restarted = fit(cfg, resume="auto", restart=True)
    assert restarted.resumed_from is None
    assert max(logged_pairs(run).values()) == 1
    aside = [p for p in run.checkpoints.iterdir() if p.name.startswith("discarded-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].glob("step_*.pt")) == [p.name for p in files]
    assert checkpoint.latest_valid(run.checkpoints)[1]["step"] == 6


def test_resume_from_a_named_checkpoint_file_uses_that_file(smoke_cfg):
    cfg = smoke_cfg(**SHORT, **{"tracking.run_name": "file"})
    whole = fit(cfg)
    reference = final_state(whole.run_dir)
    chosen = checkpoint.step_path(whole.run_dir / "checkpoints", 2)
    resumed = fit(cfg, resume=str(chosen))
    assert resumed.resumed_from == chosen
    assert_states_equal(reference, final_state(whole.run_dir))
    assert max(logged_pairs(RunFolder(whole.run_dir)).values()) == 1


def test_resuming_a_finished_run_reports_its_metrics_and_checkpoint(smoke_cfg, capsys):
    root = smoke_cfg().tracking.root
    args = [
        "--config",
        "smoke",
        f"tracking.root={root}",
        "tracking.run_name=done",
        "train.steps=4",
        "optim.warmup_steps=0",
    ]
    assert main(args) == 0
    run = RunFolder(RunFolder.of(smoke_cfg(**{"tracking.run_name": "done"})).path)
    capsys.readouterr()
    assert main([*args, "--resume", "auto"]) == 0
    captured = capsys.readouterr()
    assert "complete at step 4" in captured.err and "step_0000004.pt" in captured.err
    model_row = next(line for line in captured.out.splitlines() if line.startswith("model"))
    assert f"{run.last_metrics('val/')['val/l1']:.4f}" in model_row


def test_a_resumed_run_says_which_checkpoint_it_loaded(smoke_cfg, capsys):
    cfg = smoke_cfg(**SHORT, **{"tracking.run_name": "said"})
    run = RunFolder(fit(cfg).run_dir)
    forget_after(run, 4)
    capsys.readouterr()
    fit(cfg, resume="auto")
    assert f"from {checkpoint.step_path(run.checkpoints, 4)} at step 4" in capsys.readouterr().out


def test_mlflow_agrees_with_metrics_jsonl_after_a_resume(smoke_cfg, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = smoke_cfg(**SHORT, **{"tracking.run_name": "tracked", "tracking.mlflow": True, "tracking.mlflow_uri": uri})
    run = RunFolder(fit(cfg).run_dir)
    forget_after(run, 2)  # steps 3..6 were logged by the "killed" process
    fit(cfg, resume="auto")
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(run.mlflow_run_id(), "train/loss")
    recorded = {row["step"]: row["train/loss"] for row in run.read_metrics() if "train/loss" in row}
    assert sorted(m.step for m in history) == sorted(recorded)
    assert {m.step: m.value for m in history} == pytest.approx(recorded)
    alive = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert [r.info.run_id for r in alive] == [run.mlflow_run_id()]


def test_a_save_killed_midway_leaves_no_temporary_behind(smoke_cfg):
    cfg = smoke_cfg(**SHORT, **{"tracking.run_name": "tmp"})
    run = RunFolder(fit(cfg).run_dir)
    forget_after(run, 4)
    stale = run.checkpoints / ".step_0000006.pt.tmp-12345"
    stale.write_bytes(b"half a checkpoint")
    fit(cfg, resume="auto")
    assert not stale.exists()


def test_pruning_orders_checkpoints_by_step_beyond_seven_digits(tmp_path):
    for step in (9_999_999, 10_000_000, 10_000_001):
        checkpoint.save_step({"step": step}, tmp_path, step, keep=2)
    kept = [checkpoint.load(p)["step"] for p in checkpoint.step_files(tmp_path)]
    assert kept == [10_000_000, 10_000_001]
    assert checkpoint.latest_valid(tmp_path)[1]["step"] == 10_000_001


def test_the_non_finite_stop_does_not_promise_a_checkpoint_it_does_not_have(smoke_cfg, monkeypatch):
    real = losses.reconstruction_losses
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        values = real(*args)
        return {k: v * float("nan") for k, v in values.items()} if calls["n"] == 3 else values

    monkeypatch.setattr(losses, "reconstruction_losses", poisoned)
    with pytest.raises(NonFiniteLossError, match="at step 3; no checkpoint was written yet"):
        fit(smoke_cfg(**{"tracking.run_name": "nan"}))


def test_gumbel_noise_does_not_depend_on_the_passes_made_before_the_loop(smoke_cfg):
    """The loaders draw their iterator seeds from their own generators, not the global one."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    cfg = smoke_cfg()
    loaders = vqlab.data.build_datasets(cfg.data, 0)
    for loader in (vqlab.data.train_loader(loaders.train, cfg.data, 0), vqlab.data.val_loader(loaders.val, cfg.data)):
        next(iter(loader))
    assert torch.equal(torch.rand(3), expected)


# What a kill -9 right after the final checkpoint leaves: checkpoint written, final validation
# logged, no figure, the MLflow run RUNNING, the folder not marked finished.
KILLED_BEFORE_THE_FIGURE = """
import os, sys
from vqlab import lifecycle
from vqlab.trainer import main
lifecycle.ShowcaseCrops.reconstruct = lambda *args: os._exit(9)
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_killed_after_its_final_checkpoint_does_its_end_phase_when_resumed(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--config", "smoke", f"tracking.root={tmp_path / 'runs'}", "train.steps=6", "train.checkpoint_every=3"]
    args += ["train.log_every=1", "tracking.mlflow=true", f"tracking.mlflow_uri={uri}"]

    def train(*extra, script=None):
        head = ["-c", script] if script else ["-m", "vqlab.train"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, *head, *args, *extra], env=env, capture_output=True, text=True)

    assert train("tracking.run_name=whole").returncode == 0
    cut = train("tracking.run_name=cut", script=KILLED_BEFORE_THE_FIGURE)
    assert cut.returncode == 9, cut.stderr[-2000:]
    run, whole = RunFolder(tmp_path / "runs" / "smoke" / "cut"), RunFolder(tmp_path / "runs" / "smoke" / "whole")
    client = MlflowClient(tracking_uri=uri)
    assert checkpoint.step_files(run.checkpoints)[-1].name == "step_0000006.pt"
    assert not run.figure("reconstructions.png").exists() and not run.is_finished()
    assert not run.reconstructions.exists()
    assert client.get_run(run.mlflow_run_id()).info.status == "RUNNING"

    resumed = train("tracking.run_name=cut", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert run.figure("reconstructions.png").is_file() and run.is_finished()
    assert run.histogram().is_file() and run.reconstructions.is_file()
    recorded = client.get_run(run.mlflow_run_id())
    assert recorded.info.status == "FINISHED" and recorded.info.end_time is not None
    assert "figures" in {a.path for a in client.list_artifacts(run.mlflow_run_id())}
    wall = ("train/images_per_s",)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in wall} for r in rows]  # noqa: E731
    assert strip(run.read_metrics()) == strip(whole.read_metrics())  # the final validation logged once
    # finished now: a further resume reports what the run recorded and does nothing else
    again = train("tracking.run_name=cut", "--resume", "auto")
    assert again.returncode == 0 and "complete at step 6" in again.stderr
    assert strip(run.read_metrics()) == strip(whole.read_metrics())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--restart needs tracking.run_name"),
        (["tracking.run_name=new", "--resume", "auto"], "there is no run"),
    ],
)
def test_a_restart_with_nothing_to_restart_is_refused_before_anything_is_written(smoke_cfg, capsys, extra, message):
    root = smoke_cfg().tracking.root
    assert main(["--config", "smoke", f"tracking.root={root}", *extra, "--restart"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not os.path.exists(root)


def test_resuming_from_a_truncated_checkpoint_file_is_one_line_naming_it(smoke_cfg, capsys):
    cfg = smoke_cfg(**SHORT, **{"tracking.run_name": "cut"})
    run = RunFolder(fit(cfg).run_dir)
    chosen = checkpoint.step_path(run.checkpoints, 4)
    chosen.write_bytes(chosen.read_bytes()[:1000])
    rows = run.read_metrics()
    capsys.readouterr()
    args = ["--config", "smoke", f"tracking.root={cfg.tracking.root}", "tracking.run_name=cut"]
    args += [f"{k}={v}" for k, v in SHORT.items()]
    assert main([*args, "--resume", str(chosen)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {chosen} is not a readable checkpoint") and err.count("\n") == 1
    assert run.read_metrics() == rows  # nothing written
