"""``MISA.state_dict`` / ``load_state_dict``: everything a resumed run needs to continue
bit-identically, gathered from the pieces that own it.

Layout: ``{"state": {param index: Adam state}, "param_groups": [...], "misa": {...}}`` with
torch's param indexing (the order of ``param_groups``), so LR schedulers, the HF Trainer and
``torch.save`` handle it as any optimizer's.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .sampler import Draw

if TYPE_CHECKING:
    from .misa import MISA


def state_dict(opt: "MISA") -> dict:
    index = {p: i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[p] for p in g["params"]]}
              for g in opt.param_groups]
    misa = dict(unit_names=[u.name for u in opt.units], active_units=list(opt._active.units),
                inner_step=opt._inner_step, inner_length=opt._inner_length, scores=opt._scores.state_dict(),
                dense_skipped=int(opt._dense.skipped), warned=sorted(opt._warned), **opt._sampler.state_dict())
    return {"state": opt._store.state_dict(index), "param_groups": groups, "misa": misa}


def load_state_dict(opt: "MISA", saved: dict) -> None:
    misa = saved["misa"]
    if misa["unit_names"] != [u.name for u in opt.units]:
        raise ValueError("state_dict: its modules do not match this optimizer's model")
    if [len(g["params"]) for g in saved["param_groups"]] != [len(g["params"]) for g in opt.param_groups]:
        raise ValueError("state_dict: its param groups do not match this optimizer's")
    params = [p for g in opt.param_groups for p in g["params"]]
    opt._store.check_shapes(saved["state"], params)
    # A state saved before step counts were kept per tensor takes the loop's count.
    default_steps = [misa["inner_step"] if g["role"] == "module" else misa.get("dense_step", 0)
                     for g in opt.param_groups for _ in g["params"]]
    for group, entry in zip(opt.param_groups, saved["param_groups"]):
        group.update({k: v for k, v in entry.items() if k != "params"})
    opt._deactivate()
    opt._store.load_state_dict(saved["state"], params, default_steps)
    opt._store.allocate(opt._dense.params)
    opt._activate(Draw(tuple(misa["active_units"]), misa["inner_length"]))
    opt._inner_step = misa["inner_step"]
    opt._sampler.load_state_dict(misa)
    opt._scores.load_state_dict(misa["scores"])
    opt._dense.skipped.fill_(misa["dense_skipped"])
    opt._warned = set(misa["warned"])
