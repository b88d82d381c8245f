"""Loss scaling (``torch.amp.GradScaler``): scores free of the scale, and the scaler's skip.

MISA sets ``_step_supports_amp_scaling``, so ``scaler.step(opt)`` calls ``opt.step()``
itself, every step, with two attributes on the optimizer: ``found_inf`` (a device tensor,
nonzero when the scaled gradients overflowed: the step must change nothing) and
``grad_scale``, the scale ``S`` still in the gradients, or ``None`` when the user called
``scaler.unscale_(opt)`` before (to clip, say), which divided every ``.grad`` by ``S``.
:class:`LossScale` reads them; nothing is read back on the host.

Scores are taken from the gradient as backward leaves it, i.e. times ``S``: they are
divided by ``S^2``. After the user's ``scaler.unscale_`` the scale is not handed over, so
the scores then come from the gradients as ``step()`` sees them, unless
``opt.clip_grad_norm_`` recorded them (unscaled, before clipping) first.
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

    @classmethod
    def of(cls, optimizer) -> "LossScale":
        if not hasattr(optimizer, "found_inf"):
            return cls()
        found = optimizer.found_inf
        return cls(getattr(optimizer, "grad_scale", None), found if isinstance(found, Tensor) else None, True)

    @property
    def unscaled_by_user(self) -> bool:
        """The user's ``scaler.unscale_(opt)`` already divided ``.grad`` by ``S``."""
        return self.scaler and self.scale is None

    def unscale_(self, grads: Sequence[Tensor]) -> None:
        """Divide ``grads`` by ``S`` in place (nothing when ``S`` is not in them)."""
        if self.scale is not None and grads:
            torch._foreach_mul_(list(grads), self.scale.double().reciprocal().float())

    def norm_factor(self, dtype: torch.dtype) -> Optional[Tensor]:
        """``1 / S^2``, which turns a squared norm of a scaled gradient into the unscaled one."""
        return None if self.scale is None else self.scale.to(dtype).reciprocal().square()

    def ok(self) -> Optional[Tensor]:
        """Device bool: the scaler found no inf/NaN (``None``: nothing to check)."""
        return None if self.found_inf is None else self.found_inf == 0
