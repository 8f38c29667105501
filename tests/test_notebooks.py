"""notebooks/run.ipynb and the functions it calls (vqlab.notebook, vqlab.figures)."""

import json
import subprocess
import sys

import nbformat
import numpy as np
import pytest

from vqlab import figures, notebook
from vqlab.evaluators import CodeHistogram
from vqlab.runfolder import RunFolder
from vqlab.schema import ConfigError
from vqlab.tracking import TRIVIAL_CODECS


def test_the_parameters_cell_holds_primitives_only():
    cells = nbformat.read(notebook.NOTEBOOK, as_version=4).cells
    tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    names = {}
    exec(tagged[0].source, {}, names)
    assert set(names) == {"preset", "overrides", "experiment", "run_name", "parent_run_id", "nproc", "smoke"}
    assert all(isinstance(v, (str, int, bool, dict)) for v in names.values())


def test_build_config_takes_overrides_as_a_dict_or_yaml_text(tmp_path):
    root = str(tmp_path)
    as_dict = notebook.build_config("smoke", {"optim.lr": 3e-4, "tracking.root": root}, "exp", "r1", "parent1")
    as_text = notebook.build_config("smoke", f"optim.lr: 3.0e-4\ntracking.root: {root}", "exp", "r1", "parent1")
    assert as_dict == as_text
    assert (as_dict.optim.lr, as_dict.tracking.experiment, as_dict.tracking.run_name) == (3e-4, "exp", "r1")
    assert as_dict.tracking.parent_run_id == "parent1"
    assert notebook.build_config("smoke").tracking.experiment == "smoke"  # empty strings keep the preset's


def test_smoke_shrinks_the_run_and_explicit_overrides_win():
    cfg = notebook.build_config("default", {"train.steps": 6}, smoke=True)
    assert (cfg.train.steps, cfg.data.val_count, cfg.model.name) == (6, notebook.SMOKE["data.val_count"], "conv")


def test_bad_overrides_name_the_key():
    with pytest.raises(ConfigError, match=r"optim\.lrr"):
        notebook.build_config("smoke", "optim.lrr: 1")
    with pytest.raises(ConfigError, match="mapping"):
        notebook.build_config("smoke", "[1, 2]")


