"""Sparse backward for MISA's module-bearing Linear layers (paper Table 15, App. E.2).

For a Linear ``Y = X W^T + b`` (``W``: out x in; GPT-2's ``Conv1D`` stores ``W^T``),
flattened over batch and sequence, backward has three products:

* ``dX = dY W``: needed whenever anything below the layer is trained;
* ``dW = dY^T X`` and ``db = sum_rows dY``: needed only for an *active* module.

A *frozen* module (``weight.requires_grad`` False) therefore runs one GEMM and keeps no
activation for backward: only ``W``, a parameter, is saved (Table 15: activating
``W_Q`` costs ``bsh`` more activation memory, ``W_2`` ``4bsh``, because ``X`` must then
be kept). An *active* module saves ``X`` and, when its :class:`GradSlot` holds fp32
buffers, accumulates ``dW`` and ``db`` straight into them in fp32 (gradient-accumulation
fusion: no low-precision ``.grad`` is allocated and added per micro-batch), then calls
``slot.on_grad_ready(slot.key)`` so an optimizer can step the module in backward.

The products run in :mod:`.linear_ops`: the native ops ``torch.ops.misa.*``
(``csrc/misa_linear.cpp``, JIT-built on first use) or their PyTorch twin.

:func:`route_linears` sends existing ``nn.Linear``/``Conv1D`` modules through
:class:`SparseLinearFunction` while training, without replacing them.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

from .linear_ops import (  # noqa: F401  (re-exported: the ops are part of this module's API)
    ENV_NO_EXT, check_fp32, rows, linear_input_grad, linear_weight_grad, linear_weight_grad_accumulate_,
    native_available, reset_weight_grad_gemm_count, weight_grad_gemm_count,
)

__all__ = [
    "ENV_NO_EXT",
    "GradSlot",
    "LinearRouting",
    "SparseLinearFunction",
    "linear_input_grad",
    "linear_weight_grad",
    "linear_weight_grad_accumulate_",
    "install_forwards",
    "is_routable",
    "native_available",
    "reset_weight_grad_gemm_count",
    "route_custom_linears",
    "route_linears",
    "sparse_linear",
    "weight_grad_gemm_count",
]


# ---------------------------------------------------------------------- autograd
@dataclass(eq=False)
class GradSlot:
    """Where backward delivers one module's gradient.

    With ``weight_buffer`` set (fp32, the weight's shape) an active weight's gradient is
    added into it instead of ``weight.grad``; ``bias_buffer`` likewise for the bias. With
    no buffer, an active weight gets an ordinary ``.grad``. Frozen or active is decided by
    ``weight.requires_grad``, never by the slot. ``on_demand(slot)``, when set, runs in
    backward before an active module's first contribution while the slot holds no
    buffer, so buffers can be allocated lazily (an optimizer that frees them after each
    step then holds gradient memory only between backward and step).
    """

    key: str
    weight_buffer: Optional[Tensor] = None
    bias_buffer: Optional[Tensor] = None
    on_grad_ready: Optional[Callable[[str], None]] = None
    on_demand: Optional[Callable[["GradSlot"], None]] = None

    def allocate(self, weight: Tensor, bias: Optional[Tensor] = None) -> None:
        """Zeroed fp32 buffers shaped like ``weight`` (and ``bias``)."""
        self.weight_buffer = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        self.bias_buffer = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)

    def release(self) -> None:
        """Drop the buffers: later backwards fall back to ``.grad`` (or nothing if frozen)."""
        self.weight_buffer = self.bias_buffer = None


def _out_in(t: Tensor, transposed: bool) -> Tensor:
    """A weight-shaped tensor viewed in (out, in) layout."""
    return t.t() if transposed else t


def _linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], transposed: bool) -> Tensor:
    if not transposed:
        return F.linear(x, weight, bias)
    # HF Conv1D's own forward, so that routed outputs are bit-identical to it.
    x2d = x.reshape(-1, x.shape[-1])
    out = torch.mm(x2d, weight) if bias is None else torch.addmm(bias, x2d, weight)
    return out.view(*x.shape[:-1], weight.shape[-1])


def _weight_grad(grad_out: Tensor, x: Tensor, transposed: bool) -> Tensor:
    # Conv1D's (in, out) gradient is X^T dY: swapping the operands gives it contiguous.
    return linear_weight_grad(x, grad_out) if transposed else linear_weight_grad(grad_out, x)


def _param_grads(grad_out: Tensor, x: Optional[Tensor], slot: Optional[GradSlot], need_w: bool,
                 need_b: bool, transposed: bool) -> tuple[Optional[Tensor], Optional[Tensor], bool]:
    """(grad for weight, grad for bias, whether a buffer received anything)."""
    if slot is not None and slot.on_demand is not None and (need_w or need_b) \
            and slot.weight_buffer is None and slot.bias_buffer is None:
        slot.on_demand(slot)
    w_buf = slot.weight_buffer if slot is not None and need_w else None
    b_buf = slot.bias_buffer if slot is not None and need_b else None
    grad_w = grad_b = None
    if w_buf is not None:
        linear_weight_grad_accumulate_(_out_in(w_buf, transposed), grad_out, x, b_buf)
    elif need_w:
        grad_w = _weight_grad(grad_out, x, transposed)
    if b_buf is not None and w_buf is None:
        check_fp32(b_buf, "bias_buffer")
        b_buf.add_(rows(grad_out).sum(0, dtype=torch.float32))
    elif need_b and b_buf is None:
        grad_b = rows(grad_out).sum(0)
    return grad_w, grad_b, w_buf is not None or b_buf is not None


class SparseLinearFunction(torch.autograd.Function):
    """``Y = X W^T + b`` (``transposed``: ``Y = X W + b``, HF Conv1D) whose backward does
    only what block-coordinate training needs.

    ``apply(x, weight, bias, slot, transposed)``. ``X`` is saved only when ``weight``
    requires grad, ``W`` only when ``x`` does. Gradients for the weight and bias go to
    ``slot``'s fp32 buffers when present (returned as ``None`` to autograd), otherwise
    back to autograd as usual; ``slot.on_grad_ready(slot.key)`` runs once a buffer has
    received this node's contribution (once per backward for a module used once per
    forward).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], slot: Optional[GradSlot],
                transposed: bool = False) -> Tensor:
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.slot, ctx.transposed = slot, transposed
        # save_for_backward (not ctx attributes) so that checkpointing and
        # saved_tensors_hooks see, drop and recompute exactly these tensors.
        ctx.save_for_backward(x if need_w else None, weight if need_x else None)
        return _linear(x, weight, bias, transposed)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        slot, transposed = ctx.slot, ctx.transposed
        grad_x = linear_input_grad(grad_out, _out_in(weight, transposed)) if need_x else None
        grad_w, grad_b, delivered = _param_grads(grad_out, x, slot, need_w, need_b, transposed)
        if delivered and slot.on_grad_ready is not None:
            slot.on_grad_ready(slot.key)
        return grad_x, grad_w, grad_b, None, None


