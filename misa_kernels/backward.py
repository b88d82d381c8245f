"""The backward path of module-bearing layers: which weights get gradients, and where.

MISA drives this seam at every switch of the active set and reads gradients through it.

* :class:`AutogradBackward` (default) toggles ``requires_grad``: eager autograd then runs
  no weight-gradient GEMM for a frozen Linear and saves no input on its behalf; gradients
  are ordinary ``.grad`` tensors.
* :class:`SparseBackward` routes the module Linear layers through the sparse-backward
  ops (``csrc/misa_linear.cpp`` or their PyTorch twin, see
  :mod:`misa_kernels.ops.sparse_linear`): an active weight's gradient is accumulated in
  fp32 straight into a view of a :class:`~misa_kernels.grad_arena.GradArena` (fixed
  addresses for the inner loop), and a callback fires as soon as a module's gradient is
  complete (for ``step_in_backward``).
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional, Protocol

import torch
from torch import Tensor, nn

from .grad_arena import GradArena
from .ops.sparse_linear import GradSlot, LinearRouting, route_custom_linears, route_linears
from .ops.static_linear import route_static_linears

Pair = tuple[nn.Parameter, Optional[nn.Parameter]]  # a module's (weight, bias)


def _nbytes(tensors: Iterable[Optional[Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class BackwardPath(Protocol):
    """What MISA needs from a backward implementation."""

    name: str

    def activate(self, params: Iterable[nn.Parameter]) -> None: ...

    def deactivate(self, params: Iterable[nn.Parameter]) -> None: ...

    def routes(self, param: nn.Parameter) -> bool: ...

    def grad(self, param: nn.Parameter) -> Optional[Tensor]: ...

    def ensure_grad(self, param: nn.Parameter) -> Tensor: ...

    def release_grads(self, params: Iterable[nn.Parameter]) -> None: ...

    def clear_grads(self) -> None: ...

    def detach(self) -> None: ...


class AutogradBackward:
    """Plain autograd: frozen weights simply do not require gradients."""

    name = "autograd"

    def activate(self, params: Iterable[nn.Parameter]) -> None:
        for param in params:
            param.requires_grad_(True)

    def deactivate(self, params: Iterable[nn.Parameter]) -> None:
        for param in params:
            self._freeze(param)

    def _freeze(self, param: nn.Parameter) -> None:
        param.requires_grad_(False)
        param.grad = None

    def routes(self, param: nn.Parameter) -> bool:
        """Whether ``param``'s gradient goes somewhere else than ``.grad``: never here."""
        return False

    def grad(self, param: nn.Parameter) -> Optional[Tensor]:
        return param.grad

    def ensure_grad(self, param: nn.Parameter) -> Tensor:
        """The gradient of ``param``, zeros if backward gave it none."""
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        return param.grad

    def release_grads(self, params: Iterable[nn.Parameter]) -> None:
        """Gradients stay until ``zero_grad()``, as with any torch optimizer."""

    def clear_grads(self) -> None:
        """``Optimizer.zero_grad`` already cleared every ``.grad``."""

    def detach(self) -> None:
        """Nothing was wrapped, so nothing is restored."""


