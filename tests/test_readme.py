"""The README's own-training-loop example runs as written."""

import re
import warnings
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.DOTALL | re.MULTILINE)


def test_own_loop_example_runs_and_its_codebook_learns():
    (example,) = [block for block in python_blocks() if "on_optimizer_step()" in block]
    namespace = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a loop that follows the contract is never warned
        exec(compile(example, str(README), "exec"), namespace)
    q = namespace["q"]
    assert int(q.usage.steps) == namespace["step"] + 1  # one update per optimizer step
    assert q.initialized and torch.isfinite(q.embedding).all()


def marked_readme(tmp_path, *blocks) -> Path:
    text = "# title\n\nbefore " + " middle ".join(f"<!-- numbers:{b} -->old<!-- /numbers:{b} -->" for b in blocks)
    path = tmp_path / "README.md"
    path.write_text(text + " after\n")
    return path


def test_readme_numbers_rewrites_the_default_runs_block_with_what_the_run_measured(tmp_path, capsys):
    from vqlab import readme_numbers
    from vqlab.runfolder import RunFolder

    readme = marked_readme(tmp_path, "default", "demo")
    args = ["--readme", str(readme), "--blocks", "default", "--config", "smoke", "--root", str(tmp_path / "runs")]
    assert readme_numbers.main(args) == 0
    text = readme.read_text()
    run = RunFolder(tmp_path / "runs" / "readme" / "smoke" / "readme")
    final = run.last_metrics("val/")
    assert f"ends at val L1 {final['val/l1']:.4f}, MSE {final['val/mse']:.4f}" in text
    assert "`python -m vqlab.train --config smoke` at commit" in text and f"{torch.get_num_threads()} threads" in text
    assert re.match(r"# title\n\nbefore <!-- numbers:default -->takes \d+\.\d minutes here and ends at", text)
    assert text.endswith("<!-- numbers:demo -->old<!-- /numbers:demo --> after\n")  # the other block untouched
    assert readme_numbers.main(args) == 0  # a second rewrite reruns the run in its folder
    assert readme.read_text().count("<!-- numbers:default -->") == 1


def test_readme_numbers_keeps_edits_made_to_the_readme_while_its_run_trains(tmp_path, monkeypatch):
    from vqlab import readme_numbers

    readme = marked_readme(tmp_path, "default")

    def train_while_someone_edits(preset, root):
        readme.write_text(readme.read_text().replace("before", "edited meanwhile"))
        return "new numbers"

    monkeypatch.setattr(readme_numbers, "default_numbers", train_while_someone_edits)
    assert readme_numbers.main(["--readme", str(readme), "--blocks", "default", "--root", str(tmp_path)]) == 0
    assert readme.read_text() == (
        "# title\n\nedited meanwhile <!-- numbers:default -->new numbers<!-- /numbers:default --> after\n"
    )


def test_readme_numbers_refuses_a_readme_without_the_blocks_markers(tmp_path, capsys):
    from vqlab import readme_numbers

    readme = marked_readme(tmp_path, "default")
    before = readme.read_text()
    assert readme_numbers.main(["--readme", str(readme), "--blocks", "default,demo", "--root", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err
        == "error: the README has no <!-- numbers:demo --> ... <!-- /numbers:demo --> block to rewrite\n"
    )
    assert readme.read_text() == before and not (tmp_path / "readme").exists()


def test_the_readme_marks_the_numbers_the_command_owns():
    text = README.read_text()
    for block in ("default", "demo"):
        assert text.count(f"<!-- numbers:{block} -->") == 1 and text.count(f"<!-- /numbers:{block} -->") == 1
