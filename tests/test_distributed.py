"""MISA under torch.distributed: two CPU processes on gloo (no wrapper, DDP built before or
after MISA, FSDP2, the HF Trainer) against one process on the same global batch, and a
one-process group for what needs no second rank. ``-m distributed`` selects the spawning tests."""
from __future__ import annotations

import contextlib
import faulthandler
import gc
import os
import socket
import time
import traceback
from typing import Optional
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from misa_kernels.distributed import DTensor

import misa_kernels as mk
from arch_configs import ARCHITECTURES
from conftest import VOCAB, count_calls, enable_checkpointing, random_batch, tiny_llama

WORLD, STEPS, PER_RANK = 2, 50, 2
# Routing is discontinuous: in fp32 another summation order flips a token's experts after a
# few steps and the runs part (by 1-10% of the update, depending on the CPU), so the MoE
# variants train in fp64, where that rounding is far below any router margin, for fewer steps.
MOE_STEPS = 15
SAVE_AT = 7  # the HF Trainer's checkpoint: 2 steps into MISA's second inner loop (T=5)
TIMEOUT_S = 480  # a rank stuck in a collective fails the test instead of hanging CI
STACK_DUMP_S = 60
LAUNCHED = ("hf_trainer", "accelerate")  # variants whose process group Accelerate starts
MISA_ARGS = dict(lr=3e-3, delta=0.2, inner_steps=5, backend="torch")


def _global_batch(step: int) -> dict:
    return random_batch(batch=WORLD * PER_RANK, seq=12, seed=step)


def _shard(batch: dict, rank: int) -> dict:
    return {k: v[rank * PER_RANK:(rank + 1) * PER_RANK] for k, v in batch.items()}


def _train(model, opt, batches, clip: str = "", micro: int = 1) -> list[tuple[str, ...]]:
    active = []
    for batch in batches:
        active.append(tuple(opt.active_modules))
        for part in range(micro):  # gradient accumulation over equal slices, DDP's no_sync but the last
            size = len(batch["input_ids"]) // micro
            last = part == micro - 1
            with model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext():
                (model(**{k: v[part * size:(part + 1) * size] for k, v in batch.items()}).loss / micro).backward()
        if clip == "misa":
            opt.clip_grad_norm_(0.5)
        elif clip == "torch":  # sees the gradients MISA averaged at the end of backward
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
    return active


def _model(variant: str) -> torch.nn.Module:
    """A tiny LLaMA, or for ``moe_*`` variants a tiny Mixtral (its experts sliced into units)."""
    torch.manual_seed(0)
    if not variant.startswith("moe"):
        return tiny_llama()
    from transformers import AutoModelForCausalLM
    config = ARCHITECTURES["mixtral"]()
    config.vocab_size = VOCAB
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").double()


def _steps(variant: str) -> int:
    return MOE_STEPS if variant.startswith("moe") else STEPS


def _train_rank(rank: int, variant: str) -> dict:
    model = _model(variant)
    seed = rank if variant == "different_seeds" else 0
    if variant == "ddp_before_misa":
        wrapped = DDP(model, find_unused_parameters=True)
        opt = mk.MISA(wrapped.module, seed=seed, **MISA_ARGS)
    elif variant in ("ddp_after_misa", "trainer_like", "moe_ddp_after_misa"):  # the HF Trainer's order
        opt = mk.MISA(model, seed=seed, **MISA_ARGS)
        wrapped = DDP(model)
    elif variant.startswith("fsdp2"):
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        wrapped, opt = model, mk.MISA(model, seed=seed, **MISA_ARGS)
    else:
        enable_checkpointing(model, reentrant=True if variant == "reentrant_checkpointing" else None)
        wrapped, opt = model, mk.MISA(model, seed=seed, **MISA_ARGS)
    reductions = [0]
    if isinstance(wrapped, DDP):  # counts the buckets DDP's own reducer all-reduces
        wrapped.register_comm_hook(reductions, _counting_allreduce)
    batches = [_shard(_global_batch(step), rank) for step in range(_steps(variant))]
    averages = count_calls(mk.distributed.collectives, "average_")
    active = _train(wrapped, opt, batches, _clipping(variant), micro=2 if variant == "trainer_like" else 1)
    params = [p.full_tensor() if isinstance(p, DTensor) else p.detach().clone() for p in model.parameters()]
    return {"active": active, "params": params, "states": _state_layout(opt), "averages": averages[0],
            "ddp_reductions": reductions[0], "error": None}


def _counting_allreduce(count: list[int], bucket):
    count[0] += 1
    return allreduce_hook(None, bucket)


