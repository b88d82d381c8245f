"""Distributed checkpoints (``torch.distributed.checkpoint``) of a MISA run.

Saving is torch's, unchanged::

    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)

Loading needs one step first. Only the active modules hold optimizer states (that is the
memory MISA saves), so which parameters have states depends on the draw, and a fresh
optimizer has drawn another set: ``dcp.load`` fills a template of the fresh optimizer's
layout, and torch's ``set_optimizer_state_dict`` keeps the states of parameters that
require grad only. :func:`prepare_to_load` reads the ``"misa"`` entry from the checkpoint
and gives the optimizer the saved active set first::

    prepare_to_load(model, opt, checkpoint_id=path)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"]); set_optimizer_state_dict(model, opt, state["optim"])

For an optimizer state dict in memory (``torch.load`` of ``get_optimizer_state_dict``'s
output), :func:`set_optimizer_state_dict` does both steps.
"""
from __future__ import annotations

from typing import Any, Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import state_dict as dsd

from ..optim import checkpoint
from ..optim.misa import MISA


def prepare_to_load(model: nn.Module, opt: MISA, checkpoint_id: Any = None, *, storage_reader: Any = None,
                    key: str = "optim") -> None:
    """Read the ``"misa"`` entry of the optimizer saved under ``key`` and give ``opt`` its
    active set and state layout, so that ``get_optimizer_state_dict(model, opt)`` is the
    template ``dcp.load`` needs. Collective: call it on every rank."""
    template = {key: {"param_groups": [{"misa": checkpoint.misa_entry(opt)}]}}
    dcp.load(template, checkpoint_id=checkpoint_id, storage_reader=storage_reader)
    checkpoint.adopt(opt, template[key]["param_groups"][0]["misa"])


def set_optimizer_state_dict(model: nn.Module, opt: MISA, optim_state_dict: dict, *,
                             options: Optional[dsd.StateDictOptions] = None) -> None:
    """torch's ``set_optimizer_state_dict`` after giving ``opt`` the saved active set. With
    ``broadcast_from_rank0`` only rank 0 needs ``optim_state_dict``."""
    groups = optim_state_dict.get("param_groups")
    misa = groups[0].get("misa") if groups else None
    if options is not None and options.broadcast_from_rank0 and dist.is_initialized():
        box = [misa]
        dist.broadcast_object_list(box, src=0)
        misa = box[0]
    if misa is None:
        raise ValueError("optim_state_dict: it has no 'misa' entry in its first param group (scores, sampler, "
                         "active set); StateDictOptions(flatten_optimizer_state_dict=True) is not supported")
    checkpoint.adopt(opt, misa)
    dsd.set_optimizer_state_dict(model, opt, optim_state_dict, options=options)
