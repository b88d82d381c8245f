"""What MISA needs from ``torch.distributed``: averaging the trained gradients over the
ranks and checking that every rank sampled the same modules.

MISA averages the gradients it applies itself (only the active set and the dense
parameters: ``delta`` of the model, not all of it), so it works whether or not the
model is wrapped in ``DistributedDataParallel``: a DDP wrapper built before MISA froze
the modules would sync only the modules active at that time, one built after would
need ``find_unused_parameters=True``; averaging gradients DDP already averaged changes
nothing.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
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


def check_same_draw(units: Sequence[int], device: torch.device) -> None:
    """Raise ``RuntimeError`` unless every rank drew the same units (one small collective)."""
    signature = torch.tensor([len(units), sum((i + 1) * u for i, u in enumerate(units)), sum(u * u for u in units)],
                             dtype=torch.int64, device=device)
    low, high = signature.clone(), signature.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(f"MISA: rank {dist.get_rank()} sampled different modules than another rank; every rank "
                           "needs the same seed, model and optimizer state (load the same state_dict on all ranks)")


def reject_sharded(model: nn.Module) -> None:
    """FSDP shards parameters (``DTensor``s or flat parameters): not supported yet, say so."""
    for name, module in model.named_modules():
        if any(cls.__name__ in ("FullyShardedDataParallel", "FSDPModule") for cls in type(module).__mro__):
            raise NotImplementedError(f"model: {name or 'the model'} is FSDP-sharded; MISA supports DDP "
                                      "(or no wrapper) under torch.distributed, FSDP is not supported yet")
    for name, param in model.named_parameters():
        if type(param.data).__name__ == "DTensor":
            raise NotImplementedError(f"model: parameter {name} is a DTensor (FSDP2/tensor parallel); "
                                      "MISA does not support sharded parameters yet")
