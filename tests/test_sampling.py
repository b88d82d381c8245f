"""Sampling probabilities (Prop. 1, eq. 4) and selection (Algorithm 2)."""
from __future__ import annotations

import pytest
import torch

import misa_kernels as mk
from misa_kernels.data import batches, lm_splits
from misa_kernels.optim.sampling import (
    debiased_scores,
    draw_order,
    sampling_probabilities,
    select_within_budget,
)
from conftest import tiny_llama


def test_eta_zero_is_exactly_uniform():
    scores = torch.rand(9, dtype=torch.float64) + 0.1
    p = sampling_probabilities(scores, eta=0.0, max_logit=5.0)
    assert torch.equal(p, torch.full((9,), 1 / 9, dtype=torch.float64))


def test_probabilities_are_scale_free_and_capped():
    scores = torch.tensor([1e-9, 2e-9, 4e-9, 1e-7], dtype=torch.float64)
    p = sampling_probabilities(scores, eta=1.0, max_logit=5.0)
    q = sampling_probabilities(scores * 1e6, eta=1.0, max_logit=5.0)
    torch.testing.assert_close(p, q)
    assert torch.isclose(p.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert float(p.max() / p.min()) <= torch.e**5 * (1 + 1e-9)
    assert torch.all(p[1:] >= p[:-1])


def test_debiasing_makes_one_observation_comparable():
    beta = 0.9
    ema = torch.tensor([(1 - beta) * 2.0, 0.0, 0.0], dtype=torch.float64)  # one observation of 2.0
    observations = torch.tensor([1, 0, 0])
    scores = debiased_scores(ema, observations, beta)
    torch.testing.assert_close(scores, torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64))


def test_plain_ema_keeps_its_zero_start_when_the_correction_is_off():
    beta = 0.9
    ema = torch.tensor([(1 - beta) * 2.0, (1 - beta**2) * 2.0, 0.0], dtype=torch.float64)
    scores = debiased_scores(ema, torch.tensor([1, 2, 0]), beta, correct=False)
    expected = torch.tensor([0.2, 0.38, 0.29], dtype=torch.float64)  # unscored: the mean of the scored
    torch.testing.assert_close(scores, expected)


def test_raw_and_unscaled_normalizations_follow_their_formulas():
    scores = torch.tensor([1e-3, 2e-3, 4e-3], dtype=torch.float64)
    sizes = torch.tensor([1000.0, 500.0, 2000.0], dtype=torch.float64)
    raw = sampling_probabilities(scores, 100.0, 5.0, "raw")
    torch.testing.assert_close(raw, torch.softmax(torch.tensor([0.1, 0.2, 0.4], dtype=torch.float64), 0))
    unscaled = sampling_probabilities(scores, 1.0, 5.0, "unscaled", sizes)  # eta * ||g||^2 = 1, 1, 8 -> cap 5
    torch.testing.assert_close(unscaled, torch.softmax(torch.tensor([1.0, 1.0, 5.0], dtype=torch.float64), 0))
    near_uniform = sampling_probabilities(scores, 1.0, 5.0, "raw")  # Prop. 1 verbatim at eta=1: tiny logits
    assert float(near_uniform.max() / near_uniform.min()) < 1.01
    with pytest.raises(ValueError, match="normalization"):
        sampling_probabilities(scores, 1.0, 5.0, "unscaled")  # needs the sizes


def test_draw_order_is_a_permutation_and_topk_sorts():
    g = torch.Generator().manual_seed(0)
    scores = torch.tensor([0.3, 0.1, 0.9, 0.5], dtype=torch.float64)
    p = sampling_probabilities(scores, 1.0, 5.0)
    assert sorted(draw_order("misa", p, scores, g)) == [0, 1, 2, 3]
    assert draw_order("topk", p, scores, g) == [2, 3, 0, 1]
    assert draw_order("bottomk", p, scores, g) == [1, 0, 3, 2]


def test_algorithm_2_skips_what_does_not_fit():
    assert select_within_budget([0, 1, 2, 3], [5, 10, 3, 2], budget=10) == [0, 2, 3]
    assert select_within_budget([1, 0], [5, 10], budget=4) == []


def test_importance_sampling_draws_large_scores_more_often():
    g = torch.Generator().manual_seed(1)
    scores = torch.tensor([1.0, 1.0, 1.0, 6.0], dtype=torch.float64)
    p = sampling_probabilities(scores, 1.0, 5.0)
    first = torch.tensor([draw_order("misa", p, scores, g)[0] for _ in range(4000)])
    freq = torch.bincount(first, minlength=4).double() / len(first)
    torch.testing.assert_close(freq, p, atol=0.03, rtol=0)


def _train(opt, model, steps, seq=64):
    train, _ = lm_splits("python-reference", seq_len=seq, max_tokens=120_000)
    stream = batches(train, 4, torch.Generator().manual_seed(0))
    for _ in range(steps):
        ids = next(stream)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def test_default_eta_is_not_uniform_in_disguise():
    model = tiny_llama(layers=2)
    opt = mk.MISA(model, lr=1e-3, delta=0.1, inner_steps=3)
    _train(opt, model, steps=40)
    p = torch.tensor(list(opt.probabilities.values()))
    uniform = 1.0 / len(p)
    total_variation = 0.5 * float((p - uniform).abs().sum())
    assert total_variation > 0.15, opt.probabilities
    assert float(p.max() / p.min()) > 3.0


def test_eta_zero_gives_uniform_probabilities_after_training():
    model = tiny_llama(layers=2)
    opt = mk.MISA(model, lr=1e-3, delta=0.1, inner_steps=3, eta=0.0)
    _train(opt, model, steps=20)
    p = list(opt.probabilities.values())
    assert p == [1.0 / len(p)] * len(p)
    assert any(s > 0 for s in opt.scores.values())
