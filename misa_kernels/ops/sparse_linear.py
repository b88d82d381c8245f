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

The products run in the native ops ``torch.ops.misa.*`` (``csrc/misa_linear.cpp``),
JIT-built on first use, or in the PyTorch twin below with the same semantics when the
build fails or ``MISA_KERNELS_NO_EXT=1``.

:func:`route_linears` sends existing ``nn.Linear``/``Conv1D`` modules through
:class:`SparseLinearFunction` while training, without replacing them.
"""
from __future__ import annotations

import importlib
import os
import threading
import warnings
import weakref
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = [
    "ENV_NO_EXT",
    "GradSlot",
    "LinearRouting",
    "SparseLinearFunction",
    "linear_input_grad",
    "linear_weight_grad",
    "linear_weight_grad_accumulate_",
    "is_routable",
    "native_available",
    "reset_weight_grad_gemm_count",
    "route_linears",
    "sparse_linear",
    "weight_grad_gemm_count",
]

ENV_NO_EXT = "MISA_KERNELS_NO_EXT"
EXTENSION_NAME = "misa_kernels_C"
_SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "misa_linear.cpp"

_load_lock = threading.Lock()
_native_loaded: Optional[bool] = None
_count_lock = threading.Lock()
_fallback_gemms = 0


# ---------------------------------------------------------------------- loading
def _ops_registered() -> bool:
    try:
        torch.ops.misa.linear_weight_grad_accumulate_
    except (AttributeError, RuntimeError):
        return False
    return True


def _build() -> None:
    """Register ``torch.ops.misa``: a prebuilt ``misa_kernels._C`` if installed, else a
    JIT build of ``csrc/misa_linear.cpp`` cached in the torch extensions directory."""
    try:
        importlib.import_module("misa_kernels._C")
    except (ImportError, OSError):
        pass
    if _ops_registered():
        return
    if not _SOURCE.is_file():
        raise FileNotFoundError(f"{_SOURCE} is not shipped with this install")
    from torch.utils.cpp_extension import load

    load(name=EXTENSION_NAME, sources=[str(_SOURCE)], extra_cflags=["-O3"], verbose=False,
         is_python_module=False)


def _try_load() -> bool:
    if _ops_registered():
        return True
    try:
        _build()
    except Exception as err:  # any build failure means the fallback, never a crash
        reason = f"{type(err).__name__}: {str(err).strip()[-400:]}"
        warnings.warn(f"misa_kernels: the native sparse-linear ops could not be built ({reason}); "
                      "using the PyTorch fallback, which has the same semantics", RuntimeWarning, stacklevel=4)
        return False
    return _ops_registered()


def _load_native() -> bool:
    global _native_loaded
    if _native_loaded is None:
        with _load_lock:
            if _native_loaded is None:
                _native_loaded = _try_load()
    return _native_loaded


def _forced_fallback() -> bool:
    return os.environ.get(ENV_NO_EXT, "") not in ("", "0")


def native_available() -> bool:
    """True when the native ops are in use: built (or loaded) and not disabled by
    ``MISA_KERNELS_NO_EXT=1``. The first call may compile the extension."""
    return not _forced_fallback() and _load_native()


# ---------------------------------------------------------------------- ops
def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _count_fallback_gemm() -> None:
    global _fallback_gemms
    with _count_lock:
        _fallback_gemms += 1


def weight_grad_gemm_count() -> int:
    """Weight-gradient GEMMs run so far by the native ops and the fallback together."""
    native = torch.ops.misa.weight_grad_gemm_count() if _native_loaded else 0
    return int(native) + _fallback_gemms


def reset_weight_grad_gemm_count() -> None:
    global _fallback_gemms
    if _native_loaded:
        torch.ops.misa.reset_weight_grad_gemm_count()
    with _count_lock:
        _fallback_gemms = 0


def linear_input_grad(grad_out: Tensor, weight: Tensor) -> Tensor:
    """``dX = dY W`` for ``W`` in (out, in) layout; keeps the leading dims of ``dY``."""
    if native_available():
        return torch.ops.misa.linear_input_grad(grad_out, weight)
    return torch.matmul(grad_out, weight)


def linear_weight_grad(grad_out: Tensor, inputs: Tensor) -> Tensor:
    """``dW = dY^T X`` over flattened rows, in the operands' dtype."""
    if native_available():
        return torch.ops.misa.linear_weight_grad(grad_out, inputs)
    _count_fallback_gemm()
    return torch.mm(_rows(grad_out).t(), _rows(inputs))


def linear_weight_grad_accumulate_(grad_buffer: Tensor, grad_out: Tensor, inputs: Tensor,
                                   bias_buffer: Optional[Tensor] = None) -> None:
    """``grad_buffer += dY^T X`` (out x in) and ``bias_buffer += sum_rows dY``, both fp32
    buffers, with fp32 accumulation whatever the dtype of ``dY`` and ``X``."""
    if native_available():
        torch.ops.misa.linear_weight_grad_accumulate_(grad_buffer, grad_out, inputs, bias_buffer)
        return
    _check_fp32(grad_buffer, "grad_buffer")
    dy = _rows(grad_out)
    _count_fallback_gemm()
    grad_buffer.addmm_(dy.t().float(), _rows(inputs).float())
    if bias_buffer is not None:
        _check_fp32(bias_buffer, "bias_buffer")
        bias_buffer.add_(dy.sum(0, dtype=torch.float32))


def _check_fp32(buffer: Tensor, name: str) -> None:
    if buffer.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {buffer.dtype}")


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
        _check_fp32(b_buf, "bias_buffer")
        b_buf.add_(_rows(grad_out).sum(0, dtype=torch.float32))
    elif need_b and b_buf is None:
        grad_b = _rows(grad_out).sum(0)
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
    """The instance-level ``forward`` of a routed module."""

    __slots__ = ("module_ref", "slot", "transposed")

    def __init__(self, module: nn.Module, slot: GradSlot, transposed: bool):
        self.module_ref = weakref.ref(module)  # no module <-> __dict__ reference cycle
        self.slot, self.transposed = slot, transposed

    def __call__(self, *args, **kwargs) -> Tensor:
        module = self.module_ref()
        x = args[0] if args else next(iter(kwargs.values()))  # `input` (Linear) or `x` (Conv1D)
        weight, bias = module.weight, module.bias
        if module.training and torch.is_grad_enabled() and _builds_graph(x, weight, bias):
            return sparse_linear(x, weight, bias, self.slot, self.transposed)
        return type(module).forward(module, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<misa sparse-linear forward for {self.slot.key!r}>"


def _builds_graph(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    return x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)


class LinearRouting:
    """Handle of :func:`route_linears`; ``remove()`` (or leaving a ``with`` block)
    restores every module exactly."""

    def __init__(self, modules: dict[str, nn.Module], routers: dict[str, _RoutedForward],
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
    routers = {}
    for name, module in modules.items():
        slot = slots.setdefault(name, GradSlot(key=name))
        routers[name] = _RoutedForward(module, slot, layouts[name])
        module.__dict__["forward"] = routers[name]
    return LinearRouting(dict(modules), routers, slots)
