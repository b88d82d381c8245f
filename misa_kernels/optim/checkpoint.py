"""``MISA.state_dict`` / ``load_state_dict``: everything a resumed run needs to continue
bit-identically, gathered from the pieces that own it.

Layout: ``{"state": {param index: Adam state}, "param_groups": [...], "misa": {...}}`` with
torch's param indexing (the order of ``param_groups``), so LR schedulers, the HF Trainer and
``torch.save`` handle it as any optimizer's. The ``"misa"`` entry is also in the first param
group, because ``torch.distributed.checkpoint.state_dict`` keeps only ``state`` and
``param_groups``; under FSDP2 the states are ``DTensor``s of the parameter's sharding, so
DCP saves every rank's shard (and can gather or reshard them).

Only the active modules (and, with ``keep_states``, modules trained before) hold states,
and torch's ``set_optimizer_state_dict`` keeps the states of parameters that require grad
only: :func:`adopt` first gives a fresh optimizer the saved active set and states
(``misa_kernels.integrations.dcp`` calls it).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ..distributed import DTensor
from .sampler import Draw

if TYPE_CHECKING:
    from .misa import MISA

_SHARDED_KEYS = ("master", "exp_avg", "exp_avg_sq")  # shaped as the parameter's shard


def _params(opt: "MISA") -> list[nn.Parameter]:
    return [p for g in opt.param_groups for p in g["params"]]


def misa_entry(opt: "MISA") -> dict:
    """The MISA-specific part: scores, sampler (RNG included), active set, inner step, and
    which parameters hold a state (``held``, to detect states lost on the way)."""
    params = _params(opt)
    return dict(unit_names=[u.name for u in opt.units], active_units=list(opt._active.units),
                inner_step=opt._inner_step, inner_length=opt._inner_length, scores=opt._scores.state_dict(),
                dense_skipped=int(opt._dense.skipped), warned=sorted(opt._warned),
                held=[i for i, p in enumerate(params) if opt.state.get(p)], **opt._sampler.state_dict())


def _global(value: Any, param: nn.Parameter) -> Any:
    """A shard's state as a ``DTensor`` laid out as its FSDP2 parameter (a view, no copy)."""
    if not isinstance(param, DTensor) or not isinstance(value, Tensor) or isinstance(value, DTensor):
        return value
    return DTensor.from_local(value, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


def _local(value: Any, param: nn.Parameter, index: Any) -> Any:
    """This rank's shard of a saved ``DTensor`` state (it must be sharded as ``param``)."""
    if not isinstance(value, DTensor):
        return value
    if not isinstance(param, DTensor) or (value.device_mesh, value.placements) != (param.device_mesh,
                                                                                  param.placements):
        raise ValueError(f"state_dict: the state of parameter {index} is a DTensor sharded unlike the "
                         "parameter (load it through torch.distributed.checkpoint, which reshards)")
    return value.to_local()


def state_dict(opt: "MISA") -> dict:
    params = _params(opt)
    index = {p: i for i, p in enumerate(params)}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[p] for p in g["params"]]}
              for g in opt.param_groups]
    misa = misa_entry(opt)
    groups[0]["misa"] = misa  # the same object: torch.save and deepcopy store it once
    state = {i: {k: (_global(v, params[i]) if k in _SHARDED_KEYS else v) for k, v in entry.items()}
             for i, entry in opt._store.state_dict(index).items()}
    return {"state": state, "param_groups": groups, "misa": misa}


def _saved_misa(saved: dict) -> dict:
    misa = saved.get("misa") or saved["param_groups"][0].get("misa")
    if misa is None:
        raise ValueError("state_dict: it has no 'misa' entry (scores, sampler, active set); "
                         "StateDictOptions(flatten_optimizer_state_dict=True) drops it and is not supported")
    return misa


def _indexed_states(saved: dict, params: list[nn.Parameter], held: list[int]) -> dict[int, dict]:
    """``saved["state"]`` keyed by param index (torch's set_optimizer_state_dict keys it by
    name, in the order of the saved param groups), shards local."""
    order = [k for g in saved["param_groups"] for k in g["params"]]
    position = {k: i for i, k in enumerate(order)}
    states = {}
    for key, entry in saved["state"].items():
        i = int(position.get(key, key))
        states[i] = {k: _local(v, params[i], key) for k, v in entry.items()}
    missing = [order[i] for i in held if i not in states]
    if missing:
        raise ValueError(f"state_dict: no optimizer state for {missing[:3]} ({len(missing)} in all), which held "
                         "one when it was saved: torch.distributed.checkpoint.state_dict keeps the states of "
                         "parameters that require grad only; load with misa_kernels.integrations.dcp "
                         "(set_optimizer_state_dict, or prepare_to_load before dcp.load)")
    return states


def load_state_dict(opt: "MISA", saved: dict) -> None:
    misa = _saved_misa(saved)
    if misa["unit_names"] != [u.name for u in opt.units]:
        raise ValueError("state_dict: its modules do not match this optimizer's model")
    if [len(g["params"]) for g in saved["param_groups"]] != [len(g["params"]) for g in opt.param_groups]:
        raise ValueError("state_dict: its param groups do not match this optimizer's")
    params = _params(opt)
    states = _indexed_states(saved, params, misa.get("held", []))
    opt._store.check_shapes(states, params)
    # A state saved before step counts were kept per tensor takes the loop's count.
    default_steps = [misa["inner_step"] if g["role"] == "module" else misa.get("dense_step", 0)
                     for g in opt.param_groups for _ in g["params"]]
    for group, entry in zip(opt.param_groups, saved["param_groups"]):
        group.update({k: v for k, v in entry.items() if k not in ("params", "misa")})
    opt._deactivate()
    opt._backward.deactivate(opt._sets.params)  # what adopt() made require grad
    opt._store.load_state_dict(states, params, default_steps)
    opt._store.allocate(opt._dense.params)
    opt._activate(Draw(tuple(misa["active_units"]), misa["inner_length"]))
    opt._inner_step = misa["inner_step"]
    opt._sampler.load_state_dict(misa)
    opt._scores.load_state_dict(misa["scores"])
    opt._dense.skipped.fill_(misa["dense_skipped"])
    opt._warned = set(misa.get("warned", ()))  # an empty list does not survive broadcast_from_rank0


def adopt(opt: "MISA", misa: dict) -> None:
    """Give ``opt`` the saved active set and (zero) states for every parameter that held one,
    which then requires grad until :func:`load_state_dict`: torch's
    ``get_optimizer_state_dict`` then has the checkpoint's layout (the template ``dcp.load``
    fills) and its ``set_optimizer_state_dict`` keeps every state."""
    if misa["unit_names"] != [u.name for u in opt.units]:
        raise ValueError("state_dict: its modules do not match this optimizer's model")
    params = _params(opt)
    held = [params[i] for i in misa["held"]]
    opt._deactivate()
    opt._store.clear()
    opt._activate(Draw(tuple(misa["active_units"]), misa["inner_length"]))
    opt._store.allocate(held)
    opt._backward.activate(held)
