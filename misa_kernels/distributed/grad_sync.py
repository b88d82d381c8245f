"""Averaging the gradients MISA applies over the ranks, once per backward, as DDP would.

Only the active modules and the dense parameters are averaged (``delta`` of the model, not
all of it), at the end of each backward (not inside DDP's ``no_sync()``), so that clipping
between backward and ``step()`` (the HF Trainer's) sees the average. The end-of-backward
callback is queued from hooks on the model's output (the loss, the logits: whichever
backward starts from), i.e. once per backward on every rank and on the outermost backward
only (not per reentrant checkpoint). Averaging again after more accumulation changes
nothing but rounding, and ``step()`` averages whatever arrived after the last sync.

Every rank averages the same list of tensors: a parameter without a gradient here gets
zeros. Which parameters had a gradient on some rank stays on the device
(:attr:`GradSync.present`), so the steady state reads nothing back on the host; the
optimizer skips the others.

Under FSDP2 (``fully_shard``) FSDP's reduce-scatter has averaged already: a sync only
hands the (sharded) gradients over for their norms.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from . import collectives
from .ddp import DDPTakeover

Synced = Callable[[Sequence[nn.Parameter], Sequence[Optional[Tensor]]], None]


def output_tensors(output) -> list[Tensor]:
    """The tensors requiring grad at the top level of a model's output (a tensor, a
    tuple, or a Hugging Face ``ModelOutput``)."""
    values = list(output.values()) if isinstance(output, dict) else output
    values = values if isinstance(values, (list, tuple)) else [values]
    return [v for v in values if isinstance(v, Tensor) and v.requires_grad]


class GradSync:
    """The synced state of the gradients of ``params()`` and the hooks that keep it.

    Args:
        model: the (unwrapped) model; a DDP wrapper around it is taken over.
        params: the parameters whose gradients the next ``step()`` applies, in a fixed
            order (the active set, then the dense parameters).
        grad, ensure_grad: read a parameter's gradient; give it one (zeros) if it has none.
        on_synced: receives ``params()`` and their gradients once they are averaged (or,
            under FSDP2, reduced by FSDP), for the scores' norms.
        sharded: the model is sharded with FSDP2.
    """

    def __init__(self, model: nn.Module, params: Callable[[], list[nn.Parameter]],
                 grad: Callable[[nn.Parameter], Optional[Tensor]], ensure_grad: Callable[[nn.Parameter], Tensor],
                 on_synced: Synced, sharded: bool):
        self._params, self._grad, self._ensure_grad = params, grad, ensure_grad
        self._on_synced, self.sharded = on_synced, sharded
        self._synced = self._queued = False
        self.present: Optional[Tensor] = None  # device bool per params(): a gradient on some rank
        self._filled: dict[nn.Parameter, tuple[int, int]] = {}  # zeros this sync gave: address, version after it
        self._flag_cache: dict[tuple[bool, ...], Tensor] = {}
        self._ddp = DDPTakeover(model)
        self._handles: list = [self._ddp]  # removed by remove()
        if not sharded:  # FSDP2 averages itself, at its own time
            self._handles.append(model.register_forward_hook(self._hook_output))

    @property
    def averaging(self) -> bool:
        """Several processes, each with the whole model: MISA averages. Read at use: the HF
        Trainer and Accelerate start the process group after the optimizer may be built."""
        return not self.sharded and collectives.world_size() > 1

    @property
    def needed(self) -> bool:
        return self.sharded or self.averaging

    def mark_stale(self, *_) -> None:
        """A gradient was accumulated: ``step()`` must sync again unless a sync follows."""
        self._synced = False

    def reset(self) -> None:
        """After ``step()``: the next gradients are new."""
        self._synced, self.present, self._filled = False, None, {}

    @torch.no_grad()
    def sync(self) -> None:
        """Average (or, under FSDP2, collect) the gradients of ``params()`` unless that is
        done already for the gradients there are."""
        if not self.needed or self._synced:
            return
        self._synced = True
        params = self._params()
        if self.sharded:
            self._on_synced(params, [self._grad(p) for p in params])
            return
        if not params:
            return
        own = tuple(self._has_own_grad(p) for p in params)
        grads = [self._ensure_grad(p) for p in params]
        flags = self._flags(own, grads[0].device)
        collectives.average_(grads)
        self.present = collectives.any_rank_(flags.clone()).bool()
        # The zeros given to the others are averaged now; a later sync of this step must
        # not take them for a gradient of this rank's backward.
        self._filled = {p: (g.data_ptr(), g._version) for p, g, mine in zip(params, grads, own) if not mine}
        self._on_synced(params, grads)

    def _has_own_grad(self, param: nn.Parameter) -> bool:
        grad = self._grad(param)
        return grad is not None and self._filled.get(param) != (grad.data_ptr(), grad._version)

    def _flags(self, own: tuple[bool, ...], device: torch.device) -> Tensor:
        """``own`` as device 0/1 flags, copied to the device once per pattern (cached)."""
        if own not in self._flag_cache:
            if len(self._flag_cache) >= 16:
                self._flag_cache.clear()
            self._flag_cache[own] = torch.tensor(own, dtype=torch.int32, device=device)
        return self._flag_cache[own]

    def _hook_output(self, model: nn.Module, args: tuple, output) -> None:
        """Forward hook: queue a sync at the end of the backward through this output."""
        if not (torch.is_grad_enabled() and self.averaging):
            return
        self._queued = False
        queue = functools.partial(self._queue, self._ddp.sync_requested)  # this forward's no_sync
        for tensor in output_tensors(output):
            tensor.register_hook(queue)

    def _queue(self, sync_requested: bool, grad: Tensor) -> None:
        if sync_requested and not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._sync_at_end_of_backward)

    def _sync_at_end_of_backward(self) -> None:
        self._queued = False
        self.sync()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def track_arrivals(params: Sequence[nn.Parameter], sync: GradSync) -> list[RemovableHandle]:
    """Post-accumulate-grad hooks marking ``sync`` stale when these gradients change."""
    return [p.register_post_accumulate_grad_hook(sync.mark_stale) for p in params]
