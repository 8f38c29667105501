import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors on a shared 2-core CPU: a second thread mostly waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