def _state_layout(opt: mk.MISA) -> list[tuple[bool, bool]]:
    """(belongs to an active module, shaped as this rank's shard) for every state held."""
    active = {id(p) for p in opt.param_groups[0]["params"] if p.requires_grad}
    return [(id(p) in active, s["exp_avg"].shape == _local(p).shape) for p, s in opt.state.items() if s]


def _train_with_accelerate(rank: int) -> dict:
    """MISA built before ``Accelerator.prepare`` wraps the model in DDP and the optimizer."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = tiny_llama()
    misa = mk.MISA(model, seed=0, **MISA_ARGS)
    accelerator = Accelerator(cpu=True)
    wrapped, opt = accelerator.prepare(model, misa)
    reductions, averages = [0], count_calls(mk.distributed.collectives, "average_")
    wrapped.register_comm_hook(reductions, _counting_allreduce)
    active = []
    for step in range(STEPS):
        active.append(tuple(misa.active_modules))
        accelerator.backward(wrapped(**_shard(_global_batch(step), rank)).loss)
        accelerator.clip_grad_norm_(wrapped.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
    return {"active": active, "params": [p.detach().clone() for p in model.parameters()],
            "states": _state_layout(misa), "averages": averages[0], "ddp_reductions": reductions[0], "error": None}


def _train_with_hf_trainer(out: str, batch: int, resume_from: Optional[str] = None, resume_test: bool = False) -> dict:
    """MISA built before the Trainer (which starts the process group and wraps DDP); with
    ``resume_from``, a checkpoint of the Trainer's own (its weights replace the others)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(0)
    model = tiny_llama(seed=0 if resume_from is None else 1)
    opt = mk.MISA(model, seed=0, **MISA_ARGS)
    active = []

    class Recorder(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            active.append(tuple(opt.active_modules))

    rows = _global_batch(0)["input_ids"]
    # On resume under DDP the Trainer feeds other rows than the first run did (also with
    # torch's AdamW: 5e-3 apart in the first loss after resuming), so the resume test
    # trains on copies of one row, where the order of rows cannot matter.
    rows = rows[:1].repeat(8, 1) if resume_test else rows.repeat(2, 1)
    data = [{"input_ids": ids, "labels": ids.clone()} for ids in rows]
    args = TrainingArguments(output_dir=out, max_steps=12, per_device_train_batch_size=batch, use_cpu=True,
                             ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None, report_to=[],
                             save_strategy="steps", save_steps=SAVE_AT, logging_steps=1, seed=0, disable_tqdm=True,
                             max_grad_norm=0.5)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None), callbacks=[Recorder()])
    trainer.train(resume_from_checkpoint=resume_from)
    return {"active": active, "params": [p.detach().clone() for p in model.parameters()],
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], "error": None}


def _clipping(variant: str) -> str:
    clipping = {"clip": "misa", "torch_clip": "torch", "trainer_like": "torch", "accelerate": "torch",
                "fsdp2_clip": "misa"}
    return clipping.get(variant, "")


def _local(param):
    return param.to_local() if isinstance(param, DTensor) else param