def test_several_processes_need_a_run_name_before_anything_starts(tmp_path):
    cfg = notebook.build_config("smoke", {"tracking.root": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"tracking\.run_name"):
        notebook.train(cfg, nproc=2)
    with pytest.raises(ConfigError, match="nproc"):
        notebook.train(cfg, nproc=0)
    assert not any(tmp_path.iterdir())


def test_torchrun_runs_this_interpreter_and_continues_the_named_run(tmp_path):
    command = notebook.torchrun_command(tmp_path / "c.yaml", 4)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert command[command.index("--nproc-per-node") + 1] == "4"
    assert command[-4:] == ["--config", str(tmp_path / "c.yaml"), "--resume", "auto"]


def test_the_kernel_spec_runs_this_interpreter():
    spec = json.loads((notebook.kernel_dir() / "kernels" / notebook.KERNEL / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    assert spec["argv"][1:3] == ["-m", "ipykernel_launcher"]


def fake_run(tmp_path) -> RunFolder:
    run = RunFolder(tmp_path / "exp" / "run")
    run.path.mkdir(parents=True)
    rows = [
        {"step": 0, "val/l1": 0.3, "baseline/l1": 0.05},
        {"step": 2, "train/loss": 0.6, "train/l1": 0.5, "train/commitment": 0.1, "train/perplexity": 3.0},
        {"step": 4, "train/loss": 0.4, "train/l1": 0.35, "train/commitment": 0.05, "train/perplexity": 5.0},
        {"step": 4, "val/l1": 0.2},
    ]
    run.metrics_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    np.savez_compressed(
        run.histogram(),
        digits=np.array([[0, 1], [2, 1], [1, 3]]),
        counts=np.array([5, 1, 2]),
        radices=np.array([4, 4]),
        digit_counts_0=np.array([5, 2, 1, 0]),
        digit_counts_1=np.array([0, 6, 0, 2]),
    )
    return run


def test_loss_curves_show_the_loss_terms_and_validation(tmp_path):
    figure = figures.loss_curves(fake_run(tmp_path))
    train_axes, val_axes = figure.axes
    assert sorted(line.get_label() for line in train_axes.lines) == ["commitment", "l1", "loss"]
    assert "[-1, 1]" in train_axes.get_ylabel() and "[0, 1]" in val_axes.get_ylabel()
    assert list(val_axes.lines[0].get_ydata()) == [0.3, 0.2]


def test_codebook_usage_ranks_codes_and_names_usage_and_perplexity(tmp_path):
    figure = figures.codebook_usage(fake_run(tmp_path))
    ranked, per_digit = figure.axes
    assert list(ranked.lines[0].get_ydata()) == [5 / 8, 2 / 8, 1 / 8]
    assert "3 of 16 codes used (18.8%)" in ranked.get_title()
    assert len(per_digit.lines) == 2


def test_codebook_usage_shows_the_digits_in_their_order(tmp_path):
    radices = tuple(range(2, 13))  # 11 digits: digit 10 is not between digits 1 and 2
    digits = np.zeros((1, len(radices)), dtype=np.int64)
    CodeHistogram(digits, np.array([3]), radices, tuple(np.eye(r, dtype=np.int64)[0] for r in radices)).write(
        RunFolder(tmp_path).histogram()
    )
    per_digit = figures.codebook_usage(RunFolder(tmp_path)).axes[1]
    assert [line.get_label() for line in per_digit.lines] == [str(i) for i in range(len(radices))]
    assert [len(line.get_xdata()) for line in per_digit.lines] == list(radices)


def test_codebook_usage_without_a_histogram_says_why(tmp_path):
    with pytest.raises(FileNotFoundError, match="codebook_histogram"):
        figures.codebook_usage(RunFolder(tmp_path))


def test_metrics_table_has_a_row_per_measured_model_named_by_what_measured_it(tmp_path):
    table = figures.metrics_table(fake_run(tmp_path), {"eval/l1": 0.25, "eval_train/l1": 0.125})
    labels = [line.split("  ")[0].strip() for line in table.splitlines()[1:]]
    assert labels == [figures.MEASURED[p] for p in ("val", "eval", "eval_train")] + [TRIVIAL_CODECS["baseline"]]
    assert "0.1250" in table.splitlines()[3] and figures.SAME not in table


def test_an_evaluation_equal_to_the_final_validation_is_one_row_and_says_so(tmp_path):
    table = figures.metrics_table(fake_run(tmp_path), {"eval/l1": 0.2})  # the final val/l1
    assert figures.MEASURED["eval"] not in table and figures.MEASURED["val"] in table
    assert table.splitlines()[-1] == figures.SAME


def test_publish_saves_into_the_run_folder_and_its_mlflow_run(tmp_path):
    run = fake_run(tmp_path)
    cfg = notebook.build_config("smoke", {"tracking.root": str(tmp_path), "tracking.mlflow": True})
    from vqlab import tracking

    tracking.start_run(cfg.tracking, run, {}, [])
    path = figures.publish(figures.loss_curves(run), run, "loss_curves.png", cfg.tracking)
    assert path == run.figure("loss_curves.png") and path.stat().st_size > 0
    mlflow_run = tracking.existing_run(cfg.tracking, run)
    assert [a.path for a in mlflow_run.client.list_artifacts(mlflow_run.run_id, "figures")] == [
        "figures/loss_curves.png"
    ]


@pytest.mark.slow
def test_papermill_runs_the_notebook_headless_through_torchrun(tmp_path, monkeypatch):
    """The smoke notebook with two training processes: torchrun trains, the kernel evaluates and draws."""
    monkeypatch.setenv("MPLBACKEND", "Agg")
    run = RunFolder(tmp_path / "nb" / "two")
    parameters = {
        "preset": "smoke",
        "overrides": {"tracking.root": str(tmp_path), "train.device": "cpu"},
        "experiment": "nb",
        "run_name": "two",
        "nproc": 2,
        "smoke": True,
    }
    notebook.execute(parameters, run.notebook)
    executed = nbformat.read(run.notebook, as_version=4)
    errors = [o for c in executed.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    images = [o for c in executed.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 3  # reconstructions, loss curves, codebook usage
    for name in ("reconstructions.png", "loss_curves.png", "codebook_usage.png"):
        assert run.figure(name).is_file()
    assert run.eval_file.is_file()
    on_training_crops = json.loads(run.train_eval_file.read_text())["metrics"]
    assert set(on_training_crops) >= {"eval_train/l1", "eval_train/codebook_usage"}
    assert run.read_config().train.steps == notebook.SMOKE["train.steps"]


def tiny_notebook(path):
    book = nbformat.v4.new_notebook(metadata={"language_info": {"name": "python"}})
    book.cells = [nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]})]
    book.cells.append(nbformat.v4.new_code_cell("print('ran', x)"))
    nbformat.write(book, path)
    return path


def test_kernels_talk_over_ipc_so_two_starting_at_once_share_no_port(tmp_path, capfd):
    source = tiny_notebook(tmp_path / "in.ipynb")
    notebook.execute({"x": 2}, tmp_path / "out.ipynb", source)
    outputs = [o for c in nbformat.read(tmp_path / "out.ipynb", as_version=4).cells for o in c.get("outputs", [])]
    assert any("ran 2" in o.get("text", "") for o in outputs)
    assert "without encryption" not in capfd.readouterr().err  # the TCP transport's warning


def test_a_kernel_that_dies_before_answering_is_started_again_but_a_failing_cell_is_not(tmp_path, monkeypatch):
    import papermill
    from papermill.exceptions import PapermillExecutionError

    calls = []

    def dies_once(*args, **kwargs):
        calls.append(kwargs["kernel_name"])
        if len(calls) == 1:
            raise RuntimeError("Kernel died before replying to kernel_info")

    monkeypatch.setattr(papermill, "execute_notebook", dies_once)
    notebook.execute({}, tmp_path / "out.ipynb", tmp_path / "in.ipynb")
    assert len(calls) == 2

    def cell_fails(*args, **kwargs):
        calls.append(1)
        raise PapermillExecutionError(1, 1, "x", "ZeroDivisionError", "division by zero", [])

    calls.clear()
    monkeypatch.setattr(papermill, "execute_notebook", cell_fails)
    with pytest.raises(PapermillExecutionError):
        notebook.execute({}, tmp_path / "out.ipynb", tmp_path / "in.ipynb")
    assert len(calls) == 1


CONCURRENT = """
import sys
from pathlib import Path
from vqlab import notebook
sys.stdin.readline()  # start together
notebook.execute({"x": int(sys.argv[2])}, Path(sys.argv[1]) / f"out{sys.argv[2]}.ipynb", Path(sys.argv[1]) / "in.ipynb")
"""


def test_two_kernels_starting_at_once_in_one_folder_each_get_their_own_sockets(tmp_path):
    managers = [notebook.kernel_manager_class()() for _ in range(2)]
    assert managers[0].ip != managers[1].ip and all(m.transport == "ipc" for m in managers)
    assert all(not m.ip.startswith(str(tmp_path)) and m.ip != "kernel-ipc" for m in managers)
    tiny_notebook(tmp_path / "in.ipynb")
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT, str(tmp_path), str(i)],
            cwd=tmp_path,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for process in processes:
        process.stdin.write("go\n")
        process.stdin.flush()
    for i, process in enumerate(processes):
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
        cells = nbformat.read(tmp_path / f"out{i}.ipynb", as_version=4).cells
        assert any(f"ran {i}" in o.get("text", "") for c in cells for o in c.get("outputs", []))
    assert not list(tmp_path.glob("kernel-ipc*"))  # no socket files left in the working folder
