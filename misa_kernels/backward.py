"""The backward path of module-bearing layers: which weights get gradients, and where.

MISA drives this seam at every switch of the active set and reads gradients through it.

* :class:`AutogradBackward` (default) toggles ``requires_grad``: eager autograd then runs
  no weight-gradient GEMM for a frozen Linear and saves no input on its behalf; gradients
  are ordinary ``.grad`` tensors.
* :class:`SparseBackward` routes the module Linear layers through the sparse-backward
  ops (``csrc/misa_linear.cpp`` or their PyTorch twin, see
  :mod:`misa_kernels.ops.sparse_linear`): an active weight's gradient is accumulated in
  fp32 straight into a buffer allocated in backward and freed after the step, and a
  callback fires as soon as a module's gradient is complete (for ``step_in_backward``).
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional, Protocol

import torch
from torch import Tensor, nn

from .ops.sparse_linear import GradSlot, route_linears


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

    ``modules`` maps names to ``nn.Linear``/``Conv1D`` modules; their weights' (and biases')
    gradients live in fp32 :class:`GradSlot` buffers, allocated when backward first reaches
    an active module and released by :meth:`release_grads`. For fp32 weights the buffer is
    also the parameter's ``.grad`` (so ``clip_grad_norm_`` sees it); a bf16/fp16 weight
    keeps ``.grad`` empty, because torch requires a gradient of the parameter's dtype.
    ``on_grad_ready(name)`` runs once a module's buffers hold this backward's gradient.
    ``live_bytes``/``peak_bytes`` track the buffers' memory.
    """

    name = "sparse"

    def __init__(self, modules: Mapping[str, nn.Module], on_grad_ready: Callable[[str], None]):
        self._modules = dict(modules)
        self._routing = route_linears(self._modules)
        self.params_of: dict[str, tuple[nn.Parameter, ...]] = {}
        self._slot_of: dict[nn.Parameter, tuple[GradSlot, str]] = {}
        for name, module in self._modules.items():
            slot = self._routing.slots[name]
            slot.on_grad_ready, slot.on_demand = on_grad_ready, self._allocate
            params = tuple(p for p in (module.weight, module.bias) if p is not None)
            self.params_of[name] = params
            for param, field in zip(params, ("weight_buffer", "bias_buffer")):
                self._slot_of[param] = (slot, field)
        self.live_bytes = self.peak_bytes = 0
        self._live: dict[str, GradSlot] = {}  # slots holding buffers, so clearing skips the rest

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

    def _allocate(self, slot: GradSlot) -> None:
        module = self._modules[slot.key]
        slot.allocate(module.weight, module.bias)
        self._live[slot.key] = slot
        for param in self.params_of[slot.key]:
            buffer = self.grad(param)
            self.live_bytes += buffer.numel() * buffer.element_size()
            if param.dtype == buffer.dtype:
                param.grad = buffer
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def release_grads(self, params: Iterable[nn.Parameter]) -> None:
        """Free the buffers of ``params``' modules (and their ``.grad`` aliases)."""
        for param in params:
            found = self._slot_of.get(param)
            if found is None:
                continue
            slot = found[0]
            for owned in self.params_of[slot.key]:
                buffer = self.grad(owned)
                if buffer is not None:
                    self.live_bytes -= buffer.numel() * buffer.element_size()
                if owned.grad is buffer:
                    owned.grad = None
            slot.release()
            self._live.pop(slot.key, None)

    def clear_grads(self) -> None:
        self.release_grads([self.params_of[key][0] for key in list(self._live)])

    def deactivate(self, params: Iterable[nn.Parameter]) -> None:
        params = list(params)
        self.release_grads(params)
        super().deactivate(params)

    def reset_peak(self) -> None:
        """Start a new peak measurement of gradient-buffer bytes."""
        self.peak_bytes = self.live_bytes

    def detach(self) -> None:
        """Free every buffer and give each routed module back its class's forward."""
        self.clear_grads()
        self._routing.remove()
