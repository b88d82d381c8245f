"""Distributed checkpoints of MISA: ``torch.distributed.checkpoint.state_dict``'s
get/set_optimizer_state_dict and ``dcp.save``/``dcp.load``, in one process and on two gloo
ranks (DDP, FSDP2; saved in one spawn, loaded in fresh processes). Every resume is saved
mid inner loop and must continue bit-identically to the uninterrupted run."""
from __future__ import annotations

import copy
import faulthandler
import gc
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, _init_optim_state, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import misa_kernels as mk
from conftest import random_batch, tiny_llama
from misa_kernels.distributed import DTensor
from misa_kernels.integrations import dcp as misa_dcp

ARGS = dict(lr=3e-3, delta=0.2, inner_steps=4, sweep=False, backend="torch")
SAVE_AT, MORE = 6, 7  # T=4: saved at inner step 2 of the second loop, resumed across a switch
WORLD, PER_RANK, TIMEOUT_S = 2, 2, 300
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _train(model, opt, start: int, steps: int, rank: int = 0, world: int = 1) -> list[tuple[str, ...]]:
    active = []
    for step in range(start, start + steps):
        active.append(tuple(opt.active_modules))
        batch = random_batch(batch=world * PER_RANK, seq=12, seed=step)
        model(**{k: v[rank * PER_RANK:(rank + 1) * PER_RANK] for k, v in batch.items()}).loss.backward()
        opt.step()
        opt.zero_grad()
    return active


def _full(model) -> list[torch.Tensor]:
    return [p.full_tensor() if isinstance(p, DTensor) else p.detach().clone() for p in model.parameters()]


def _saved_run(**args):
    """A run stopped mid inner loop: model, optimizer and a deep copy of both state dicts."""
    model = tiny_llama()
    opt = mk.MISA(model, **{**ARGS, **args})
    _train(model, opt, 0, SAVE_AT)
    assert opt.inner_step == SAVE_AT % ARGS["inner_steps"]
    return model, opt, copy.deepcopy(model.state_dict()), copy.deepcopy(get_optimizer_state_dict(model, opt))


def _fresh(model_state: dict, **args):
    model = tiny_llama(seed=1)  # other weights and, through them, nothing shared with the saved run
    model.load_state_dict(model_state)
    return model, mk.MISA(model, **{**ARGS, **args})


def _assert_same_continuation(model, opt, resumed, opt2) -> None:
    misa, misa2 = opt.state_dict()["misa"], opt2.state_dict()["misa"]
    assert misa2["active_units"] == misa["active_units"] and misa2["inner_step"] == misa["inner_step"]
    assert torch.equal(misa2["rng"], misa["rng"]) and torch.equal(misa2["scores"]["ema"], misa["scores"]["ema"])
    assert _train(resumed, opt2, SAVE_AT, MORE) == _train(model, opt, SAVE_AT, MORE)
    for p, ref in zip(resumed.parameters(), model.parameters()):
        assert torch.equal(p, ref)


def test_torch_fake_step_never_runs_on_misa():
    # _init_optim_state calls step() with zero grads on an optimizer without state; MISA
    # always holds the states of its first draw, so it returns at once.
    model = tiny_llama()
    opt = mk.MISA(model, **ARGS)
    before = _full(model)
    _init_optim_state(opt)
    assert opt.state and opt.inner_step == 0 and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(_full(model), before))


@pytest.mark.parametrize("args", [{}, {"mode": "pretrain"}, {"keep_states": True}])
def test_get_and_set_optimizer_state_dict_resume_exactly(args):
    model, opt, model_state, osd = _saved_run(**args)
    assert "misa" in osd["param_groups"][0] and all(isinstance(k, str) for k in osd["state"])
    resumed, opt2 = _fresh(model_state, **args)
    assert opt2.active_modules != opt.active_modules  # the fresh draw differs: adopting it matters
    misa_dcp.set_optimizer_state_dict(resumed, opt2, osd)
    _assert_same_continuation(model, opt, resumed, opt2)


def test_torch_set_alone_loses_the_states_of_the_saved_active_set():
    model, opt, model_state, osd = _saved_run()
    resumed, opt2 = _fresh(model_state)
    with pytest.raises(RuntimeError, match="Missing optimizer state for parameter"):  # torch's, strict
        set_optimizer_state_dict(resumed, opt2, copy.deepcopy(osd))
    with pytest.raises(ValueError, match="no optimizer state for .*misa_kernels.integrations.dcp"):
        set_optimizer_state_dict(resumed, opt2, osd, options=StateDictOptions(strict=False))


def test_a_flattened_optimizer_state_dict_is_refused():
    model = tiny_llama(dtype=torch.bfloat16)  # fp32 weights have master None, which torch cannot flatten
    opt = mk.MISA(model, **ARGS)
    flat = get_optimizer_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
    fresh = tiny_llama(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"flatten_optimizer_state_dict=True\) is not supported"):
        misa_dcp.set_optimizer_state_dict(fresh, mk.MISA(fresh, **ARGS), flat)


