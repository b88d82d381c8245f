"""MISA on FSDP2 (``fully_shard``) parameters in one process (a gloo group of one rank):
the DTensor paths, without spawning. Two ranks: tests/test_distributed.py (-m distributed)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import misa_kernels as mk
from conftest import assert_runs_agree, random_batch, tiny_llama
from misa_kernels.distributed import DTensor, is_fsdp2

ARGS = dict(lr=3e-3, delta=0.2, inner_steps=3, backend="torch")


def _shard(model: nn.Module, root: bool = True, **options) -> nn.Module:
    """``fully_shard`` each decoder layer, then (``root``) the whole model."""
    for layer in model.model.layers:
        fully_shard(layer, **options)
    return fully_shard(model, **options) if root else model


def _train(model, opt, steps: int, clip: bool = False) -> list[tuple[str, ...]]:
    active = []
    for step in range(steps):
        active.append(tuple(opt.active_modules))
        model(**random_batch(seed=step)).loss.backward()
        if clip:
            opt.clip_grad_norm_(0.05)
        opt.step()
        opt.zero_grad()
    return active


def _full(param: nn.Parameter) -> torch.Tensor:
    return param.full_tensor() if isinstance(param, DTensor) else param.detach()


@pytest.mark.parametrize("clip, mode", [(False, "finetune"), (True, "finetune"), (True, "pretrain")])
def test_sharded_model_trains_like_the_plain_one(one_rank, clip, mode):
    plain = tiny_llama()
    reference = _train(plain, mk.MISA(plain, mode=mode, **ARGS), 15, clip)
    sharded = _shard(tiny_llama())
    opt = mk.MISA(sharded, mode=mode, **ARGS)
    assert isinstance(next(sharded.parameters()), DTensor)
    assert _train(sharded, opt, 15, clip) == reference
    assert len(set(reference)) > 3
    assert_runs_agree([_full(p) for p in sharded.parameters()], plain.parameters(), ARGS["lr"])
    trained = {id(p) for name in opt.active_modules for p in sharded.get_submodule(name).parameters()}
    dense = {id(p) for p in opt._dense.params}
    for param, state in opt.state.items():  # moments of the active modules only, shaped as the shard
        if state:
            assert id(param) in trained | dense and state["exp_avg"].shape == param.to_local().shape


@pytest.mark.filterwarnings("ignore:delta=0.015 allows")  # one unit at a time is the point here
def test_groups_frozen_at_the_first_forward_train_later_in_bf16(one_rank):
    # FSDP2 fixes a group's compute dtypes at the first forward from its parameters that
    # require grad; MISA initialises it before freezing, or a group holding no active
    # module then fails once one of its modules is drawn.
    policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32)
    model = _shard(tiny_llama(layers=4), mp_policy=policy)
    initial = {name: _full(p).clone() for name, p in model.named_parameters()}
    opt = mk.MISA(model, **{**ARGS, "delta": 0.015, "inner_steps": 1})
    first = {name.split(".")[2] for name in opt.active_modules if name.startswith("model.layers.")}
    assert len(first) <= 1  # the other layers' groups hold nothing that trains at the first forward
    drawn = {name for active in _train(model, opt, 12) for name in active}
    assert {name.split(".")[2] for name in drawn if name.startswith("model.layers.")} == {"0", "1", "2", "3"}
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[0] in drawn:
            assert not torch.equal(_full(param), initial[name]), name


def test_sparse_backward_is_refused_on_a_sharded_model(one_rank):
    with pytest.raises(ValueError, match="sparse_backward"):
        mk.MISA(_shard(tiny_llama()), sparse_backward=True, **ARGS)


def test_sharded_layers_without_a_sharded_root_are_refused(one_rank):
    # Each layer would be its own root, left unsharded between steps, where the
    # requires_grad MISA sets on the sharded parameters does not reach.
    with pytest.raises(NotImplementedError, match="fully_shard\\(model\\) on the root"):
        mk.MISA(_shard(tiny_llama(), root=False), **ARGS)


def test_a_two_dimensional_mesh_is_refused(one_rank):
    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("replicate", "shard"))
    with pytest.raises(NotImplementedError, match="2-D"):
        mk.MISA(_shard(tiny_llama(), mesh=mesh), **ARGS)


def test_dtensors_outside_fsdp2_are_refused(one_rank):
    from torch.distributed.tensor import Replicate, distribute_tensor

    model = tiny_llama()
    assert not is_fsdp2(model)
    mesh = init_device_mesh("cpu", (1,))
    head = model.lm_head
    head.weight = nn.Parameter(distribute_tensor(head.weight.detach(), mesh, [Replicate()]))
    with pytest.raises(NotImplementedError, match="lm_head.weight is a DTensor outside FSDP2"):
        is_fsdp2(model)


def test_state_dict_resumes_a_sharded_run_exactly(one_rank):
    model = _shard(tiny_llama())
    opt = mk.MISA(model, **ARGS)
    _train(model, opt, 7)  # mid outer iteration: moments of the active shards are live
    saved_model = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())  # like torch's, it references the live states
    expected = _train(model, opt, 6)

    resumed = tiny_llama()
    resumed.load_state_dict(saved_model)
    resumed = _shard(resumed)
    opt2 = mk.MISA(resumed, **ARGS)
    opt2.load_state_dict(saved_opt)
    assert _train(resumed, opt2, 6) == expected
    for p, ref in zip(resumed.parameters(), model.parameters()):
        assert torch.equal(_full(p), _full(ref))


def test_a_state_dict_of_another_sharding_is_refused(one_rank):
    plain = tiny_llama()
    opt = mk.MISA(plain, sweep=False, **ARGS)
    _train(plain, opt, 2)  # within the first outer iteration: the active modules hold moments
    saved = opt.state_dict()
    index, state = next((i, st) for i, st in saved["state"].items() if st)
    state["exp_avg"] = state["exp_avg"][: len(state["exp_avg"]) // 2]  # as one of two ranks' shards
    with pytest.raises(ValueError, match=f"moments of parameter {index} have shape"):
        mk.MISA(tiny_llama(), sweep=False, **ARGS).load_state_dict(saved)


@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_an_empty_shard_has_norm_zero_on_its_rank(norm_type):
    from misa_kernels.optim.clipping import tensor_norm as _norm

    # With fewer rows than ranks a shard is empty; its rank must still join the collective.
    assert _norm(torch.empty(0, 8), norm_type) == 0
    grad = torch.randn(3, 5)[:, ::2]  # non-contiguous
    assert _norm(grad, norm_type) == torch.linalg.vector_norm(grad, norm_type)


def test_fused_experts_under_fsdp2_are_refused(one_rank):
    from arch_configs import tiny_causal_lm
    model = _shard(tiny_causal_lm("mixtral"))
    with pytest.raises(ValueError, match="FSDP2-sharded fused experts"):
        mk.MISA(model, **ARGS)
    opt = mk.MISA(model, module_filter=lambda name, m: name.endswith("self_attn.q_proj"), **ARGS)  # no experts
    assert all("experts" not in n for n in opt.active_modules)
