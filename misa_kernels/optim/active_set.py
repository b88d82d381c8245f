"""The active set of an outer iteration: its units, their parameters in update order, and
the device index maps that let a step score and skip units without reading the device.

Every module parameter has a *slot* (its position among all units' parameters), the key
of the per-parameter buffers (recorded norms). :class:`ActiveSets` builds the active set of
a draw once per switch (a few host-to-device copies there, none per step) and caches the
subsets a step may need (parameters without a gradient left out).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..modules import Unit


@dataclass(frozen=True)
class ActiveSet:
    """Units ``b`` being trained and their parameters, sorted by param group."""

    units: tuple[int, ...]
    params: tuple[nn.Parameter, ...]
    slots: tuple[int, ...]
    slot_ids: Tensor  # device: ``slots``
    unit_ids: Tensor  # device: ``units``
    local_unit: Tensor  # device: position in ``units`` of each parameter's unit
    unit_numel: Tensor  # device: ``|b|`` of each unit
    covered: Optional[Tensor] = None  # device: units with a parameter here (None: all of them)

    def per_unit(self, per_param: Tensor) -> Tensor:
        """Sum a per-parameter quantity over each unit's parameters."""
        out = torch.zeros(len(self.units), dtype=per_param.dtype, device=per_param.device)
        return out.index_add_(0, self.local_unit, per_param)

    def per_param(self, per_unit: Tensor) -> Tensor:
        """Spread a per-unit quantity over the units' parameters."""
        return per_unit.index_select(0, self.local_unit)


class ActiveSets:
    """Builds :class:`ActiveSet` s of ``units`` on ``device``; ``group_of`` orders the
    parameters by param group, so that each group is one run for the updater."""

    def __init__(self, units: Sequence[Unit], group_of: Mapping[nn.Parameter, int], device: torch.device,
                 norm_dtype: torch.dtype):
        self.units, self.group_of, self.device, self.norm_dtype = units, group_of, device, norm_dtype
        self.params = [p for u in units for p in u.params]
        self.slot_of = {p: i for i, p in enumerate(self.params)}
        self._unit_of_slot = [b for b, u in enumerate(units) for _ in u.params]
        self._subsets: dict[tuple[bool, ...], ActiveSet] = {}

    def build(self, units: Sequence[int], params: Optional[Sequence[nn.Parameter]] = None) -> ActiveSet:
        """The active set of ``units`` (restricted to ``params`` when given)."""
        everything = params is None
        if everything:
            params = [p for b in units for p in self.units[b].params]
        params = sorted(params, key=self.group_of.__getitem__)
        slots = [self.slot_of[p] for p in params]
        position = {b: i for i, b in enumerate(units)}
        local_unit = [position[self._unit_of_slot[s]] for s in slots]
        as_ids = dict(dtype=torch.int64, device=self.device)
        with_params = set(local_unit)
        covered = None if everything else torch.as_tensor([i in with_params for i in range(len(units))],
                                                          device=self.device)
        return ActiveSet(
            tuple(units), tuple(params), tuple(slots), torch.as_tensor(slots, **as_ids),
            torch.as_tensor(list(units), **as_ids), torch.as_tensor(local_unit, **as_ids),
            torch.as_tensor([self.units[b].numel for b in units], dtype=self.norm_dtype, device=self.device),
            covered)

    def subset(self, active: ActiveSet, keep: Sequence[bool]) -> ActiveSet:
        """``active`` restricted to the parameters where ``keep`` is True (cached until
        :meth:`forget`)."""
        keep = tuple(keep)
        if all(keep):
            return active
        if keep not in self._subsets:
            params = [p for p, kept in zip(active.params, keep) if kept]
            self._subsets[keep] = self.build(active.units, params)
        return self._subsets[keep]

    def forget(self) -> None:
        """Drop the cached subsets (the active set changed)."""
        self._subsets.clear()
