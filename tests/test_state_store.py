"""StateStore (masters, moments, step counts, accounting) and Updater (Adam and momentum
steps over param groups) on plain tensors, against torch.optim.AdamW."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from misa_kernels.ops import torch_adam
from misa_kernels.optim.state_store import StateStore
from misa_kernels.optim.updater import Updater


def _params(dtype=torch.float32, seed=0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=gen).to(dtype)) for shape in ((4, 3), (5,), (2, 2))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_allocate_gives_fresh_states_with_a_master_only_for_16_bit(dtype):
    params = _params(dtype)
    store = StateStore({}, keep=False)
    store.allocate(params)
    with torch.no_grad():
        params[0].mul_(2)  # changed after activation (a checkpoint loaded, a broadcast): the master follows
    store.of(params)  # the updater's first read fills the masters
    for p in params:
        state = store.state[p]
        assert (state["master"] is not None) == (dtype == torch.bfloat16)
        if state["master"] is not None:
            assert state["master"].dtype == torch.float32 and torch.equal(state["master"].to(dtype), p)
        assert state["exp_avg"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert not state["exp_avg"].any() and not state["exp_avg_sq"].any() and float(state["step"]) == 0
    n, size = sum(p.numel() for p in params), 8 if dtype == torch.float64 else 4
    assert store.bytes_of(params) == dict(master_weights=4 * n if dtype == torch.bfloat16 else 0,
                                          moments=2 * size * n, step_counts=4 * len(params))


def test_release_frees_unless_kept_and_the_peak_remembers():
    params = _params()
    n = sum(p.numel() for p in params)
    for keep in (False, True):
        store = StateStore({}, keep=keep)
        store.allocate(params[:2])
        store.state[params[0]]["step"] += 3
        store.release(params[:2])
        assert (params[0] in store.state) == keep
        store.allocate(params[2:])
        assert store.peak_bytes == 8 * (n if keep else sum(p.numel() for p in params[:2]))
        store.allocate(params[:1])  # a kept state is continued, not renewed
        assert float(store.state[params[0]]["step"]) == (3 if keep else 0)
        store.reset_peak()
        assert store.peak_bytes == store.held_bytes()


def test_state_dict_round_trip_and_legacy_int_steps():
    params = _params()
    store = StateStore({}, keep=False)
    store.allocate(params)
    store.state[params[1]]["exp_avg"].normal_()
    store.state[params[1]]["step"] += 2
    index = {p: i for i, p in enumerate(params)}
    saved = store.state_dict(index)
    other = StateStore({}, keep=False)
    other.load_state_dict(saved, params, default_steps=[0, 0, 0])
    for p in params:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(other.state[p][key], store.state[p][key])
    legacy = {0: {k: v for k, v in saved[0].items() if k != "step"}, 1: {**saved[1], "step": 5}}
    other.load_state_dict(legacy, params, default_steps=[7, 0, 0])
    assert [float(other.state[p]["step"]) for p in params[:2]] == [7.0, 5.0] and params[2] not in other.state
    saved[0]["exp_avg"] = torch.zeros(9)
    with pytest.raises(ValueError, match="moments of parameter 0 have shape"):
        other.load_state_dict(saved, params, default_steps=[0, 0, 0])


def _updater(params, groups):
    store = StateStore({}, keep=False)
    store.allocate(params)
    group_of = {p: i for i, g in enumerate(groups) for p in g["params"]}
    return Updater(groups, group_of, store, torch_adam), store


def test_runs_are_the_consecutive_members_of_a_group():
    params = _params()
    groups = [dict(params=[params[0], params[2]]), dict(params=[params[1]])]
    updater, _ = _updater(params, groups)
    assert [(g is groups[0], lo, hi) for g, lo, hi in updater.runs([params[0], params[2], params[1]])] == \
        [(True, 0, 2), (False, 2, 3)]


def test_adam_matches_adamw_per_group_and_a_skip_does_not_count():
    """Two groups with their own hyperparameters; tensor 1 skips its first step, so its
    bias corrections lag one step behind the others (defect: the count advanced anyway)."""
    params, reference = _params(seed=1), _params(seed=1)
    hyper = [dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1),
             dict(lr=3e-3, betas=(0.8, 0.999), eps=1e-6, weight_decay=0.0)]
    groups = [dict(params=params[:2], **hyper[0]), dict(params=params[2:], **hyper[1])]
    updater, store = _updater(params, groups)
    adamw = [torch.optim.AdamW([reference[0]], **hyper[0]), torch.optim.AdamW([reference[1]], **hyper[0]),
             torch.optim.AdamW([reference[2]], **hyper[1])]
    gen = torch.Generator().manual_seed(2)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        skip = torch.tensor([False, step == 0, False])
        updater.adam(params, grads, skip)
        for i, (q, opt) in enumerate(zip(reference, adamw)):
            if not bool(skip[i]):
                q.grad = grads[i]
                opt.step()
    for p, q in zip(params, reference):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert [float(store.state[p]["step"]) for p in params] == [4.0, 3.0, 4.0]


@pytest.mark.parametrize("form, factor", [("beta1", 0.9), ("proof", 0.9 / 0.1), ("none", 0.0)])
def test_momentum_forms(form, factor):
    params = _params(seed=3)
    before = [p.detach().clone() for p in params]
    updater, store = _updater(params, [dict(params=params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)])
    for p in params:
        state = store.state[p]
        state["exp_avg"].normal_(generator=torch.Generator().manual_seed(4))
        state["exp_avg_sq"].uniform_(0.1, 1.0, generator=torch.Generator().manual_seed(5))
        state["step"] += 3
    updater.momentum(params, form)
    for p, b in zip(params, before):
        state = store.state[p]
        m_hat, v_hat = state["exp_avg"] / (1 - 0.9**3), state["exp_avg_sq"] / (1 - 0.999**3)
        torch.testing.assert_close(p, b - 1e-2 * factor * m_hat / (v_hat.sqrt() + 1e-8), rtol=1e-6, atol=1e-7)
