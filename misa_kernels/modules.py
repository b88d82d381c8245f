"""Finding MISA's modules (paper Sec. 3.3) in a model.

A *module* is one weight matrix inside a transformer block (q, k, v, o, gate, up, down for
LLaMA-style models; c_attn, c_proj, c_fc for GPT-2), together with its bias if it has one.
Blocks are found from the model's own structure: the largest ``nn.ModuleList`` whose
children are all of one class and hold 2-D weights. A *sampling unit* is what Algorithm 2
draws: a single module (``granularity="module"``) or all modules of one block
(``granularity="layer"``, BAdam-like layer-wise BCD).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

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


def discover_modules(model: nn.Module, module_filter: Optional[ModuleFilter] = None) -> list[Unit]:
    """Every module of ``model`` as a :class:`Unit`, in model order.

    Without ``module_filter``, the modules are the 2-D-weight submodules of the repeated
    blocks. With it, every 2-D-weight submodule of the model for which
    ``module_filter(qualified_name, submodule)`` is true is a module (its block index is
    the block holding it, or the first integer in its name). Raises ``ValueError`` when nothing is found.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = find_block_list(model)
    if module_filter is not None:
        prefix = found[0] if found is not None else None
        units = [
            Unit(name, _layer_index(name, prefix), (name,), _module_params(m))
            for name, m in model.named_modules()
            if _owns_matrix(m) and module_filter(name, m)
        ]
        if not units:
            raise ValueError("module_filter selected no module with a 2-D weight in model")
        return units
    if found is None:
        raise ValueError(
            f"model ({type(model).__name__}): no repeated transformer blocks holding 2-D weights "
            "were found; pass module_filter=lambda name, module: ... to choose the modules"
        )
    prefix, blocks = found
    units = []
    for index, block in enumerate(blocks):
        for sub_name, m in block.named_modules():
            if _owns_matrix(m):
                name = f"{prefix}.{index}.{sub_name}"
                units.append(Unit(name, index, (name,), _module_params(m)))
    return units


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
