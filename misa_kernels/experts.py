"""Mixture-of-experts layers as MISA modules: one sampling unit per expert matrix.

Hugging Face stores a layer's experts fused, as 3-D parameters (``experts.gate_up_proj``
``[E, 2I, H]``, ``experts.down_proj`` ``[E, H, I]``, optional 2-D biases ``[E, out]``).
MISA samples, stores states for and updates single experts, so each expert ``e`` of each
fused matrix gets its own leaf :class:`~torch.nn.Parameter` that is a *view* of slice
``e`` (:class:`ExpertSlices`): an update of the view writes the fused tensor in place, the
view's ``requires_grad`` decides whether that expert's weight gradient is computed, and
optimizer states exist only for active views. The fused parameters never require grad.

While training, the experts module runs :func:`experts_forward` (an instance-level
``forward``, as :func:`~misa_kernels.ops.sparse_linear.route_linears` does for Linears):
each expert hit by a token runs its matrices through the views, so a frozen expert costs
only its input-gradient GEMM and saves no input, and with the sparse backward an active
expert's weight gradient is accumulated in fp32 into its own buffer. In ``eval()`` or
under ``no_grad`` the class's own forward runs on the fused tensors.

Supported layouts (:func:`expert_layout`):

* ``routed``: classes decorated by transformers' ``use_experts_implementation`` (Mixtral,
  Qwen2/3-MoE, DeepSeek-V3, OLMoE, GPT-OSS, ...), called as ``(hidden, top_k_index,
  top_k_weights)``; the decorator's ``has_gate``, ``has_bias``, ``is_transposed`` and
  ``has_post_expert_norm`` describe the layout, ``_apply_gate`` the activation.
* ``dense``: Llama-4's ``Llama4TextExperts``, which runs every expert on its own slice
  of a ``[E * T, H]`` input with ``[E, H, 2I]`` / ``[E, I, H]`` (transposed) weights.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed.fsdp2 import DTensor
from .ops.sparse_linear import GradSlot, LinearRouting, install_forwards, sparse_linear

Linear = Callable[[Tensor, Tensor, Optional[Tensor], str], Tensor]


@dataclass(frozen=True)
class ExpertLayout:
    """``kind`` (``"routed"`` or ``"dense"``), the fused matrices in the order the forward
    uses them, each with its bias's attribute name (or ``None``), and whether the weights
    are stored ``[E, in, out]`` (``transposed``)."""

    kind: str
    matrices: tuple[tuple[str, Optional[str]], ...]
    transposed: bool


def expert_layout(module: nn.Module) -> Optional[ExpertLayout]:
    """The layout of a fused experts module, or ``None`` if ``module`` is not one MISA knows."""
    params = module._parameters
    if type(module).__name__ == "Llama4TextExperts":
        return ExpertLayout("dense", (("gate_up_proj", None), ("down_proj", None)), True)
    if "has_gate" not in vars(module) or "down_proj" not in params:
        return None
    first = "gate_up_proj" if module.has_gate else "up_proj"
    if first not in params or params[first] is None or params[first].dim() != 3:
        return None
    bias = (lambda name: f"{name}_bias") if module.has_bias else (lambda name: None)
    return ExpertLayout("routed", ((first, bias(first)), ("down_proj", bias("down_proj"))), module.is_transposed)


def slice_name(module_name: str, matrix: str, expert: int) -> str:
    """How MISA names expert ``expert`` of a fused matrix: ``...experts.gate_up_proj[5]``."""
    return f"{module_name}.{matrix}[{expert}]"


@dataclass
class ExpertSlices:
    """The per-expert views of one experts module's fused parameters."""

    name: str
    module: nn.Module
    layout: ExpertLayout
    views: dict[str, tuple[nn.Parameter, Optional[nn.Parameter]]] = field(default_factory=dict)
    _storages: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, name: str, module: nn.Module, layout: ExpertLayout) -> "ExpertSlices":
        slices = cls(name, module, layout)
        for matrix, bias in layout.matrices:
            fused = [module._parameters[matrix]] + ([module._parameters[bias]] if bias else [])
            if any(isinstance(t, DTensor) for t in fused):
                raise ValueError(f"model: MISA's per-expert views cannot slice FSDP2-sharded fused experts ({name}); "
                                 "train the MoE model with DDP (or one process), or choose non-expert modules "
                                 "with module_filter")
            for tensor in fused:
                slices._storages[_attr_name(tensor, module)] = tensor.untyped_storage().data_ptr()
            for e in range(fused[0].shape[0]):
                # ``.data`` anew per expert: each view gets a version counter of its own, so
                # updating one expert (in backward) does not invalidate another's saved weight.
                pieces = [nn.Parameter(t.data[e], requires_grad=False) for t in fused]
                slices.views[slice_name(name, matrix, e)] = (pieces[0], pieces[1] if bias else None)
        return slices

    @property
    def fused(self) -> list[nn.Parameter]:
        return [self.module._parameters[n] for m in self.layout.matrices for n in m if n is not None]

    @property
    def num_experts(self) -> int:
        return self.module._parameters[self.layout.matrices[0][0]].shape[0]

    def view(self, matrix: str, expert: int) -> tuple[nn.Parameter, Optional[nn.Parameter]]:
        return self.views[slice_name(self.name, matrix, expert)]

    def check_storage(self) -> None:
        """Refuse to run when the fused tensors were re-allocated (``model.to(...)``,
        ``.half()``, ``load_state_dict(assign=True)``) after the views were made."""
        for attr, pointer in self._storages.items():
            if self.module._parameters[attr].untyped_storage().data_ptr() != pointer:
                raise RuntimeError(f"{self.name}.{attr} was re-allocated after MISA was built (e.g. model.to() or "
                                   "model.half()), so MISA's per-expert views no longer alias it: move or cast "
                                   "the model first, then build MISA")


