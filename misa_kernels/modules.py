"""Finding MISA's modules (paper Sec. 3.3) in a model.

A *module* is one weight matrix inside a transformer block (q, k, v, o, gate, up, down for
LLaMA-style models; c_attn, c_proj, c_fc for GPT-2), together with its bias if it has one.
Blocks are found from the model's own structure: the largest ``nn.ModuleList`` whose
children are all of one class and hold 2-D weights. A *sampling unit* is what Algorithm 2
draws: a single module (``granularity="module"``) or all modules of one block
(``granularity="layer"``, BAdam-like layer-wise BCD).

In a mixture-of-experts block, each expert's matrix is a module of its own: its slice of a
fused 3-D parameter (``model.layers.3.mlp.experts.gate_up_proj[5]``, see
:mod:`misa_kernels.experts`), or its own ``nn.Linear`` in the per-expert layout; routers
and shared experts are modules too. No matrix of a block is silently left out: one that
fits none of these raises a ``ValueError`` naming it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from .experts import ExpertSlices, expert_layout, slice_name

ModuleFilter = Callable[[str, nn.Module], bool]


@dataclass(frozen=True)
class Unit:
    """One sampling unit ``b`` of Algorithm 1: its name, block index and parameters."""

    name: str
    layer: int
    module_names: tuple[str, ...]
    params: tuple[nn.Parameter, ...]

    @property
    def numel(self) -> int:
        """``|b|``, the number of parameters of the unit."""
        return sum(p.numel() for p in self.params)


def _owns_matrix(module: nn.Module) -> bool:
    weight = module._parameters.get("weight")
    return weight is not None and weight.dim() == 2


def _module_params(module: nn.Module) -> tuple[nn.Parameter, ...]:
    return tuple(p for key in ("weight", "bias") if (p := module._parameters.get(key)) is not None)


def find_block_list(model: nn.Module) -> Optional[tuple[str, nn.ModuleList]]:
    """The model's stack of repeated transformer blocks, or ``None``.

    Candidates are ``nn.ModuleList``s whose children share one class and each hold a
    2-D weight; the one with the most parameters wins.
    """
    best, best_size = None, 0
    for name, child in model.named_modules():
        if not isinstance(child, nn.ModuleList) or len(child) == 0:
            continue
        if len({type(block) for block in child}) != 1:
            continue
        if not all(any(_owns_matrix(m) for m in block.modules()) for block in child):
            continue
        size = sum(p.numel() for p in child.parameters())
        if size > best_size:
            best, best_size = (name, child), size
    return best


def _layer_index(name: str, block_prefix: Optional[str]) -> int:
    """Index of the block holding ``name``: from the block list when the name lies under it,
    else the first integer in the name (-1 when there is none)."""
    if block_prefix is not None and name.startswith(f"{block_prefix}."):
        return int(name[len(block_prefix) + 1 :].split(".", 1)[0])
    match = re.search(r"\.(\d+)(\.|$)", f".{name}")
    return int(match.group(1)) if match else -1


_LORA_MATRIX = re.compile(r"\.lora_[AB]\.[^.]+$")


def is_lora_matrix(name: str, module: nn.Module) -> bool:
    """A PEFT LoRA ``A`` or ``B`` matrix (``...q_proj.lora_A.default``): MISA's modules
    on a LoRA model (paper B.2)."""
    return isinstance(module, nn.Linear) and _LORA_MATRIX.search(name) is not None


def is_lora_model(model: nn.Module) -> bool:
    """Whether ``model`` carries PEFT LoRA adapters."""
    return any(is_lora_matrix(name, m) for name, m in model.named_modules())


@dataclass
class Discovery:
    """The units of a model and the experts modules whose fused matrices they slice."""

    units: list[Unit]
    experts: dict[str, ExpertSlices] = field(default_factory=dict)


def _candidates(root: nn.Module, prefix: str, layer: Callable[[str], int], experts: dict[str, ExpertSlices],
                keep: ModuleFilter = lambda name, module: True) -> list[Unit]:
    """The units under ``root`` that ``keep`` accepts: 2-D-weight submodules, and one per
    expert matrix of a fused experts module (its views made, and recorded in ``experts``,
    only when one of its matrices is kept)."""
    units = []
    for sub_name, m in root.named_modules():
        name = ".".join(part for part in (prefix, sub_name) if part)
        layout = expert_layout(m)
        if layout is not None:
            count = m._parameters[layout.matrices[0][0]].shape[0]
            kept = [key for e in range(count) for matrix, _ in layout.matrices
                    if keep(key := slice_name(name, matrix, e), m)]
            if kept:
                slices = experts[name] = ExpertSlices.of(name, m, layout)
                units += [Unit(key, layer(name), (key,), tuple(p for p in slices.views[key] if p is not None))
                          for key in kept]
        elif _owns_matrix(m) and keep(name, m):
            units.append(Unit(name, layer(name), (name,), _module_params(m)))
    return units


def _unplaced(blocks: nn.ModuleList, prefix: str, units: list[Unit], experts: dict[str, ExpertSlices]) -> list[str]:
    """Trainable parameters of the blocks with two or more dimensions that no unit covers
    (one that does not require grad is left out on purpose, by the model or the user)."""
    placed = {id(p) for u in units for p in u.params} | {id(p) for e in experts.values() for p in e.fused}
    return [f"{prefix}.{name} {list(p.shape)}" for name, p in blocks.named_parameters()
            if p.dim() >= 2 and p.requires_grad and id(p) not in placed]


def discover(model: nn.Module, module_filter: Optional[ModuleFilter] = None) -> Discovery:
    """Every module of ``model`` as a :class:`Unit`, in model order, with the experts it slices.

    Without ``module_filter``, the modules are the 2-D-weight submodules and the expert
    matrices of the repeated blocks, and every block parameter with two or more dimensions
    that requires grad must be one of them (``ValueError`` otherwise). With it, every such candidate of the
    whole model for which ``module_filter(qualified_name, submodule)`` is true is a module
    (an expert matrix is offered as ``(".../gate_up_proj[e]", experts_module)``; its block
    index is the block holding it, or the first integer in its name), and everything else
    stays frozen. Raises ``ValueError`` when nothing is found.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = find_block_list(model)
    experts: dict[str, ExpertSlices] = {}
    if module_filter is not None:
        prefix = found[0] if found is not None else None
        layer = lambda name: _layer_index(name, prefix)  # noqa: E731
        units = _candidates(model, "", layer, experts, module_filter)
        if not units:
            raise ValueError("module_filter selected no module with a 2-D weight in model")
        return Discovery(units, experts)
    if found is None:
        raise ValueError(
            f"model ({type(model).__name__}): no repeated transformer blocks holding 2-D weights "
            "were found; pass module_filter=lambda name, module: ... to choose the modules"
        )
    prefix, blocks = found
    units = [u for index, block in enumerate(blocks)
             for u in _candidates(block, f"{prefix}.{index}", lambda _name, i=index: i, experts)]
    unplaced = _unplaced(blocks, prefix, units, experts)
    if unplaced:
        raise ValueError(
            f"model ({type(model).__name__}): MISA cannot place {len(unplaced)} block parameter(s) with two or more "
            f"dimensions in a module: {', '.join(unplaced[:6])}{' ...' if len(unplaced) > 6 else ''}. Supported: "
            "nn.Linear-like modules (a 2-D `weight`) and fused experts in transformers' layouts (see the README). "
            "To leave a parameter out on purpose, call requires_grad_(False) on it before building MISA; to train "
            "a chosen subset and keep the rest frozen, pass module_filter=lambda name, module: ... (it sees every "
            "candidate module and expert matrix)"
        )
    return Discovery(units, experts)


def discover_modules(model: nn.Module, module_filter: Optional[ModuleFilter] = None) -> list[Unit]:
    """The units of :func:`discover` (each call makes new per-expert views)."""
    return discover(model, module_filter).units


def group_by_layer(modules: list[Unit]) -> list[Unit]:
    """Merge modules of the same block into one unit (``granularity="layer"``)."""
    layers: dict[int, list[Unit]] = {}
    for unit in modules:
        layers.setdefault(unit.layer, []).append(unit)
    units = []
    for layer, members in layers.items():
        names = tuple(n for u in members for n in u.module_names)
        name = names[0].rsplit(".", 1)[0] if len(names) == 1 else _common_prefix(names)
        units.append(Unit(name, layer, names, tuple(p for u in members for p in u.params)))
    return units


def _common_prefix(names: tuple[str, ...]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common) or names[0]
