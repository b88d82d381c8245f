"""The dense parameters of ``mode="pretrain"`` (embeddings, lm_head, norms) or of
``dense_embeddings=True`` (embeddings, lm_head): trained with
AdamW at every step, on top of the ``delta`` budget of modules, each tensor skipped alone
when its gradient is not finite."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..distributed import local
from .gradients import both, select
from .loss_scale import LossScale
from .updater import Updater


class DenseParameters:
    """The dense tensors, their skipped-step count (on the device), and their step."""

    def __init__(self, params: Sequence[nn.Parameter], device: torch.device):
        self.params = list(params)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def step(self, updater: Updater, squared_norms: Callable[[Sequence[Tensor]], Tensor], scale: LossScale,
             present: Optional[Tensor]) -> None:
        """One AdamW step of the tensors with a gradient (``present``: device flags, one per
        dense tensor, whether it had a gradient on some rank)."""
        has_grad = [p.grad is not None for p in self.params]
        params = [p for p, kept in zip(self.params, has_grad) if kept]
        if not params:
            return
        grads = [p.grad for p in params]
        scale.unscale_([local(g) for g in grads])
        finite = torch.isfinite(squared_norms(grads))
        counted = both(None if present is None else select(present, has_grad), scale.ok())
        self.skipped += both(~finite, counted).sum()
        updater.adam(params, grads, ~both(finite, counted))
