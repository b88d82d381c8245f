"""Gradient sources: where a step finds the active modules' gradients and their norms.

Both sources sit on a backward path (:mod:`misa_kernels.backward`: ``.grad`` through
autograd, or the sparse backward's fp32 buffers) and record each gradient's squared norm
the moment it is complete (:class:`~misa_kernels.optim.norm_records.NormRecords`), so the
scores see it before clipping. At ``step()`` a source hands over a :class:`StepGradients`:
the gradients to apply, which tensors to skip, and each unit's scaled norm
``||g_b||^2 / |b|`` (App. A.2) to score.

* :class:`RecordedGradients`: the gradients wait in ``.grad`` (or the buffers) for ``step()``.
* :class:`SteppedInBackward`: each module is updated as soon as its gradient is complete
  and the gradient is freed at once (``step_in_backward=True``); ``step()`` only scores.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..backward import BackwardPath
from ..distributed import local
from .active_set import ActiveSet, ActiveSets
from .loss_scale import LossScale
from .norm_records import NormRecords

SquaredNorms = Callable[[Sequence[Tensor]], Tensor]
Update = Callable[[Sequence[nn.Parameter], Sequence[Tensor], Tensor], None]


@dataclass(frozen=True)
class StepGradients:
    """What one step applies (``grads`` of ``active.params``, ``skip`` per tensor) and
    scores (per unit of ``active``: ``scaled_norms``, ``finite``, ``observed``)."""

    active: ActiveSet
    grads: list
    skip: Optional[Tensor]
    scaled_norms: Tensor
    finite: Tensor
    observed: Optional[Tensor]


def select(flags: Tensor, keep: Sequence[bool]) -> Tensor:
    """The entries of a device tensor where ``keep`` is True (without a copy when all are)."""
    if all(keep):
        return flags
    return flags[torch.as_tensor([i for i, kept in enumerate(keep) if kept], device=flags.device)]


def both(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    """``a & b`` of two optional device masks (``None``: all True)."""
    if a is None or b is None:
        return b if a is None else a
    return a & b


class RecordedGradients:
    """Gradients recorded by hooks (autograd) or the sparse backward's callbacks, applied
    at ``step()``.

    Args:
        backward: where the gradients live.
        records: the squared norms, one slot per module parameter.
        sets: builds the subsets of the active set that have gradients.
        squared_norms: ``||g||^2`` of a list of gradients (the backend's, summed over FSDP2 shards).
        on_arrival: called whenever a gradient arrives (the distributed sync goes stale).
    """

    def __init__(self, backward: BackwardPath, records: NormRecords, sets: ActiveSets,
                 squared_norms: SquaredNorms, on_arrival: Callable[[], None]):
        self.backward, self.records, self.sets = backward, records, sets
        self.squared_norms, self.on_arrival = squared_norms, on_arrival

    def hook(self, params: Sequence[nn.Parameter]) -> list:
        """Post-accumulate-grad hooks recording ``params``' norms (those the backward path
        does not route: routed modules call :meth:`on_module_grad`)."""
        return [p.register_post_accumulate_grad_hook(self._on_param_grad) for p in params
                if not self.backward.routes(p)]

    def _on_param_grad(self, param: nn.Parameter) -> None:
        self.records.record(self.sets.slot_of[param], param.grad)
        self.on_arrival()

    @torch.no_grad()
    def on_module_grad(self, name: str) -> None:
        """Sparse backward: module ``name``'s gradient is complete for this backward."""
        for param in self.backward.params_of[name]:
            self.records.record(self.sets.slot_of[param], self.backward.grad(param))
        self.on_arrival()

    def record_current(self, active: ActiveSet, grads: Sequence[Optional[Tensor]], unscaled: bool) -> None:
        """Record the norms of ``grads`` (one per active parameter, ``None``: no gradient)
        as they are now: averaged over the ranks, or before clipping. ``unscaled``: read
        after any loss scaler's ``unscale_``."""
        subset = self.sets.subset(active, [g is not None for g in grads])
        if subset.params:
            present = [g for g in grads if g is not None]
            self.records.record_many(subset.slots, subset.slot_ids, present, self.squared_norms(present), unscaled)

    def gather(self, active: ActiveSet, scale: LossScale, present: Optional[Tensor] = None) -> Optional[StepGradients]:
        """The active parameters with a gradient, unscaled, with their scores' norms.

        ``present`` (device, one flag per active parameter): the parameter had a gradient
        on some rank; the others are skipped and not scored."""
        has_grad = [self.backward.grad(p) is not None for p in active.params]
        subset = self.sets.subset(active, has_grad)
        if not subset.params:
            return None
        grads = [self.backward.grad(p) for p in subset.params]
        applied, scored = self._norms(subset, grads, scale)
        unit_applied, unit_scored = subset.per_unit(applied), subset.per_unit(scored)
        finite = torch.isfinite(unit_applied) & torch.isfinite(unit_scored)
        present = None if present is None else select(present, has_grad)
        on_some_rank = None if present is None else subset.per_unit(present.to(applied.dtype)) > 0
        observed = both(both(subset.covered, on_some_rank), scale.ok())
        skip = subset.per_param(~both(finite, observed))
        if present is not None:  # a tensor without a gradient on any rank: not updated
            skip = skip | ~present
        return StepGradients(subset, grads, skip, unit_scored / subset.unit_numel, finite, observed)

    def _norms(self, subset: ActiveSet, grads: list, scale: LossScale) -> tuple[Tensor, Tensor]:
        """Squared norms of the gradients as applied (for the finite check) and as scored
        (as backward left them, before clipping, free of the loss scale)."""
        slots = subset.slots
        recorded = self.records.read(subset.slot_ids) if self.records.complete(slots) else None
        fresh = recorded is not None and self.records.fresh(slots, grads)
        if recorded is not None and scale.scale is not None:  # nothing unscaled yet: all times S
            recorded = recorded * scale.norm_factor(self.records.sq.dtype)
        elif recorded is not None and scale.unscaled_by_user and not self.records.all_unscaled(slots):
            # read by backward, before the user's unscale_ (which left no version mark)
            factor = scale.norm_factor(self.records.sq.dtype)
            recorded, fresh = (None if factor is None else recorded * factor), False
        if scale.scale is not None:  # S is still in the gradients
            scale.unscale_([local(g) for g in grads])
        applied = recorded if fresh else self.squared_norms(grads)
        return applied, applied if recorded is None else recorded

    def release(self, active: ActiveSet) -> None:
        """After the update: the sparse backward frees its buffers; the records close."""
        self.backward.release_grads(active.params)
        self.records.forget(active.slots)


