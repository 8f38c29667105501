"""Every command block of the README runs as written, in the project's environment, from a fresh
folder: the commands a user copies, in the README's order (later ones read what earlier ones wrote).

A command that takes minutes runs at smoke size (``SMALLER``: the same command with the smoke
preset, ``--smoke`` or one shard); a command that needs GPUs, a cluster or a dataset this machine
does not have is listed in ``NOT_HERE`` with the reason, and a sweep of that kind is checked with
``--dry-run``. A new command in the README must be one of these or run as it is.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAKEFILE = ROOT / "Makefile"

# command (as written, comment stripped) -> why it does not run in a test
NOT_HERE = {
    "make test": "it is the command that runs this test",
    "jupyter lab notebooks/": "a server a person opens; its program is checked",
    "mlflow ui --backend-store-uri sqlite:///runs/mlflow.db": "a server a person opens; its program is checked",
    "python -m vqlab.train --config reproduction train.dtype=bf16": "ImageNet on disk and a GPU",
    "torchrun --standalone --nproc-per-node 8 -m vqlab.train --config reproduction": "ImageNet and 8 GPUs",
    "torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $HEAD:29500 --rdzv-id vq1 "
    "-m vqlab.train --config reproduction tracking.run_name=vq1 --resume auto": "four nodes of 8 GPUs",
    "python -m vqlab.train data.name=imagefolder data.root=/data/imagenet/train data.val_root=/data/imagenet/val "
    "data.image_size=128 model.width=512 model.channels=512": "ImageNet on disk",
    "python -m vqlab.train data.name=cifar10 data.root=/data/cifar": "CIFAR-10 on disk",
    "torchrun --nproc-per-node 8 -m vqlab.evaluate --run-dir runs/imagenet/<run>": "an ImageNet run and 8 GPUs",
}
# (pattern, replacement): the same command at smoke size
SMALLER = [
    (r"^python -m vqlab\.sweep demo$", "python -m vqlab.sweep demo --smoke --seeds 0"),
    (
        r"--config default (.*) train\.steps=5000",
        r"--config smoke \1 train.steps=10 tracking.experiment=demo tracking.run_name=readme",
    ),
    (r"-p preset default", "-p preset default -p smoke True"),
    (r"^python -m vqlab\.sweep seed_table$", "python -m vqlab.sweep seed_table --smoke --shard 1/14"),
    # the command above ran a shard of this sweep; this one's runs are what it lists
    (r"^(python -m vqlab\.sweep seed_table --seeds 0,1,2)$", r"\1 --dry-run"),
    (r"^(python -m vqlab\.sweep seed_table --scale imagenet .*)$", r"\1 --dry-run"),  # GPUs, a cluster
    (r"step_0001000\.pt", "step_0000010.pt"),
]
SLOW = 900  # seconds for one command on a busy 2-core machine


def commands() -> list[str]:
    """The README's ``bash`` blocks, a command a line (continuations joined, comments dropped);
    ``make demo`` is its Makefile recipe."""
    found = []
    for block in re.findall(r"^```bash\n(.*?)^```", README.read_text(), flags=re.DOTALL | re.MULTILINE):
        for line in block.replace("\\\n", " ").splitlines():
            command = " ".join(shlex.split(line, comments=True, posix=False))
            if command == "make demo":
                found += recipe("demo")
            elif command:
                found.append(command)
    return found


def recipe(target: str) -> list[str]:
    text = MAKEFILE.read_text().split(f"\n{target}:", 1)[1]
    lines = re.findall(r"^\t(.*)$", text.split("\n\n", 1)[0], flags=re.MULTILINE)
    return [line.replace("$(BIN)/", "") for line in lines]


def smaller(command: str) -> str:
    for pattern, replacement in SMALLER:
        command = re.sub(pattern, replacement, command)
    return command


def test_every_readme_command_runs_here_or_says_why_not():
    listed = commands()
    assert len(listed) > 20 and set(NOT_HERE) <= set(listed), sorted(set(NOT_HERE) - set(listed))
    used = {pattern for pattern, _ in SMALLER for command in listed if re.search(pattern, command)}
    assert used == {pattern for pattern, _ in SMALLER}  # no rule outlives its command


def test_the_readme_says_once_at_the_top_how_to_enter_the_environment():
    top = README.read_text().split("\n## ", 1)[0]
    assert "source .venv/bin/activate" in top


@pytest.mark.slow
@pytest.mark.longest
@pytest.mark.timeout(3 * SLOW)  # about 4 minutes on an idle 2-core machine, three times that when it is busy
def test_the_readme_commands_run_as_written(tmp_path):
    (tmp_path / "notebooks").symlink_to(ROOT / "notebooks")
    bin_dir = Path(sys.executable).parent  # what `source .venv/bin/activate` puts first on PATH
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "VQLAB_"))}
    env |= {"PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "VIRTUAL_ENV": str(bin_dir.parent)}
    env |= {"MPLBACKEND": "Agg", "TORCH_HOME": str(tmp_path / "torch"), "OMP_NUM_THREADS": "1"}
    from vqlab.config import load, to_yaml

    (tmp_path / "my_run.yaml").write_text(to_yaml(load("smoke")))
    for command in commands():
        if command in NOT_HERE:
            program = command.split()[0] if command.startswith(("jupyter", "mlflow", "torchrun")) else None
            if program:
                assert shutil.which(program, path=str(bin_dir)), f"{program} is not in the environment"
            continue
        if "<run>" in command:  # the run the README's first training command made (named by SMALLER)
            assert (tmp_path / "runs" / "demo" / "readme" / "finished").is_file(), command
            command = command.replace("<run>", "readme")
        done = subprocess.run(
            smaller(command), shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=SLOW
        )
        # the doctor exits 1 when a preset's weights are missing, as they are here: its answer, not a failure
        expected = (0, 1) if command == "python -m vqlab.doctor" else (0,)
        assert done.returncode in expected, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    for written in ("runs/demo-photos/report/compare.ipynb", "runs/my_lfq.ipynb", "runs/seed_table-photos/report"):
        assert (tmp_path / written).exists(), written