def _autocast_cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def sparse_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, slot: Optional[GradSlot] = None,
                  transposed: bool = False) -> Tensor:
    """:class:`SparseLinearFunction` with autocast applied as ``F.linear`` would be."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight, bias = (_autocast_cast(t, dtype) for t in (x, weight, bias))
        with torch.autocast(device_type, enabled=False):
            return SparseLinearFunction.apply(x, weight, bias, slot, transposed)
    return SparseLinearFunction.apply(x, weight, bias, slot, transposed)


# ---------------------------------------------------------------------- routing
@lru_cache(maxsize=1)
def _conv1d_class() -> Optional[type]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def is_routable(module: nn.Module) -> bool:
    """Whether :func:`route_linears` accepts ``module``: an ``nn.Linear`` or HF ``Conv1D``
    running its class's own forward, not routed yet."""
    try:
        _is_transposed("", module)
    except TypeError:
        return False
    return True


def _is_transposed(name: str, module: nn.Module) -> bool:
    """False for ``nn.Linear`` (W: out x in), True for HF ``Conv1D`` (W: in x out)."""
    if "forward" in module.__dict__:
        raise TypeError(f"{name}: already has an instance-level forward ({module.__dict__['forward']!r}), "
                        "e.g. an earlier routing or an accelerate hook")
    forward = type(module).forward
    if isinstance(module, nn.Linear) and forward is nn.Linear.forward:
        return False
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d) and forward is conv1d.forward:
        return True
    raise TypeError(f"{name}: only nn.Linear and transformers Conv1D with their own forward can be routed, "
                    f"got {type(module).__name__}")


class _RoutedForward:
    """The instance-level ``forward`` of a routed module: :meth:`_training_forward` while
    autograd records a training step, the module class's own ``forward`` otherwise."""

    __slots__ = ("module_ref", "slot", "transposed")

    def __init__(self, module: nn.Module, slot: GradSlot, transposed: bool):
        self.module_ref = weakref.ref(module)  # no module <-> __dict__ reference cycle
        self.slot, self.transposed = slot, transposed

    def __call__(self, *args, **kwargs) -> Tensor:
        module = self.module_ref()
        x = args[0] if args else next(iter(kwargs.values()))  # `input` (Linear) or `x` (Conv1D)
        if module.training and torch.is_grad_enabled() and self._records(module, x):
            return self._training_forward(module, x)
        return type(module).forward(module, *args, **kwargs)

    def _records(self, module: nn.Module, x: Tensor) -> bool:
        return _builds_graph(x, module.weight, module.bias)

    def _training_forward(self, module: nn.Module, x: Tensor) -> Tensor:
        return sparse_linear(x, module.weight, module.bias, self.slot, self.transposed)

    def __repr__(self) -> str:
        return f"<misa sparse-linear forward for {self.slot.key!r}>"


