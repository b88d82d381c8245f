"""The sparse backward as ``torch.library`` custom ops, for a graph that switching never changes.

:class:`~.sparse_linear.SparseLinearFunction` decides frozen or active by
``weight.requires_grad``, and toggling it at every switch of the active set fails
``torch.compile``'s guards: a new graph per active set, until the recompile limit drops the
model back to eager. Here every module weight keeps ``requires_grad=True`` and the decision
is made *inside* an opaque op at run time, by looking up the module's :class:`StaticRoute`:

* ``misa::static_linear(x, W, b, token, key, transposed)``: ``Y = X W^T + b`` (Conv1D:
  ``X W + b``); it saves ``X`` and ``W`` whatever the active set (the price of a fixed
  graph: a frozen module's input is kept too);
* ``misa::static_linear_backward(dY, X, W, has_bias, key, transposed, need_x)``: ``dX``, and
  for an active module ``dW`` (and ``db``) accumulated in fp32 into its slot's buffers
  (allocated on demand), then ``slot.on_grad_ready(name)`` (a step in backward). Autograd
  gets no weight gradient, so ``.grad`` is only ever the slot's buffer.

The buffers are a side effect no graph can see, and a weight gradient of ``None`` leaves
nothing for a compiled backward to compute: it would be dropped as dead code. So every op
takes a shared 0-d ``token`` that requires grad, and the backward op returns a zero
gradient for it: the token's gradient depends on every backward op, so all of them run.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import Tensor

from .linear_ops import linear_input_grad
from .sparse_linear import (GradSlot, LinearRouting, _is_transposed, _linear, _out_in, _param_grads, _RoutedForward,
                            install_forwards)


@dataclass(eq=False)
class StaticRoute:
    """One module's run-time switch: ``active`` decides whether backward computes ``dW``."""

    name: str
    slot: GradSlot
    active: bool = False


_ROUTES: dict[int, StaticRoute] = {}  # detach() removes an optimizer's routes
_KEYS = itertools.count()


def register(route: StaticRoute) -> int:
    """Make ``route`` reachable from the ops by an int key (what a graph can carry)."""
    key = next(_KEYS)
    _ROUTES[key] = route
    return key


def unregister(key: int) -> None:
    _ROUTES.pop(key, None)


@torch.library.custom_op("misa::static_linear", mutates_args=())
def static_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], token: Tensor, key: int,
                  transposed: bool) -> Tensor:
    return _linear(x, weight, bias, transposed)


@static_linear.register_fake
def _static_linear_fake(x, weight, bias, token, key, transposed):
    return x.new_empty((*x.shape[:-1], weight.shape[1] if transposed else weight.shape[0]))


@torch.library.custom_op("misa::static_linear_backward", mutates_args=())
def static_linear_backward(grad_out: Tensor, x: Tensor, weight: Tensor, has_bias: bool, key: int,
                           transposed: bool, need_x: bool) -> tuple[Tensor, Tensor]:
    grad_x = linear_input_grad(grad_out, _out_in(weight, transposed)) if need_x else grad_out.new_empty(0)
    route = _ROUTES[key]
    if route.active:
        _, _, delivered = _param_grads(grad_out, x, route.slot, True, has_bias, transposed)
        if not delivered:
            raise RuntimeError(f"{route.name}: an active module got no gradient buffer")
        if route.slot.on_grad_ready is not None:
            route.slot.on_grad_ready(route.slot.key)
    return grad_x, grad_out.new_zeros((), dtype=torch.float32)


@static_linear_backward.register_fake
def _static_linear_backward_fake(grad_out, x, weight, has_bias, key, transposed, need_x):
    return (x.new_empty(x.shape) if need_x else grad_out.new_empty(0)), grad_out.new_empty((), dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, token, key, transposed = inputs
    ctx.save_for_backward(x, weight)
    ctx.key, ctx.transposed, ctx.has_bias = key, transposed, bias is not None


def _backward(ctx, grad_out: Tensor):
    x, weight = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    grad_x, grad_token = torch.ops.misa.static_linear_backward(grad_out.contiguous(), x, weight, ctx.has_bias,
                                                               ctx.key, ctx.transposed, need_x)
    return (grad_x if need_x else None), None, None, grad_token, None, None


static_linear.register_autograd(_backward, setup_context=_setup_context)


class _StaticForward(_RoutedForward):
    """A routed module's ``forward`` through ``misa::static_linear``: the same op in every
    training step, whatever ``requires_grad`` says (it is never toggled here)."""

    __slots__ = ("key", "token")

    def __init__(self, module: torch.nn.Module, slot: GradSlot, transposed: bool, key: int, token: Tensor):
        super().__init__(module, slot, transposed)
        self.key, self.token = key, token

    def _records(self, module: torch.nn.Module, x: Tensor) -> bool:
        return True

    def _training_forward(self, module: torch.nn.Module, x: Tensor) -> Tensor:
        return static_linear(x, module.weight, module.bias, self.token, self.key, self.transposed)

    def __repr__(self) -> str:
        return f"<misa static-linear forward for {self.slot.key!r}>"


class StaticRouting(LinearRouting):
    """Handle of :func:`route_static_linears`: ``routes[name]`` switches a module;
    ``remove()`` restores the modules and forgets the routes."""

    def __init__(self, routing: LinearRouting, routes: dict[str, StaticRoute], keys: list[int], token: Tensor):
        super().__init__(routing.modules, routing._routers, routing.slots)
        self.routes, self._keys, self.token = routes, keys, token

    def remove(self) -> None:
        super().remove()
        for key in self._keys:
            unregister(key)
        self._keys = []


def route_static_linears(modules: Mapping[str, torch.nn.Module], slots: Mapping[str, GradSlot]) -> StaticRouting:
    """Route each ``nn.Linear``/``Conv1D`` of ``modules`` through ``misa::static_linear``
    in training mode; each starts frozen (``routes[name].active`` False)."""
    layouts = {name: _is_transposed(name, module) for name, module in modules.items()}
    routes = {name: StaticRoute(name, slots[name]) for name in modules}
    device = next(iter(modules.values())).weight.device if modules else None
    token = torch.zeros((), device=device, requires_grad=True)  # its .grad stays a zero: nobody reads it
    keys = {name: register(route) for name, route in routes.items()}
    forwards = {name: _StaticForward(module, slots[name], layouts[name], keys[name], token)
                for name, module in modules.items()}
    try:
        routing = install_forwards(modules, forwards, slots)
    except TypeError:
        for key in keys.values():
            unregister(key)
        raise
    return StaticRouting(routing, routes, list(keys.values()), token)
