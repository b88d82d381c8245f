"""The collectives MISA issues: averaging the applied gradients, merging presence flags,
checking that every rank drew the same modules, and sums over FSDP2 shards."""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def world_size() -> int:
    """Processes in the default group, 1 when ``torch.distributed`` is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def average_(grads: Sequence[Tensor]) -> None:
    """All-reduce ``grads`` in place to their mean over the ranks: one collective per
    (dtype, device), on a flattened copy."""
    groups: dict[tuple, list[Tensor]] = defaultdict(list)
    for grad in grads:
        groups[(grad.dtype, grad.device)].append(grad)
    size = world_size()
    for members in groups.values():
        flat = _flatten_dense_tensors(members)
        dist.all_reduce(flat)
        flat.div_(size)
        for grad, averaged in zip(members, _unflatten_dense_tensors(flat, members)):
            grad.copy_(averaged)


def any_rank_(flags: Tensor) -> Tensor:
    """``flags`` (a device tensor of 0/1) OR-ed over the ranks in place; nothing is read on the host."""
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


def check_same_draw(units: Sequence[int], device: torch.device) -> None:
    """Raise ``RuntimeError`` unless every rank drew the same units (one small collective,
    once per switch of the active set)."""
    signature = torch.tensor([len(units), sum((i + 1) * u for i, u in enumerate(units)), sum(u * u for u in units)],
                             dtype=torch.int64, device=device)
    low, high = signature.clone(), signature.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(f"MISA: rank {dist.get_rank()} sampled different modules than another rank; every rank "
                           "needs the same seed, model and optimizer state (load the same state_dict on all ranks)")


def reduce_over_shards_(tensor: Tensor, group, op: str = "sum") -> Tensor:
    """All-reduce ``tensor`` in place over the ranks of ``group`` (the FSDP2 mesh): the
    ``"sum"`` or ``"max"`` of the per-shard values."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return tensor
