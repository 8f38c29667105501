"""The benchmarks run end to end at toy sizes (their numbers are measured, never asserted)."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name: str, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(BENCHMARKS.parent)}
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), *args], capture_output=True, text=True, env=env
    )


def test_the_quantizer_table_gives_vqlab_over_peer_per_row_and_names_failures():
    quantizers = load("quantizers")
    rows = [
        {"case": "a", "dtype": "fp32", "library": "vqlab", "ms": 2.0, "peak_mib": 10.0},
        {"case": "a", "dtype": "fp32", "library": "peer", "ms": 4.0, "peak_mib": 5.0},
        {"case": "b", "dtype": "bf16", "library": "vqlab", "ms": 1.0, "peak_mib": 1.0},
        {"case": "b", "dtype": "bf16", "library": "peer", "error": "ModuleNotFoundError: vector_quantize_pytorch"},
    ]
    lines = quantizers.table(rows).splitlines()
    assert lines[2] == "| a | fp32 | 2.0 | 4.0 | 0.50 | 10.0 | 5.0 | 2.00 |"
    assert lines[3] == "| b | bf16 | 1.0 | error | — | 1.0 | error | — |"


def test_the_quantizer_benchmark_measures_both_libraries_and_writes_json(tmp_path):
    out = tmp_path / "quantizers.json"
    cases = ["vq_ema K=1024", "fsq 8-8-8-5-5-5"]
    done = run("quantizers", "--tokens", "64", "--warmup", "0", "--repeats", "1", "--cases", *cases, "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {(r["case"], r["library"]) for r in rows} == {(c, lib) for c in cases for lib in ("vqlab", "peer")}
    assert all("error" not in r and r["ms"] > 0 and r["tokens"] == 64 for r in rows), rows
    assert "| vq_ema K=1024 | fp32 |" in done.stdout and "64 tokens per step" in done.stdout


def test_one_worker_process_times_several_cases_and_returns_a_row_for_each():
    """How CUDA runs: every case of a library and dtype in one process, rows in the cases' order."""
    quantizers = load("quantizers")
    args = argparse.Namespace(tokens=32, warmup=0, repeats=1, device="cpu")
    cases = ["fsq 8-8-8-5-5-5", "vq K=1024", "lfq d=10"]
    rows = quantizers.measure(cases, "vqlab", "fp32", args)
    assert [r["case"] for r in rows] == cases
    assert all(r["library"] == "vqlab" and r["ms"] > 0 and "error" not in r for r in rows), rows


def test_the_kmeans_benchmark_scores_every_library_the_same_way(tmp_path):
    out = tmp_path / "kmeans.json"
    done = run("kmeans", "--codes", "4", "16", "--points", "256", "--iters", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["codes"], r["library"]) for r in rows] == [
        (k, lib) for k in (4, 16) for lib in ("vqlab", "peer", "sklearn")
    ]
    assert all("error" not in r and r["fit_s"] > 0 and r["inertia"] > 0 for r in rows), rows
    assert "| 16 | 256 | sklearn |" in done.stdout


def test_the_loader_benchmark_writes_the_photos_pixels_as_jpegs(tmp_path):
    import numpy as np
    from PIL import Image

    from vqlab import data

    load("data").write_jpegs(tmp_path, count=2, size=64)
    photos = [p for p in (data.load_photo(*name) for name in data.TRAIN_PHOTOS) if min(p.shape[1:]) >= 64]
    rng = np.random.default_rng(0)  # the writer's draws, replayed
    for i in range(2):
        photo = photos[i]
        top, left = rng.integers(0, photo.shape[1] - 63), rng.integers(0, photo.shape[2] - 63)
        crop = photo[:, top : top + 64, left : left + 64].permute(1, 2, 0).numpy().astype(float)
        written = np.asarray(Image.open(tmp_path / "photos" / f"{i:06d}.jpg").convert("RGB")).astype(float)
        assert np.abs(written - crop).mean() < 8  # JPEG at quality 90, not another image


def test_the_loader_benchmark_times_each_worker_count_against_the_step_rate(tmp_path):
    out = tmp_path / "data.json"
    args = ["--count", "64", "--workers", "0", "1", "--batches", "2", "--batch", "16", "--step-rate", "1e9"]
    done = run("data", *args, "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["workers"] for r in rows] == [0, 1]
    assert all(r["images_per_s"] > 0 and r["bottleneck"] for r in rows)  # no loader keeps up with 1e9 images/s


def test_the_validation_benchmark_writes_stand_ins_elsewhere_than_the_real_cache(tmp_path):
    out, cache = tmp_path / "evaluate.json", tmp_path / "cache"
    args = ["--config", "smoke", "--images", "8", "--batch", "8", "--metrics", "reconstruction", "lpips"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(BENCHMARKS.parent), "TORCH_HOME": str(cache)}
    command = [sys.executable, str(BENCHMARKS / "evaluate.py"), *args, "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["stand_ins"] == ["alexnet"] and not cache.exists()
    assert [r["metrics"] for r in result["rows"]] == ["reconstruction", "lpips", "reconstruction+lpips"]
    assert all(r["images_per_s"] > 0 for r in result["rows"])


def test_the_training_step_benchmark_gives_mfu_from_counted_flops_and_lpips_rows(tmp_path):
    out = tmp_path / "train_step.json"
    # a row without LPIPS and one with, each a training process of its own; the bf16 variants (one
    # through torchrun) run the same code, and bf16 convolutions on a CPU without bf16 units are too
    # slow for a test on a busy 2-core machine
    variants = ["fp32", "fp32 + lpips"]
    # 8 validation crops: bf16 convolutions on a CPU without bf16 units take minutes for the default 64
    args = ["--steps", "4", "--image-size", "32", "--batch", "2", "--peak-tflops", "1", "--val-count", "8"]
    args += ["--variants", *variants]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(BENCHMARKS.parent), "TORCH_HOME": str(tmp_path / "c")}
    command = [sys.executable, str(BENCHMARKS / "train_step.py"), *args, "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert [r["variant"] for r in result["results"]] == variants
    assert result["flops_per_image"] > 0 and result["stand_ins"] == ["alexnet"]
    for row in result["results"]:
        assert row["mfu"] == pytest.approx(row["images_per_s"] * result["flops_per_image"] / 1e12)


def test_the_gpu_session_script_parses_and_names_existing_variants():
    import shlex

    script = BENCHMARKS / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    line = next(line for line in script.read_text().splitlines() if line.startswith("variants=("))
    named = shlex.split(line[len("variants=(") : line.rindex(")")])
    assert named and set(named) <= set(load("train_step").variants("cuda", with_compile=True))
