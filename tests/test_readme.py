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
