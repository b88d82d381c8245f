"""MISA under torch.distributed: two CPU processes on gloo, with and without a DDP wrapper,
against one process on the same global batch."""
from __future__ import annotations

import os
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import misa_kernels as mk
from conftest import random_batch, tiny_llama

WORLD, STEPS, PER_RANK = 2, 50, 2
TIMEOUT_S = 480  # a rank stuck in a collective fails the test instead of hanging CI
MISA_ARGS = dict(lr=3e-3, delta=0.2, inner_steps=5, backend="torch")


def _global_batch(step: int) -> dict:
    return random_batch(batch=WORLD * PER_RANK, seq=12, seed=step)


def _shard(batch: dict, rank: int) -> dict:
    return {k: v[rank * PER_RANK:(rank + 1) * PER_RANK] for k, v in batch.items()}


def _train(model, opt, batches, clip: bool) -> list[tuple[str, ...]]:
    active = []
    for batch in batches:
        active.append(tuple(opt.active_modules))
        model(**batch).loss.backward()
        if clip:
            opt.clip_grad_norm_(0.5)
        opt.step()
        opt.zero_grad()
    return active


def _worker(rank: int, variant: str, out: str, init_file: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback: no interface or hostname lookup to stall on
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=TIMEOUT_S // 2))
        torch.manual_seed(0)
        model = tiny_llama()
        seed = rank if variant == "different_seeds" else 0
        if variant == "ddp_before_misa":
            wrapped = DDP(model, find_unused_parameters=True)
            opt = mk.MISA(wrapped.module, seed=seed, **MISA_ARGS)
        else:
            wrapped, opt = model, mk.MISA(model, seed=seed, **MISA_ARGS)
        batches = [_shard(_global_batch(step), rank) for step in range(STEPS)]
        active = _train(wrapped, opt, batches, clip=variant == "clip")
        result = {"active": active, "params": [p.detach().clone() for p in model.parameters()], "error": None}
    except Exception as err:  # reported to the parent, which asserts on it
        result = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.destroy_process_group()


def _run(tmp_path: Path, variant: str) -> list[dict]:
    context = mp.spawn(_worker, args=(variant, str(tmp_path), str(tmp_path / "init")), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{variant}: the ranks did not finish within {TIMEOUT_S} s")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def _single_process(clip: bool) -> dict:
    torch.manual_seed(0)
    model = tiny_llama()
    opt = mk.MISA(model, seed=0, **MISA_ARGS)
    active = _train(model, opt, [_global_batch(step) for step in range(STEPS)], clip)
    return {"active": active, "params": list(model.parameters())}


# These spawn processes and stall intermittently on this machine (about one run in five,
# cause not found yet), so they are opt-in: python -m pytest -m distributed tests.
# Not covered: DDP wrapping *after* MISA froze the modules (the HF Trainer's order). DDP then
# registers only the modules active at wrap time, and that run hung intermittently here.
@pytest.mark.distributed
@pytest.mark.parametrize("variant", ["no_wrapper", "ddp_before_misa", "clip"])
def test_two_ranks_train_like_one_process_on_the_global_batch(tmp_path, variant):
    ranks = _run(tmp_path, variant)
    for result in ranks:
        assert result["error"] is None, result.get("trace")
    reference = _single_process(clip=variant == "clip")
    assert len(set(reference["active"])) > 3  # several switches happened
    for result in ranks:
        assert result["active"] == reference["active"]
    initial = list(tiny_llama().parameters())
    for p0, p1, ref, init in zip(ranks[0]["params"], ranks[1]["params"], reference["params"], initial):
        assert torch.equal(p0, p1)  # ranks bit-identical
        # Adam's m / sqrt(v) amplifies the rounding of another summation order on tiny
        # gradients elementwise, so compare the whole training update instead.
        update = (ref.detach() - init.detach()).norm()
        assert (p0 - ref.detach()).norm() <= 1e-2 * update + 1e-7


@pytest.mark.distributed
def test_ranks_with_different_seeds_are_refused(tmp_path):
    ranks = _run(tmp_path, "different_seeds")
    for result in ranks:
        assert result["error"] is not None and "sampled different modules" in result["error"]


def test_fsdp2_sharded_models_are_refused_clearly(tmp_path):
    from torch.distributed.fsdp import fully_shard

    from misa_kernels.distributed import reject_sharded

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = tiny_llama()
        reject_sharded(model)  # a plain model passes
        fully_shard(model)
        with pytest.raises(NotImplementedError, match="FSDP-sharded"):
            reject_sharded(model)
    finally:
        dist.destroy_process_group()
