from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors on a shared 2-core CPU: a second thread mostly waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run_notebook(tmp_path, monkeypatch):
    """``run(name, parameters)``: ``notebooks/<name>.ipynb`` executed headless through papermill
    into ``tmp_path``; returns its code cells' outputs, none of which may be an error."""
    import nbformat

    from vqlab.notebook import execute

    def run(name: str, parameters: dict) -> list:
        monkeypatch.setenv("MPLBACKEND", "Agg")
        executed = tmp_path / f"{name}.ipynb"
        execute(parameters, executed, notebook=Path(__file__).resolve().parents[2] / "notebooks" / f"{name}.ipynb")
        cells = nbformat.read(executed, as_version=4).cells
        outputs = [o for c in cells if c.cell_type == "code" for o in c.outputs]
        assert not [o for o in outputs if o.output_type == "error"]
        return outputs

    return run
