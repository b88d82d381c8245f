"""Gradient clipping over the gradients MISA applies (``MISA.clip_grad_norm_``)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..distributed import reduce_over_shards_


def tensor_norm(tensor: Tensor, norm_type: float) -> Tensor:
    """``vector_norm`` in fp32, 0 for an empty tensor (an FSDP2 shard can be empty, where
    the inf-norm would raise on that rank alone)."""
    if tensor.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=tensor.device)
    return torch.linalg.vector_norm(tensor, norm_type, dtype=torch.float32)


def total_norm(norms: Tensor, norm_type: float, shard_group=None, sharded: bool = False) -> Tensor:
    """The norm of the per-tensor ``norms``; under FSDP2 they are norms of this rank's
    shards, combined over the ranks of ``shard_group``."""
    if not sharded:
        return torch.linalg.vector_norm(norms, norm_type)
    if math.isinf(norm_type):
        return reduce_over_shards_(norms.max(), shard_group, "max")
    return reduce_over_shards_(norms.pow(norm_type).sum(), shard_group).pow(1.0 / norm_type)


def clip_(grads: Sequence[Tensor], max_norm: float, norm_type: float, shard_group=None,
          sharded: bool = False) -> Optional[Tensor]:
    """``torch.nn.utils.clip_grad_norm_`` of ``grads`` in place; the total norm before
    clipping (``None`` when there is nothing to clip)."""
    if not grads:
        return None
    total = total_norm(torch.stack([tensor_norm(g, norm_type) for g in grads]), norm_type, shard_group, sharded)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for grad in grads:
        grad.mul_(coef.to(grad.dtype))
    return total
