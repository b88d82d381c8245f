"""The active sets of ``bench_fused_step.py``: the three families' tensor shapes (LLaMA-shaped
modules, whole modules with biases and norms, LoRA adapters) and the operands built from them.

Every set is a list of shapes; :func:`make_active_set` turns one into the weights, gradients,
fp32 masters and moments of a fused MISA step, :func:`active_sets` picks the sets a command
line asks for.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FAMILIES = ("llama", "many", "lora")
FAMILY_ALIASES = {"modules": "many"}
HIDDEN_7B, INTERMEDIATE_7B = 4096, 11008


def layer_shapes(hidden: int = HIDDEN_7B) -> list[tuple[int, int]]:
    """The weight shapes ``(out, in)`` of one LLaMA decoder layer of width ``hidden``: q, k,
    v, o, then gate, up, down (intermediate ``11008 / 4096`` times the width)."""
    inter = round(hidden * INTERMEDIATE_7B / HIDDEN_7B)
    return [(hidden, hidden)] * 4 + [(inter, hidden), (inter, hidden), (hidden, inter)]


# One LLaMA-7B decoder layer: q, k, v, o, then gate, up, down.
LAYER_SHAPES = layer_shapes(HIDDEN_7B)
HYPER = dict(lr=1e-5, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
STEP = 10  # any t >= 1: bias corrections are runtime scalars


@dataclass
class ActiveSet:
    """The operands of one fused step, one entry per module."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    masters: list[Optional[torch.Tensor]]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    skip: torch.Tensor

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


# ------------------------------------------------------------------------------ shapes
def active_set_shapes(n_params: int) -> list[tuple[int, ...]]:
    """Whole LLaMA-7B modules in layer order while they fit, then 4096-wide remainder pieces."""
    shapes, left = [], n_params
    for shape in itertools.cycle(LAYER_SHAPES):
        if shape[0] * shape[1] > left:
            break
        shapes.append(shape)
        left -= shape[0] * shape[1]
    if left >= 4096:
        shapes.append((left // 4096, 4096))
    if left % 4096:
        shapes.append((left % 4096,))
    return shapes


def module_set_shapes(n_modules: int, hidden: int = HIDDEN_7B) -> list[tuple[int, ...]]:
    """``n_modules`` whole modules of a LLaMA of width ``hidden`` in layer order, each followed
    by a vector of its output size (a bias), and the two norm weights (``hidden``) of every
    layer begun: ``2 n + 2 ceil(n / 7)`` tensors."""
    layer, shapes = layer_shapes(hidden), []
    for i in range(n_modules):
        if i % len(layer) == 0:
            shapes += [(hidden,), (hidden,)]  # input and post-attention RMSNorm weights
        weight = layer[i % len(layer)]
        shapes += [weight, (weight[0],)]
    return shapes


def lora_set_shapes(layers: int, rank: int = 16, hidden: int = HIDDEN_7B) -> list[tuple[int, ...]]:
    """LoRA adapters of every module of ``layers`` LLaMA layers: A ``(rank, in)`` and B
    ``(out, rank)`` per module, 14 tensors a layer."""
    shapes = []
    for _ in range(layers):
        for out_features, in_features in layer_shapes(hidden):
            shapes += [(rank, in_features), (out_features, rank)]
    return shapes


def active_sets(args) -> list[tuple[str, str, Optional[float], list]]:
    """``(family, label, size_m, shapes)`` of every set the arguments ask for."""
    sets = []
    for family in args.family:
        if family == "llama":
            sets += [("llama", f"{m:g}M", m, active_set_shapes(int(m * 1e6))) for m in args.sizes]
        elif family == "many":
            sets += [("many", f"{n} modules", None, module_set_shapes(n, args.hidden)) for n in args.modules]
        elif family == "lora":
            sets += [("lora", f"r{args.lora_rank} x {n} layers", None,
                      lora_set_shapes(n, args.lora_rank, args.hidden)) for n in args.lora_layers]
    return sets


# ------------------------------------------------------------------------------ operands
def make_active_set(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> ActiveSet:
    """Seeded operands of ``shapes``: ``dtype`` weights and gradients, with fp32 masters when
    ``dtype`` is not fp32, and fp32 moments (v non-negative, as Adam keeps it)."""
    low = dtype != torch.float32
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(shape, scale=1.0):
        return torch.randn(shape, generator=gen, device=device).mul_(scale)

    masters = [randn(s, 0.02) for s in shapes]
    return ActiveSet(
        params=[m.to(dtype) for m in masters] if low else masters,
        grads=[randn(s, 1e-3).to(dtype) for s in shapes],
        masters=masters if low else [None] * len(shapes),
        exp_avgs=[randn(s, 1e-4) for s in shapes],
        exp_avg_sqs=[randn(s, 1e-4).square_() for s in shapes],
        skip=torch.zeros(len(shapes), dtype=torch.bool, device=device),
    )


def make_step(kind: str, n: int, device: torch.device) -> Union[int, torch.Tensor]:
    """``STEP`` as one int, or as MISA passes it: a float32 device tensor of per-tensor counts."""
    if kind == "int":
        return STEP
    return torch.full((n,), float(STEP), dtype=torch.float32, device=device)
