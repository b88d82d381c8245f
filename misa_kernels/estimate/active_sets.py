"""MISA's active sets: an exact one read from module names, the greedy worst case of
Algorithm 2's selection, and sets drawn by Algorithm 2 for the expected case."""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Union

from .activations import LayerSpec, _layer, _Run
from .shapes import HF_NAMES, _KIND_OF_NAME, ModelShape, layer_kinds, module_numel

ModuleRef = Union[str, tuple[int, str]]


_MOE_NAMES = ((re.compile(r"experts\.(gate_up|down)_proj\[(\d+)\]$"), lambda m: f"{m[1]}[{m[2]}]"),
              (re.compile(r"shared_expert\.(gate|up|down)_proj$"), lambda m: f"shared_{m[1]}"),
              (re.compile(r"shared_expert_gate$"), lambda m: "shared_expert_gate"),
              (re.compile(r"\.(gate|router)$"), lambda m: "router"))


def _parse_module(ref: ModuleRef, shape: ModelShape) -> tuple[int, str]:
    """``"model.layers.3.mlp.down_proj"``, ``"3.down_proj"``, ``(3, "down")`` -> ``(3, "down")``;
    in a MoE block also ``"model.layers.3.mlp.experts.gate_up_proj[5]"`` -> ``(3, "gate_up[5]")``,
    ``"...mlp.gate"`` -> ``(3, "router")`` and the shared expert's modules."""
    if isinstance(ref, tuple):
        layer, kind = ref
        kind = _KIND_OF_NAME.get(kind, kind)
    else:
        match = re.search(r"(?:^|\.)(\d+)\.(?:.*\.)?([a-z_]+(?:\[\d+\])?)$", str(ref))
        if match is None:
            raise ValueError(f"active_modules: cannot read a layer and a module from {ref!r}")
        layer, kind = int(match.group(1)), _kind_of(str(ref), match.group(2), shape, int(match.group(1)))
    if not 0 <= int(layer) < shape.layers or kind not in layer_kinds(shape, int(layer)):
        raise ValueError(f"active_modules: {ref!r} is not a module of this {shape.layers}-layer model "
                         f"(its block has {', '.join(layer_kinds(shape, int(layer) % shape.layers)[:8])}, ...)")
    return int(layer), kind


def _kind_of(ref: str, last: str, shape: ModelShape, layer: int) -> str:
    if shape.is_moe(layer % shape.layers):
        for pattern, kind in _MOE_NAMES:
            found = pattern.search(ref)
            if found:
                return kind(found)
    if last not in _KIND_OF_NAME:
        raise ValueError(f"active_modules: cannot read a layer and one of {tuple(HF_NAMES.values())} from {ref!r}")
    return _KIND_OF_NAME[last]


def _specs(layers: int, active: Iterable[tuple[int, str]], base: frozenset = frozenset()) -> list[LayerSpec]:
    """One :class:`LayerSpec` per block: its active modules, plus ``base`` (what trains in
    every block: the norms in MISA's pretrain mode)."""
    kinds: dict[int, set[str]] = {}
    for layer, kind in active:
        kinds.setdefault(layer, set()).add(kind)
    return [LayerSpec(trainable=frozenset(kinds.get(l, ())) | base) for l in range(layers)]


@dataclass
class _StateCost:
    """Bytes per trained parameter of gradients and optimizer states."""

    grad: int
    master: int
    moments: int

    @property
    def per_param(self) -> int:
        return self.grad + self.master + self.moments


def _worst_active_set(run: _Run, budget: float, cost: _StateCost,
                      base: frozenset = frozenset()) -> list[tuple[int, str]]:
    """Greedy worst case of Algorithm 2's selection: repeatedly add the module (one of a
    kind per layer) with the most extra bytes (saved input + states) per parameter that
    still fits under ``budget``; all blocks assumed to carry gradients (paper eq. 14), and
    ``base`` (trained in every block regardless: MISA pretrain's norms) in each. Blocks of
    one type (dense or MoE) are interchangeable, so patterns are counted per type."""
    shape = run.shape
    types = [shape.is_moe(l) for l in range(shape.layers)]
    kinds = {moe: layer_kinds(shape, types.index(moe)) for moe in set(types)}
    numel = {k: module_numel(shape, k) for ks in kinds.values() for k in ks}
    extra: dict[tuple, int] = {}

    def layer_bytes(moe: bool, pattern: frozenset) -> int:
        if (moe, pattern) not in extra:
            extra[(moe, pattern)] = _layer(run, LayerSpec(trainable=pattern | base), True, moe)[0]
        return extra[(moe, pattern)]

    def gain(moe: bool, pattern: frozenset, kind: str) -> int:
        return layer_bytes(moe, pattern | {kind}) - layer_bytes(moe, pattern) + cost.per_param * numel[kind]

    patterns: Counter = Counter((moe, frozenset()) for moe in types)
    remaining = budget
    while True:
        options = [(gain(moe, p, k) / numel[k], gain(moe, p, k), moe, p, k) for (moe, p) in patterns
                   if patterns[(moe, p)] for k in kinds[moe] if k not in p and numel[k] <= remaining]
        if not options:
            break
        _, _, moe, pattern, kind = max(options, key=lambda o: (o[0], o[1], o[4]))
        patterns[(moe, pattern)] -= 1
        patterns[(moe, pattern | {kind})] += 1
        remaining -= numel[kind]
    if all(not p for (_, p), count in patterns.items() if count):  # nothing fits: the first drawn trains alone
        layer = max(range(shape.layers), key=lambda l: max(gain(types[l], frozenset(), k) for k in kinds[types[l]]))
        moe = types[layer]
        return [(layer, max(kinds[moe], key=lambda k: (gain(moe, frozenset(), k), k)))]
    free = {moe: [l for l, t in enumerate(types) if t == moe] for moe in set(types)}
    active = []
    for (moe, pattern), count in sorted(patterns.items(), key=lambda pc: (pc[0][0], sorted(pc[0][1]))):
        for _ in range(count):
            layer = free[moe].pop(0)
            active += [(layer, k) for k in sorted(pattern)]
    return active


def _drawn_active_sets(shape: ModelShape, budget: float, draws: int, seed: int) -> list[list[tuple[int, str]]]:
    """Active sets drawn by Algorithm 2 with uniform probabilities: modules in random order,
    each kept if it still fits; the first drawn alone when none fits."""
    modules = [(l, k) for l in range(shape.layers) for k in layer_kinds(shape, l)]
    rng = random.Random(seed)
    sets = []
    for _ in range(draws):
        order = rng.sample(modules, len(modules))
        chosen, used = [], 0
        for layer, kind in order:
            size = module_numel(shape, kind)
            if used + size <= budget:
                chosen.append((layer, kind))
                used += size
        sets.append(chosen or [order[0]])
    return sets
