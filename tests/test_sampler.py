"""The Sampler on its own: no model, no tensors on a device, just sizes and scores."""
from __future__ import annotations

import pytest
import torch

from misa_kernels.optim.sampler import Draw, Sampler

SIZES = [40, 10, 30, 20, 10, 50]


def _sampler(**overrides) -> Sampler:
    args = dict(strategy="misa", eta=1.0, max_logit=5.0, inner_steps=7, sweep=False, sweep_steps=2, seed=3)
    return Sampler(SIZES, overrides.pop("budget", 60), **{**args, **overrides})


def _scores(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_draws_fit_the_budget_and_are_counted():
    sampler = _sampler()
    counts = [0] * len(SIZES)
    for _ in range(200):
        draw = sampler.draw(torch.zeros(len(SIZES), dtype=torch.float64))
        assert sum(SIZES[b] for b in draw.units) <= 60 and len(set(draw.units)) == len(draw.units)
        assert draw.length == 7 and not draw.fallback
        for b in draw.units:
            counts[b] += 1
    assert sampler.sample_counts == counts
    assert min(counts) > 0


def test_the_sweep_draws_never_drawn_units_first_for_sweep_steps():
    sampler = _sampler(sweep=True)
    seen = set()
    while sampler.sweeping:
        draw = sampler.draw(torch.zeros(len(SIZES), dtype=torch.float64))
        assert draw.length == 2 and not seen & set(draw.units)  # none drawn twice during the sweep
        seen |= set(draw.units)
    assert seen == set(range(len(SIZES)))
    assert sampler.draw(torch.zeros(len(SIZES), dtype=torch.float64)).length == 7


def test_topk_and_bottomk_visit_units_by_score_within_the_budget():
    scores = _scores(0.1, 0.9, 0.2, 0.8, 0.3, 0.05)
    top = _sampler(strategy="topk")
    assert top.draw(scores).units == (1, 3, 4)  # sizes 10 + 20 + 10; unit 2 (30) would exceed 60
    assert top.draw(scores).units == (1, 3, 4)  # deterministic for distinct scores
    assert _sampler(strategy="bottomk").draw(scores).units == (5, 4)  # 50 + 10


def test_update_sets_the_probabilities_of_prop_1():
    scores = _scores(1.0, 1.0, 1.0, 1.0, 1.0, 7.0)
    sampler = _sampler()
    sampler.update(scores)
    logits = scores / scores.mean()  # eta = 1, below the cap of 5
    torch.testing.assert_close(sampler.probabilities, torch.softmax(logits, 0))
    uniform = _sampler(strategy="uniform")
    uniform.update(scores)
    assert torch.equal(uniform.probabilities, torch.full((6,), 1 / 6, dtype=torch.float64))


def test_fallback_takes_the_first_drawn_unit_alone():
    sampler = _sampler(budget=5)
    draw = sampler.draw(torch.zeros(len(SIZES), dtype=torch.float64))
    assert len(draw.units) == 1 and draw.fallback and sampler.fallback_draws == 1


def test_state_dict_resumes_the_same_draws():
    sampler = _sampler(sweep=True)
    scores = _scores(0.3, 0.1, 0.7, 0.2, 0.9, 0.4)
    for _ in range(5):
        sampler.update(scores)
        sampler.draw(scores)
    saved = sampler.state_dict()
    expected = [sampler.draw(scores) for _ in range(10)]
    resumed = _sampler(sweep=True, seed=99)
    resumed.load_state_dict(saved)
    assert [resumed.draw(scores) for _ in range(10)] == expected
    assert resumed.sample_counts == sampler.sample_counts


def test_state_dict_of_another_size_is_refused():
    with pytest.raises(ValueError, match="state_dict: 6 sampling units"):
        Sampler([1, 2], 3, strategy="misa", eta=1.0, max_logit=5.0, inner_steps=1, sweep=False, sweep_steps=1,
                seed=0).load_state_dict(_sampler().state_dict())


def test_draw_is_a_value():
    assert Draw((1, 2), 5) == Draw((1, 2), 5, False)
