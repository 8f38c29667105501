"""Gradient accumulation, exact resume after SIGKILL (1 and 2 processes), DDP, model EMA, NaN stop."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from vqlab import checkpoint, losses
from vqlab.trainer import NonFiniteLossError, fit

from .helpers import HOST_READS, assert_states_equal, final_state, read_metrics


def test_accumulating_4_x_8_equals_one_batch_of_32(smoke_cfg):
    common = {"train.steps": 1, "optim.warmup_steps": 0, "optim.name": "sgd", "optim.lr": 0.5, "data.flip": False}
    whole = fit(smoke_cfg(**common, **{"data.batch_size": 32, "tracking.run_name": "whole"}))
    accumulated = fit(smoke_cfg(**common, **{"data.batch_size": 8, "train.grad_accum": 4, "tracking.run_name": "acc"}))
    a, b = final_state(whole.run_dir)["model"], final_state(accumulated.run_dir)["model"]
    initial = final_state(fit(smoke_cfg(**{**common, "optim.lr": 1e-30, "tracking.run_name": "init"})).run_dir)["model"]
    moved = sum((a[k] - initial[k]).abs().sum().item() for k in a)
    assert moved > 1e-2  # the step really changed the weights
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def launch(args, tmp_path, nproc=1):
    if nproc == 1:
        command = [sys.executable, "-m", "vqlab.train", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        command += ["-m", "vqlab.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def kill_after_checkpoint(process, folder, min_step, timeout=120):
    deadline = time.monotonic() + timeout
    pointer = folder / "last"
    while time.monotonic() < deadline and process.poll() is None:
        if pointer.is_file() and int(pointer.read_text().strip()[5:12]) >= min_step:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint at step >= {min_step} before the run ended: {process.communicate()}")


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_then_resume_is_bit_identical(tmp_path, nproc):
    steps = 80
    args = [
        "--config",
        "smoke",
        f"tracking.root={tmp_path / 'runs'}",
        f"train.steps={steps}",
        "train.checkpoint_every=10",
    ]
    args += ["train.log_every=5", "data.batch_size=8"]
    reference = launch([*args, "tracking.run_name=whole"], tmp_path, nproc)
    _, err = reference.communicate()
    # the end of stderr, where a rank's own error stands (a repr of both streams was cut before it)
    assert reference.returncode == 0, err.decode()[-3000:]
    resumable = [*args, "tracking.run_name=killed", "--resume", "auto"]
    killed = launch(resumable, tmp_path, nproc)
    folder = tmp_path / "runs" / "smoke" / "killed" / "checkpoints"
    kill_after_checkpoint(killed, folder, min_step=20)
    assert int((folder / "last").read_text().strip()[5:12]) < steps  # it really died mid-run
    resumed = launch(resumable, tmp_path, nproc)
    _, err = resumed.communicate()
    assert resumed.returncode == 0, err.decode()[-3000:]
    runs = tmp_path / "runs" / "smoke"
    assert_states_equal(final_state(runs / "whole"), final_state(runs / "killed"))
    whole_rows, killed_rows = read_metrics(runs / "whole"), read_metrics(runs / "killed")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "train/images_per_s"} for r in rows]  # noqa: E731
    assert strip(whole_rows) == strip(killed_rows)


GAN = ["loss.adversarial.weight=0.1", "loss.adversarial.width=8", "loss.adversarial.layers=2"]
GAN += ["loss.adversarial.start_step=5", "loss.adversarial.lecam=0.1", "train.grad_accum=2"]


@pytest.mark.parametrize(
    "extra",
    [[], GAN, *(["quantizer.name=" + name] for name in ("bsq", "learned_grid", "simvq", "ibq"))],
    ids=["plain", "gan-accum", "bsq", "learned_grid", "simvq", "ibq"],
)
def test_ddp_ranks_stay_identical(tmp_path, extra):
    args = ["--config", "smoke", f"tracking.root={tmp_path / 'runs'}", "train.steps=20", "train.checkpoint_every=5"]
    run = launch([*args, "tracking.run_name=ddp", *extra], tmp_path, nproc=2)
    _, err = run.communicate()
    assert run.returncode == 0, err.decode()[-3000:]
    # every checkpoint compared the ranks' weights and buffers bit for bit (check_in_sync)
    assert len(list((tmp_path / "runs" / "smoke" / "ddp" / "checkpoints").glob("step_*.pt"))) == 3
    rows = read_metrics(tmp_path / "runs" / "smoke" / "ddp")
    assert rows[-1]["step"] == 20 and "val/l1" in rows[-1]


def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(smoke_cfg, monkeypatch):
    calls = {"n": 0}
    real = losses.reconstruction_losses

    def poisoned(*args):
        calls["n"] += 1
        values = real(*args)
        return {k: v * float("nan") for k, v in values.items()} if calls["n"] == 8 else values

    monkeypatch.setattr(losses, "reconstruction_losses", poisoned)
    cfg = smoke_cfg(**{"train.checkpoint_every": 5, "tracking.run_name": "nan"})
    with pytest.raises(NonFiniteLossError, match=r"step 8; the last good checkpoint is .*step_0000005\.pt"):
        fit(cfg)
    path, state = checkpoint.latest_valid(Path(cfg.tracking.root) / "smoke" / "nan" / "checkpoints")
    assert state["step"] == 5 and path.name == "step_0000005.pt"


def test_model_ema_is_evaluated_beside_the_raw_model(smoke_cfg):
    result = fit(smoke_cfg(**{"train.ema_decay": 0.9, "train.steps": 20}))
    assert {"val_ema/l1", "val_ema/codebook_usage"} <= set(result.metrics)
    assert result.metrics["val_ema/l1"] != result.metrics["val/l1"]
    state = final_state(result.run_dir)
    assert state["ema"].keys() == state["model"].keys()


def test_resume_refuses_another_config(smoke_cfg):
    fit(smoke_cfg(**{"train.steps": 4, "optim.warmup_steps": 0, "tracking.run_name": "r"}))
    with pytest.raises(ValueError, match=r"optim\.lr"):
        fit(
            smoke_cfg(**{"train.steps": 4, "optim.warmup_steps": 0, "optim.lr": 0.1, "tracking.run_name": "r"}),
            resume="auto",
        )


def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(smoke_cfg):
    cfg = smoke_cfg(
        **{"train.steps": 10, "train.checkpoint_every": 5, "optim.warmup_steps": 0, "tracking.run_name": "c"}
    )
    result = fit(cfg)
    folder = result.run_dir / "checkpoints"
    (folder / "step_0000010.pt").write_bytes(b"torn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path, state = checkpoint.latest_valid(folder)
    assert path.name == "step_0000005.pt" and state["step"] == 5
    assert any("step_0000010.pt" in str(w.message) for w in caught)


def test_keeps_only_the_newest_checkpoints(smoke_cfg):
    cfg = smoke_cfg(
        **{"train.steps": 20, "train.checkpoint_every": 2, "train.keep_checkpoints": 2, "optim.warmup_steps": 0}
    )
    result = fit(cfg)
    names = sorted(p.name for p in (result.run_dir / "checkpoints").iterdir())
    assert names == ["last", "step_0000018.pt", "step_0000020.pt"]


GAN_FROM_STEP_2 = {"loss.adversarial.weight": 0.1, "loss.adversarial.width": 8, "loss.adversarial.layers": 2}
GAN_FROM_STEP_2 |= {"loss.adversarial.start_step": 2, "loss.adversarial.lecam": 0.1}


@pytest.mark.parametrize("extra", [{}, {"data.on_device": True}, GAN_FROM_STEP_2], ids=["loader", "on_device", "gan"])
def test_steps_between_log_lines_read_no_tensor_on_the_host(smoke_cfg, monkeypatch, extra):
    """On a GPU each read of a tensor's value waits for the device. Between the first step (where
    the quantizer reads whether it is initialised, and k-means initialises a codebook of 256 from
    the first batch's 256 tokens) and the last (log line, evaluation, checkpoint), a step reads
    none: the finiteness check, the step count and the logged means stay on the device. Reads are
    recorded with the step the trainer announced through ``set_step``."""
    from vqlab.quantizers.base import Quantizer

    step = {"now": None}
    reads = []
    real_set_step = Quantizer.set_step

    def set_step(self, current, total):
        step["now"] = current
        real_set_step(self, current, total)

    monkeypatch.setattr(Quantizer, "set_step", set_step)
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def recorded(self, *args, real=real, name=name, **kwargs):
            reads.append((step["now"], name))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, recorded)
    steps = 8
    overrides = {"train.steps": steps, "train.log_every": steps, "train.ema_decay": 0.9, "optim.warmup_steps": 2}
    overrides |= {"quantizer.name": "vq_ema", "quantizer.codebook_size": 256, **extra}
    fit(smoke_cfg(**overrides))
    inside = [(s, name) for s, name in reads if s is not None and 0 < s < steps - 1]
    assert not inside, inside
    assert any(s == steps - 1 for s, _ in reads)  # the last step's log line does read: the hook sees reads


def finite_weights(state) -> bool:
    tensors = [*state["model"].values(), *state.get("ema", {}).values()]
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


@pytest.mark.parametrize("name", ["fsq", "vq", "identity"])
def test_a_diverging_run_stops_at_its_step_and_keeps_only_finite_checkpoints(name, tmp_path):
    """Non-finite tokens reaching the quantizer are a non-finite loss like any other."""
    from .test_resume import preset_quantizer_cfg

    overrides = {"optim.lr": 1e30, "train.checkpoint_every": 1, "train.ema_decay": 0.9, "tracking.run_name": "d"}
    cfg = preset_quantizer_cfg(name, tmp_path, **overrides)
    with pytest.raises(NonFiniteLossError, match=r"at step \d+; ") as stopped:
        fit(cfg)
    kept = checkpoint.step_files(Path(cfg.tracking.root) / "smoke" / "d" / "checkpoints")
    assert all(finite_weights(checkpoint.load(path)) for path in kept)
    newest = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was written yet"
    assert str(stopped.value).endswith(newest)


def test_the_command_line_stops_a_diverging_run_with_one_line(smoke_cfg, capsys):
    from vqlab.trainer import main

    root = smoke_cfg().tracking.root
    code = main(["--config", "smoke", f"tracking.root={root}", "optim.lr=1e8", "train.checkpoint_every=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("error: non-finite") and "Traceback" not in err[0]


def test_training_forwards_count_codes_only_at_the_steps_that_log_them(smoke_cfg, monkeypatch):
    from vqlab.quantizers import base

    step, counted = {"now": None}, []
    real_set_step, real_stats = base.Quantizer.set_step, base.batch_stats

    def set_step(self, current, total):
        step["now"] = current
        real_set_step(self, current, total)

    def batch_stats(codes, radices):
        counted.append(step["now"])
        return real_stats(codes, radices)

    monkeypatch.setattr(base.Quantizer, "set_step", set_step)
    monkeypatch.setattr(base, "batch_stats", batch_stats)
    result = fit(smoke_cfg(**{"train.steps": 7, "train.log_every": 3, "train.grad_accum": 2}))
    # steps 3 and 6 log, and step 7 is the last: two micro-batches each; validation forwards come after
    assert [s for s in counted if s is not None and s < 7][:6] == [2, 2, 5, 5, 6, 6]
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [row["step"] for row in rows if "train/perplexity" in row]
    assert logged == [3, 6, 7]
