"""Loss scaling (``torch.amp.GradScaler``): scores free of the scale, and the scaler's skip.

MISA sets ``_step_supports_amp_scaling``, so ``scaler.step(opt)`` calls ``opt.step()``
itself, every step, with two attributes on the optimizer: ``found_inf`` (a device tensor,
nonzero when the scaled gradients overflowed: the step must change nothing) and
``grad_scale``, the scale ``S`` still in the gradients, or ``None`` when the user called
``scaler.unscale_(opt)`` before (to clip, say), which divided every ``.grad`` by ``S``.
:class:`LossScale` reads them; nothing is read back on the host.

Scores are taken from the gradient as backward leaves it, i.e. times ``S``: they are
divided by ``S^2``. After the user's ``scaler.unscale_`` GradScaler hands no scale over;
the scores then use the scale of a scaler attached as ``opt.grad_scaler``, or the norms
``opt.clip_grad_norm_`` recorded (unscaled, before clipping), and failing both the
gradients as ``step()`` sees them (after any clipping). ``unscale_`` changes no version
counter, so the records cannot tell by themselves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class LossScale:
    """The loss scaler's view of one ``step()`` (all ``None``/False without a scaler)."""

    scale: Optional[Tensor] = None  # S, still in the gradients: MISA unscales
    found_inf: Optional[Tensor] = None  # nonzero: GradScaler skips this step
    scaler: bool = False  # a GradScaler drives this step
    record_scale: Optional[Tensor] = None  # S of backward's records, when known (default: scale)

    def __post_init__(self) -> None:
        if self.record_scale is None and self.scale is not None:
            object.__setattr__(self, "record_scale", self.scale)

    @classmethod
    def of(cls, optimizer) -> "LossScale":
        """What ``GradScaler.step`` set on ``optimizer``; the scale of a scaler attached as
        ``optimizer.grad_scaler`` fills in after the user's own ``unscale_``."""
        if not hasattr(optimizer, "found_inf"):
            return cls()
        found, scale = optimizer.found_inf, getattr(optimizer, "grad_scale", None)
        attached = getattr(optimizer, "grad_scaler", None)
        # GradScaler's scale changes only in update(), after this step: it is backward's.
        record_scale = scale if scale is not None else getattr(attached, "_scale", None)
        return cls(scale, found if isinstance(found, Tensor) else None, True, record_scale)

    @property
    def unscaled_by_user(self) -> bool:
        """The user's ``scaler.unscale_(opt)`` already divided ``.grad`` by ``S``."""
        return self.scaler and self.scale is None

    def unscale_(self, grads: Sequence[Tensor]) -> None:
        """Divide ``grads`` by ``S`` in place (nothing when ``S`` is not in them)."""
        if self.scale is not None and grads:
            torch._foreach_mul_(list(grads), self.scale.double().reciprocal().float())

    def norm_factor(self, dtype: torch.dtype) -> Optional[Tensor]:
        """``1 / S^2``, which turns a squared norm read by backward into the unscaled one."""
        return None if self.record_scale is None else self.record_scale.to(dtype).reciprocal().square()

    def ok(self) -> Optional[Tensor]:
        """Device bool: the scaler found no inf/NaN (``None``: nothing to check)."""
        return None if self.found_inf is None else self.found_inf == 0
