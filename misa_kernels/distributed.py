"""What MISA needs from ``torch.distributed``: averaging the trained gradients over the
ranks and checking that every rank sampled the same modules.

MISA averages the gradients it applies itself (only the active set and the dense
parameters: ``delta`` of the model, not all of it). A ``DistributedDataParallel``
wrapper registers the parameters that require grad when it is built, so its reducer
would sync a stale set after MISA switches modules (and, without
``find_unused_parameters``, crash on the ones that got no gradient). MISA therefore
switches the reduction of the DDP wrapper it runs under off, whether the wrapper was
built before or after MISA (the Hugging Face Trainer and Accelerate build it after).

Under FSDP2 (``fully_shard``) the parameters are ``DTensor`` shards and FSDP averages
the gradients itself (a reduce-scatter of the modules that received one); MISA keeps
fp32 masters and moments for this rank's shard of the active modules only, and sums
squared gradient norms over the ranks for the scores.
"""
from __future__ import annotations

import logging
import weakref
from collections import defaultdict
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel
from torch.utils.hooks import RemovableHandle

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.5
    from torch.distributed._tensor import DTensor

logger = logging.getLogger("misa_kernels")


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


def on_any_rank(flags: Sequence[bool], device: torch.device) -> list[bool]:
    """Each flag OR-ed over the ranks (one small collective)."""
    if not flags:
        return []
    merged = torch.tensor(flags, dtype=torch.int32, device=device)
    dist.all_reduce(merged, op=dist.ReduceOp.MAX)
    return merged.bool().tolist()


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


