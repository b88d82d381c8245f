"""Sampling probabilities (Prop. 1, eq. 4) and module selection (Algorithm 2).

All functions are host-side and work on small CPU tensors with one entry per sampling
unit; they are called once per switch of the active set.
"""
from __future__ import annotations

import torch
from torch import Tensor

STRATEGIES = ("misa", "uniform", "topk", "bottomk")


def debiased_scores(ema: Tensor, observations: Tensor, beta: float) -> Tensor:
    """``G_b / (1 - beta^{n_b})``: the EMA of eq. 4 corrected for its zero start.

    ``n_b`` is how many inner loops have scored unit ``b``. Without the correction a
    unit scored once would look ``1 / (1 - beta)`` times less important than one scored
    often. Units never scored get the mean of the scored ones (a neutral prior).
    """
    scored = observations > 0
    corrected = torch.zeros_like(ema)
    corrected[scored] = ema[scored] / (1.0 - beta ** observations[scored].to(ema.dtype))
    if scored.any():
        corrected[~scored] = corrected[scored].mean()
    return corrected


def sampling_probabilities(scores: Tensor, eta: float, max_logit: float) -> Tensor:
    """``p_b = softmax(eta * G_b / mean(G))`` with logits capped at ``max_logit``.

    Scores are divided by their mean, so ``eta`` is scale-free: ``eta = 1`` makes a unit
    with twice the mean score ``e`` times likelier than one with score zero, whatever the
    model's gradient scale. The cap bounds the largest probability ratio by
    ``exp(max_logit)``. ``eta = 0`` (or all scores zero) is exactly uniform.
    """
    mean = scores.mean()
    if eta == 0.0 or not bool(mean > 0):
        return torch.full_like(scores, 1.0 / scores.numel())
    logits = (eta * scores / mean).clamp(max=max_logit)
    return torch.softmax(logits, dim=0)


def draw_order(
    strategy: str, probabilities: Tensor, scores: Tensor, generator: torch.Generator
) -> list[int]:
    """The order in which Algorithm 2 visits the units.

    ``misa`` and ``uniform`` draw without replacement by ``probabilities``; ``topk`` and
    ``bottomk`` sort by score (ties broken at random).
    """
    count = scores.numel()
    if strategy in ("misa", "uniform"):
        return torch.multinomial(probabilities, count, replacement=False, generator=generator).tolist()
    shuffle = torch.randperm(count, generator=generator)
    ranked = torch.sort(scores[shuffle], descending=strategy == "topk", stable=True).indices
    return shuffle[ranked].tolist()


def select_within_budget(order: list[int], sizes: list[int], budget: float) -> list[int]:
    """Algorithm 2: visit units in ``order``, keep each that still fits under ``budget``.

    Returns an empty list when no unit fits; the caller decides the fallback.
    """
    chosen, used = [], 0
    for index in order:
        if used + sizes[index] <= budget:
            chosen.append(index)
            used += sizes[index]
    return chosen
