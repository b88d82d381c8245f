"""The gradient sources and what they stand on (ActiveSets, NormRecords, LossScale), on a toy
model of plain Linears: no transformer, no optimizer."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from misa_kernels.backward import AutogradBackward, SparseBackward
from misa_kernels.modules import Unit
from misa_kernels.ops import torch_adam
from misa_kernels.optim.active_set import ActiveSets
from misa_kernels.optim.gradients import RecordedGradients, SteppedInBackward
from misa_kernels.optim.loss_scale import LossScale
from misa_kernels.optim.norm_records import NormRecords

NO_SCALER = LossScale()


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 5, bias=False), nn.Linear(5, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x))))).square().sum()


def _units(model: Toy) -> list[Unit]:
    return [Unit(name, i, (name,), tuple(getattr(model, name).parameters())) for i, name in enumerate("abc")]


def _setup(model: Toy, backward=None, stepped_update=None):
    units = _units(model)
    # group 0: matrices, group 1: biases, as MISA's param groups split them
    group_of = {p: int(p.dim() == 1) for u in units for p in u.params}
    sets = ActiveSets(units, group_of, torch.device("cpu"), torch.float32)
    records = NormRecords(len(sets.params), torch.float32, torch.device("cpu"))
    arrivals = []

    def squared_norms(grads):
        return torch_adam.squared_norms_(grads, torch.empty(len(grads)))

    backward = backward or AutogradBackward()
    args = (backward, records, sets, squared_norms, lambda: arrivals.append(1))
    source = (RecordedGradients(*args) if stepped_update is None else
              SteppedInBackward(*args, update=stepped_update, group_of=group_of, refuse=lambda: None))
    params = [p for u in units for p in u.params]
    backward.activate(params)
    source.hook(params)
    return SimpleNamespace(units=units, sets=sets, records=records, source=source, arrivals=arrivals,
                           backward=backward, group_of=group_of)


def test_active_sets_order_by_group_and_sum_per_unit():
    model = Toy()
    sets = _setup(model).sets
    active = sets.build([2, 0])
    assert active.params == (model.c.weight, model.a.weight, model.c.bias, model.a.bias)  # by group, then unit
    assert active.local_unit.tolist() == [0, 1, 0, 1] and active.unit_numel.tolist() == [18.0, 30.0]
    assert active.per_unit(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist() == [4.0, 6.0]
    subset = sets.subset(active, [True, False, True, False])
    assert subset.params == (model.c.weight, model.c.bias) and subset.covered.tolist() == [True, False]
    assert sets.subset(active, [True, False, True, False]) is subset and sets.subset(active, [True] * 4) is active
    sets.forget()
    assert sets.subset(active, [True, False, True, False]) is not subset


def test_norm_records_know_when_a_gradient_changed():
    records = NormRecords(2, torch.float32, torch.device("cpu"))
    grad = torch.full((3,), 2.0)
    assert not records.complete([0])
    records.record(0, grad)
    assert records.complete([0]) and records.fresh([0], [grad]) and float(records.sq[0]) == 12.0
    assert not records.fresh([0], [grad.clone()])  # replaced out of place: another tensor, same version
    grad.mul_(0.5)  # clipping
    assert not records.fresh([0], [grad]) and float(records.sq[0]) == 12.0
    records.forget([0])
    assert not records.complete([0])


def test_recorded_norms_are_read_before_clipping():
    model = Toy()
    env = _setup(model)
    active = env.sets.build([0, 1])
    model(torch.randn(7, 4)).backward()
    assert len(env.arrivals) == 5  # every parameter's gradient arrived (c's too)
    raw = [float(sum(p.grad.double().square().sum() for p in u.params)) / u.numel for u in env.units[:2]]
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-4)
    batch = env.source.gather(active, NO_SCALER)
    assert batch.grads == [p.grad for p in batch.active.params]
    torch.testing.assert_close(batch.scaled_norms, torch.tensor(raw), rtol=1e-5, atol=0)
    assert batch.finite.all() and not batch.skip.any() and batch.observed is None


def test_a_non_finite_unit_is_skipped_alone_and_a_unit_without_gradients_is_not_observed():
    model = Toy()
    env = _setup(model)
    model.c.weight.requires_grad_(False)
    model.c.bias.requires_grad_(False)
    model(torch.randn(7, 4)).backward()
    model.a.bias.grad[0] = float("nan")
    batch = env.source.gather(env.sets.build([0, 1, 2]), NO_SCALER)
    assert batch.active.params == (model.a.weight, model.b.weight, model.a.bias)
    assert batch.finite.tolist() == [False, True, True] and batch.observed.tolist() == [True, True, False]
    assert batch.skip.tolist() == [True, False, True]


def test_the_loss_scale_comes_out_of_norms_and_gradients():
    model, scaled = Toy(), Toy()
    env, scaled_env = _setup(model), _setup(scaled)
    x = torch.randn(7, 4)
    model(x).backward()
    (scaled(x) * 1024.0).backward()
    scale = LossScale(scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0), scaler=True)
    plain = env.source.gather(env.sets.build([0, 2]), NO_SCALER)
    batch = scaled_env.source.gather(scaled_env.sets.build([0, 2]), scale)
    assert torch.equal(batch.scaled_norms, plain.scaled_norms)
    assert all(torch.equal(a, b) for a, b in zip(batch.grads, plain.grads))  # unscaled in place
    overflow = LossScale(scale=torch.tensor(1.0), found_inf=torch.tensor(1.0), scaler=True)
    assert overflow.ok().item() is False
    assert scaled_env.source.gather(scaled_env.sets.build([0, 2]), overflow).skip.all()


def test_loss_scale_reads_what_grad_scaler_sets():
    assert LossScale.of(SimpleNamespace()) == NO_SCALER
    unscaled = LossScale.of(SimpleNamespace(grad_scale=None, found_inf=torch.tensor(0.0)))
    assert unscaled.scaler and unscaled.unscaled_by_user and unscaled.norm_factor(torch.float32) is None
    ready = LossScale.of(SimpleNamespace(grad_scale=torch.tensor(4.0), found_inf=0))  # no grads: an int 0
    assert ready.found_inf is None and float(ready.norm_factor(torch.float32)) == 1 / 16


def test_stepped_in_backward_updates_each_module_once_and_scores_at_step():
    model = Toy()
    updates = []
    modules = {name: getattr(model, name) for name in "abc"}
    env = _setup(model, backward=SparseBackward(modules, lambda name: env.source.on_module_grad(name)),
                 stepped_update=lambda p, g, skip: updates.append((tuple(p), skip.tolist())))
    active = env.sets.build([0, 1, 2])
    model(torch.randn(7, 4)).backward()
    assert sorted(len(p) for p, _ in updates) == [1, 2, 2] and all(not any(s) for _, s in updates)
    assert all(env.backward.grad(p) is None for u in env.units for p in u.params)  # freed at once
    batch = env.source.gather(active, NO_SCALER)
    assert batch.grads == [] and batch.finite.all() and (batch.scaled_norms > 0).all()
    model(torch.randn(7, 4)).backward()  # after gather (step()) each module may step again
    with pytest.raises(RuntimeError, match="second gradient"):
        model(torch.randn(7, 4)).backward()
    with pytest.raises(RuntimeError, match="GradScaler"):
        env.source.gather(active, LossScale(scaler=True))
    env.backward.detach()
