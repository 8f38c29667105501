"""Optimizers: fused on CPU, and a non-finite step skipped on the device without moving anything."""

import pytest
import torch

from vqlab.config import OptimConfig
from vqlab.optim import build_optimizer, skip_step_if
from vqlab.trainer import FiniteGuard, NonFiniteLossError

CPU = torch.device("cpu")


def model_and_optimizer(name: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    return model, build_optimizer(model, OptimConfig(name=name, lr=1e-2, weight_decay=0.01), CPU)


def snapshot(model, optimizer):
    weights = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)} for p in model.parameters()]
    return weights, state


def assert_same(a, b):
    for x, y in zip(a[0], b[0], strict=True):
        assert torch.equal(x, y)
    for x, y in zip(a[1], b[1], strict=True):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def backward(model, scale: float = 1.0):
    model.zero_grad(set_to_none=True)
    (model(torch.randn(16, 4)).square().mean() * scale).backward()


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_a_flagged_step_leaves_weights_and_optimizer_state_exactly_as_they_were(name):
    model, optimizer = model_and_optimizer(name)
    assert optimizer.defaults["fused"]
    backward(model)
    skip_step_if(optimizer, torch.tensor(False))
    optimizer.step()  # a real step first, so that moments and step counts exist
    before = snapshot(model, optimizer)
    backward(model, scale=float("nan"))
    skip_step_if(optimizer, torch.tensor(True))
    optimizer.step()
    assert_same(before, snapshot(model, optimizer))
    backward(model)
    skip_step_if(optimizer, torch.tensor(False))
    optimizer.step()
    assert not torch.equal(before[0][0], next(model.parameters()).detach())


def test_skipping_needs_a_fused_optimizer():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="fused"):
        skip_step_if(torch.optim.Adam(model.parameters(), foreach=True), torch.tensor(True))


def test_the_guard_skips_the_first_non_finite_step_and_names_it_at_the_check(tmp_path):
    model, optimizer = model_and_optimizer("adam")
    guard = FiniteGuard(CPU)
    losses = [1.0, float("nan"), 2.0, float("inf")]
    for step, value in enumerate(losses, start=1):
        backward(model, scale=value)
        before = snapshot(model, optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        guard.watch(step, torch.tensor(value), grad_norm, optimizer)
        optimizer.step()
        moved = not torch.equal(before[0][0], next(model.parameters()).detach())
        assert moved == (value == value and abs(value) != float("inf")), step
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(NonFiniteLossError, match="non-finite loss nan, grad norm nan at step 2; no checkpoint"):
        guard.check(tmp_path)
