"""The MLflow store vqlab opens: created once even when processes start together; never created by a read."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

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
    env = os.environ | {"PYTHONPATH": str(ROOT)}
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