class SparseBackward(AutogradBackward):
    """Module Linear layers routed through :func:`~misa_kernels.ops.sparse_linear.route_linears`.

    ``modules`` maps names to ``nn.Linear``/``Conv1D`` modules, ``custom`` to modules whose
    own forward calls ``F.linear`` on their 2-D weight (MoE routers, see
    :func:`~misa_kernels.ops.sparse_linear.route_custom_linears`), ``slices`` to the
    ``(weight, bias)`` views of expert matrices (routed by
    :func:`~misa_kernels.experts.route_experts` through ``slots``); their weights' (and
    biases') gradients live in fp32 :class:`GradSlot` buffers: views of a :class:`GradArena` built
    for the active modules when backward first reaches one of them after a switch
    (``shared``, for ``step_in_backward``: one module-sized buffer reused by each module in
    turn), handed to a slot on its first contribution and given back (zeroed) by
    :meth:`release_grads`. For fp32 weights the buffer is also the parameter's ``.grad``
    (so ``clip_grad_norm_`` sees it); a bf16/fp16 weight keeps ``.grad`` empty, because
    torch requires a gradient of the parameter's dtype. ``on_grad_ready(name)`` runs once a
    module's buffers hold this backward's gradient. ``live_bytes``/``peak_bytes`` count the
    arena and any buffer allocated outside it.
    """

    name = "sparse"

    def __init__(self, modules: Mapping[str, nn.Module], on_grad_ready: Callable[[str], None],
                 shared: bool = False, slices: Mapping[str, Pair] = {}, custom: Mapping[str, nn.Module] = {}):
        self._pairs: dict[str, Pair] = {name: (m.weight, getattr(m, "bias", None))
                                        for name, m in {**modules, **custom}.items()}
        self._pairs.update(slices)
        self.slots: dict[str, GradSlot] = {key: GradSlot(key) for key in self._pairs}
        self._routings = self._route(dict(modules), dict(custom))
        self.params_of: dict[str, tuple[nn.Parameter, ...]] = {}
        self._slot_of: dict[nn.Parameter, tuple[GradSlot, str]] = {}
        for name, (weight, bias) in self._pairs.items():
            slot = self.slots[name]
            slot.on_grad_ready, slot.on_demand = on_grad_ready, self._allocate
            params = tuple(p for p in (weight, bias) if p is not None)
            self.params_of[name] = params
            for param, field in zip(params, ("weight_buffer", "bias_buffer")):
                self._slot_of[param] = (slot, field)
        self.shared = shared
        self.arena: Optional[GradArena] = None
        self.live_bytes = self.peak_bytes = 0
        self._live: dict[str, GradSlot] = {}  # slots holding buffers, so clearing skips the rest
        self._in_arena: set[str] = set()  # of those, the ones holding arena views

    def _route(self, modules: dict[str, nn.Module], custom: dict[str, nn.Module]) -> list[LinearRouting]:
        return [route_linears(modules, {k: self.slots[k] for k in modules}),
                route_custom_linears(custom, {k: self.slots[k] for k in custom})]

    def routes(self, param: nn.Parameter) -> bool:
        """Whether ``param``'s gradient goes to a buffer rather than ``.grad``."""
        return param in self._slot_of

    @property
    def holds_outside_grad(self) -> bool:
        """Whether some fp32 buffer is not also a ``.grad`` (its weight is not fp32)."""
        return any(p.dtype != torch.float32 for p in self._slot_of)

    def grad(self, param: nn.Parameter) -> Optional[Tensor]:
        found = self._slot_of.get(param)
        return param.grad if found is None else getattr(found[0], found[1])

    def ensure_grad(self, param: nn.Parameter) -> Tensor:
        found = self._slot_of.get(param)
        if found is None:
            return super().ensure_grad(param)
        if self.grad(param) is None:
            self._allocate(found[0])
        return self.grad(param)

    def activate(self, params: Iterable[nn.Parameter]) -> None:
        self._drop_arena()
        super().activate(params)

    def deactivate(self, params: Iterable[nn.Parameter]) -> None:
        params = list(params)
        self.release_grads(params)
        self._drop_arena()
        super().deactivate(params)

    def is_active(self, name: str) -> bool:
        """Whether module ``name`` gets a weight gradient: one of its parameters requires grad."""
        return any(p.requires_grad for p in self.params_of[name])

    def _active_shapes(self) -> dict[str, tuple]:
        """(weight, bias) shapes of the active modules."""
        return {name: tuple(None if p is None else p.shape for p in pair)
                for name, pair in self._pairs.items() if self.is_active(name)}

    def _allocate(self, slot: GradSlot) -> None:
        """Give ``slot`` its fp32 buffers: arena views, or its own when the arena cannot."""
        weight, bias = self._pairs[slot.key]
        if self.arena is None:
            self.arena = GradArena(self._active_shapes(), weight.device, self.shared)
            self._count(self.arena.nbytes)
        views = self.arena.take(slot.key) if slot.key in self.arena else None
        if views is None:
            slot.allocate(weight, bias)
            self._count(_nbytes(self._buffers(slot.key)))
        else:
            slot.weight_buffer, slot.bias_buffer = views
            self._in_arena.add(slot.key)
        self._live[slot.key] = slot
        for param, buffer in zip(self.params_of[slot.key], self._buffers(slot.key)):
            if param.dtype == buffer.dtype:
                param.grad = buffer

    def _buffers(self, name: str) -> list[Tensor]:
        return [self.grad(p) for p in self.params_of[name]]

    def _count(self, nbytes: int) -> None:
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def release_grads(self, params: Iterable[nn.Parameter]) -> None:
        """Give back the buffers of ``params``' modules (and clear their ``.grad`` aliases)."""
        for param in params:
            found = self._slot_of.get(param)
            if found is None or found[0].key not in self._live:
                continue
            slot = self._live.pop(found[0].key)
            buffers = self._buffers(slot.key)
            for owned, buffer in zip(self.params_of[slot.key], buffers):
                if owned.grad is buffer:
                    owned.grad = None
            slot.release()
            if slot.key in self._in_arena:
                self._in_arena.discard(slot.key)
                self.arena.give_back(slot.key)
            else:
                self.live_bytes -= _nbytes(buffers)

    def _drop_arena(self) -> None:
        """A new active set: the next backward builds its own arena (once nothing holds views)."""
        if self.arena is not None and not self._in_arena:
            self.live_bytes -= self.arena.nbytes
            self.arena = None

    def clear_grads(self) -> None:
        self.release_grads([self.params_of[key][0] for key in list(self._live)])

    def reset_peak(self) -> None:
        """Start a new peak measurement of gradient-buffer bytes."""
        self.peak_bytes = self.live_bytes

    def detach(self) -> None:
        """Free every buffer and give each routed module back its class's forward."""
        self.clear_grads()
        for routing in self._routings:
            routing.remove()