def is_fsdp2(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 (``fully_shard``) shards; raise
    ``NotImplementedError`` for the sharding MISA cannot handle (FSDP1, tensor parallel)."""
    fsdp2 = False
    for name, module in model.named_modules():
        classes = {cls.__name__ for cls in type(module).__mro__}
        if "FullyShardedDataParallel" in classes:
            raise NotImplementedError(f"model: {name or 'the model'} is wrapped in FSDP1 (FullyShardedDataParallel); "
                                      "MISA supports FSDP2: shard with torch.distributed.fsdp.fully_shard")
        fsdp2 = fsdp2 or "FSDPModule" in classes
    sharded = [(name, param) for name, param in model.named_parameters() if isinstance(param, DTensor)]
    if sharded and not fsdp2:
        raise NotImplementedError(f"model: parameter {sharded[0][0]} is a DTensor outside FSDP2 (tensor "
                                  "parallel?); MISA supports DDP and FSDP2 (fully_shard) only")
    if fsdp2 and not hasattr(model, "_get_fsdp_state"):
        raise NotImplementedError("model: FSDP2 shards some of its modules but not the model itself; call "
                                  "fully_shard(model) on the root too, after its layers, and give MISA the root")
    for name, param in sharded:
        if param.device_mesh.ndim != 1 or param.device_mesh != sharded[0][1].device_mesh:
            raise NotImplementedError(f"model: parameter {name} is sharded over a {param.device_mesh.ndim}-D or "
                                      "different mesh (HSDP?); MISA supports FSDP2 on one 1-D mesh")
    return fsdp2


def shard_group(model: nn.Module):
    """The process group FSDP2 shards ``model``'s parameters over (None if unsharded)."""
    for param in model.parameters():
        if isinstance(param, DTensor):
            return param.device_mesh.get_group()
    return None


def lazy_init_fsdp2(root: nn.Module) -> None:
    """Run FSDP2's lazy initialisation of the sharded ``root`` while every parameter still
    requires grad.

    FSDP2 fixes each group's mixed-precision dtypes at the first forward from the
    parameters that require grad then; a group that MISA had frozen would get none and
    fail once its modules are sampled."""
    root._get_fsdp_state()._lazy_init()


def local(tensor: Optional[Tensor]) -> Optional[Tensor]:
    """The shard this rank holds of an FSDP2 ``DTensor`` (a view), else ``tensor`` itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def reduce_over_shards_(tensor: Tensor, group, op: str = "sum") -> Tensor:
    """All-reduce ``tensor`` in place over the ranks of ``group`` (the FSDP2 mesh): the
    ``"sum"`` or ``"max"`` of the per-shard values."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return tensor


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper, else ``model``."""
    return model.module if isinstance(model, DistributedDataParallel) else model


class DDPTakeover:
    """Keeps the reducer of the DDP wrapper ``model`` runs under switched off, while
    honouring its ``no_sync()``: :attr:`sync_requested` tells whether the backward of the
    latest forward through the wrapper should average (``False`` inside ``no_sync``).

    A forward pre-hook on ``model`` finds the wrapper (DDP's ``_active_ddp_module``),
    reads the flag ``no_sync`` sets and clears it, so that DDP prepares no reduction. The
    wrapper's ``_post_forward``, the last thing its forward does with the flag, is
    extended on this instance to put the flag back (and a forward hook that runs even
    when the forward raises does the same; failing both, the next forward does)."""

    def __init__(self, model: nn.Module):
        self.sync_requested = True
        self._wrappers: "weakref.WeakKeyDictionary[DistributedDataParallel, RemovableHandle]" = (
            weakref.WeakKeyDictionary())
        self._outside: "weakref.WeakSet[DistributedDataParallel]" = weakref.WeakSet()
        self._pending: Optional[tuple[DistributedDataParallel, bool, bool]] = None
        self._pre_hook = model.register_forward_pre_hook(self._before_forward)

    def _before_forward(self, module: nn.Module, args: tuple) -> None:
        self.settle()
        wrapper = getattr(DistributedDataParallel, "_active_ddp_module", None)
        if wrapper is None or not self._take(wrapper, module):
            self.sync_requested = True
            return
        if wrapper._join_config.enable:
            raise RuntimeError("model: DistributedDataParallel.join() (uneven inputs) cannot shadow MISA's own "
                               "gradient averaging; give every rank the same number of batches")
        self.sync_requested = wrapper.require_backward_grad_sync
        self._pending = (wrapper, self.sync_requested, torch.is_grad_enabled())
        wrapper.require_backward_grad_sync = False

    def _take(self, wrapper: DistributedDataParallel, module: nn.Module) -> bool:
        """Whether ``wrapper`` wraps ``module``; on first sight, check it and hook it."""
        if wrapper in self._wrappers:
            return True
        if wrapper in self._outside:
            return False
        if not any(m is module for m in wrapper.module.modules()):
            self._outside.add(wrapper)
            return False
        _check_supported(wrapper)
        logger.info("MISA averages the gradients of the active modules itself; the "
                    "DistributedDataParallel reducer is switched off")
        original = wrapper._post_forward

        def post_forward(output):
            output = original(output)
            self.settle()
            return output

        wrapper._post_forward = post_forward  # this forward, already under way, calls it too
        self._wrappers[wrapper] = wrapper.register_forward_hook(lambda *_: self.settle(), always_call=True)
        return True

    def settle(self) -> None:
        """Give the wrapper its flag back after a forward, and what DDP derives from it:
        whether buffers are broadcast before the next forward."""
        if self._pending is not None:
            wrapper, flag, grad_enabled = self._pending
            wrapper.require_backward_grad_sync = flag
            wrapper.require_forward_param_sync = flag and grad_enabled
            self._pending = None

    def remove(self) -> None:
        self.settle()
        self._pre_hook.remove()
        for wrapper, handle in list(self._wrappers.items()):
            handle.remove()
            wrapper.__dict__.pop("_post_forward", None)
        self._wrappers.clear()


def _check_supported(wrapper: DistributedDataParallel) -> None:
    if wrapper.static_graph:
        raise ValueError("model: DistributedDataParallel(static_graph=True) assumes the same parameters "
                         "train at every step, but MISA switches modules; build it without static_graph")
    if wrapper.process_group is not None and dist.get_world_size(wrapper.process_group) != world_size():
        raise ValueError("model: DistributedDataParallel over a sub-group of the ranks (process_group=...) is "
                         "not supported; MISA averages over all ranks")
