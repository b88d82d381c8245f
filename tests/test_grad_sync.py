"""GradSync on its own, in a one-rank gloo group treated as several processes: what it
averages, when, and which gradients it marks present."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import misa_kernels as mk
from misa_kernels.backward import AutogradBackward
from misa_kernels.distributed import GradSync

from conftest import HostTraffic, count_calls


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


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.use_b = True

    def forward(self, x):
        x = torch.tanh(self.a(x))
        return torch.tanh(self.b(x)) if self.use_b else x


class Stack(nn.Module):
    """Two blocks whose second Linear can be left out of the forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x.square().mean()


def _train_stack(micro: int, steps: int = 4) -> tuple[Stack, mk.MISA, list]:
    model = Stack()
    opt = mk.MISA(model, lr=1e-2, delta=1.0, granularity="layer", inner_steps=10, weight_decay=0.1, sweep=False,
                  backend="torch")
    traffic = []
    for step in range(steps):
        model.layers[0].use_b = step == 0  # layer 0's b gets a gradient at the first step only
        with HostTraffic() as seen:
            for part in range(micro):
                model(torch.randn(4, 6, generator=torch.Generator().manual_seed(10 * step + part))).backward()
            opt.step()
        opt.zero_grad()
        traffic.append(seen.calls)
    return model, opt, traffic


@pytest.mark.parametrize("micro", [1, 2])  # 2: accumulation without no_sync syncs after each backward
def test_a_tensor_without_a_gradient_on_any_rank_is_not_updated(one_rank, monkeypatch, micro):
    """Per tensor (its unit, the whole block, had other gradients), and across the several
    syncs of an accumulation window (the zeros of the first are not a gradient): as in one
    process, where such a tensor simply has none. Its score is not counted either."""
    reference, ref_opt, _ = _train_stack(micro)
    monkeypatch.setattr(GradSync, "averaging", property(lambda self: True))
    model, opt, traffic = _train_stack(micro)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    b = model.layers[0].b
    assert [float(opt.state[p]["step"]) for p in (b.weight, b.bias)] == [1.0, 1.0]
    assert opt.scores == ref_opt.scores
    assert traffic[2] == traffic[3] == []  # a partial pattern is copied to the device once, not per step


def test_a_weight_changed_after_activation_is_not_reverted():
    """bf16 masters are filled from the weights at their first update, not at activation:
    weights loaded (or broadcast by DDP) after MISA was built are the ones trained."""
    from conftest import random_batch, tiny_llama

    model, loaded = tiny_llama(dtype=torch.bfloat16), tiny_llama(dtype=torch.bfloat16, seed=7)
    opt = mk.MISA(model, lr=1e-6, delta=0.1, inner_steps=5, mode="pretrain")
    model.load_state_dict(loaded.state_dict())
    model(**random_batch()).loss.backward()
    opt.step()
    for (name, p), q in zip(model.named_parameters(), loaded.parameters()):
        torch.testing.assert_close(p.float(), q.float(), rtol=0, atol=1e-3, msg=name)
