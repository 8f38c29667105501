"""Fixtures shared by the quantizer tests."""

import pytest
import torch

from ..helpers import HOST_READS


class HostSync(AssertionError):
    """A tensor was read on the host: on a GPU, a host-device sync."""


@pytest.fixture
def no_host_reads(monkeypatch):
    """Reading a tensor's value in Python (``bool``, ``int``, ``float``, ``item``, ``tolist``, or an
    index) raises while active: on a GPU each of them waits for the device."""

    def read(*args, **kwargs):
        raise HostSync("a tensor value was read on the host")

    def watch():
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, read)

    return watch