def _attr_name(tensor: Tensor, module: nn.Module) -> str:
    return next(n for n, p in module._parameters.items() if p is tensor)


# ---------------------------------------------------------------------- forward
def _linear_of(slots: Optional[Mapping[str, GradSlot]], transposed: bool) -> Linear:
    """``linear(x, weight, bias, key)`` through the sparse backward's slot ``key``, or plain autograd."""
    def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], key: str) -> Tensor:
        if slots is not None:
            return sparse_linear(x, weight, bias, slots[key], transposed)
        out = x @ weight if transposed else F.linear(x, weight)
        return out if bias is None else out + bias
    return linear


def _two_matrices(experts: ExpertSlices, linear: Linear, x: Tensor, e: int, activate: Callable[[Tensor], Tensor]) -> Tensor:
    (first, _), (second, _) = experts.layout.matrices
    w1, b1 = experts.view(first, e)
    w2, b2 = experts.view(second, e)
    hidden = activate(linear(x, w1, b1, slice_name(experts.name, first, e)))
    return linear(hidden, w2, b2, slice_name(experts.name, second, e))


def routed_forward(experts: ExpertSlices, linear: Linear, hidden_states: Tensor, top_k_index: Tensor,
                   top_k_weights: Tensor) -> Tensor:
    """transformers' experts loop over the per-expert views: the (token, expert) pairs are
    sorted by expert, each expert runs on its tokens, and the outputs, back in pair order and
    weighted by the router, are summed per token. Autograd keeps int64 indices for the
    gathers, not a copy of every output (as an ``index_add_`` per expert would)."""
    module, (tokens, k) = experts.module, top_k_index.shape
    ids = top_k_index.reshape(-1)
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=experts.num_experts + 1).tolist()  # the loop's bounds
    activate = module._apply_gate if module.has_gate else module.act_fn
    outs, start = [], 0
    for e, count in enumerate(counts[: experts.num_experts]):
        if count:
            y = _two_matrices(experts, linear, hidden_states[order[start:start + count] // k], e, activate)
            outs.append(module.post_expert_norm(y) if module.has_post_expert_norm else y)
        start += count
    if start < ids.numel():  # pairs routed to no local expert (ids >= num_experts) add nothing
        outs.append(hidden_states.new_zeros(ids.numel() - start, hidden_states.shape[-1]))
    weighted = torch.cat(outs) * top_k_weights.reshape(-1)[order, None]  # in the promoted dtype, as eager
    by_pair = weighted.index_select(0, torch.argsort(order))
    return by_pair.view(tokens, k, -1).sum(dim=1).to(hidden_states.dtype)


def dense_forward(experts: ExpertSlices, linear: Linear, hidden_states: Tensor) -> Tensor:
    """Llama-4: expert ``e`` runs on rows ``[e T, (e + 1) T)`` of the input (already scaled
    by its router scores); ``up * act(gate)``."""
    module = experts.module
    chunks = hidden_states.view(experts.num_experts, -1, hidden_states.shape[-1])

    def activate(gate_up: Tensor) -> Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return up * module.act_fn(gate)

    outs = [_two_matrices(experts, linear, chunks[e], e, activate) for e in range(experts.num_experts)]
    return torch.stack(outs).view(-1, outs[0].shape[-1])


class _RoutedExperts:
    """The instance-level ``forward`` of a routed experts module."""

    __slots__ = ("experts", "linear", "module_ref")

    def __init__(self, experts: ExpertSlices, slots: Optional[Mapping[str, GradSlot]]):
        self.experts, self.linear = experts, _linear_of(slots, experts.layout.transposed)
        self.module_ref = weakref.ref(experts.module)

    def __call__(self, *args, **kwargs) -> Tensor:
        module = self.module_ref()
        if not (module.training and torch.is_grad_enabled()):
            return type(module).forward(module, *args, **kwargs)
        self.experts.check_storage()
        if getattr(module, "_is_expert_parallel", False):
            raise RuntimeError(f"{self.experts.name}: MISA does not support expert parallelism")
        inputs = list(args) + list(kwargs.values())
        if self.experts.layout.kind == "dense":
            return dense_forward(self.experts, self.linear, inputs[0])
        return routed_forward(self.experts, self.linear, *inputs[:3])

    def __repr__(self) -> str:
        return f"<misa per-expert forward for {self.experts.name!r}>"


def route_experts(experts: Mapping[str, ExpertSlices], slots: Optional[Mapping[str, GradSlot]] = None) -> LinearRouting:
    """Run each experts module through its per-expert views while training (``slots``: the
    sparse backward's, by slice name; ``None``: plain autograd)."""
    modules = {name: found.module for name, found in experts.items()}
    return install_forwards(modules, {name: _RoutedExperts(found, slots) for name, found in experts.items()})
