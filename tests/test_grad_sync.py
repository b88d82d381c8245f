"""GradSync on its own, in a one-rank gloo group treated as several processes: what it
averages, when, and which gradients it marks present."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import misa_kernels as mk
from misa_kernels.backward import AutogradBackward
from misa_kernels.distributed import GradSync

from conftest import count_calls


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.unused = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2)

    def forward(self, x):
        hidden = self.a(x)
        return {"loss": self.b(hidden).square().mean(), "hidden": hidden}


@pytest.fixture
def synced(one_rank, monkeypatch):
    monkeypatch.setattr(GradSync, "averaging", property(lambda self: True))
    averages = count_calls(mk.distributed.collectives, "average_", monkeypatch.setattr)
    model = TwoHeads()
    backward, seen = AutogradBackward(), []
    params = list(model.parameters())
    sync = GradSync(model, lambda: params, backward.grad, backward.ensure_grad,
                    lambda p, g: seen.append([x.clone() for x in g]), sharded=False)
    yield model, sync, averages, seen
    sync.remove()


def test_one_average_at_the_end_of_each_backward(synced):
    model, sync, averages, seen = synced
    out = model(torch.randn(5, 3))
    (out["loss"] + out["hidden"].sum()).backward()  # gradients reach both outputs: one sync
    assert averages[0] == 1 and len(seen) == 1
    sync.sync()
    assert averages[0] == 1  # nothing new arrived
    sync.mark_stale()
    sync.sync()
    assert averages[0] == 2
    sync.reset()
    assert sync.present is None


def test_a_parameter_without_a_gradient_gets_zeros_and_is_marked_absent(synced):
    model, sync, _, seen = synced
    model(torch.randn(5, 3))["loss"].backward()
    assert sync.present.tolist() == [True, True, True, True, False, False]  # ``unused`` got none on any rank
    assert torch.equal(model.unused.weight.grad, torch.zeros(2, 2))  # every rank averages the same list
    assert all(torch.equal(a, p.grad) for a, p in zip(seen[-1], model.parameters()))


def test_no_sync_when_grad_mode_is_off_or_a_single_process(one_rank):
    model = TwoHeads()
    backward = AutogradBackward()
    sync = GradSync(model, lambda: list(model.parameters()), backward.grad, backward.ensure_grad,
                    lambda p, g: pytest.fail("no sync expected"), sharded=False)
    model(torch.randn(5, 3))["loss"].backward()  # one process: nothing to average
    sync.sync()
    assert not sync.averaging and sync.present is None
    sync.remove()
