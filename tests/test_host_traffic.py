"""The steady state of an inner loop reads nothing back on the host and copies nothing to
the device: every step but the switching one, on each gradient path (counted with
:class:`conftest.HostTraffic`, so it is checked on the CPU too)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import misa_kernels as mk
from conftest import HostTraffic, random_batch, tiny_llama

INNER = 5


def _traffic(forward, batch) -> list[str]:
    with HostTraffic() as traffic:
        forward(**batch).loss.backward()
    return traffic.calls


def _steady_steps(model, opt, forward=None, plain=None) -> list[str]:
    """Host traffic of forward, backward and step of steps 2..INNER-1 of one inner loop
    (step 1 fills the caches) beyond what the model's own forward and backward make (read
    on ``plain``, the same model without MISA)."""
    forward = forward or model
    extra = []
    for step in range(INNER - 1):
        batch = random_batch(seed=step)
        with HostTraffic() as traffic:
            forward(**batch).loss.backward()
            opt.step()
        opt.zero_grad()
        own = _traffic(plain, batch)
        plain.zero_grad()
        if step > 0:
            extra += list((Counter(traffic.calls) - Counter(own)).elements())
    assert opt.inner_step == INNER - 1  # no switch inside the measured steps
    return extra


@pytest.mark.parametrize("variant", ["fp32", "bf16", "pretrain", "sparse", "sparse_bf16", "step_in_backward",
                                     "layer"])
def test_steady_steps_read_and_copy_nothing(variant):
    model = tiny_llama(dtype=torch.bfloat16 if variant.endswith("bf16") else torch.float32)
    kwargs = dict(lr=1e-3, delta=0.15, inner_steps=INNER, sweep=False, backend="torch",
                  mode="pretrain" if variant == "pretrain" else "finetune",
                  sparse_backward=variant.startswith("sparse"), step_in_backward=variant == "step_in_backward",
                  granularity="layer" if variant == "layer" else "module")
    if variant == "layer":
        kwargs["delta"] = 0.5
    opt = mk.MISA(model, **kwargs)
    assert _steady_steps(model, opt, plain=tiny_llama(dtype=model.dtype)) == []


def test_clipping_between_backward_and_step_reads_nothing():
    model = tiny_llama()
    opt = mk.MISA(model, lr=1e-3, delta=0.15, inner_steps=INNER, sweep=False, backend="torch")
    for step in range(3):
        model(**random_batch(seed=step)).loss.backward()
        with HostTraffic() as traffic:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            opt.clip_grad_norm_(0.1)
            opt.step()
        opt.zero_grad()
        assert step == 0 or traffic.calls == []


def test_ddp_steady_steps_read_and_copy_nothing(one_rank, monkeypatch):
    """Under torch.distributed the presence of each gradient on the ranks stays on the
    device (a review found a .tolist() of it at every step)."""
    monkeypatch.setattr(mk.distributed.GradSync, "averaging", property(lambda self: True))
    model = tiny_llama()
    opt = mk.MISA(model, lr=1e-3, delta=0.15, inner_steps=INNER, sweep=False, backend="torch")
    wrapped = DDP(model)
    plain = DDP(tiny_llama())
    assert _steady_steps(model, opt, wrapped, plain) == []
    opt.detach()
