"""The MLflow store vqlab opens: created once even when processes start together; never created by a read."""

import contextlib
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vqlab import mlflow_store

ROOT = Path(__file__).resolve().parents[1]

# A process that imports everything first, says so, waits for "go" on stdin and only then opens a
# new store through vqlab and records a run in it: two of them told "go" together create the store
# at the same moment, however slowly each one imported.
OPEN_TOGETHER = textwrap.dedent(
    """
    import sys
    from vqlab.config import TrackingConfig
    from vqlab import tracking
    import mlflow.store.tracking.sqlalchemy_store

    cfg = TrackingConfig(root=sys.argv[1], experiment="E")
    print("ready", flush=True)
    sys.stdin.readline()
    client = tracking.client(cfg)
    run = client.create_run(tracking.experiment_id(client, cfg), run_name=sys.argv[2])
    client.set_terminated(run.info.run_id)
    print("done", flush=True)
    """
)


def test_two_processes_creating_a_new_store_at_once_both_succeed(tmp_path):
    from mlflow import MlflowClient

    root = tmp_path / "runs"
    # no template yet either: one of them makes it (and with it MLflow's tables) while the other waits
    env = os.environ | {"PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("MLFLOW_TRACKING_URI", None)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_TOGETHER, str(root), name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name in ("a", "b")
    ]
    for process in processes:
        assert process.stdout.readline().strip() == "ready", process.stderr.read()
    for process in processes:
        process.stdin.write("go\n")
        process.stdin.flush()
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        assert out.strip() == "done"
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("E")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.info.run_name for run in runs) == ["a", "b"]
    assert [p.name for p in (tmp_path / "cache" / "vqlab").iterdir()] == [mlflow_store.store_template().name]


def test_a_new_store_is_a_copy_of_an_empty_one_with_a_default_experiment_of_its_own(tmp_path, monkeypatch):
    import mlflow.store.db.utils

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = mlflow_store.open_client(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}")
    template = mlflow_store.store_template()
    assert template.parent == tmp_path / "cache" / "vqlab"
    with contextlib.closing(sqlite3.connect(template)) as db:
        assert db.execute("SELECT COUNT(*) FROM experiments").fetchone() == (0,)

    made = []
    monkeypatch.setattr(mlflow.store.db.utils, "_initialize_tables", lambda engine: made.append(engine))
    second = mlflow_store.open_client(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}")
    assert made == []  # no migration ran: the tables came with the copy
    for client in (first, second):
        (default,) = client.search_experiments()
        assert default.experiment_id == "0" and str(tmp_path / "cache") not in default.artifact_location
    run = second.create_run(second.create_experiment("E"))
    second.log_metric(run.info.run_id, "val/l1", 0.5, step=3)
    assert second.get_metric_history(run.info.run_id, "val/l1")[0].value == 0.5


def test_a_template_that_fails_at_its_last_step_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mlflow_store.os, "replace", full_disk)
    assert mlflow_store.store_template() is None
    assert list((tmp_path / "cache" / "vqlab").iterdir()) == []


def test_a_new_store_is_made_by_mlflow_where_the_cache_cannot_be_written(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("a file where the cache folder would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert mlflow_store.store_template() is None
    client = mlflow_store.open_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [e.name for e in client.search_experiments()] == ["Default"]


READERS = {
    "report": ("vqlab.report", ["nope"]),
    "report --tracking-uri": ("vqlab.report", ["nope", "--tracking-uri", "sqlite:///{T}/elsewhere/mlflow.db"]),
    "report --root": ("vqlab.report", ["nope", "--root", "{T}/other"]),
    "codebook": ("analysis.utilization", ["nope"]),
    "codebook --no-mlflow": ("analysis.utilization", ["nope", "--no-mlflow"]),
    "decomposition --trained": ("analysis.decomposition", ["--trained", "nope"]),
}


@pytest.mark.parametrize("case", list(READERS))
def test_reading_a_store_that_is_not_there_is_one_line_and_creates_nothing(tmp_path, monkeypatch, capsys, case):
    import importlib

    module, argv = READERS[case]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = [a.replace("{T}", str(tmp_path)) for a in argv]
    assert importlib.import_module(module).main(argv) == 2
    out, err = capsys.readouterr()
    store = next((a.removeprefix("sqlite:///") for a in argv if a.startswith("sqlite:")), None)
    store = store or f"{tmp_path / (argv[argv.index('--root') + 1] if '--root' in argv else 'runs')}/mlflow.db"
    assert err == f"error: no MLflow store at {store}\n" and out == ""
    assert list(tmp_path.iterdir()) == []


def test_reading_an_experiment_that_is_not_there_writes_nothing(tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    from vqlab import report

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("other")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    capsys.readouterr()  # MLflow's lines as it made the store
    assert report.main(["nope"]) == 2
    assert capsys.readouterr().err == f"error: no MLflow experiment named 'nope' in {uri}\n"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_codes_with_a_missing_run_folder_creates_no_store(tmp_path, monkeypatch, capsys):
    from analysis import integer_codes

    monkeypatch.chdir(tmp_path)
    assert integer_codes.main(["--runs", "nope"]) == 2
    assert capsys.readouterr().err == "error: no run folder (config.yaml) at nope\n"
    assert list(tmp_path.iterdir()) == []
