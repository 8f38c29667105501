"""Same config, seed, device and thread count: the same numbers, bit for bit, in one process or in
a sweep; and the smoke run's numbers pinned, so that a change that moves them says so."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from vqlab import checkpoint
from vqlab.runfolder import RunFolder
from vqlab.runtime import cpu_name

WALL_CLOCK = ("train/images_per_s", "train/peak_memory_gb")
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# oneDNN picks its convolution kernels by the CPU's vector instructions, and AVX-512 kernels round
# differently (the smoke run's val L1 moves in the 6th digit): capped at AVX2, every x86-64 CPU that
# has AVX2 makes the same numbers
PORTABLE = {**ONE_THREAD, "ONEDNN_MAX_CPU_ISA": "AVX2"}

# The smoke preset's final numbers at one thread on a CPU (python -m vqlab.train --config smoke with
# OMP_NUM_THREADS=1 ONEDNN_MAX_CPU_ISA=AVX2). A change that moves them fails this test on purpose: such a change updates
# these values, reruns the README's numbers (python -m vqlab.readme_numbers) and says so.
PINNED = {
    "train/loss": 0.3361544132232666,
    "val/l1": 0.16152658761514732,
    "val/mse": 0.04025005671890385,
    "val/codebook_usage": 0.025,
    "val/perplexity": 10.003629929040327,
}


def train(root, *overrides, env=ONE_THREAD):
    command = [sys.executable, "-m", "vqlab.train", "--config", "smoke", f"tracking.root={root}", *overrides]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def record(run: RunFolder) -> tuple[list[dict], dict[str, torch.Tensor]]:
    rows = [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in run.read_metrics()]
    return rows, checkpoint.latest_valid(run.checkpoints)[1]["model"]


def assert_same(a: RunFolder, b: RunFolder) -> None:
    rows_a, weights_a = record(a)
    rows_b, weights_b = record(b)
    assert rows_a == rows_b
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def final(run: RunFolder) -> dict[str, float]:
    return run.last_metrics(("train/loss", "val/"))


def test_the_smoke_run_makes_the_pinned_numbers(tmp_path):
    train(tmp_path, "tracking.run_name=pinned", env=PORTABLE)
    values = final(RunFolder(tmp_path / "smoke" / "pinned"))
    assert {k: values[k] for k in PINNED} == pytest.approx(PINNED, rel=1e-6, abs=1e-9)


@pytest.mark.slow
def test_same_seed_runs_are_bit_identical_in_two_processes_and_in_a_sweep(tmp_path):
    steps = ["train.steps=8", "train.log_every=2", "eval.every=4"]
    train(tmp_path / "a", "tracking.run_name=r", *steps)
    train(tmp_path / "b", "tracking.run_name=r", *steps)
    assert_same(RunFolder(tmp_path / "a" / "smoke" / "r"), RunFolder(tmp_path / "b" / "smoke" / "r"))

    source = tmp_path / "sweep.yaml"
    overrides = {key: int(value) for key, value in (item.split("=") for item in steps)}
    source.write_text(yaml.safe_dump({"name": "same", "base": "smoke", "overrides": overrides, "variants": {"v": {}}}))
    command = [sys.executable, "-m", "vqlab.sweep", str(source), f"tracking.root={tmp_path / 'c'}"]
    done = subprocess.run(command, env={**ONE_THREAD, "MPLBACKEND": "Agg"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    in_sweep = next(folder for folder in (tmp_path / "c" / "same").rglob("config.yaml")).parent
    assert_same(RunFolder(tmp_path / "a" / "smoke" / "r"), RunFolder(in_sweep))
    runtime = json.loads(RunFolder(in_sweep).runtime_file.read_text())
    assert runtime["threads"] == "1" and runtime["cpu"] == cpu_name()
