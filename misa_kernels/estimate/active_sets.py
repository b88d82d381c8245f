"""MISA's active sets: an exact one read from module names, the greedy worst case of
Algorithm 2's selection, and sets drawn by Algorithm 2 for the expected case."""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Union

from .activations import LayerSpec, _layer, _Run
from .shapes import HF_NAMES, KINDS, _KIND_OF_NAME, ModelShape, module_numel

ModuleRef = Union[str, tuple[int, str]]


def _parse_module(ref: ModuleRef, layers: int) -> tuple[int, str]:
    """``"model.layers.3.mlp.down_proj"``, ``"3.down_proj"`` or ``(3, "down")`` -> ``(3, "down")``."""
    if isinstance(ref, tuple):
        layer, kind = ref
        kind = _KIND_OF_NAME.get(kind, kind)
    else:
        match = re.search(r"(?:^|\.)(\d+)\.(?:.*\.)?([a-z_]+)$", str(ref))
        if match is None or match.group(2) not in _KIND_OF_NAME:
            raise ValueError(f"active_modules: cannot read a layer and one of {tuple(HF_NAMES.values())} "
                             f"from {ref!r}")
        layer, kind = int(match.group(1)), _KIND_OF_NAME[match.group(2)]
    if kind not in KINDS or not 0 <= int(layer) < layers:
        raise ValueError(f"active_modules: {ref!r} is not a module of a {layers}-layer model")
    return int(layer), kind


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
    ``base`` (trained in every block regardless: MISA pretrain's norms) in each."""
    shape = run.shape
    numel = {k: module_numel(shape, k) for k in KINDS}
    extra: dict[frozenset, int] = {}

    def layer_bytes(kinds: frozenset) -> int:
        if kinds not in extra:
            extra[kinds] = _layer(run, LayerSpec(trainable=kinds | base), True)[0]
        return extra[kinds]

    def gain(pattern: frozenset, kind: str) -> int:
        return layer_bytes(pattern | {kind}) - layer_bytes(pattern) + cost.per_param * numel[kind]

    patterns: Counter = Counter({frozenset(): shape.layers})
    remaining = budget
    while True:
        options = [(gain(p, k) / numel[k], gain(p, k), p, k) for p in patterns if patterns[p]
                   for k in KINDS if k not in p and numel[k] <= remaining]
        if not options:
            break
        _, _, pattern, kind = max(options, key=lambda o: (o[0], o[1], o[3]))
        patterns[pattern] -= 1
        patterns[pattern | {kind}] += 1
        remaining -= numel[kind]
    if sum(patterns.values()) == patterns[frozenset()]:  # nothing fits: the first drawn trains alone
        kind = max(KINDS, key=lambda k: (gain(frozenset(), k), k))
        return [(0, kind)]
    active, layer = [], 0
    for pattern, count in sorted(patterns.items(), key=lambda pc: sorted(pc[0])):
        for _ in range(count):
            active += [(layer, k) for k in sorted(pattern)]
            layer += 1
    return active


def _drawn_active_sets(shape: ModelShape, budget: float, draws: int, seed: int) -> list[list[tuple[int, str]]]:
    """Active sets drawn by Algorithm 2 with uniform probabilities: modules in random order,
    each kept if it still fits; the first drawn alone when none fits."""
    modules = [(l, k) for l in range(shape.layers) for k in KINDS]
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
