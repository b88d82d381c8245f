"""Applying the backend's Adam step (Alg. 1 lines 10-12) and extra momentum step (line 16)
to lists of parameters.

One grouping routine serves both: consecutive parameters of one param group (its ``lr``,
``betas``, ``eps``, ``weight_decay``) go to the backend in one call, which splits them by
dtype itself (one fused launch per dtype group). Step counts are per tensor and stay on the
device, so tensors of one group may be at different steps (a skipped update, kept states)
and still share a call. The updater knows nothing of hooks or sampling.
"""
from __future__ import annotations

from types import ModuleType
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..distributed import local
from .arguments import momentum_coefficient
from .state_store import StateStore


class Updater:
    """Runs ``backend`` over parameters sorted by param group, with the states of ``store``."""

    def __init__(self, param_groups: Sequence[dict], group_of: Mapping[nn.Parameter, int], store: StateStore,
                 backend: ModuleType):
        self.param_groups, self.group_of, self.store, self.backend = param_groups, group_of, store, backend

    def runs(self, params: Sequence[nn.Parameter]) -> list[tuple[dict, int, int]]:
        """``(param group, start, end)`` of each run of consecutive ``params`` in one group."""
        runs: list[tuple[int, int, int]] = []
        for position, param in enumerate(params):
            group = self.group_of[param]
            if runs and runs[-1][0] == group:
                runs[-1] = (group, runs[-1][1], position + 1)
            else:
                runs.append((group, position, position + 1))
        return [(self.param_groups[g], start, end) for g, start, end in runs]

    @torch.no_grad()
    def adam(self, params: Sequence[nn.Parameter], grads: Sequence[Tensor], skip: Tensor) -> None:
        """One AdamW step of every tensor whose ``skip`` (device bool) is False; each
        applied update advances that tensor's step count."""
        for group, lo, hi in self.runs(params):
            states = self.store.of(params[lo:hi])
            steps = _advance([s["step"] for s in states], skip[lo:hi])
            beta1, beta2 = group["betas"]
            self.backend.adam_update_(
                _locals(params[lo:hi]), _locals(grads[lo:hi]), [s["master"] for s in states],
                [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], skip[lo:hi],
                step=steps, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"])

    @torch.no_grad()
    def momentum(self, params: Sequence[nn.Parameter], form: str) -> None:
        """The extra momentum step of every tensor, with its moments and step count as they
        are (``form``: see :func:`~misa_kernels.optim.arguments.momentum_coefficient`)."""
        for group, lo, hi in self.runs(params):
            beta1, beta2 = group["betas"]
            coefficient: Optional[float] = momentum_coefficient(form, beta1)
            if coefficient is None:
                return
            states = self.store.of(params[lo:hi])
            self.backend.momentum_step_(
                _locals(params[lo:hi]), [s["master"] for s in states], [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states], step=torch.stack([s["step"] for s in states]),
                lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], coefficient=coefficient)


def _advance(steps: list[Tensor], skip: Tensor) -> Tensor:
    """Add one to the step counts of the tensors not skipped; the counts, stacked."""
    increments = (~skip).to(steps[0].dtype).unbind(0)
    torch._foreach_add_(steps, list(increments))
    return torch.stack(steps)


def _locals(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [local(t) for t in tensors]
