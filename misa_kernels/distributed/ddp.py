"""Keeping a ``DistributedDataParallel`` wrapper's reducer switched off.

A DDP wrapper registers the parameters that require grad when it is built, so its reducer
would sync a stale set after MISA switches modules (and, without
``find_unused_parameters``, crash on the ones that got no gradient). MISA averages the
gradients it applies itself (:mod:`.grad_sync`) and switches the reduction of the wrapper
it runs under off, whether the wrapper was built before or after MISA (the Hugging Face
Trainer and Accelerate build it after).
"""
from __future__ import annotations

import logging
import weakref
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.hooks import RemovableHandle

from .collectives import world_size

logger = logging.getLogger("misa_kernels")


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