def _dcp_state(model, opt) -> dict:
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}


def _dcp_load(model, opt, path) -> None:
    misa_dcp.prepare_to_load(model, opt, checkpoint_id=path)
    state = _dcp_state(model, opt)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])


def test_dcp_save_and_load_resume_exactly(tmp_path):
    model, opt, _, _ = _saved_run(keep_states=True)  # kept states of frozen modules travel too
    dcp.save(_dcp_state(model, opt), checkpoint_id=tmp_path)
    naive = tiny_llama(seed=1)
    naive_opt = mk.MISA(naive, **ARGS, keep_states=True)
    state = _dcp_state(naive, naive_opt)  # the fresh draw's layout: the first loop's, kept in the checkpoint
    dcp.load(state, checkpoint_id=tmp_path)  # so it loads, without the saved active set's states
    with pytest.raises(ValueError, match="no optimizer state for .*prepare_to_load"):
        set_optimizer_state_dict(naive, naive_opt, state["optim"])
    resumed = tiny_llama(seed=1)
    opt2 = mk.MISA(resumed, **ARGS, keep_states=True)
    _dcp_load(resumed, opt2, tmp_path)
    _assert_same_continuation(model, opt, resumed, opt2)


# ---------------------------------------------------------------- two gloo ranks
def _build(variant: str, seed: int):
    model = tiny_llama(seed=seed)
    if variant == "ddp":
        opt = mk.MISA(model, **ARGS)
        return DDP(model), opt
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model, mk.MISA(model, **ARGS)


def _save_rank(rank: int, variant: str, out: Path) -> dict:
    model, opt = _build(variant, seed=0)
    _train(model, opt, 0, SAVE_AT, rank, WORLD)
    dcp.save(_dcp_state(model, opt), checkpoint_id=out / "sharded")
    if variant == "fsdp2":  # a full, CPU-offloaded copy on rank 0 only
        full = {"model": get_model_state_dict(model, options=FULL), "optim": get_optimizer_state_dict(model, opt,
                                                                                                       options=FULL)}
        if rank == 0:
            torch.save(full, out / "full.pt")
    active = _train(model, opt, SAVE_AT, MORE, rank, WORLD)  # the uninterrupted run
    return {"active": active, "params": _full(model)}


def _load_rank(rank: int, variant: str, out: Path) -> dict:
    results = {}
    model, opt = _build(variant, seed=1)
    _dcp_load(model, opt, out / "sharded")
    results["sharded"] = {"active": _train(model, opt, SAVE_AT, MORE, rank, WORLD), "params": _full(model)}
    if variant == "fsdp2":
        model, opt = _build(variant, seed=1)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        full = torch.load(out / "full.pt", weights_only=False) if rank == 0 else {"model": {}, "optim": {}}
        set_model_state_dict(model, full["model"], options=options)
        misa_dcp.set_optimizer_state_dict(model, opt, full["optim"], options=options)
        results["full"] = {"active": _train(model, opt, SAVE_AT, MORE, rank, WORLD), "params": _full(model)}
    return results


def _worker(rank: int, phase: str, variant: str, out: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(60, file=open(os.path.join(out, f"stacks{phase}{rank}.txt"), "w"))
    dist.init_process_group("gloo", init_method=f"file://{out}/init{phase}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=TIMEOUT_S // 2))
    try:
        result = (_save_rank if phase == "save" else _load_rank)(rank, variant, Path(out))
        result["error"] = None
    except Exception as err:  # reported to the parent, which asserts on it
        result = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
    torch.save(result, os.path.join(out, f"{phase}{rank}.pt"))
    gc.collect()  # a DDP reducer outliving its process group can hang the exit
    dist.destroy_process_group()


def _spawn(tmp_path: Path, phase: str, variant: str) -> list[dict]:
    context = mp.spawn(_worker, args=(phase, variant, str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{variant} {phase}: the ranks did not finish within {TIMEOUT_S} s")
    results = [torch.load(tmp_path / f"{phase}{r}.pt", weights_only=False) for r in range(WORLD)]
    for result in results:
        assert result["error"] is None, result.get("trace")
    return results


@pytest.mark.distributed
@pytest.mark.parametrize("variant", ["ddp", "fsdp2"])
def test_two_ranks_resume_from_a_distributed_checkpoint_exactly(tmp_path, variant):
    reference = _spawn(tmp_path, "save", variant)[0]
    loaded = _spawn(tmp_path, "load", variant)
    assert len(set(reference["active"])) > 1  # the resumed steps cross a switch
    for result in loaded:
        for how in ("sharded", "full") if variant == "fsdp2" else ("sharded",):
            assert result[how]["active"] == reference["active"], how
            for p, ref in zip(result[how]["params"], reference["params"]):
                assert torch.equal(p, ref), how
