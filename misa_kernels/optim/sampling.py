"""Sampling probabilities (Prop. 1, eq. 4) and module selection (Algorithm 2).

All functions are host-side and work on small CPU tensors with one entry per sampling
unit; they are called once per switch of the active set.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

STRATEGIES = ("misa", "uniform", "topk", "bottomk")
NORMALIZATIONS = ("mean", "raw", "unscaled")


def debiased_scores(ema: Tensor, observations: Tensor, beta: float, correct: bool = True) -> Tensor:
    """``G_b / (1 - beta^{n_b})``: the EMA of eq. 4 corrected for its zero start.

    ``n_b`` is how many inner loops have scored unit ``b``. Without the correction a
    unit scored once would look ``1 / (1 - beta)`` times less important than one scored
    often (``correct=False`` keeps the plain EMA, for the ablation). Units never scored
    get the mean of the scored ones (a neutral prior).
    """
    scored = observations > 0
    corrected = torch.zeros_like(ema)
    divisor = (1.0 - beta ** observations[scored].to(ema.dtype)) if correct else 1.0
    corrected[scored] = ema[scored] / divisor
    if scored.any():
        corrected[~scored] = corrected[scored].mean()
    return corrected


def sampling_probabilities(scores: Tensor, eta: float, max_logit: float, normalization: str = "mean",
                           sizes: Optional[Tensor] = None) -> Tensor:
    """``p_b = softmax(eta * G_b / mean(G))`` with logits capped at ``max_logit``.

    Scores are divided by their mean, so ``eta`` is scale-free: ``eta = 1`` makes a unit
    with twice the mean score ``e`` times likelier than one with score zero, whatever the
    model's gradient scale. The cap bounds the largest probability ratio by
    ``exp(max_logit)``. ``eta = 0`` (or all scores zero) is exactly uniform.

    The other ``normalization`` forms, for the ablations: ``"raw"`` is Prop. 1 verbatim,
    ``softmax(eta * G_b)`` on the scaled scores ``G_b = ||g_b||^2 / |b|`` (tiny on a real
    model, so close to uniform unless ``eta`` is huge); ``"unscaled"`` is the authors'
    release, ``exp(min(max_logit, eta * |b| G_b))`` normalised: the plain squared norm
    ``||g_b||^2`` (``sizes`` holds ``|b|``).
    """
    mean = scores.mean()
    if eta == 0.0 or not bool(mean > 0):
        return torch.full_like(scores, 1.0 / scores.numel())
    if normalization == "mean":
        logits = eta * scores / mean
    elif normalization == "raw":
        logits = eta * scores
    elif normalization == "unscaled" and sizes is not None:
        logits = eta * scores * sizes.to(scores.dtype)
    else:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS} ('unscaled' with sizes), "
                         f"got {normalization!r}")
    return torch.softmax(logits.clamp(max=max_logit), dim=0)


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
