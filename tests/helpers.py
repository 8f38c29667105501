import json
from pathlib import Path

import torch

from vqlab import checkpoint
from vqlab.models import AutoencoderOutput
from vqlab.quantizers import QuantizerOutput

# Python-level reads of a tensor's value: on a GPU each waits for the device (a host-device sync).
HOST_READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def metric_at(run_dir: Path, key: str, step: int) -> float:
    return next(row[key] for row in read_metrics(run_dir) if row["step"] == step and key in row)


def final_state(run_dir):
    return checkpoint.latest_valid(run_dir / "checkpoints")[1]


def assert_states_equal(a, b):
    for key in ("model", "optimizer", "schedule"):
        flat_a, flat_b = flatten_state(a[key]), flatten_state(b[key])
        assert flat_a.keys() == flat_b.keys()
        for name in flat_a:
            va, vb = flat_a[name], flat_b[name]
            assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, f"{key}.{name}"


def flatten_state(obj, prefix=""):
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in flatten_state(value, f"{prefix}{key}.").items()}
    if isinstance(obj, list):
        return {k: v for i, value in enumerate(obj) for k, v in flatten_state(value, f"{prefix}{i}.").items()}
    return {prefix: obj}


def model_output(
    reconstruction: torch.Tensor | None = None, codes: torch.Tensor | None = None, latents: torch.Tensor | None = None
) -> AutoencoderOutput:
    """A model output holding only what the evaluator under test reads."""
    return AutoencoderOutput(reconstruction, QuantizerOutput(z_q=latents, codes=codes), latents)


def tracked_smoke_runs(root: Path, variants: dict[str, dict]) -> str:
    """4 steps of the smoke preset per variant (run name -> overrides), one thread, in the MLflow
    experiment ``E`` of a store under ``root``; returns the store's URI."""
    import vqlab

    uri = f"sqlite:///{root}/mlflow.db"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for name, overrides in variants.items():
        base = {"tracking.root": str(root), "tracking.mlflow": True, "tracking.mlflow_uri": uri}
        base |= {"tracking.experiment": "E", "tracking.run_name": name, "train.steps": 4, "optim.warmup_steps": 0}
        vqlab.fit(vqlab.config.load("smoke", base | overrides))
    torch.set_num_threads(threads)
    return uri
