"""Module importance scores: eq. 4 with the scaled gradient norm of App. A.2.

During an inner loop everything stays on the device: each step adds every active unit's
``||g_b||_F^2 / |b|`` into a buffer, with a count of the finite steps. The host reads the
buffers once per switch and folds the mean into the EMA
``G_b <- beta G_b + (1 - beta) mean_t ||g_b^t||^2 / |b|``. Units not sampled keep ``G_b``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .sampling import debiased_scores


class ScoreTracker:
    """Per-unit score state: host EMA + observation counts, device accumulators."""

    def __init__(self, num_units: int, beta: float, device: torch.device, dtype: torch.dtype, debias: bool = True):
        self.beta, self.debias = beta, debias
        self.ema = torch.zeros(num_units, dtype=torch.float64)
        self.observations = torch.zeros(num_units, dtype=torch.int64)
        self.skipped_total = 0
        self.norm_sum = torch.zeros(num_units, dtype=dtype, device=device)
        self.finite_steps = torch.zeros(num_units, dtype=torch.int64, device=device)
        self.skipped_steps = torch.zeros(num_units, dtype=torch.int64, device=device)

    def accumulate(self, units: Tensor, scaled_norms: Tensor, finite: Tensor, observed: Optional[Tensor] = None) -> None:
        """Add one step's ``||g_b||^2 / |b|`` for ``units`` (device indices); no host sync.

        ``finite`` marks the units whose gradient was finite (the others count as skipped);
        units where ``observed`` is False (no gradient on any rank, or a step the loss
        scaler skipped) count neither way."""
        counted = finite if observed is None else finite & observed
        skipped = ~finite if observed is None else ~finite & observed
        zero = torch.zeros((), dtype=scaled_norms.dtype, device=scaled_norms.device)
        self.norm_sum.index_add_(0, units, torch.where(counted, scaled_norms, zero))
        self.finite_steps.index_add_(0, units, counted.to(torch.int64))
        self.skipped_steps.index_add_(0, units, skipped.to(torch.int64))

    def fold(self, units: list[int]) -> int:
        """Close an inner loop: fold the means of ``units`` into the EMA (one host read).

        Returns the number of skipped (non-finite) unit-steps in that loop.
        """
        stacked = torch.stack([self.norm_sum.double(), self.finite_steps.double(), self.skipped_steps.double()])
        sums, counts, skipped = stacked.cpu()
        for b in units:
            if counts[b] > 0:
                mean = sums[b] / counts[b]
                self.ema[b] = self.beta * self.ema[b] + (1.0 - self.beta) * mean
                self.observations[b] += 1
        self.norm_sum.zero_()
        self.finite_steps.zero_()
        self.skipped_steps.zero_()
        new_skips = int(skipped.sum())
        self.skipped_total += new_skips
        return new_skips

    def buffers(self) -> tuple[Tensor, ...]:
        """The device accumulators (for memory accounting)."""
        return self.norm_sum, self.finite_steps, self.skipped_steps

    def pending_skips(self) -> int:
        """Skipped unit-steps of the running inner loop (reads the device)."""
        return int(self.skipped_steps.sum())

    def scores(self) -> Tensor:
        """``G_b`` corrected for the EMA's zero start unless ``debias`` is off (what sampling uses)."""
        return debiased_scores(self.ema, self.observations, self.beta, self.debias)

    def state_dict(self) -> dict:
        return {
            "ema": self.ema.clone(),
            "observations": self.observations.clone(),
            "skipped_total": self.skipped_total,
            "norm_sum": self.norm_sum.cpu(),
            "finite_steps": self.finite_steps.cpu(),
            "skipped_steps": self.skipped_steps.cpu(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.ema.copy_(state["ema"])
        self.observations.copy_(state["observations"])
        self.skipped_total = int(state["skipped_total"])
        self.norm_sum.copy_(state["norm_sum"])
        self.finite_steps.copy_(state["finite_steps"])
        self.skipped_steps.copy_(state["skipped_steps"])