class SteppedInBackward(RecordedGradients):
    """``step_in_backward=True``: :meth:`on_module_grad` updates the module at once
    (``update(params, grads, skip)``) and frees its gradient; ``step()`` scores.

    ``refuse``: returns an error message when stepping in backward is not allowed now
    (several processes), else ``None``."""

    def __init__(self, *args, update: Update, group_of, refuse: Callable[[], Optional[str]]):
        super().__init__(*args)
        self.update, self.group_of, self.refuse = update, group_of, refuse
        self.stepped: set[str] = set()
        self._slot_ids: dict[str, Tensor] = {}

    @torch.no_grad()
    def on_module_grad(self, name: str) -> None:
        super().on_module_grad(name)
        if name in self.stepped:
            raise RuntimeError(f"step_in_backward=True: {name} received a second gradient before step(); "
                               "gradient accumulation (or calling a module twice per forward) needs "
                               "step_in_backward=False")
        message = self.refuse()
        if message is not None:
            raise RuntimeError(message)
        self.stepped.add(name)
        params = sorted(self.backward.params_of[name], key=self.group_of.__getitem__)
        if name not in self._slot_ids:  # one host-to-device copy per module, ever
            self._slot_ids[name] = torch.as_tensor([self.sets.slot_of[p] for p in params], device=self.records.sq.device)
        finite = torch.isfinite(self.records.read(self._slot_ids[name]).sum())
        self.update(params, [self.backward.grad(p) for p in params], (~finite).expand(len(params)))
        self.backward.release_grads(params)

    def gather(self, active: ActiveSet, scale: LossScale, present: Optional[Tensor] = None) -> Optional[StepGradients]:
        """The scores of the modules updated during this backward (nothing left to apply)."""
        if scale.scaler:
            raise RuntimeError("step_in_backward=True updates during backward, before a GradScaler can unscale "
                               "or check the gradients: use step_in_backward=False with torch.amp.GradScaler")
        stepped = {p for name in self.stepped for p in self.backward.params_of[name]}
        self.stepped.clear()
        subset = self.sets.subset(active, [p in stepped for p in active.params])
        if not subset.params:
            return None
        unit_scored = subset.per_unit(self.records.read(subset.slot_ids))
        return StepGradients(subset, [], None, unit_scored / subset.unit_numel, torch.isfinite(unit_scored),
                             subset.covered)

    def release(self, active: ActiveSet) -> None:
        self.records.forget(active.slots)
