"""Keeping gradients alive under reentrant gradient checkpointing.

A reentrant checkpoint (``torch.utils.checkpoint(..., use_reentrant=True)``) computes
parameter gradients only when one of its *inputs* requires grad. With frozen embeddings
and frozen lower blocks, the hidden states entering the lowest active block do not, and
its weights would silently get no gradient. Hugging Face works around it by making the
embedding output require grad, which costs input gradients through every frozen lower
block. Here only the input of a block that holds an active module is marked, so the
frozen blocks below it still skip their backward.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def _uses_reentrant_checkpoint(block: nn.Module) -> bool:
    if not (getattr(block, "gradient_checkpointing", False) and block.training):
        return False
    func = getattr(block, "_gradient_checkpointing_func", None)
    keywords = getattr(func, "keywords", None) or {}
    return keywords.get("use_reentrant", True) is not False


def _mark_input(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if args and isinstance(args[0], torch.Tensor):
        first = args[0]
        if first.is_floating_point() and not first.requires_grad:
            args = (first.detach().requires_grad_(),) + args[1:]
    return args, kwargs


def attach_input_grad_hooks(
    blocks: nn.ModuleList, block_is_active: Callable[[int], bool]
) -> list[RemovableHandle]:
    """Forward pre-hooks making an active block's hidden-state input require grad when the
    block is under reentrant checkpointing and grad mode is on."""

    def make_hook(index: int) -> Callable[..., Any]:
        def hook(block: nn.Module, args: tuple, kwargs: dict):
            # the active set is read last, so torch.compile does not guard on it without checkpointing
            if torch.is_grad_enabled() and _uses_reentrant_checkpoint(block) and block_is_active(index):
                return _mark_input(args, kwargs)
            return None

        return hook

    return [
        block.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, block in enumerate(blocks)
    ]
