"""Which units train next: the sampling policy of Algorithm 1 (lines 2, 5, 15), host-side.

The :class:`Sampler` holds the probabilities ``p`` (Prop. 1), the sampling generator, how
often each unit was drawn and the start-up sweep; given the scores ``G`` it returns a
:class:`Draw`. It knows units only by index and size: nothing of tensors, devices or
models, so it is tested on its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .sampling import draw_order, sampling_probabilities, select_within_budget


@dataclass(frozen=True)
class Draw:
    """One outer iteration's active set: the units, the inner-loop length ``T`` (or the
    sweep's steps), and whether no drawn unit fitted the budget so the first one was
    taken alone."""

    units: tuple[int, ...]
    length: int
    fallback: bool = False


class Sampler:
    """Algorithm 2 with the probabilities of Prop. 1, the C.4 ablations and the sweep.

    Args:
        sizes: ``|b|`` of every unit.
        budget: ``delta * n``, the most parameters a draw may hold (Alg. 2).
        strategy: ``"misa"``, ``"uniform"``, ``"topk"`` or ``"bottomk"``.
        eta: temperature of ``p = softmax(eta * G / mean(G))`` (0: uniform).
        max_logit: cap on ``eta * G / mean(G)``.
        normalization: ``"mean"`` (``G / mean(G)``), ``"raw"`` or ``"unscaled"`` (see
            :func:`~.sampling.sampling_probabilities`).
        inner_steps: ``T``, the length of an inner loop.
        sweep: while some unit was never drawn, draw never-drawn units (in random order,
            within the budget) for ``sweep_steps`` steps each, so that every unit has a
            score before sampling by them.
        seed: seed of the sampling generator.
    """

    def __init__(self, sizes: Sequence[int], budget: float, *, strategy: str, eta: float, max_logit: float,
                 inner_steps: int, sweep: bool, sweep_steps: int, seed: int, normalization: str = "mean"):
        self.sizes, self.budget = list(sizes), budget
        self.strategy, self.eta, self.max_logit, self.normalization = strategy, eta, max_logit, normalization
        self.inner_steps, self.sweep, self.sweep_steps = inner_steps, sweep, sweep_steps
        self.generator = torch.Generator().manual_seed(seed)
        self.probabilities = torch.full((len(sizes),), 1.0 / len(sizes), dtype=torch.float64)
        self.sample_counts = [0] * len(sizes)
        self.fallback_draws = 0

    @property
    def sweeping(self) -> bool:
        """Whether the next draw is part of the start-up sweep."""
        return self.sweep and 0 in self.sample_counts

    def update(self, scores: Tensor) -> None:
        """Line 15: the probabilities of the next draw from the scores ``G`` (host, float64)."""
        eta = 0.0 if self.strategy == "uniform" else self.eta
        self.probabilities = sampling_probabilities(scores, eta, self.max_logit, self.normalization,
                                                    torch.tensor(self.sizes, dtype=torch.float64))

    def draw(self, scores: Tensor) -> Draw:
        """Line 5 (Algorithm 2, or the sweep): the next active set; counts it."""
        if self.sweeping:
            never = [b for b, count in enumerate(self.sample_counts) if count == 0]
            order = [never[i] for i in torch.randperm(len(never), generator=self.generator).tolist()]
            length = self.sweep_steps
        else:
            order = draw_order(self.strategy, self.probabilities, scores, self.generator)
            length = self.inner_steps
        chosen = select_within_budget(order, self.sizes, self.budget)
        fallback = not chosen
        if fallback:
            chosen = order[:1]
            self.fallback_draws += 1
        for b in chosen:
            self.sample_counts[b] += 1
        return Draw(tuple(chosen), length, fallback)

    def state_dict(self) -> dict:
        return dict(sample_counts=list(self.sample_counts), probabilities=self.probabilities.clone(),
                    rng=self.generator.get_state(), fallback_draws=self.fallback_draws)

    def load_state_dict(self, state: dict) -> None:
        if len(state["sample_counts"]) != len(self.sizes):
            raise ValueError(f"state_dict: {len(state['sample_counts'])} sampling units, this sampler has "
                             f"{len(self.sizes)}")
        self.sample_counts = list(state["sample_counts"])
        self.probabilities = state["probabilities"].clone()
        self.generator.set_state(state["rng"])
        self.fallback_draws = state.get("fallback_draws", 0)
