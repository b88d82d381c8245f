"""The squared gradient norms behind the scores, recorded as each gradient completes.

A score ``G_b`` reads ``||g_b||^2`` from the gradient as backward leaves it, before any
clipping the user applies before ``step()``. The records live on the device (one entry per
module parameter, its *slot*); on the host each keeps the version counter of the gradient
it was read from, so that a step knows whether the gradient changed since (clipped,
unscaled), and whether it was read after a loss scaler's unscale.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..distributed import local


def stamp(grad: Tensor) -> tuple[int, int]:
    """Where a gradient lives and how often it was changed in place: a record of it is
    fresh while both are the same (a gradient replaced out of place has another address)."""
    shard = local(grad)  # an FSDP2 gradient is modified through its local shard
    return shard.data_ptr(), shard._version


class NormRecords:
    """``sq[slot] = ||g||^2`` (device) with the gradient's stamp and unscaled flag (host)."""

    def __init__(self, n_slots: int, dtype: torch.dtype, device: torch.device):
        self.sq = torch.zeros(n_slots, dtype=dtype, device=device)
        self.stamps: list[Optional[tuple[int, int]]] = [None] * n_slots
        self.unscaled = [False] * n_slots

    def record(self, slot: int, grad: Tensor, unscaled: bool = False) -> None:
        """Record one gradient's squared norm (a device write, no host read)."""
        self.sq[slot] = torch.linalg.vector_norm(grad, dtype=self.sq.dtype).square()
        self.stamps[slot], self.unscaled[slot] = stamp(grad), unscaled

    def record_many(self, slots: Sequence[int], slot_ids: Tensor, grads: Sequence[Tensor], sq: Tensor,
                    unscaled: bool = False) -> None:
        """Record ``sq`` (one squared norm per gradient, computed by the caller) at ``slots``."""
        self.sq.index_copy_(0, slot_ids, sq)
        for slot, grad in zip(slots, grads):
            self.stamps[slot], self.unscaled[slot] = stamp(grad), unscaled

    def complete(self, slots: Sequence[int]) -> bool:
        """Whether every slot holds a record of this backward."""
        return all(self.stamps[s] is not None for s in slots)

    def fresh(self, slots: Sequence[int], grads: Sequence[Tensor]) -> bool:
        """Whether no gradient changed since its record."""
        return all(self.stamps[s] == stamp(g) for s, g in zip(slots, grads))

    def all_unscaled(self, slots: Sequence[int]) -> bool:
        return all(self.unscaled[s] for s in slots)

    def read(self, slot_ids: Tensor) -> Tensor:
        return self.sq.index_select(0, slot_ids)

    def forget(self, slots: Sequence[int]) -> None:
        """The gradients were applied: the next records belong to the next backward."""
        for slot in slots:
            self.stamps[slot], self.unscaled[slot] = None, False
