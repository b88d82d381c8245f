"""What MISA trains in a model: its sampling units, the dense parameters of pre-training,
the param groups and the budget. Read once, when the optimizer is built.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..backward import SparseBackward, StaticSparseBackward
from ..experts import ExpertSlices
from ..modules import ModuleFilter, Unit, discover, group_by_layer, is_lora_matrix, is_lora_model
from ..ops.linear_ops import low_precision_gemm_note
from ..ops.sparse_linear import is_routable


@dataclass(frozen=True)
class TrainedParameters:
    """The units ``b`` (Alg. 1 line 1), their parameters, and the dense parameters."""

    units: list[Unit]
    unit_params: list[nn.Parameter]
    dense: list[nn.Parameter]  # mode="pretrain": embeddings, lm_head, norms; dense_embeddings: the first two
    all_params: list[nn.Parameter]  # the model's own (fused experts included, not their views)
    lora: bool  # a PEFT LoRA model: the units are its A and B matrices (paper B.2)
    experts: dict[str, ExpertSlices]  # experts modules whose matrices are sliced into units

    @property
    def budget_params(self) -> int:
        """``n`` of ``delta * n``: all parameters, or on a LoRA model the LoRA ones (B.2)."""
        return sum(p.numel() for p in (self.unit_params if self.lora else self.all_params))


def unique_params(model: nn.Module) -> list[nn.Parameter]:
    seen, params = set(), []
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            params.append(param)
    return params


def trained_parameters(model: nn.Module, module_filter: Optional[ModuleFilter], granularity: str,
                       mode: str, dense_embeddings: bool = False) -> TrainedParameters:
    """Find the units of ``model`` (see :func:`~misa_kernels.modules.discover`)."""
    lora = module_filter is None and isinstance(model, nn.Module) and is_lora_model(model)
    if lora and (mode == "pretrain" or dense_embeddings):
        raise ValueError("mode='pretrain' and dense_embeddings=True train base weights densely; a LoRA model needs "
                         "mode='finetune' and dense_embeddings=False")
    found = discover(model, is_lora_matrix if lora else module_filter)
    units = found.units if granularity == "module" else group_by_layer(found.units)
    unit_params = [p for u in units for p in u.params]
    if len({id(p) for p in unit_params}) != len(unit_params):
        raise ValueError("model: a parameter belongs to two modules (shared weights are not supported)")
    all_params = unique_params(model)
    in_units = {id(p) for p in unit_params} | {id(p) for e in found.experts.values() for p in e.fused}
    if mode == "pretrain":
        dense = [p for p in all_params if id(p) not in in_units]
    else:
        dense = [p for p in embedding_params(model) if id(p) not in in_units] if dense_embeddings else []
    return TrainedParameters(units, unit_params, dense, all_params, lora, found.experts)


def embedding_params(model: nn.Module) -> list[nn.Parameter]:
    """The weights of the input embeddings and the lm_head (one tensor when tied), found by
    the Hugging Face accessors ``get_input_embeddings`` / ``get_output_embeddings``."""
    if not callable(getattr(model, "get_input_embeddings", None)):
        raise ValueError(f"dense_embeddings=True finds the embeddings with get_input_embeddings(), which "
                         f"{type(model).__name__} does not have: leave dense_embeddings=False")
    modules = [model.get_input_embeddings()]
    if callable(getattr(model, "get_output_embeddings", None)):
        modules.append(model.get_output_embeddings())
    params = [m.weight for m in modules if m is not None and isinstance(getattr(m, "weight", None), nn.Parameter)]
    return list({id(p): p for p in params}.values())


def param_groups(unit_params: list[nn.Parameter], dense: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Modules and dense parameters, each split into decayed matrices and undecayed
    vectors (biases, norms); ``role`` tells them apart."""
    groups = []
    for role, params in (("module", unit_params), ("dense", dense)):
        for decay in (True, False):
            members = [p for p in params if (p.dim() >= 2) == decay]
            if members:
                groups.append(dict(params=members, weight_decay=weight_decay if decay else 0.0, role=role))
    return groups


def common_device(params: list[nn.Parameter]) -> torch.device:
    devices = {p.device for p in params}
    if len(devices) != 1:
        raise ValueError(f"model: MISA needs all trained parameters on one device, found {sorted(map(str, devices))}")
    return devices.pop()


def _calls_linear(module: nn.Module) -> bool:
    """A module of a model's own (not a torch.nn layer such as Embedding) with a 2-D weight,
    whose forward may call ``F.linear`` on it (checked when it runs)."""
    weight = module._parameters.get("weight")
    return weight is not None and weight.dim() == 2 and not type(module).__module__.startswith("torch.nn")


def sparse_backward(model: nn.Module, units: list[Unit], experts: dict[str, ExpertSlices], step_in_backward: bool,
                    on_grad_ready: Callable[[str], None], static: bool = False) -> SparseBackward:
    """The modules' Linear/Conv1D layers and expert matrices routed through the sparse
    backward. Other modules with a 2-D weight (MoE routers) keep autograd, unless
    ``step_in_backward`` needs them routed: then their ``F.linear`` calls on the weight are."""
    used = [name for u in units for name in u.module_names]
    views = {key: pair for e in experts.values() for key, pair in e.views.items()}
    slices = {name: views[name] for name in used if name in views}
    modules = {name: model.get_submodule(name) for name in used if name not in slices}
    custom = {name: m for name, m in modules.items() if not is_routable(m)}
    unsupported = sorted(name for name, m in custom.items() if not _calls_linear(m))
    if unsupported and step_in_backward:
        raise ValueError(f"step_in_backward=True needs every module to be an nn.Linear, a Conv1D or a module "
                         f"calling F.linear on its 2-D weight; these are not: {unsupported[:5]}")
    routed = {n: m for n, m in modules.items() if n not in custom}
    weights = [m.weight for m in routed.values()] + [w for w, _ in slices.values()]
    notes = {low_precision_gemm_note(w.device, w.dtype) for w in weights} - {None}
    for note in notes:
        warnings.warn(f"sparse_backward: {note}; upgrade torch to avoid those temporaries", RuntimeWarning,
                      stacklevel=4)
    kind = StaticSparseBackward if static else SparseBackward
    return kind(routed, on_grad_ready, shared=step_in_backward, slices=slices,
                custom=custom if step_in_backward or static else {})