def _builds_graph(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    return x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)


class _WeightLinears(TorchFunctionMode):
    """Sends ``F.linear(x, module.weight[, module.bias])`` calls through the sparse backward."""

    def __init__(self, module: nn.Module, slot: GradSlot):
        super().__init__()
        self.weight, self.bias, self.slot, self.seen = module.weight, getattr(module, "bias", None), slot, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and args[1] is self.weight:
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if bias is None or bias is self.bias:
                self.seen = True
                return sparse_linear(args[0], self.weight, bias, self.slot)
        return func(*args, **kwargs)


class _RoutedCustomForward:
    """The instance-level ``forward`` of a module with a 2-D ``weight`` and a forward of its
    own (a MoE router): its class's forward runs with its ``F.linear`` on the weight routed."""

    __slots__ = ("module_ref", "name", "slot")

    def __init__(self, name: str, module: nn.Module, slot: GradSlot):
        self.name, self.slot, self.module_ref = name, slot, weakref.ref(module)

    def __call__(self, *args, **kwargs):
        module = self.module_ref()
        if not (module.training and torch.is_grad_enabled()):
            return type(module).forward(module, *args, **kwargs)
        calls = _WeightLinears(module, self.slot)
        with calls:
            out = type(module).forward(module, *args, **kwargs)
        if module.weight.requires_grad and not calls.seen:
            raise RuntimeError(f"{self.name}: its forward does not call F.linear on its weight, so the sparse backward "
                               "cannot route it; leave it out with module_filter, or use step_in_backward=False")
        return out

    def __repr__(self) -> str:
        return f"<misa sparse-linear forward (F.linear calls) for {self.slot.key!r}>"


def route_custom_linears(modules: Mapping[str, nn.Module], slots: Mapping[str, GradSlot]) -> LinearRouting:
    """Like :func:`route_linears`, for modules with a 2-D ``weight`` whose own forward calls
    ``F.linear`` on it (MoE routers): every such call goes through
    :class:`SparseLinearFunction`; a training forward that makes none raises."""
    forwards = {name: _RoutedCustomForward(name, module, slots[name]) for name, module in modules.items()}
    return install_forwards(modules, forwards, slots)


def install_forwards(modules: Mapping[str, nn.Module], forwards: Mapping[str, Callable],
                     slots: Mapping[str, GradSlot] = {}) -> "LinearRouting":
    """Give each module its instance-level ``forward`` from ``forwards`` (none of them may
    have one already: then nothing is installed); the handle restores them."""
    taken = [f"{name}: already has an instance-level forward ({m.__dict__['forward']!r})"
             for name, m in modules.items() if "forward" in m.__dict__]
    if taken:
        raise TypeError("; ".join(taken))
    for name, module in modules.items():
        module.__dict__["forward"] = forwards[name]
    return LinearRouting(dict(modules), dict(forwards), dict(slots))


class LinearRouting:
    """Handle of :func:`install_forwards` (:func:`route_linears`, :func:`route_custom_linears`,
    :func:`~misa_kernels.experts.route_experts`); ``remove()`` (or leaving a ``with`` block)
    restores every module exactly."""

    def __init__(self, modules: dict[str, nn.Module], routers: dict[str, Callable],
                 slots: dict[str, GradSlot]):
        self.modules, self.slots = modules, slots
        self._routers = routers

    def remove(self) -> None:
        for name, module in self.modules.items():
            if module.__dict__.get("forward") is self._routers[name]:
                del module.__dict__["forward"]
        self.modules, self._routers = {}, {}

    def __enter__(self) -> "LinearRouting":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def route_linears(modules: Mapping[str, nn.Module],
                  slots: Optional[Mapping[str, GradSlot]] = None) -> LinearRouting:
    """Run each ``nn.Linear``/``Conv1D`` in ``modules`` through
    :class:`SparseLinearFunction` whenever it is in training mode with grad enabled.

    The module objects stay in place (``state_dict``, ``save_pretrained`` and parameter
    identity are untouched): each gets an instance-level ``forward`` attribute and no
    hook. In ``eval()`` or under ``no_grad`` the class's own forward runs. ``slots``
    maps names to :class:`GradSlot`; missing names get an empty one (in
    ``handle.slots``). Which modules are active is changed later through the slots and
    ``requires_grad``, never by routing again.
    """
    slots = dict(slots or {})
    unknown = sorted(set(slots) - set(modules))
    if unknown:
        raise ValueError(f"slots: no module named {unknown}")
    if len({id(m) for m in modules.values()}) != len(modules):
        raise ValueError("modules: the same module appears under two names")
    layouts = {name: _is_transposed(name, module) for name, module in modules.items()}
    forwards = {name: _RoutedForward(module, slots.setdefault(name, GradSlot(key=name)), layouts[name])
                for name, module in modules.items()}
    return install_forwards(modules, forwards, slots)