def _worker(rank: int, variant: str, out: str, rendezvous: str) -> None:
    """``rendezvous``: a FileStore path, or for the Trainer a free TCP port."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback: no interface or hostname lookup to stall on
    torch.set_num_threads(1)  # two ranks on a 2-core CI machine
    stacks = open(os.path.join(out, f"stacks{rank}.txt"), "w")
    faulthandler.dump_traceback_later(STACK_DUMP_S, file=stacks)  # where a stuck rank waits
    if variant in LAUNCHED:  # Accelerate starts the group from torchrun's variables
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                          LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=rendezvous)
    else:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=TIMEOUT_S // 2))
    try:
        if variant == "hf_trainer":
            result = _train_with_hf_trainer(out, PER_RANK)
        elif variant == "hf_trainer_save":
            result = _train_with_hf_trainer(out, PER_RANK, resume_test=True)
        elif variant == "hf_trainer_resume":  # fresh processes, from the first run's checkpoint
            checkpoint = os.path.join(os.path.dirname(out), "first", f"checkpoint-{SAVE_AT}")
            result = _train_with_hf_trainer(out, PER_RANK, resume_from=checkpoint, resume_test=True)
        else:
            result = _train_with_accelerate(rank) if variant == "accelerate" else _train_rank(rank, variant)
    except Exception as err:  # reported to the parent, which asserts on it
        result = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    # A DDP reducer destroyed after its process group can hang the exiting rank: the
    # training objects die with _train_rank, and anything cyclic goes here, first.
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def _run(tmp_path: Path, variant: str) -> list[dict]:
    rendezvous = _free_port() if variant in LAUNCHED else str(tmp_path / "init")
    context = mp.spawn(_worker, args=(variant, str(tmp_path), rendezvous), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            stacks = "\n".join((tmp_path / f"stacks{r}.txt").read_text() for r in range(WORLD))
            pytest.fail(f"{variant}: the ranks did not finish within {TIMEOUT_S} s; their stacks:\n{stacks}")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def _single_process(clip: str, variant: str = "") -> dict:
    model = _model(variant)
    opt = mk.MISA(model, seed=0, **MISA_ARGS)
    active = _train(model, opt, [_global_batch(step) for step in range(_steps(variant))], clip)
    return {"active": active, "params": list(model.parameters())}


@pytest.mark.distributed
@pytest.mark.parametrize("variant", [
    "no_wrapper", "ddp_before_misa", "ddp_after_misa", "clip", "torch_clip",
    "trainer_like",  # DDP after MISA, two micro-batches per step, torch's clipping
    "accelerate",  # Accelerator.prepare(model, MISA), accelerator.clip_grad_norm_
    "reentrant_checkpointing",
    "fsdp2", "fsdp2_clip",
    "moe_no_wrapper", "moe_ddp_after_misa",  # experts hit by the tokens of one rank only are averaged too
])
def test_two_ranks_train_like_one_process_on_the_global_batch(tmp_path, variant):
    ranks = _run(tmp_path, variant)
    for result in ranks:
        assert result["error"] is None, result.get("trace")
    reference = _single_process(_clipping(variant), variant)
    assert len(set(reference["active"])) > 3  # several switches happened
    for result in ranks:
        assert result["active"] == reference["active"]
    for result in ranks:
        # MISA's average: once per step (not inside no_sync, not per reentrant checkpoint,
        # not again in step()); none under FSDP2, which reduce-scatters. DDP's reducer: off.
        assert result["averages"] == (0 if variant.startswith("fsdp2") else _steps(variant))
        assert result["ddp_reductions"] == 0
    for result in ranks:  # moments for the active modules only, of this rank's shard under FSDP2
        assert result["states"] and all(active and local for active, local in result["states"])
    initial = list(_model(variant).parameters())
    for p0, p1, ref, init in zip(ranks[0]["params"], ranks[1]["params"], reference["params"], initial):
        assert torch.equal(p0, p1)  # ranks bit-identical
        # Adam's m / sqrt(v) amplifies the rounding of another summation order on tiny
        # gradients elementwise, so compare the whole training update instead (fp64: far less)
        update = (ref.detach() - init.detach()).norm()
        assert (p0 - ref.detach()).norm() <= (1e-2 if p0.dtype == torch.float32 else 1e-6) * update + 1e-7


@pytest.mark.distributed
def test_hf_trainer_on_two_ranks_trains_like_one_process(tmp_path):
    # Trainer order: MISA first, then the process group and the DDP wrapper; the Trainer
    # clips (max_grad_norm) between backward and step(), on the averaged gradients.
    ranks = _run(tmp_path, "hf_trainer")
    for result in ranks:
        assert result["error"] is None, result.get("trace")
    reference = _train_with_hf_trainer(str(tmp_path / "single"), WORLD * PER_RANK)
    assert len(set(reference["active"])) > 3
    initial = list(tiny_llama().parameters())
    for result in ranks:
        assert result["active"] == reference["active"]
        assert result["losses"] == pytest.approx(reference["losses"], rel=1e-4)
        for p, ref, init in zip(result["params"], reference["params"], initial):
            assert (p - ref).norm() <= 1e-2 * (ref - init.detach()).norm() + 1e-7


@pytest.mark.distributed
def test_hf_trainer_resume_on_two_ranks_is_bit_identical(tmp_path):
    """The Trainer's own checkpoint (saved at step 7 of 12, inside MISA's second inner loop),
    loaded by fresh processes into other weights, continues exactly as the first run."""
    (tmp_path / "first").mkdir()
    (tmp_path / "resumed").mkdir()
    first = _run(tmp_path / "first", "hf_trainer_save")
    assert (tmp_path / "first" / f"checkpoint-{SAVE_AT}" / "optimizer.pt").exists()
    resumed = _run(tmp_path / "resumed", "hf_trainer_resume")
    for a, b in zip(first, resumed):
        assert a["error"] is None and b["error"] is None, (a.get("trace"), b.get("trace"))
        assert len(set(a["active"][SAVE_AT:])) > 1, "no switch after the checkpoint"
        assert b["active"] == a["active"][SAVE_AT:]
        assert b["losses"] == a["losses"]  # the first half from trainer_state.json, the rest re-run
        for p, q in zip(a["params"], b["params"]):
            assert torch.equal(p, q)


@pytest.mark.distributed
def test_ranks_with_different_seeds_are_refused(tmp_path):
    ranks = _run(tmp_path, "different_seeds")
    for result in ranks:
        assert result["error"] is not None and "sampled different modules" in result["error"]


def test_a_ddp_wrapper_built_after_misa_follows_the_switches(one_rank):
    # DDP registers the then-active modules; without find_unused_parameters its reducer
    # would fail at the first step after a switch ("Expected to have finished reduction").
    plain = tiny_llama()
    reference = _train(plain, mk.MISA(plain, seed=0, **MISA_ARGS), [_global_batch(s) for s in range(12)])
    model = tiny_llama()
    opt = mk.MISA(model, seed=0, **MISA_ARGS)
    wrapped = DDP(model)
    assert _train(wrapped, opt, [_global_batch(s) for s in range(12)]) == reference
    for p, ref in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p, ref, rtol=1e-5, atol=1e-6)
    # switched off only while DDP prepares the backward: buffer broadcasting and no_sync unchanged
    assert wrapped.require_backward_grad_sync and wrapped.require_forward_param_sync


def test_ddp_join_is_refused(one_rank):
    model = tiny_llama()
    opt = mk.MISA(model, **MISA_ARGS)
    wrapped = DDP(model)
    with pytest.raises(RuntimeError, match="join"), wrapped.join():
        wrapped(**_global_batch(0))
    opt.detach()


def test_misa_given_the_ddp_wrapper_trains_the_module_inside(one_rank):
    plain = tiny_llama()
    reference = _train(plain, mk.MISA(plain, seed=0, **MISA_ARGS), [_global_batch(s) for s in range(12)])
    wrapped = DDP(tiny_llama())  # built before MISA: every parameter registered
    opt = mk.MISA(wrapped, seed=0, **MISA_ARGS)
    assert _train(wrapped, opt, [_global_batch(s) for s in range(12)]) == reference
    for p, ref in zip(wrapped.module.parameters(), plain.parameters()):
        torch.testing.assert_close(p, ref, rtol=1e-5, atol=1e-6)


def test_static_graph_ddp_is_refused(one_rank):
    model = tiny_llama()
    opt = mk.MISA(model, **MISA_ARGS)
    with pytest.raises(ValueError, match="static_graph"):
        DDP(model, static_graph=True)(**_global_batch(0))
    opt.detach()


def test_step_in_backward_is_refused_under_several_processes(monkeypatch):
    monkeypatch.setattr(mk.distributed.collectives, "world_size", lambda: 2)
    with pytest.raises(ValueError, match="step_in_backward=False under torch.distributed"):
        mk.MISA(tiny_llama(), step_in_backward=True, **MISA_ARGS)


@pytest.fixture
def averages(one_rank, monkeypatch) -> list[int]:
    """MISA treating the one-rank group as several processes; counts its averages."""
    monkeypatch.setattr(mk.distributed.GradSync, "averaging", property(lambda self: True))
    return count_calls(mk.distributed.collectives, "average_", monkeypatch.setattr)


def test_no_sync_is_followed_from_a_first_forward_without_backward(averages):
    model = tiny_llama()
    opt = mk.MISA(model, seed=0, **MISA_ARGS)
    wrapped = DDP(model)
    with torch.no_grad():  # the wrapper's first forward: its forward hooks did not run yet
        wrapped(**_global_batch(0))
    assert wrapped.require_backward_grad_sync and not wrapped.require_forward_param_sync  # as DDP leaves them
    for step in range(3):
        with wrapped.no_sync():
            wrapped(**_global_batch(step)).loss.backward()
        assert averages[0] == step
        wrapped(**_global_batch(step)).loss.backward()
        assert averages[0] == step + 1
        opt.step()
        opt.zero_grad()
    assert wrapped.require_backward_grad_sync and wrapped.require_forward_param_sync
    opt.detach()


def test_a_bare_forward_before_backward_does_not_change_what_it_syncs(averages):
    model = tiny_llama()
    opt = mk.MISA(model, seed=0, **MISA_ARGS)
    wrapped = DDP(model)
    with wrapped.no_sync():
        loss = wrapped(**_global_batch(0)).loss
        with torch.no_grad():
            model(**_global_batch(1))  # e.g. logging on one rank only
        loss.backward()
    assert averages[0] == 0
    opt.detach()


def test_a_step_without_gradients_on_any_rank_changes_nothing(averages):
    model = tiny_llama()
    opt = mk.MISA(model, seed=0, sweep=False, **MISA_ARGS)  # no switch (which frees states) at step 1
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert averages[0] == 1  # every rank averages the same (zero) gradients: no rank waits alone
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(float(s["step"]) == 0 and not s["exp_avg"].any() for s in opt.state.values())  # skipped
    assert opt.skipped_steps == 0  # no gradient is not a non-finite one: nothing to report
