"""The fused kernels' tables: built on the host once per active set, copied to the device
through a preallocated staging ring, and never rebuilt in the steady state of an inner loop
(the sparse backward's gradients live at fixed addresses in a GradArena). Counted with
``triton_tables.stats`` under ``TRITON_INTERPRET=1`` on the CPU, and on a GPU when present."""
from __future__ import annotations

import pytest
import torch

import misa_kernels as mk
from conftest import random_batch, tiny_llama

pytest.importorskip("triton")
from misa_kernels.ops import triton_tables as tables  # noqa: E402

INNER = 4
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


@pytest.fixture(autouse=True)
def fresh_tables():
    tables.clear_cache()
    tables.stats.reset()
    yield
    tables.clear_cache()


def _rows(n: int, seed: int) -> list[tuple[int, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [tuple(int(v) for v in torch.randint(0, 2**40, (8,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("device", DEVICES)
def test_tables_reach_the_device_intact_through_the_ring(device, monkeypatch):
    """A ring of 64 entries: tables wrap around it and outgrow it, and every table made
    earlier keeps its content (a region is reused only after its copy)."""
    monkeypatch.setattr(tables, "STAGING_ELEMENTS", 64)
    device = torch.device(device)
    made = [(rows, tables.device_table(rows, device)) for rows in (_rows(n, n) for n in (3, 5, 2, 6, 1, 13, 4))]
    for rows, table in made:
        assert table.device.type == device.type
        assert torch.equal(table.cpu(), torch.tensor(rows, dtype=torch.int64))
    assert tables.stats.builds == tables.stats.copies == len(made)
    assert tables.stats.staging_allocations == 2  # the first ring, and one grown for 13 x 8 entries


def test_cache_hits_build_nothing_and_the_least_recent_goes_first(monkeypatch):
    monkeypatch.setattr(tables, "TABLE_CACHE_SIZE", 2)
    cpu = torch.device("cpu")
    a, b, c = _rows(2, 1), _rows(2, 2), _rows(2, 3)
    first = tables.device_table(a, cpu)
    tables.device_table(b, cpu)
    assert tables.device_table(list(a), cpu) is first  # by content, and now the most recent
    tables.device_table(c, cpu)  # evicts b, not a
    assert tables.stats.builds == 3
    assert tables.device_table(a, cpu) is first
    tables.device_table(b, cpu)
    assert tables.stats.builds == 4


VARIANTS = {
    "sparse": dict(sparse_backward=True),
    "sparse_bf16": dict(sparse_backward=True),
    "step_in_backward": dict(step_in_backward=True),
    "autograd": {},
}


def _steps(model, opt, device, n: int) -> list[dict]:
    """Table counts of each of ``n`` steps (forward, backward, step)."""
    counts = []
    for step in range(n):
        tables.stats.reset()
        batch = {k: v.to(device) for k, v in random_batch(seed=step).items()}
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        counts.append(dict(vars(tables.stats)))
    return counts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_steady_steps_build_and_copy_no_table(variant, device):
    model = tiny_llama(dtype=torch.bfloat16 if variant.endswith("bf16") else torch.float32).to(device)
    opt = mk.MISA(model, lr=1e-3, delta=0.3, inner_steps=INNER, sweep=False, backend="triton", **VARIANTS[variant])
    counts = _steps(model, opt, device, INNER)
    assert opt.inner_step == 0  # the last step switched
    first, steady, switching = counts[0], counts[1:-1], counts[-1]
    assert first["builds"] > 0 and first["copies"] == first["builds"]
    if variant == "autograd":
        # autograd re-allocates .grad every step: a table is rebuilt only if an address
        # moved, and never allocates staging memory or waits for the device
        assert all(c["builds"] <= first["builds"] for c in steady)
    else:
        assert all(c["builds"] == c["copies"] == 0 for c in steady), steady
    assert all(c["staging_allocations"] == c["waits"] == 0 for c in steady + [switching])
    assert switching["builds"] > 0  # the momentum step's tables are new


def test_a_moving_gradient_is_a_new_table():
    """The counters can fail: re-allocating the arena every step rebuilds the tables."""
    model = tiny_llama()
    opt = mk.MISA(model, lr=1e-3, delta=0.3, inner_steps=INNER, sweep=False, backend="triton",
                  sparse_backward=True)
    backward = opt._backward
    counts, kept = [], []
    for step in range(INNER - 1):
        tables.stats.reset()
        kept.append(backward.arena)  # held, so every new arena lands at a new address
        backward._drop_arena()
        model(**random_batch(seed=step)).loss.backward()
        opt.step(), opt.zero_grad()
        counts.append(tables.stats.builds)
    assert all(c > 0 for c in counts)