class StaticSparseBackward(SparseBackward):
    """:class:`SparseBackward` for ``torch.compile``: every module weight keeps
    ``requires_grad=True`` and a switch flips run-time flags read inside the
    ``misa::static_linear`` ops (:mod:`misa_kernels.ops.static_linear`), so the compiled
    graph, and what Dynamo guards on, is the same for every active set. Expert slices and
    custom modules are refused (their forwards are not custom ops)."""

    name = "static"

    def _route(self, modules: dict[str, nn.Module], custom: dict[str, nn.Module]) -> list[LinearRouting]:
        outside = sorted(set(self._pairs) - set(modules))
        if outside:
            raise ValueError(f"compile_friendly=True routes nn.Linear/Conv1D modules only; these are not: "
                             f"{outside[:5]} (mixture-of-experts slices and routers are not supported yet)")
        self._static = route_static_linears(modules, self.slots)
        return [self._static]

    def is_active(self, name: str) -> bool:
        return self._static.routes[name].active

    def activate(self, params: Iterable[nn.Parameter]) -> None:
        params = list(params)
        self._set_routes(params, True)
        super().activate(params)

    def deactivate(self, params: Iterable[nn.Parameter]) -> None:
        params = list(params)
        self._set_routes(params, False)
        super().deactivate(params)

    def _freeze(self, param: nn.Parameter) -> None:
        """A routed weight keeps requiring grad (its route is off); the others freeze."""
        if param in self._slot_of:
            param.grad = None
        else:
            super()._freeze(param)

    def _set_routes(self, params: list[nn.Parameter], active: bool) -> None:
        for param in params:
            found = self._slot_of.get(param)
            if found is not None:
                self._static.routes[found[0].key].active = active
